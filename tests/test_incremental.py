"""What becomes stale, and what rebuilds, when singers, recordings or code change (real Dagster instance and DVC)."""
from __future__ import annotations

import shutil

import dagster as dg
import pandas as pd
import pytest
from click.testing import CliRunner

from assets.versions import bind_code_versions
from assets.workspace import Workspace, WorkspaceError
from orchestration.build import build, materialize_training, open_instance, status_resolver
from orchestration.cli import main
from orchestration.definitions import build_definitions
from orchestration.jobs import PER_SINGER_ASSETS
from orchestration.singers import add_singer, remove_singer
from orchestration.status import workspace_status
from tests.conftest import clip, use_config

quiet = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def _built(tmp_path_factory, voices_dir, _workspace_template):
    """alice and bob with every per-singer asset and the training set materialized."""
    root = tmp_path_factory.mktemp("incremental") / "ws"
    shutil.copytree(_workspace_template, root, symlinks=True)
    ws = Workspace(root)
    instance = open_instance(ws)
    add_singer(ws, "alice", clip(voices_dir, "speaker-a", 2), instance=instance, push=False, log=quiet)
    add_singer(ws, "bob", clip(voices_dir, "speaker-b", 2), instance=instance, push=False, log=quiet)
    build(ws, instance=instance, log=quiet)
    defs = build_definitions(ws)  # its assets carry the workspace's code versions
    dg.materialize([*defs.assets], selection=[dg.AssetKey("training_set")], instance=instance,
                   resources=defs.resources)
    instance.dispose()
    return root


