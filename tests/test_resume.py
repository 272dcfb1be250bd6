"""Killed training runs resume: the last good checkpoint (a corrupt one is moved aside), the run folder of the same
training definition, the history file, pruning of completed run folders, and a real `svc train` SIGKILLed and re-run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from assets.training_set import (
    RUN_RECORD,
    prune_run_folders,
    read_history,
    read_run_record,
    run_folder_for,
    run_folder_of,
    run_lock,
    training_definition,
    training_key,
)
from assets.workspace import Workspace
from svc_model.config import load_config
from svc_model.train import Trainer, checkpoints
from tests.conftest import clip, use_config


def _cfg(**train):
    cfg = load_config("tiny")
    update = {"deterministic": True, "checkpoint_every": 2, "validate_every": 1000, "log_every": 1, **train}
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


class Warnings(list):
    def __call__(self, message: str) -> None:
        self.append(message)


def _trainer(manifest, out_dir, **kw):
    return Trainer(_cfg(), manifest, out_dir, device="cpu", log=lambda _: None, tensorboard=False, **kw)


def _dead_pid() -> int:
    """The pid of a process that has exited (what a killed writer leaves in its temp names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# ---- the trainer: corrupt checkpoints, history, temp files ---------------------------------------------------
@pytest.fixture
def four_steps(tiny_manifest, tmp_path):
    """A run folder with checkpoints at steps 2 and 4 (and their history)."""
    run = tmp_path / "run"
    trainer = _trainer(tiny_manifest, run)
    trainer.fit(steps=4)
    trainer.close()
    assert [p.name for p in checkpoints(run)] == ["step-00000002.pt", "step-00000004.pt"]
    return run


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one_and_is_moved_aside(tiny_manifest, four_steps):
    run = four_steps
    newest = run / "step-00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # what a kill mid-write without the atomic helper would leave
    warnings = Warnings()
    resumed = _trainer(tiny_manifest, run, warn=warnings)
    assert resumed.step == 2 and resumed.resumed_from == run / "step-00000002.pt"
    assert len(warnings) == 1 and str(newest) in warnings[0] and "step-00000004.pt.corrupt" in warnings[0]
    # kept for inspection, byte for byte, out of the resume scan
    assert not newest.exists() and (run / "step-00000004.pt.corrupt").read_bytes() == data[: len(data) // 2]
    from svc_model.weights import load_torch_file

    assert _same_weights(resumed.generator.state_dict(), load_torch_file(run / "step-00000002.pt", "cpu")["generator"])
    # and it trains on from there
    assert resumed.fit(steps=2).step == 4 and (run / "step-00000004.pt").is_file()


def test_with_every_checkpoint_unloadable_training_starts_over_with_a_warning(tiny_manifest, four_steps, tmp_path):
    run = four_steps
    (run / "step-00000004.pt").write_bytes(os.urandom(4096))  # garbage
    torch.save({"step": 2, "config": {}}, run / "step-00000002.pt")  # a readable file without the training state
    warnings = Warnings()
    resumed = _trainer(tiny_manifest, run, warn=warnings)
    assert resumed.step == 0 and resumed.resumed_from is None
    assert "step-00000004.pt" in warnings[0] and "step-00000002.pt" in warnings[1]
    assert "starting over from step 0" in warnings[2] and len(warnings) == 3
    assert sorted(p.name for p in run.iterdir() if "corrupt" in p.name) == ["step-00000002.pt.corrupt",
                                                                          "step-00000004.pt.corrupt"]
    # nothing of the bad files was applied: the weights are a fresh run's
    fresh = _trainer(tiny_manifest, tmp_path / "fresh")
    assert _same_weights(resumed.generator.state_dict(), fresh.generator.state_dict())


def test_resume_trims_the_history_by_replacing_the_file_and_training_appends_to_it(tiny_manifest, four_steps):
    run = four_steps
    history = run / "history.jsonl"
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [1, 2, 3, 4]
    history.write_text(history.read_text() + '{"step": 5, "mel": 1.')  # a line torn by the kill
    (run / "step-00000004.pt").unlink()  # the run was killed before its step-4 checkpoint
    inode = history.stat().st_ino
    resumed = _trainer(tiny_manifest, run)
    assert resumed.step == 2
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [1, 2]
    trimmed = history.stat().st_ino
    assert trimmed != inode, "the trimmed history replaced the file (atomic), it was not rewritten in place"
    resumed.fit(steps=2)
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [1, 2, 3, 4]
    assert history.stat().st_ino == trimmed, "training appends to the history"
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


def test_temp_files_of_a_killed_writer_are_swept_when_a_run_starts(tiny_manifest, four_steps):
    run = four_steps
    stale = run / f".step-00000006.pt.tmp-{_dead_pid()}-0badc0de"
    stale.write_bytes(b"half a checkpoint")
    live = run / f".step-00000006.pt.tmp-{os.getpid()}-5afe5afe"  # a writer still running: not touched
    live.write_bytes(b"in progress")
    _trainer(tiny_manifest, run)
    assert not stale.exists() and live.exists()


# ---- run folders: the key, completion, pruning --------------------------------------------------------------
@pytest.fixture
def small_ws(tmp_path) -> tuple[Workspace, pd.DataFrame]:
    """A workspace folder with a two-row training manifest whose feature files exist, and a DVC file per singer."""
    ws = Workspace(tmp_path / "ws")
    rows = []
    for singer in ("alto", "bass"):
        (ws.raw_dir).mkdir(parents=True, exist_ok=True)
        (ws.raw_dir / f"{singer}.dvc").write_text(f"outs:\n- md5: {singer}0001.dir\n  path: {singer}\n")
        row = {"segment_id": f"{singer}/0", "singer": singer, "split": "train", "duration_s": 2.0}
        for column in ("audio", "pitch", "ppg", "vec", "speaker"):
            rel = f"data/derived/{column}/{singer}/0.npy"
            ws.resolve(rel).parent.mkdir(parents=True, exist_ok=True)
            ws.resolve(rel).write_bytes(b"x" * 16)
            row[column] = rel
        rows.append(row)
    return ws, pd.DataFrame(rows)


def test_the_run_folder_key_follows_what_defines_the_training(small_ws):
    ws, manifest = small_ws
    cfg = load_config("tiny")
    key = training_key(training_definition(ws, manifest, cfg, "scratch", 12))
    assert training_key(training_definition(ws, manifest.copy(), load_config("tiny"), "scratch", 12)) == key
    # bookkeeping settings change no weight: still the same folder
    bookkeeping = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"keep_checkpoints": 9, "keep_runs": 1, "log_every": 1}),
        "evaluation": cfg.evaluation.model_copy(update={"min_f0_corr": 0.9})})
    assert training_key(training_definition(ws, manifest, bookkeeping, "scratch", 12)) == key
    changed = {
        "start point": training_definition(ws, manifest, cfg, "production:v1", 12),
        "steps": training_definition(ws, manifest, cfg, "scratch", 13),
        "config": training_definition(
            ws, manifest, cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1e-4})}),
            "scratch", 12),
        "training set": training_definition(ws, manifest.assign(split=["train", "valid"]), cfg, "scratch", 12),
    }
    (ws.raw_dir / "bass.dvc").write_text("outs:\n- md5: bass0002.dir\n  path: bass\n")
    changed["data version"] = training_definition(ws, manifest, cfg, "scratch", 12)
    (ws.raw_dir / "bass.dvc").write_text("outs:\n- md5: bass0001.dir\n  path: bass\n")
    assert training_key(training_definition(ws, manifest, cfg, "scratch", 12)) == key
    pitch = ws.resolve(manifest.loc[0, "pitch"])
    os.utime(pitch, ns=(pitch.stat().st_atime_ns, pitch.stat().st_mtime_ns + 10**9))  # re-extracted features
    changed["features"] = training_definition(ws, manifest, cfg, "scratch", 12)
    for what, definition in changed.items():
        assert training_key(definition) != key, what


