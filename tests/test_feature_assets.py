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
        ("pitch", "frames_match_audio"), ("ppg", "frames_match_audio"), ("vec", "frames_match_audio"),
        ("speaker_embedding", "finite"), ("speaker_embedding", "embeddings_valid")]]
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


def _run_checks(workspace, instance, *keys):
    """Run only the given checks of alice's partition, as "Execute checks" in the UI; ``{key: (passed, meta)}``."""
    defs = build_definitions(workspace)
    # The partition as a run tag: Dagster cannot infer a partitions definition from a selection without assets.
    result = dg.materialize([*defs.assets, *defs.asset_checks], selection=dg.AssetSelection.checks(*keys),
                            instance=instance, resources=defs.resources, tags={"dagster/partition": "alice"},
                            raise_on_error=False)
    return {e.asset_check_key: (e.passed, {k: v.value for k, v in e.metadata.items()})
            for e in result.get_asset_check_evaluations()}


def test_checks_fail_on_a_truncated_pitch_file_and_on_a_wrong_embedding(workspace, instance, voices_dir):
    # Fails if frames_match_audio compares counts the extractors already force equal (the manifest's) instead of
    # the stored files against the audio's duration, or if embeddings_valid passes a vector of the wrong size, a
    # zero vector, or a mean.npy that is not the mean of the segments.
    quiet = lambda _: None  # noqa: E731
    add_singer(workspace, "alice", clip(voices_dir, "speaker-a", 2), instance=instance, push=False, log=quiet)
    build(workspace, singers=["alice"], instance=instance, log=quiet)
    pitch_check = dg.AssetCheckKey(dg.AssetKey("pitch"), "frames_match_audio")
    ppg_check = dg.AssetCheckKey(dg.AssetKey("ppg"), "frames_match_audio")
    spk_check = dg.AssetCheckKey(dg.AssetKey("speaker_embedding"), "embeddings_valid")
    before = _run_checks(workspace, instance, pitch_check, ppg_check, spk_check)
    assert {k: ok for k, (ok, _) in before.items()} == {pitch_check: True, ppg_check: True, spk_check: True}
    assert before[pitch_check][1]["worst_offset_frames"] < 1

    part = workspace.partition_dir("pitch", "alice")
    manifest = pd.read_parquet(part / "manifest.parquet")
    victim = part / manifest["path"].iloc[0]
    full = np.load(victim)
    np.save(victim, full[: len(full) - 5])  # 50 ms short: a few frames, beyond the 1-frame tolerance
    after = _run_checks(workspace, instance, pitch_check, ppg_check)
    ok, meta = after[pitch_check]
    assert not ok and meta["mismatched"] == 1 and meta["worst_offset_frames"] > 4
    assert manifest["segment_id"].iloc[0] in meta["examples"] and f"{len(full) - 5} frames" in meta["examples"]
    assert after[ppg_check][0], "the other features are untouched"

    spk = workspace.partition_dir("speaker_embedding", "alice")
    names = list(pd.read_parquet(spk / "manifest.parquet")["path"])
    good = np.load(spk / names[0])
    for bad, says in [(good[:128], "shape (128,)"), (np.zeros_like(good), "norm 0.0000")]:
        np.save(spk / names[0], bad)
        ok, meta = _run_checks(workspace, instance, spk_check)[spk_check]
        assert not ok and says in meta["examples"] and names[0] in meta["examples"], meta
    other = good + 0.2 * np.random.default_rng(0).standard_normal(good.shape).astype(np.float32)
    np.save(spk / names[0], other / np.linalg.norm(other))  # a valid vector, but mean.npy is no longer the mean
    ok, meta = _run_checks(workspace, instance, spk_check)[spk_check]
    assert not ok and meta["examples"].startswith("mean.npy is not the mean"), meta
    np.save(spk / names[0], good)
    assert _run_checks(workspace, instance, spk_check)[spk_check][0], "the files as the asset wrote them pass"


def test_stored_partition_checks_flag_a_constant_encoder_and_a_missing_file(tmp_path):
    # Fails if embeddings_valid passes an encoder that gives one vector for everything (fed silence, or broken), or
    # if frames_match_audio passes a segment whose file is gone.
    from svc_model.features.store import check_embeddings, check_frames

    clean = pd.DataFrame({"segment_id": [f"alice/seg{i}" for i in range(3)], "duration_s": [2.0, 3.0, 4.0]})
    vector = np.zeros(256, np.float32)
    vector[0] = 1.0
    for i in range(3):
        np.save(tmp_path / f"seg{i}.npy", vector)
        np.save(tmp_path / f"pitch{i}.npy", np.zeros((int(100 * clean["duration_s"][i]), 2), np.float32))
    np.save(tmp_path / "mean.npy", vector)
    pd.DataFrame({"segment_id": clean["segment_id"], "path": [f"seg{i}.npy" for i in range(3)]}).to_parquet(
        tmp_path / "manifest.parquet")
    assert check_embeddings(clean, tmp_path, 256, unit_norm=True).problems == ["all 3 segments have the same embedding"]

    pitch_dir = tmp_path / "pitch"
    pitch_dir.mkdir()
    for i in range(3):
        (tmp_path / f"pitch{i}.npy").rename(pitch_dir / f"seg{i}.npy")
    pd.DataFrame({"segment_id": clean["segment_id"], "path": [f"seg{i}.npy" for i in range(3)]}).to_parquet(
        pitch_dir / "manifest.parquet")
    assert check_frames(clean, pitch_dir, 100).passed
    (pitch_dir / "seg1.npy").unlink()
    result = check_frames(clean, pitch_dir, 100)
    assert not result.passed and result.missing == ["alice/seg1"] and not result.mismatched