@pytest.fixture
def built(_built, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(_built, root, symlinks=True)
    ws = Workspace(root)
    instance = open_instance(ws)
    yield ws, instance
    instance.dispose()


def _statuses(defs, instance, singers):
    status = status_resolver(defs, instance)
    per_singer = {(a, s): status(a, s) for a in PER_SINGER_ASSETS for s in singers}
    return per_singer, status("training_set", None)


def test_everything_starts_fresh(built):
    ws, instance = built
    per_singer, training_set = _statuses(build_definitions(ws), instance, ["alice", "bob"])
    assert set(per_singer.values()) == {"fresh"} and training_set == "fresh"


def test_bumping_one_extractors_code_version_makes_only_it_and_downstream_stale(built, monkeypatch):
    from assets import features

    ws, instance = built
    monkeypatch.setitem(features.CODE_VERSIONS, "pitch", "2")
    [bumped] = bind_code_versions([features._feature_asset("pitch")], ws.config())
    current = build_definitions(ws)
    defs = dg.Definitions(assets=[bumped if a.key == bumped.key else a for a in current.assets],
                          asset_checks=current.asset_checks, resources=current.resources)
    per_singer, training_set = _statuses(defs, instance, ["alice", "bob"])
    assert {k for k, v in per_singer.items() if v != "fresh"} == {("pitch", "alice"), ("pitch", "bob")}
    assert per_singer[("clean_audio", "alice")] == "fresh"
    assert training_set == "stale"


def _stale(defs, instance):
    per_singer, training_set = _statuses(defs, instance, ["alice", "bob"])
    return {k for k, v in per_singer.items() if v != "fresh"}, training_set


def test_changing_the_pitch_backend_makes_exactly_pitch_stale_then_rebuilds_only_pitch(built):
    # Fails if code versions ignore the config (switching fcpe -> crepe left every feature "fresh"), or if the
    # settings hash leaks into other assets (ppg, vec, speaker_embedding, clean_audio rebuilt for nothing).
    ws, instance = built
    use_config(ws.root, "extends: tiny\nfeatures:\n  pitch:\n    backend: crepe\n    crepe_model: tiny\n",
               "crepe.yaml")
    assert _stale(build_definitions(ws), instance) == ({("pitch", "alice"), ("pitch", "bob")}, "stale")

    steps = build(ws, instance=instance, log=quiet)
    assert [(s.singer, s.assets) for s in steps] == [("alice", ["pitch"]), ("bob", ["pitch"])]
    backends = {pd.read_parquet(ws.partition_dir("pitch", s) / "manifest.parquet")["backend"].iloc[0]
                for s in ("alice", "bob")}
    assert backends == {"crepe-tiny"}
    defs = build_definitions(ws)
    assert _stale(defs, instance) == (set(), "stale")
    # Dagster's own resolver (no propagation of ours): the rebuilt pitch has a new data version.
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    assert resolver.get_status(dg.AssetKey("training_set")) == StaleStatus.STALE
    causes = {c.dependency.asset_key.to_user_string() for c in resolver.get_stale_causes(dg.AssetKey("training_set"))
              if c.dependency is not None}
    assert causes == {"pitch"}


def test_settings_that_do_not_change_features_leave_everything_fresh(built):
    # Fails if batch sizes or the device (same features, other speed) were hashed into the code versions.
    ws, instance = built
    use_config(ws.root, "extends: tiny\nfeatures:\n  device: cpu\n  pitch:\n    batch_frames: 7\n"
                        "  ppg:\n    batch_size: 3\n  speaker:\n    batch_partials: 5\n"
                        "train:\n  log_every: 3\n", "same-output.yaml")
    assert _stale(build_definitions(ws), instance) == (set(), "fresh")


@pytest.mark.parametrize("override, stale", [
    ("audio:\n  loudness_lufs: -18.0\n", {"clean_audio", "pitch", "ppg", "vec", "speaker_embedding"}),
    ("features:\n  ppg:\n    piece_s: 10.0\n", {"ppg"}),
    ("features:\n  speaker:\n    backend: mozilla-lstm\n", {"speaker_embedding"}),
    ("features:\n  vec:\n    backend: hubert-soft\n", {"vec"}),
])
def test_each_setting_marks_its_own_asset_and_what_is_downstream(built, override, stale):
    # Fails if a setting is missing from its asset's hash (nothing stale), or hashed into another asset.
    ws, instance = built
    use_config(ws.root, "extends: tiny\n" + override, "changed.yaml")
    per_singer, training_set = _stale(build_definitions(ws), instance)
    assert per_singer == {(a, s) for a in stale for s in ("alice", "bob")} and training_set == "stale"


def test_adding_a_singer_marks_the_training_set_stale_and_builds_only_that_singer(built, voices_dir):
    ws, instance = built
    add_singer(ws, "carol", clip(voices_dir, "speaker-c", 2), instance=instance, push=False, log=quiet)
    defs = build_definitions(ws)
    per_singer, training_set = _statuses(defs, instance, ["alice", "bob", "carol"])
    assert training_set == "stale", "a new singer must be visible before any of its features exist"
    assert {k for k, v in per_singer.items() if v != "fresh"} == {(a, "carol") for a in PER_SINGER_ASSETS}

    steps = build(ws, instance=instance, log=quiet)
    assert [(s.singer, s.assets) for s in steps] == [("carol", PER_SINGER_ASSETS)]
    for singer in ("alice", "bob"):
        for asset in PER_SINGER_ASSETS:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[singer]), limit=5).records
            assert len(records) == 1, (asset, singer)
    assert build(ws, instance=instance, log=quiet) == [], "a second build has nothing to do"


