"""The four feature assets on a real Dagster instance: one singer at a time, files, metadata and checks."""
from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd

from orchestration.build import build, partition_statuses
from orchestration.definitions import build_definitions
from orchestration.jobs import PER_SINGER_ASSETS
from orchestration.singers import add_singer
from tests.conftest import clip

FEATURES = ["pitch", "ppg", "vec", "speaker_embedding"]


def _latest(instance, asset, singer):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[singer]), limit=10).records
    return records


def test_features_for_one_singer_leave_the_other_untouched(workspace, instance, voices_dir):
    quiet = lambda _: None  # noqa: E731
    add_singer(workspace, "alice", clip(voices_dir, "speaker-a", 3), instance=instance, push=False, log=quiet)
    add_singer(workspace, "bob", clip(voices_dir, "speaker-b", 2), instance=instance, push=False, log=quiet)

    steps = build(workspace, singers=["alice"], instance=instance, log=quiet)
    assert [(s.singer, s.assets) for s in steps] == [("alice", PER_SINGER_ASSETS)]

    segments = pd.read_parquet(workspace.partition_dir("clean_audio", "alice") / "manifest.parquet")
    manifests = {f: pd.read_parquet(workspace.partition_dir(f, "alice") / "manifest.parquet") for f in FEATURES}
    for feature, manifest in manifests.items():
        assert list(manifest["segment_id"]) == list(segments["segment_id"]), feature
        assert manifest["finite"].all()
    frames100 = (segments["duration_s"] * 100).round().astype(int).to_numpy()
    assert np.abs(manifests["pitch"]["frames"].to_numpy() - frames100).max() <= 1
    for feature in ("ppg", "vec"):
        assert np.abs(manifests[feature]["frames"].to_numpy() * 2 - manifests["pitch"]["frames"].to_numpy()).max() <= 1
    assert (manifests["ppg"]["dim"] == 384).all() and manifests["ppg"]["pretrained"].all()
    # The tiny profile has no vec (no real HuBERT offline): zero-width frames, and the manifest says so.
    assert (manifests["vec"]["dim"] == 0).all() and (manifests["vec"]["vec_backend"] == "none").all()

    part = workspace.partition_dir("pitch", "alice")
    pitch = np.load(part / manifests["pitch"]["path"].iloc[0])
    voiced = pitch[:, 1] > 0
    assert 0.3 < voiced.mean() < 0.95 and 70 < np.median(pitch[voiced, 0]) < 400  # real speech
    assert (pitch[~voiced, 0] == 0).all()
    spk = workspace.partition_dir("speaker_embedding", "alice")
    mean = np.load(spk / "mean.npy")
    assert mean.shape == (256,) and abs(np.linalg.norm(mean) - 1) < 1e-5

    meta = _latest(instance, "vec", "alice")[0].asset_materialization.metadata
    assert meta["vec_backend"].value == "none" and meta["extractor"].value == "none" and meta["dim"].value == 0
    assert meta["rtf"].value > 0 and meta["segments"].value == len(segments)
    pmeta = _latest(instance, "pitch", "alice")[0].asset_materialization.metadata
    assert 0 < pmeta["voiced_ratio"].value < 1 and pmeta["median_f0_hz"].value > 50

    checks = [dg.AssetCheckKey(dg.AssetKey(a), c) for a, c in [
        ("pitch", "finite"), ("pitch", "voiced_ratio_plausible"), ("ppg", "finite"), ("vec", "finite"),
        ("vec", "frames_aligned"), ("speaker_embedding", "finite"), ("speaker_embedding", "unit_norm")]]
    results = instance.event_log_storage.get_latest_asset_check_execution_by_key(checks)
    for key in checks:
        data = results[key].event.dagster_event.event_specific_data
        assert data.passed, (key, data.metadata)

    # Bob was never touched.
    for asset in ["clean_audio", *FEATURES]:
        assert _latest(instance, asset, "bob") == []
        assert not workspace.partition_dir(asset, "bob").exists()
    statuses = partition_statuses(build_definitions(workspace), instance, PER_SINGER_ASSETS, ["alice", "bob"])
    assert {a for (a, s), v in statuses.items() if s == "alice" and v == "fresh"} == set(PER_SINGER_ASSETS)
    assert {v for (a, s), v in statuses.items() if s == "bob"} == {"missing"}
