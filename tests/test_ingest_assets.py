"""clean_audio on a real Dagster instance, and the singer sensor."""
from __future__ import annotations

import shutil

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from orchestration.build import BuildError, build, partition_statuses, sync_singers
from orchestration.definitions import build_definitions
from orchestration.sensors import singer_sensor
from orchestration.singers import add_singer, register_singer
from tests.conftest import clip, tone, write

CLEAN = dg.AssetKey("clean_audio")


def _materializations(instance, singer):
    return instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=CLEAN, asset_partitions=[singer]), limit=100
    ).records


def _add(ws, instance, singer, files, **kw):
    return add_singer(ws, singer, files, instance=instance, push=False, log=lambda _: None, **kw)


def test_clean_audio_one_partition_leaves_others_untouched(workspace, instance, voices_dir):
    _add(workspace, instance, "alice", clip(voices_dir, "speaker-a", 4))
    _add(workspace, instance, "bob", clip(voices_dir, "speaker-b", 3))
    raw_before = {p: p.read_bytes() for p in workspace.raw_dir.rglob("*") if p.is_file()}

    steps = build(workspace, assets=["clean_audio"], singers=["alice"], instance=instance, log=lambda _: None)
    assert [(s.singer, s.assets) for s in steps] == [("alice", ["clean_audio"])]

    part = workspace.partition_dir("clean_audio", "alice")
    manifest = pd.read_parquet(part / "manifest.parquet")
    assert list(manifest.columns) == [
        "segment_id", "singer", "source_file", "start_s", "end_s", "duration_s",
        "sample_rate", "feature_sample_rate", "path", "path_16k",
    ]
    assert set(manifest["source_file"]) == {p.name for p in clip(voices_dir, "speaker-a", 4)}
    assert manifest["segment_id"].is_unique and (manifest["singer"] == "alice").all()
    assert manifest["duration_s"].between(1.0, 15.0).all()
    assert np.allclose(manifest["end_s"] - manifest["start_s"], manifest["duration_s"])
    for row in manifest.itertuples():
        info32, info16 = sf.info(str(part / row.path)), sf.info(str(part / row.path_16k))
        assert (info32.samplerate, info16.samplerate, info32.channels) == (32000, 16000, 1)
        assert abs(info32.frames / 32000 - row.duration_s) < 1e-3
        assert abs(info16.frames * 2 - info32.frames) <= 2
    # Loudness-normalized and within the peak ceiling.
    audio, _ = sf.read(str(part / manifest["path"].iloc[0]))
    assert 0.2 < np.abs(audio).max() <= 10 ** (-1 / 20) + 1e-3

    # The other singer's partition was not touched, and nothing in data/raw changed.
    assert len(_materializations(instance, "alice")) == 1
    assert _materializations(instance, "bob") == []
    assert not workspace.partition_dir("clean_audio", "bob").exists()
    assert {p: p.read_bytes() for p in workspace.raw_dir.rglob("*") if p.is_file()} == raw_before

    # Metadata reports counts and hours; the check passed.
    record = _materializations(instance, "alice")[0]
    meta = record.asset_materialization.metadata
    assert meta["segments"].value == len(manifest) and meta["files_skipped"].value == 0
    assert meta["hours"].value == pytest.approx(manifest["duration_s"].sum() / 3600, abs=1e-4)

    # A second build only does bob; alice is fresh.
    steps = build(workspace, assets=["clean_audio"], instance=instance, log=lambda _: None)
    assert [s.singer for s in steps] == ["bob"]
    assert len(_materializations(instance, "alice")) == 1


def test_changed_recordings_make_only_that_singer_stale(workspace, instance, voices_dir):
    a = clip(voices_dir, "speaker-a", 3)
    _add(workspace, instance, "alice", a[:2])
    _add(workspace, instance, "bob", clip(voices_dir, "speaker-b", 2))
    build(workspace, assets=["clean_audio"], instance=instance, log=lambda _: None)
    defs = build_definitions(workspace)
    assert set(partition_statuses(defs, instance, ["clean_audio"], ["alice", "bob"]).values()) == {"fresh"}

    _add(workspace, instance, "alice", [a[2]], append=True)
    statuses = partition_statuses(defs, instance, ["clean_audio"], ["alice", "bob"])
    assert statuses == {("clean_audio", "alice"): "stale", ("clean_audio", "bob"): "fresh"}
    steps = build(workspace, assets=["clean_audio"], instance=instance, log=lambda _: None)
    assert [s.singer for s in steps] == ["alice"]
    assert len(_materializations(instance, "bob")) == 1


def _dvc_add_folder(ws, instance, singer, files):
    """The manual route: a folder dropped into data/raw, then `dvc add`."""
    folder = ws.singer_raw_dir(singer)
    folder.mkdir(parents=True)
    for name, maker in files.items():
        maker(folder / name)
    ws.run_tool("dvc", "add", "-q", f"data/raw/{singer}")
    register_singer(ws, instance, singer)
    return folder


