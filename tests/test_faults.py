"""Faults: concurrent users of one workspace, a full disk during a write, temp files of killed writers.

The concurrency tests run real `svc` processes against one workspace; a hold on the workspace lock (by the test,
or by a helper process) makes them meet at the lock every time rather than by luck of timing. The disk-full tests
inject ``OSError(ENOSPC)`` in the middle of a write, and also fill a real 256 KiB tmpfs where the kernel allows a
user namespace to mount one.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from assets.partitions import SINGERS
from assets.workspace import PROJECT_ROOT, Workspace, WorkspaceBusy
from orchestration.singers import latest_observed_version
from svc_model.storage import TEMP_MARK, atomic_write_bytes, sweep_stale_temps
from tests.conftest import clip

SVC = Path(sys.executable).parent / "svc"
# A process that holds the workspace lock until its stdin closes: "another user" of the workspace.
HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from assets.workspace import Workspace
    with Workspace(Path(sys.argv[1])).lock(sys.argv[2]):
        print("held", flush=True)
        sys.stdin.read()
""")


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SVC_WORKSPACE"}
    return {**env, "DVC_NO_ANALYTICS": "1", **extra}


def _svc(ws: Workspace, *args: str, log: Path, **env) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen([str(SVC), "-C", str(ws.root), *args], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=_env(**env), cwd=ws.root)


def _wait_for(text: str, procs: dict[str, subprocess.Popen], logs: dict[str, Path], deadline_s: float = 300) -> None:
    """Until every process's log says ``text``: they have all reached that point. Fails if one ends without saying
    it; the deadline is not a timed assert, it only turns a hang into a failure."""
    end = time.monotonic() + deadline_s
    while not all(text in logs[name].read_text() for name in procs):
        for name, proc in procs.items():
            assert proc.poll() is None or text in logs[name].read_text(), f"{name} ended: {logs[name].read_text()}"
        assert time.monotonic() < end, "never reached: " + " | ".join(log.read_text()[-2000:] for log in logs.values())
        time.sleep(0.2)


class Holder:
    """Another process holding the workspace lock for ``purpose`` until :meth:`release` (or a kill)."""

    def __init__(self, ws: Workspace, purpose: str):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ws.root), purpose], cwd=PROJECT_ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=60)


@pytest.fixture
def holder(workspace):
    holders = []

    def make(purpose: str) -> Holder:
        holders.append(Holder(workspace, purpose))
        return holders[-1]

    yield make
    for h in holders:
        if h.proc.poll() is None:
            h.kill()


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if TEMP_MARK in p.name)


# ---- concurrent users ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_concurrent_add_singer_of_one_name_make_one_singer(workspace, instance, voices_dir, tmp_path):
    # Fails without the existence check under the lock: both processes validated "alice is new" before either
    # moved its files, and the second then died with an uncaught OSError (or merged into the first's folder).
    # (`instance` has created the Dagster instance, so they meet at add-singer's lock, not at its creation.)
    takes = clip(voices_dir, "speaker-a", 4)
    batches = {"first": takes[:2], "second": takes[2:]}
    logs = {name: tmp_path / f"{name}.log" for name in batches}
    with workspace.lock("the test's hold"):  # both get past validation, then meet at the lock
        procs = {name: _svc(workspace, "add-singer", "alice", *map(str, files), log=logs[name])
                 for name, files in batches.items()}
        _wait_for("add-singer 'alice': waiting for the test's hold", procs, logs)
    codes = {name: proc.wait(timeout=600) for name, proc in procs.items()}
    outputs = {name: log.read_text() for name, log in logs.items()}
    assert sorted(codes.values()) == [0, 1], outputs
    winner = next(name for name, code in codes.items() if code == 0)
    loser = next(name for name, code in codes.items() if code == 1)
    assert "error: singer 'alice' already exists" in outputs[loser] and "--append" in outputs[loser]
    assert "Traceback" not in outputs[loser] + outputs[winner]

    assert workspace.singers() == ["alice"]
    assert sorted(p.name for p in workspace.raw_dir.glob("*.dvc")) == ["alice.dvc"]
    # Only the winner's recordings, not a mixture of both batches.
    assert sorted(p.name for p in workspace.singer_raw_dir("alice").iterdir()) == sorted(p.name for p in batches[winner])
    assert _temps(workspace.raw_dir) == []  # the loser's staging folder is gone
    assert workspace.run_tool("dvc", "status", "-q", "data/raw/alice.dvc", check=False).returncode == 0
    assert instance.get_dynamic_partitions(SINGERS) == ["alice"]
    assert latest_observed_version(instance, "alice") == workspace.singer_data_version("alice")