def test_remove_singer_drops_derived_data_and_partition_and_keeps_dvc_history(built):
    ws, instance = built
    ws.run_tool("git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "with bob")
    bob_files = sorted(p.name for p in ws.singer_raw_dir("bob").iterdir())

    report = remove_singer(ws, "bob", instance, log=quiet)

    assert report.derived_removed == PER_SINGER_ASSETS and report.raw_removed and report.partition_removed
    assert not ws.singer_raw_dir("bob").exists() and not ws.singer_dvc_file("bob").exists()
    assert all(not ws.partition_dir(a, "bob").exists() for a in PER_SINGER_ASSETS)
    assert ws.partition_dir("pitch", "alice").is_dir(), "other singers are untouched"
    assert "bob" not in instance.get_dynamic_partitions("singers") and ws.singers() == ["alice"]
    _, training_set = _statuses(build_definitions(ws), instance, ["alice"])
    assert training_set == "stale"
    # DVC history is intact: the committed .dvc file and the cache bring the recordings back.
    ws.run_tool("git", "checkout", "HEAD", "--", "data/raw/bob.dvc")
    ws.run_tool("dvc", "checkout", "-q", "data/raw/bob.dvc")
    assert sorted(p.name for p in ws.singer_raw_dir("bob").iterdir()) == bob_files

    with pytest.raises(WorkspaceError, match="no singer 'nobody'"):
        remove_singer(ws, "nobody", instance, log=quiet)


def test_re_adding_a_removed_singer_starts_clean(built, voices_dir):
    ws, instance = built
    remove_singer(ws, "bob", instance, log=quiet)
    add_singer(ws, "bob", clip(voices_dir, "speaker-b", 2), instance=instance, push=False, log=quiet)
    per_singer, _ = _statuses(build_definitions(ws), instance, ["bob"])
    assert "fresh" not in per_singer.values(), "old materializations must not make the new bob look built"
    steps = build(ws, instance=instance, log=quiet)
    assert [(s.singer, s.assets) for s in steps] == [("bob", PER_SINGER_ASSETS)]
    assert all(ws.partition_dir(a, "bob").is_dir() for a in PER_SINGER_ASSETS)


def test_remove_singer_refuses_uncached_changes(built, tmp_path):
    ws, instance = built
    extra = ws.singer_raw_dir("alice") / "new-take.flac"
    shutil.copy(next(ws.singer_raw_dir("bob").glob("*.flac")), extra)
    with pytest.raises(WorkspaceError, match="not recorded"):
        remove_singer(ws, "alice", instance, log=quiet)
    assert extra.exists() and ws.partition_dir("pitch", "alice").is_dir(), "nothing was removed"


def test_status_and_remove_singer_cli(built):
    ws, instance = built
    instance.dispose()
    runner = CliRunner()
    out = runner.invoke(main, ["-C", str(ws.root), "status"])
    assert out.exit_code == 0, out.output
    lines = {line.split()[0]: line for line in out.output.splitlines() if line.split()}
    assert lines["alice"].split()[1] == ws.singer_data_version("alice")[:12]
    assert lines["alice"].count("fresh") == len(PER_SINGER_ASSETS)
    assert "training_set fresh" in out.output
    assert "production none, candidate none" in out.output

    refused = runner.invoke(main, ["-C", str(ws.root), "remove-singer", "bob"], input="n\n")
    assert refused.exit_code != 0 and ws.singer_dvc_file("bob").exists(), "answering no changes nothing"
    done = runner.invoke(main, ["-C", str(ws.root), "remove-singer", "bob", "--yes"])
    assert done.exit_code == 0, done.output
    out = runner.invoke(main, ["-C", str(ws.root), "status"])
    assert "bob" not in out.output and "training_set stale" in out.output
    assert "build --train" in out.output


def test_build_train_is_a_no_op_when_the_training_set_is_fresh(built):
    ws, instance = built
    instance.dispose()
    out = CliRunner().invoke(main, ["-C", str(ws.root), "build", "--train"])
    assert out.exit_code == 0, out.output
    assert "nothing to do" in out.output and "nothing to train" in out.output


@pytest.mark.slow
def test_build_train_fine_tunes_after_a_singer_is_added(built, voices_dir):
    from assets import tracking

    ws, instance = built
    materialize_training(ws, steps=2, device="cpu", instance=instance)
    from assets.promotion import promote

    promote(ws, force=True, reason="test")
    production = tracking.alias_version(ws, tracking.PRODUCTION).version
    add_singer(ws, "carol", clip(voices_dir, "speaker-c", 2), instance=instance, push=False, log=quiet)
    instance.dispose()
    out = CliRunner().invoke(main, ["-C", str(ws.root), "build", "--train", "--steps", "2", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "carol: clean_audio, pitch, ppg, vec, speaker_embedding" in out.output
    candidate = tracking.alias_version(ws, tracking.CANDIDATE)
    assert int(candidate.version) == int(production) + 1
    run = tracking.client(ws).get_run(candidate.run_id)
    assert run.data.tags["fine_tuned_from_version"] == str(production)
    assert "carol" in run.data.tags["singers"]
    assert workspace_status(ws).training["training_set"] == "fresh"
