"""Workspaces, `svc init` and `svc add-singer` against real git, DVC, MLflow and a Dagster instance."""
from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import dagster as dg
import pytest
import yaml
from click.testing import CliRunner

from assets.partitions import SINGERS
from assets.workspace import Workspace, WorkspaceError, validate_singer_name
from orchestration.cli import main
from orchestration.singers import latest_observed_version
from svc_model.storage import TEMP_MARK
from tests.conftest import clip, tone, write


def _digest(paths):
    return {str(p): hashlib.md5(Path(p).read_bytes()).hexdigest() for p in paths}


def _run(args, ok=True):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_svc_init_creates_a_complete_workspace(tmp_path):
    root = tmp_path / "studio"
    out = _run(["init", str(root)]).output
    assert "workspace ready" in out
    for sub in ("data/raw", "data/derived", "mlflow/artifacts", ".dagster/dagster.yaml", ".git", ".dvc", "svc.yaml"):
        assert (root / sub).exists(), sub
    config = (root / ".dvc" / "config").read_text()
    assert "remote = local" in config and "../.dvc-remote" in config
    # MLflow: SQLite store with the experiment whose artifact root is absolute.
    with sqlite3.connect(root / "mlflow" / "mlflow.db") as db:
        (location,) = db.execute("select artifact_location from experiments where name='svc'").fetchone()
    assert location == (root / "mlflow" / "artifacts").as_uri()
    # Idempotent.
    _run(["init", str(root)])
    assert Workspace.discover(root).root == root.resolve()


def test_discover_rejects_a_folder_that_is_not_a_workspace(tmp_path):
    with pytest.raises(WorkspaceError, match="not a workspace"):
        Workspace.discover(tmp_path)


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "-dash", "sp ace", "x" * 65, "semi;colon"])
def test_bad_singer_names_are_refused(name):
    with pytest.raises(WorkspaceError, match="invalid singer name"):
        validate_singer_name(name)


def test_add_singer_end_to_end(workspace, instance, voices_dir):
    sources = clip(voices_dir, "speaker-a", 3)
    before = _digest(sources)
    out = _run(["add-singer", "-C", str(workspace.root), "alice", *map(str, sources)]).output

    # Copied, originals untouched.
    copied = sorted(p.name for p in workspace.singer_raw_dir("alice").iterdir())
    assert copied == [p.name for p in sources]
    assert _digest(sources) == before
    # One .dvc file for the singer, its md5 is the data version, and the remote holds the data.
    dvc = yaml.safe_load(workspace.singer_dvc_file("alice").read_text())
    md5 = dvc["outs"][0]["md5"]
    assert md5.endswith(".dir") and dvc["outs"][0]["nfiles"] == 3
    remote = workspace.root / ".dvc-remote" / "files" / "md5"
    assert (remote / md5[:2] / md5[2:]).is_file()
    for src in sources:
        h = hashlib.md5(src.read_bytes()).hexdigest()
        assert (remote / h[:2] / h[2:]).is_file()
    # Registered in Dagster with the DVC md5 as the raw_recordings data version.
    assert instance.get_dynamic_partitions(SINGERS) == ["alice"]
    assert latest_observed_version(instance, "alice") == md5
    assert "will rebuild: clean_audio[alice]" in out
    # The .dvc file is staged in the workspace's git repo.
    staged = workspace.run_tool("git", "diff", "--cached", "--name-only").stdout.split()
    assert "data/raw/alice.dvc" in staged


def test_add_singer_skips_bad_files_and_names_them(workspace, instance, voices_dir, tmp_path):
    folder = tmp_path / "takes"
    good = clip(voices_dir, "speaker-b", 2)
    for p in good:
        (folder / p.name).parent.mkdir(parents=True, exist_ok=True)
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "empty.wav").write_bytes(b"")
    write(folder / "quiet.wav", tone(2.0, 32000, amp=0.0), 32000)
    (folder / "readme.txt").write_text("session notes")
    result = _run(["add-singer", "-C", str(workspace.root), "bob", str(folder)])
    assert "empty.wav: empty file" in result.output
    assert "quiet.wav: silent" in result.output
    assert "readme.txt: not an audio file" in result.output
    assert sorted(p.name for p in workspace.singer_raw_dir("bob").iterdir()) == sorted(p.name for p in good)


def test_add_singer_with_nothing_usable_changes_nothing(workspace, instance, tmp_path):
    bad = write(tmp_path / "silence.wav", tone(2.0, 32000, amp=0.0), 32000)
    result = _run(["add-singer", "-C", str(workspace.root), "ghost", str(bad)], ok=False)
    assert result.exit_code == 1
    assert "no usable recordings, nothing was added" in result.output and "silence.wav: silent" in result.output
    assert not workspace.singer_raw_dir("ghost").exists()
    assert not workspace.singer_dvc_file("ghost").exists()
    assert [p.name for p in workspace.raw_dir.iterdir() if TEMP_MARK in p.name] == []  # no staging folder left
    assert instance.get_dynamic_partitions(SINGERS) == []


def test_duplicate_singer_needs_append_and_append_changes_only_that_version(workspace, instance, voices_dir):
    ws = str(workspace.root)
    a = clip(voices_dir, "speaker-a", 3)
    _run(["add-singer", "-C", ws, "alice", *map(str, a[:2])])
    _run(["add-singer", "-C", ws, "bob", *map(str, clip(voices_dir, "speaker-b", 2))])
    v_alice, v_bob = workspace.singer_data_version("alice"), workspace.singer_data_version("bob")

    dup = _run(["add-singer", "-C", ws, "alice", str(a[2])], ok=False)
    assert dup.exit_code == 1 and "already exists" in dup.output and "--append" in dup.output

    again = _run(["add-singer", "-C", ws, "alice", "--append", str(a[0])], ok=False)
    assert "same content as" in again.output and "no usable recordings" in again.output
    assert workspace.singer_data_version("alice") == v_alice

    _run(["add-singer", "-C", ws, "alice", "--append", str(a[2])])
    assert workspace.singer_data_version("alice") != v_alice
    assert workspace.singer_data_version("bob") == v_bob
    assert latest_observed_version(instance, "alice") == workspace.singer_data_version("alice")
    assert latest_observed_version(instance, "bob") == v_bob


def test_bad_name_via_cli_is_a_clear_error(workspace, voices_dir):
    result = _run(["add-singer", "-C", str(workspace.root), "../etc", str(clip(voices_dir, "speaker-a", 1)[0])], ok=False)
    assert result.exit_code == 1 and "invalid singer name '../etc'" in result.output
    assert not (workspace.root / "data" / "etc").exists()


def test_definitions_load_fast_without_torch():
    import subprocess
    import sys

    code = "import sys, orchestration.definitions as d; d.defs.resolve_asset_graph(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_config_errors_name_the_file_and_field(tmp_path):
    from svc_model.config import ConfigError, load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("audio:\n  max_segment_s: -3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid config: audio\.max_segment_s"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("audoi: {}\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: invalid config: audoi: Extra inputs"):
        load_config(typo)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no-such-profile")
    assert load_config("tiny").audio.sample_rate == 32000


def test_dagster_instance_persists_partitions(workspace, voices_dir):
    from orchestration.build import open_instance

    _run(["add-singer", "-C", str(workspace.root), "carol", str(clip(voices_dir, "speaker-c", 1)[0])])
    fresh = dg.DagsterInstance.from_config(str(workspace.dagster_home))
    assert fresh.get_dynamic_partitions(SINGERS) == ["carol"]
    fresh.dispose()
    open_instance(workspace).dispose()