def test_two_first_commands_on_a_new_workspace_both_open_its_dagster_instance(workspace, tmp_path):
    # Fails without the lock around a fresh instance's creation: both create its SQLite tables and one dies with
    # "table jobs already exists".
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "second")}
    assert not (workspace.dagster_home / "history" / "runs.db").exists()
    with workspace.lock("the test's hold"):
        procs = {name: _svc(workspace, "status", log=log) for name, log in logs.items()}
        _wait_for("creating the Dagster instance: waiting for the test's hold", procs, logs)
    for name, proc in procs.items():
        assert proc.wait(timeout=300) == 0, logs[name].read_text()
        assert "Traceback" not in logs[name].read_text()


def test_a_promotion_waits_for_a_lock_held_elsewhere_then_fails_clearly(workspace, holder, tmp_path):
    # Fails if promotion takes no lock (it answers at once that there is no version 1), or waits forever.
    other = holder("add-singer 'bob'")
    log = tmp_path / "promote.log"
    proc = _svc(workspace, "promote", "1", log=log, SVC_LOCK_TIMEOUT="2")
    assert proc.wait(timeout=300) == 1
    out = log.read_text()
    assert f"promote version 1: waiting for add-singer 'bob' held by pid {other.pid}" in out
    assert f"error: workspace {workspace.root} is busy: add-singer 'bob' held by pid {other.pid}" in out
    assert "gave up waiting for it after 2 s, so promote version 1 changed nothing" in out
    assert "Traceback" not in out

    # The lock dies with its holder (an OS lock, nothing stale to clean): the same command now gets past it.
    other.kill()
    proc = _svc(workspace, "promote", "1", log=log, SVC_LOCK_TIMEOUT="2")
    assert proc.wait(timeout=300) == 1
    out = log.read_text()
    assert "waiting for" not in out and "model 'svc' has no version 1" in out


def test_a_command_waits_for_the_lock_and_goes_on_when_it_is_released(workspace, instance, holder, tmp_path):
    # Fails if the waiter gives up at once, or if it never notices the release.
    other = holder("add-singer 'bob'")
    log = tmp_path / "remove.log"
    proc = _svc(workspace, "remove-singer", "ghost", "--yes", log=log)
    _wait_for(f"remove-singer 'ghost': waiting for add-singer 'bob' held by pid {other.pid}", {"remove": proc},
              {"remove": log})
    assert proc.poll() is None  # still waiting
    other.release()
    assert proc.wait(timeout=300) == 1
    assert "no singer 'ghost'" in log.read_text()  # it went on to the command's own answer


def test_the_singer_sensor_skips_a_tick_while_the_workspace_is_locked(workspace, instance, holder, voices_dir):
    # Fails if the sensor plans while add-singer/remove-singer hold the lock (it could register a half-added
    # singer), or if it blocks the daemon waiting instead of skipping.
    from assets.resources import WorkspaceResource
    from orchestration.sensors import singer_sensor

    (workspace.raw_dir / "bob").mkdir(parents=True)
    for src in clip(voices_dir, "speaker-b", 1):
        shutil.copy(src, workspace.raw_dir / "bob" / src.name)
    workspace.run_tool("dvc", "add", "-q", "data/raw/bob")

    def tick() -> dg.SensorResult:
        context = dg.build_sensor_context(instance=instance, resources={"workspace": WorkspaceResource(
            root=str(workspace.root))})
        return singer_sensor(context)

    other = holder("remove-singer 'carol'")
    busy = tick()
    assert "is busy: remove-singer 'carol'" in busy.skip_reason.skip_message
    assert busy.dynamic_partitions_requests == []
    other.release()
    free = tick()
    assert [r.partition_keys for r in free.dynamic_partitions_requests] == [["bob"]]


