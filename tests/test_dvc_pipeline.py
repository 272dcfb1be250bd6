"""DVC's view of the pipeline: `dvc repro` on a fresh clone rebuilds through Dagster (`svc build`, `svc train`),
`dvc push`/`dvc pull` share the derived feature store, `dvc metrics show` shows the evaluation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from assets.workspace import DVC_REMOTE_DIR, DVC_REMOTE_NAME, Workspace, init_workspace
from orchestration.build import open_instance
from orchestration.singers import add_singer
from orchestration.status import workspace_status
from tests.conftest import LENIENT, clip, use_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

# Two training steps and lenient thresholds: this is about the plumbing, not the voice.
FAST = LENIENT + "train:\n  steps: 2\n"


def sh(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DAGSTER_HOME", None)  # svc uses the workspace's own
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def git_commit(cwd: Path, message: str) -> None:
    sh(cwd, "git", "add", "-A")
    sh(cwd, "git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", message)


def clone(origin: Path, target: Path) -> Path:
    """A teammate's clone: git history, and the origin's DVC remote (a shared remote in real life)."""
    sh(origin.parent, "git", "clone", "-q", str(origin), str(target))
    sh(target, "dvc", "remote", "modify", "--local", DVC_REMOTE_NAME, "url", str(origin / DVC_REMOTE_DIR))
    return target


def test_dvc_repro_on_a_fresh_clone_rebuilds_through_dagster(tmp_path, voices_dir):
    origin = tmp_path / "origin"
    ws = init_workspace(origin)
    use_config(origin, FAST, "fast.yaml")
    instance = open_instance(ws)
    add_singer(ws, "alice", clip(voices_dir, "speaker-a", 2), instance=instance, log=lambda _: None)  # pushes
    instance.dispose()
    git_commit(origin, "alice's recordings")

    first = clone(origin, tmp_path / "first")
    sh(first, "dvc", "pull", "--allow-missing", "-q")
    assert len(list((first / "data" / "raw" / "alice").glob("*.flac"))) == 2
    out = sh(first, "dvc", "repro")
    assert "materializing clean_audio[alice], pitch[alice]" in out, out  # svc build did the work, through Dagster
    assert "registered svc version 1" in out, out  # svc train: a tracked run and a registered version
    assert (first / "dvc.lock").is_file()
    status = workspace_status(Workspace(first))
    assert status.singers[0].state == "materialized" and status.candidate == "1"
    assert status.training["training_set"] == "fresh"

    metrics = sh(first, "dvc", "metrics", "show", "--json")
    figures = json.loads(metrics)
    (values,) = [m["data"]["metrics/evaluation.json"]["data"] for m in figures.values()]
    assert {"f0_corr", "reconstruction_mel"} <= values.keys()

    again = sh(first, "dvc", "repro")
    assert "materializing" not in again and "registered" not in again, "nothing changed, nothing reruns"

    # The derived feature store travels through the DVC remote.
    sh(first, "dvc", "push", "-q")
    git_commit(first, "features and evaluation")
    sh(first, "git", "push", "-q", str(origin), "HEAD:refs/heads/features")
    second = tmp_path / "second"
    sh(tmp_path, "git", "clone", "-q", "-b", "features", str(origin), str(second))
    sh(second, "dvc", "remote", "modify", "--local", DVC_REMOTE_NAME, "url", str(origin / DVC_REMOTE_DIR))
    sh(second, "dvc", "pull", "-q")
    for asset in ("clean_audio", "pitch", "ppg", "vec", "speaker_embedding", "training_set"):
        local = sorted(p.relative_to(first) for p in (first / "data" / "derived" / asset).rglob("*") if p.is_file())
        pulled = sorted(p.relative_to(second) for p in (second / "data" / "derived" / asset).rglob("*") if p.is_file())
        assert pulled == local and pulled, asset