def test_bad_files_are_skipped_reported_and_checked(workspace, instance, voices_dir):
    good = clip(voices_dir, "speaker-c", 2)
    x48 = tone(3.0, 48000, channels=2)
    nan = tone(2.0, 32000)
    nan[5] = np.nan
    _dvc_add_folder(workspace, instance, "dave", {
        good[0].name: lambda p: shutil.copy(good[0], p),
        "stereo48k.wav": lambda p: write(p, x48, 48000),
        "phone.wav": lambda p: write(p, tone(2.0, 8000), 8000),
        "nan.wav": lambda p: write(p, nan, 32000, subtype="FLOAT"),
        "fake.mp3": lambda p: p.write_text("not really an mp3"),
        "blip.wav": lambda p: write(p, tone(0.4, 32000), 32000),
    })
    build(workspace, assets=["clean_audio"], singers=["dave"], instance=instance, log=lambda _: None)
    manifest = pd.read_parquet(workspace.partition_dir("clean_audio", "dave") / "manifest.parquet")
    assert set(manifest["source_file"]) == {good[0].name, "stereo48k.wav"}

    meta = _materializations(instance, "dave")[0].asset_materialization.metadata
    assert meta["files_skipped"].value == 4
    skipped = meta["skipped"].value
    for name, problem in [("phone.wav", "8000 Hz is below"), ("nan.wav", "NaN or inf"),
                          ("fake.mp3", "cannot decode"), ("blip.wav", "too short")]:
        assert name in skipped and problem in skipped
    assert "mixed 2 channels" in meta["notes"].value

    check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(CLEAN, "all_recordings_usable")]
    )[dg.AssetCheckKey(CLEAN, "all_recordings_usable")]
    evaluation = check.event.dagster_event.event_specific_data
    assert evaluation.passed is False and evaluation.severity == dg.AssetCheckSeverity.WARN


def test_singer_with_nothing_usable_fails_cleanly(workspace, instance, voices_dir):
    _add(workspace, instance, "alice", clip(voices_dir, "speaker-a", 2))
    build(workspace, assets=["clean_audio"], instance=instance, log=lambda _: None)
    _dvc_add_folder(workspace, instance, "mute", {
        "a.wav": lambda p: write(p, np.zeros(64000, np.float32), 32000),
        "b.flac": lambda p: p.write_bytes(b"fLaC garbage"),
    })
    with pytest.raises(BuildError) as info:
        build(workspace, assets=["clean_audio"], singers=["mute"], instance=instance, log=lambda _: None)
    message = str(info.value)
    assert "no usable audio for singer 'mute'" in message
    assert "a.wav: silent" in message and "b.flac: cannot decode" in message
    derived = workspace.derived_dir / "clean_audio"
    assert sorted(p.name for p in derived.iterdir()) == ["alice"], "no partial or temp partition is left"
    assert sorted(p.name for p in workspace.singer_raw_dir("mute").iterdir()) == ["a.wav", "b.flac"]


def test_sensor_registers_new_singer_and_requests_its_run(workspace, instance, voices_dir):
    defs = build_definitions(workspace)

    def evaluate():
        return singer_sensor(dg.build_sensor_context(instance=instance, resources=defs.resources))

    empty = evaluate()
    assert empty.run_requests == [] and empty.dynamic_partitions_requests == []

    # The "dvc add" route: a folder dropped into data/raw with its .dvc file, no svc involved.
    folder = workspace.singer_raw_dir("erin")
    folder.mkdir()
    shutil.copy(clip(voices_dir, "speaker-d", 1)[0], folder)
    assert evaluate().run_requests == [], "an untracked folder (no .dvc yet) gives no request"
    workspace.run_tool("dvc", "add", "-q", "data/raw/erin")

    result = evaluate()
    assert [r.partition_keys for r in result.dynamic_partitions_requests] == [["erin"]]
    assert result.run_requests == [], "the automation sensor builds the new partition, as for svc add-singer"
    assert [(e.asset_key.to_user_string(), e.partition) for e in result.asset_events] == [
        ("raw_recordings", "erin"), ("singer_roster", None)]
    assert result.asset_events[1].metadata["singers"].value == "erin"

    # What the daemon does with the result; afterwards a known singer gives nothing.
    instance.add_dynamic_partitions("singers", ["erin"])
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    again = evaluate()
    assert again.run_requests == [] and again.dynamic_partitions_requests == []

    # Changed recordings: a new observation, but no new partition and no explicit run (eager handles it).
    shutil.copy(clip(voices_dir, "speaker-d", 2)[1], folder)
    workspace.run_tool("dvc", "add", "-q", "data/raw/erin")
    changed = evaluate()
    assert changed.dynamic_partitions_requests == [] and changed.run_requests == []
    assert [e.tags["dagster/data_version"] for e in changed.asset_events] == [workspace.singer_data_version("erin")]


def test_sync_singers_registers_dvc_tracked_folders(workspace, instance, voices_dir):
    folder = workspace.singer_raw_dir("frank")
    folder.mkdir()
    shutil.copy(clip(voices_dir, "speaker-a", 1)[0], folder)
    workspace.run_tool("dvc", "add", "-q", "data/raw/frank")
    assert sync_singers(workspace, instance) == ["frank"]
    assert sync_singers(workspace, instance) == []