def test_the_lock_is_reentrant_in_one_thread_and_excludes_other_threads(workspace):
    # add_singer holds the lock while the `dvc add` inside it takes it again: without re-entry it deadlocks.
    import threading

    outcome = []
    with workspace.lock("outer"):
        with workspace.lock("inner (dvc add)", timeout=0):
            pass
        assert workspace.lock_holder()["purpose"] == "outer"  # the inner hold does not rewrite who holds it

        def other_thread():
            try:
                with workspace.lock("a studio worker", timeout=0):
                    outcome.append("got it")
            except WorkspaceBusy as exc:
                outcome.append(str(exc))

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert "busy: outer held by pid" in outcome[0] and "(this process, another thread)" in outcome[0]
    assert workspace.lock_holder() is None  # released: nobody is named as holding it


def test_outputs_named_alike_at_once_get_distinct_files(tmp_path):
    # Fails if two claims of one name can both win (a check-then-create race), or if a taken name is reused.
    from concurrent.futures import ThreadPoolExecutor

    from svc_model.storage import claim_new_path

    target = tmp_path / "studio" / "audio-to-alto-20261207-120000.wav"
    with ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(lambda _: claim_new_path(target), range(16)))
    assert len(set(claimed)) == 16 and all(p.is_file() for p in claimed)
    assert sorted(p.name for p in claimed) == sorted(
        [target.name] + [f"audio-to-alto-20261207-120000-{n}.wav" for n in range(2, 17)])


# ---- a full disk ---------------------------------------------------------------------------------------------------
def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_disk_full_file_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    # Fails if the temp file survives the error, or if the write went to the destination directly.
    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}')
    monkeypatch.setattr(os, "fsync", _enospc)  # the data is in the temp file, the disk refuses to keep it
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b'{"new": true}' * 1000)
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_disk_full_checkpoint_save_leaves_the_old_checkpoint_and_no_temp(tmp_path, monkeypatch):
    # Fails if a half-written checkpoint replaces the good one, or its temp file is left to fill the disk further.
    import torch

    from svc_model import train

    ckpt = tmp_path / "step-00000100.pt"
    train.atomic_save({"step": 100, "w": torch.ones(4)}, ckpt)
    before = ckpt.read_bytes()

    def full_disk_save(obj, fh, *args, **kwargs):
        try:  # what torch does on a full disk (seen on a real tmpfs): the file's OSError, then its own error
            fh.write(b"PK\x03\x04 half a zip archive")
            _enospc()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(train.torch, "save", full_disk_save)
    with pytest.raises(OSError, match="No space left"):
        train.atomic_save({"step": 200, "w": torch.zeros(4)}, ckpt)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]


def test_a_disk_full_partition_write_leaves_the_old_partition_and_no_temp(workspace):
    # Fails if a failed write leaves its temp folder, or removes/replaces the partition it was rebuilding.
    with workspace.write_partition("pitch", "alice") as out:
        (out / "seg-0.npy").write_bytes(b"old")
    final = workspace.partition_dir("pitch", "alice")
    with pytest.raises(OSError, match="No space left"):
        with workspace.write_partition("pitch", "alice") as out:
            (out / "seg-0.npy").write_bytes(b"new")
            _enospc()
    assert sorted(p.name for p in final.iterdir()) == ["seg-0.npy"]
    assert (final / "seg-0.npy").read_bytes() == b"old"
    assert _temps(final.parent) == []