def test_an_incomplete_folder_is_resumed_and_a_complete_one_never(small_ws):
    ws, manifest = small_ws
    definition = training_definition(ws, manifest, load_config("tiny"), "scratch", 12)
    first = run_folder_for(ws, definition, "svc")
    assert first.path.name == f"dagster-{training_key(definition)}" and not first.complete
    first.add_attempt(dagster_run_id="r1", mlflow_run_id="m1")
    again = run_folder_for(ws, definition, "svc")
    assert again.path == first.path and again.attempts[0]["mlflow_run_id"] == "m1"
    assert run_folder_of(ws, "r1") == first.path and run_folder_of(ws, "r9") is None  # the studio's progress
    again.mark_complete("1")
    assert read_run_record(first.path)["complete"] is True
    second = run_folder_for(ws, definition, "svc")
    assert second.path.name == f"{first.path.name}-2"
    # killed after registering but before the record said so: complete, not resumed
    second.add_attempt(dagster_run_id="r2", mlflow_run_id="m2")
    registry = {"m2": "7"}  # MLflow run -> registered version
    third = run_folder_for(ws, definition, "svc",
                           is_registered=lambda record: registry.get(record["attempts"][-1]["mlflow_run_id"]))
    assert third.path.name == f"{first.path.name}-3"
    assert read_run_record(second.path)["complete"] is True and read_run_record(second.path)["model_version"] == "7"


