"""The demo command end to end, as a user runs it (a subprocess of the installed `svc`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from orchestration.cli import DEMO_SINGERS

SVC = str(Path(sys.executable).parent / "svc")


@pytest.mark.slow
def test_demo_builds_three_singers_and_a_rerun_reuses_them(tmp_path):
    root = tmp_path / "demo"
    first = subprocess.run([SVC, "demo", "-C", str(root)], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "materialized 3 partition run(s)" in first.stdout
    assert "svc -C" in first.stdout and "mlflow" in first.stdout and "ui" in first.stdout

    instance = dg.DagsterInstance.from_config(str(root / ".dagster"))
    try:
        assert sorted(instance.get_dynamic_partitions("singers")) == DEMO_SINGERS
        for singer in DEMO_SINGERS:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("clean_audio"), asset_partitions=[singer]), limit=10
            ).records
            assert len(records) == 1
            manifest = pd.read_parquet(root / "data/derived/clean_audio" / singer / "manifest.parquet")
            assert len(manifest) >= 8 and manifest["duration_s"].sum() > 30
        assert not (root / "data/raw/speaker-d").exists(), "the fourth voice is kept back"
    finally:
        instance.dispose()

    second = subprocess.run([SVC, "demo", "-C", str(root)], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already added (reusing)" in second.stdout
    assert "materialized 0 partition run(s)" in second.stdout