def test_a_failed_rename_puts_the_old_partition_back(workspace, monkeypatch):
    # The swap is two renames (old aside, new in); the second can fail too. Fails if the partition is then gone
    # (it stayed under its aside name) or the new temp folder is left behind.
    with workspace.write_partition("pitch", "alice") as out:
        (out / "seg-0.npy").write_bytes(b"old")
    final = workspace.partition_dir("pitch", "alice")
    real_rename = Path.rename

    def rename(self, target):
        if TEMP_MARK in self.name and not self.name.startswith(".old-") and Path(target) == final:
            _enospc()
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        with workspace.write_partition("pitch", "alice") as out:
            (out / "seg-0.npy").write_bytes(b"new")
    assert (final / "seg-0.npy").read_bytes() == b"old"
    assert _temps(final.parent) == []


def test_temp_files_of_killed_writers_are_swept_when_a_partition_is_written(workspace):
    # Fails if killed writers' temp folders pile up beside the partitions, or if a live writer's is removed.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited: its temp folders are garbage
    parent = workspace.partition_dir("pitch", "alice").parent
    stale = parent / f".alice{TEMP_MARK}{dead_pid}-0badc0de"
    live = parent / f".bob{TEMP_MARK}{os.getpid()}-0000beef"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "seg-0.npy").write_bytes(b"x")
    with workspace.write_partition("pitch", "alice") as out:
        (out / "seg-0.npy").write_bytes(b"new")
    assert not stale.exists()
    assert live.exists()
    assert sweep_stale_temps(parent) == []  # nothing else is stale


REAL_DISK_FULL = textwrap.dedent("""
    import errno, json, os, subprocess, sys
    from pathlib import Path
    mount = Path(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    import torch
    from svc_model.storage import atomic_dir, atomic_write_bytes
    from svc_model.train import atomic_save
    result = {}
    atomic_write_bytes(mount / "metrics.json", b"old")
    atomic_save({"w": torch.ones(8)}, mount / "last.pt")
    with atomic_dir(mount / "pitch") as out:
        (out / "seg-0.npy").write_bytes(b"old")
    ckpt_before = (mount / "last.pt").read_bytes()

    def partition():
        with atomic_dir(mount / "pitch") as out:
            for i in range(64):
                (out / f"seg-{i}.npy").write_bytes(os.urandom(1 << 14))

    for name, write in [("file", lambda: atomic_write_bytes(mount / "metrics.json", os.urandom(1 << 20))),
                        ("checkpoint", lambda: atomic_save({"w": torch.ones(1 << 18)}, mount / "last.pt")),
                        ("partition", partition)]:
        try:
            write()
            result[name] = "written"
        except OSError as exc:
            result[name] = errno.errorcode.get(exc.errno, str(exc.errno))
    result["metrics"] = (mount / "metrics.json").read_bytes().decode()
    result["checkpoint_intact"] = (mount / "last.pt").read_bytes() == ckpt_before
    result["partition_files"] = sorted(p.name for p in (mount / "pitch").iterdir())
    result["partition_data"] = (mount / "pitch" / "seg-0.npy").read_bytes().decode()
    result["left"] = sorted(p.name for p in mount.iterdir())
    print(json.dumps(result))
""")


def test_a_real_full_disk_leaves_every_old_artifact_and_no_temp(tmp_path):
    # The same three writes on a 256 KiB tmpfs, in a user + mount namespace (no root needed where the kernel allows
    # unprivileged user namespaces). Fails like the injected tests, with the kernel's own ENOSPC.
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no unprivileged user+mount namespace here (unshare -rm); the injected ENOSPC tests still ran")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run([unshare, "-rm", sys.executable, "-c", REAL_DISK_FULL, str(mount)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["file"] == result["checkpoint"] == result["partition"] == "ENOSPC", result
    assert result["metrics"] == "old" and result["checkpoint_intact"]
    assert result["partition_files"] == ["seg-0.npy"] and result["partition_data"] == "old"
    assert result["left"] == ["last.pt", "metrics.json", "pitch"]  # no temp file or folder