def _folder(ws: Workspace, name: str, record: dict | None) -> Path:
    path = ws.runs_dir / name
    path.mkdir(parents=True)
    (path / "step-00000002.pt").write_bytes(b"checkpoint")
    if record is not None:
        (path / RUN_RECORD).write_text(json.dumps({"key": name, "attempts": [], **record}))
    return path


def test_pruning_keeps_the_newest_completed_folders_per_model_and_every_incomplete_one(tmp_path):
    ws = Workspace(tmp_path / "ws")
    done = [_folder(ws, f"dagster-done{i}", {"complete": True, "registered_model": "svc", "completed_ns": i})
            for i in range(5)]
    incomplete = [_folder(ws, f"dagster-open{i}", {"complete": False, "registered_model": "svc"}) for i in range(2)]
    other_model = _folder(ws, "dagster-other", {"complete": True, "registered_model": "other", "completed_ns": 0})
    local = _folder(ws, "default", None)  # `svc train --local default`
    older_version = _folder(ws, "dagster-1a2b3c4d", None)  # a folder from before run records: unknown, kept
    with run_lock(done[1]):  # held by another run: skipped this time
        removed = prune_run_folders(ws, 2, "svc", log=lambda _: None)
    assert sorted(p.name for p in removed) == ["dagster-done0", "dagster-done2"]
    kept = {p.name for p in ws.runs_dir.iterdir()}
    assert kept == {p.name for p in [done[1], done[3], done[4], *incomplete, other_model, local, older_version]}
    removed = prune_run_folders(ws, 2, "svc", log=lambda _: None)
    assert [p.name for p in removed] == ["dagster-done1"]
    assert prune_run_folders(ws, 0, "other", log=lambda _: None) == [other_model]
    assert {p.name for p in ws.runs_dir.iterdir()} == {"dagster-done3", "dagster-done4", "dagster-open0",
                                                       "dagster-open1", "default", "dagster-1a2b3c4d"}


# ---- a real `svc train`, SIGKILLed and re-run ----------------------------------------------------------------
RESUMABLE = """extends: tiny
train:
  checkpoint_every: 2
  log_every: 1
evaluation:
  max_segments_per_singer: 1
"""


