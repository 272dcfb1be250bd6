"""The demo command end to end, as a user runs it (a subprocess of the installed `svc`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import soundfile as sf

from orchestration.cli import DEMO_SINGERS

SVC = str(Path(sys.executable).parent / "svc")


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_a_rerun_reuses_it(tmp_path):
    root = tmp_path / "demo"
    first = subprocess.run([SVC, "demo", "-C", str(root)], capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert "materialized 3 partition run(s)" in out
    assert "svc -C" in out and "mlflow ui --backend-store-uri" in out

    instance = dg.DagsterInstance.from_config(str(root / ".dagster"))
    try:
        assert sorted(instance.get_dynamic_partitions("singers")) == DEMO_SINGERS
        for singer in DEMO_SINGERS:
            for asset in ("clean_audio", "pitch", "ppg", "vec", "speaker_embedding"):
                records = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[singer]), limit=10).records
                assert len(records) == 1, (asset, singer)
            manifest = pd.read_parquet(root / "data/derived/clean_audio" / singer / "manifest.parquet")
            assert len(manifest) >= 8 and manifest["duration_s"].sum() > 30
        for asset in ("training_set", "svc_checkpoint", "evaluation_report"):
            assert instance.get_latest_materialization_event(dg.AssetKey(asset)) is not None, asset
        assert not (root / "data/raw/speaker-d").exists(), "the fourth voice is kept back"
    finally:
        instance.dispose()

    # MLflow: the training run with its loss curve, a registered version in production.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    production = client.get_model_version_by_alias("svc", "production")
    history = sorted(client.get_metric_history(production.run_id, "train/mel"), key=lambda m: m.step)
    assert len(history) == 300
    early = sum(m.value for m in history[:20]) / 20
    late = sum(m.value for m in history[-20:]) / 20
    assert late < early, (early, late)
    assert "eval.passed" in production.tags
    metrics = json.loads((root / "metrics" / "evaluation.json").read_text())
    assert metrics["model_version"] == int(production.version)
    for singer in DEMO_SINGERS:
        wav = root / "outputs" / "demo" / f"57-to-{singer}.wav"
        info = sf.info(str(wav))
        assert info.samplerate == 32000 and info.duration > 6

    second = subprocess.run([SVC, "demo", "-C", str(root)], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "already added (reusing)" in second.stdout
    assert "materialized 0 partition run(s)" in second.stdout
    assert "already trained and evaluated" in second.stdout and "already in production" in second.stdout