@pytest.fixture
def built_ws(tmp_path, voices_dir):
    from assets.workspace import init_workspace
    from orchestration.build import build, open_instance
    from orchestration.singers import add_singer

    ws = init_workspace(tmp_path / "ws")
    use_config(ws.root, RESUMABLE, "resumable.yaml")
    instance = open_instance(ws)
    quiet = lambda _: None
    add_singer(ws, "alto", clip(voices_dir, "speaker-a", 2), instance=instance, push=False, log=quiet)
    add_singer(ws, "bass", clip(voices_dir, "speaker-d", 2), instance=instance, push=False, log=quiet)
    build(ws, instance=instance, log=quiet)
    instance.dispose()
    return ws


def _svc_train(ws: Workspace, steps: int) -> list[str]:
    return [str(Path(sys.executable).parent / "svc"), "-C", str(ws.root), "train", "--steps", str(steps),
            "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("corrupt_newest", [False, True], ids=["as-killed", "newest-checkpoint-truncated"])
def test_a_killed_svc_train_resumes_at_its_last_good_checkpoint_in_the_same_lineage(built_ws, tmp_path,
                                                                                   corrupt_newest):
    from assets import tracking

    ws, steps = built_ws, 12
    env = {**ws.env(), "TQDM_DISABLE": "1"}
    log = (tmp_path / "killed.log").open("wb")
    killed = subprocess.Popen(_svc_train(ws, steps), env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        # The first run's folder, once its second checkpoint exists (so there is a previous one).
        while killed.poll() is None and not list(ws.runs_dir.glob("dagster-*/step-00000004.pt")):
            time.sleep(0.1)
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        log.close()
    assert killed.returncode == -signal.SIGKILL
    [run_dir] = ws.runs_dir.glob("dagster-*")
    found = checkpoints(run_dir)
    assert len(found) >= 2 and int(found[-1].stem.split("-")[1]) < steps
    if corrupt_newest:
        newest = found[-1]
        newest.write_bytes(newest.read_bytes()[:1000])
    last = found[-2] if corrupt_newest else found[-1]
    resume_step = int(last.stem.split("-")[1])
    stale = run_dir / f".step-{resume_step + 2:08d}.pt.tmp-{killed.pid}-0badc0de"  # as a kill mid-save leaves
    stale.write_bytes(b"half a checkpoint")
    [attempt] = read_run_record(run_dir)["attempts"]

    rerun = subprocess.run(_svc_train(ws, steps), env=env, capture_output=True, text=True, check=False)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-4000:]
    assert f"resuming from step {resume_step} (checkpoint {last})" in output
    assert not stale.exists()
    if corrupt_newest:
        assert f"{newest}: checkpoint cannot be loaded" in output and f"moved it to {newest.name}.corrupt" in output
        assert (run_dir / f"{newest.name}.corrupt").stat().st_size == 1000, "kept, not deleted"
    assert [row["step"] for row in read_history(run_dir)] == list(range(1, steps + 1))  # each step once

    record = read_run_record(run_dir)
    assert record["complete"] is True and record["model_version"] == "1"
    first_run, second_run = (a["mlflow_run_id"] for a in record["attempts"])
    assert first_run == attempt["mlflow_run_id"]
    client = tracking.client(ws)
    killed_run, resumed_run = client.get_run(first_run), client.get_run(second_run)
    assert killed_run.info.status == "KILLED" and resumed_run.info.status == "FINISHED"
    assert killed_run.data.tags["training_key"] == resumed_run.data.tags["training_key"] == record["key"]
    assert resumed_run.data.tags["resumed_from_run_id"] == first_run
    assert resumed_run.data.tags["resumed_from_step"] == str(resume_step)
    assert resumed_run.data.tags["resumed_from_checkpoint"] == last.name
    # the resumed attempt logs exactly the steps after its checkpoint
    assert [m.step for m in sorted(client.get_metric_history(second_run, "train/mel"), key=lambda m: m.step)] == \
        list(range(resume_step + 1, steps + 1))
    versions = tracking.model_versions(ws)
    assert [(int(v.version), v.run_id) for v in versions] == [(1, second_run)]
