"""Workspaces: a folder with recordings, derived data, an MLflow store, a Dagster home and a DVC repo.

Every file path the pipeline uses comes from :class:`Workspace`, so the storage root can later move to an
object store by changing this one place. This module imports neither dagster nor torch: the CLI and the
Definitions load it cheaply.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import yaml

from svc_model.storage import atomic_dir, atomic_write_text, sweep_stale_temps

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORKSPACE_FILE = "svc.yaml"
DVC_REMOTE_NAME = "local"
DVC_REMOTE_DIR = ".dvc-remote"
EXPERIMENT_NAME = "svc"
SINGER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# The workspace lock: a folder of its own that ignores itself in git, so that old workspaces need no .gitignore edit.
LOCK_DIR = ".svc"
LOCK_TIMEOUT_ENV = "SVC_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 600.0

DAGSTER_YAML = """\
# Dagster instance of this workspace (DAGSTER_HOME). Storage defaults to SQLite in this folder.
telemetry:
  enabled: false
run_queue:
  max_concurrent_runs: 2
"""

DVC_YAML = """\
# DVC's view of the pipeline. It does not re-implement anything: each stage calls the same Dagster
# materializations through `svc` (put the project's .venv/bin on PATH). Dagster decides what is stale, so the
# outputs persist between runs and `dvc repro` only does the work that changed. Each stage depends on svc.yaml
# and on the config files it names (the profile and what that extends; `svc init` rewrites those lines).
stages:
  features:
    cmd: svc build
    deps:
      - data/raw
      - svc.yaml
    outs:
      - data/derived/clean_audio:
          persist: true
      - data/derived/pitch:
          persist: true
      - data/derived/ppg:
          persist: true
      - data/derived/vec:
          persist: true
      - data/derived/speaker_embedding:
          persist: true
  train:
    cmd: svc train --fine-tune
    deps:
      - data/derived/clean_audio
      - data/derived/pitch
      - data/derived/ppg
      - data/derived/vec
      - data/derived/speaker_embedding
      - svc.yaml
    outs:
      - data/derived/training_set:
          persist: true
    metrics:
      - metrics/evaluation.json:
          cache: false
"""

GITIGNORE = """\
# Derived data and stores are rebuilt or shared through DVC/MLflow, not git.
/data/derived/
/mlflow/*
!/mlflow/.gitkeep
/.dagster/*
!/.dagster/dagster.yaml
/.dvc-remote/
/outputs/
/runs/
/models/
/logs/
__pycache__/
"""


class WorkspaceError(RuntimeError):
    """The workspace is missing, malformed, or a command on it failed."""


class WorkspaceBusy(WorkspaceError):
    """Another process (or thread) held the workspace lock for longer than the caller would wait."""


# One FileLock per lock file in this process: filelock refuses a second instance on a path this process already
# holds (it would deadlock), and one shared instance is re-entrant per thread, so `add_singer` can hold the lock
# while the `dvc add` inside it takes it again. Other threads (the studio's workers) wait like other processes.
_LOCKS: dict[str, object] = {}
_LOCKS_GUARD = threading.Lock()


def _file_lock(path: Path):
    from filelock import FileLock

    with _LOCKS_GUARD:
        lock = _LOCKS.get(str(path))
        if lock is None:
            # preserve_lock_file: unlinking on release lets a waiter lock a file that is already gone.
            lock = _LOCKS[str(path)] = FileLock(path, preserve_lock_file=True)
        return lock


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def lock_timeout_s() -> float:
    """How long a command waits for the workspace lock: ``$SVC_LOCK_TIMEOUT`` seconds, default 600."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise WorkspaceError(f"${LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise WorkspaceError(f"${LOCK_TIMEOUT_ENV}={raw!r} must be 0 or more seconds")
    return value


def validate_singer_name(name: str) -> str:
    """Letters, digits, ``-`` and ``_``; starts with a letter or digit; at most 64 characters."""
    if not isinstance(name, str) or not SINGER_NAME_RE.fullmatch(name):
        raise WorkspaceError(
            f"invalid singer name {name!r}: use 1-64 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class WorkspaceSettings:
    """What ``svc.yaml`` holds."""

    config: str = "tiny"
    mlflow_tracking_uri: str | None = None
    registered_model_name: str = "svc"


@dataclass(frozen=True)
class Workspace:
    root: Path

    # ---- discovery -------------------------------------------------------------------------------------------
    @classmethod
    def discover(cls, explicit: str | Path | None = None) -> "Workspace":
        """``explicit`` > ``$SVC_WORKSPACE`` > nearest parent of the cwd with ``svc.yaml`` > the project root."""
        if explicit is None:
            explicit = os.environ.get("SVC_WORKSPACE") or None
        if explicit is not None:
            root = Path(explicit).expanduser().resolve()
            if not (root / WORKSPACE_FILE).is_file():
                raise WorkspaceError(f"{root}: not a workspace (no {WORKSPACE_FILE}); create one with `svc init {root}`")
            return cls(root)
        here = Path.cwd().resolve()
        for candidate in (here, *here.parents):
            if (candidate / WORKSPACE_FILE).is_file():
                return cls(candidate)
        return cls(PROJECT_ROOT)

    # ---- settings --------------------------------------------------------------------------------------------
    @property
    def settings(self) -> WorkspaceSettings:
        path = self.root / WORKSPACE_FILE
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise WorkspaceError(f"{path}: cannot read workspace settings: {exc}") from exc
        known = set(WorkspaceSettings.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise WorkspaceError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        return WorkspaceSettings(**raw)

    def config(self):
        """The typed model/pipeline config this workspace uses (``svc.yaml: config``)."""
        from svc_model.config import load_config

        return load_config(self.settings.config, base_dir=self.root)

    # ---- layout ----------------------------------------------------------------------------------------------
    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def derived_dir(self) -> Path:
        return self.root / "data" / "derived"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def dagster_home(self) -> Path:
        return self.root / ".dagster"

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def runs_dir(self) -> Path:
        """Training runs: checkpoints, TensorBoard logs, the manifest they trained on."""
        return self.root / "runs"

    def singer_raw_dir(self, singer: str) -> Path:
        return self.raw_dir / validate_singer_name(singer)

    def singer_dvc_file(self, singer: str) -> Path:
        return self.raw_dir / f"{validate_singer_name(singer)}.dvc"

    def partition_dir(self, asset: str, singer: str) -> Path:
        return self.derived_dir / asset / validate_singer_name(singer)

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    @property
    def tracking_uri(self) -> str:
        # An absolute SQLite path: with a relative one, artifacts land wherever the process started.
        return self.settings.mlflow_tracking_uri or f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return (self.mlflow_dir / "artifacts").as_uri()

    def env(self) -> dict[str, str]:
        """Environment for child processes (dagster dev, mlflow ui) so they see this workspace."""
        env = dict(os.environ)
        env["DAGSTER_HOME"] = str(self.dagster_home)
        env["SVC_WORKSPACE"] = str(self.root)
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        return env

    # ---- singers ---------------------------------------------------------------------------------------------
    def singers(self) -> list[str]:
        """Singers tracked by DVC: every valid ``data/raw/<name>.dvc``."""
        if not self.raw_dir.is_dir():
            return []
        return sorted(p.stem for p in self.raw_dir.glob("*.dvc") if SINGER_NAME_RE.fullmatch(p.stem))

    def untracked_singer_dirs(self) -> list[str]:
        """Folders under ``data/raw`` with no ``.dvc`` file yet (dropped in by hand, not ``dvc add``-ed)."""
        if not self.raw_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.raw_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and not (self.raw_dir / f"{p.name}.dvc").exists()
        )

    def singer_data_version(self, singer: str) -> str | None:
        """The DVC md5 of ``data/raw/<singer>`` as recorded in its ``.dvc`` file, or ``None`` if untracked."""
        path = self.singer_dvc_file(singer)
        if not path.is_file():
            return None
        try:
            outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
            md5 = outs[0]["md5"]
        except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
            raise WorkspaceError(f"{path}: not a valid DVC file: {exc}") from exc
        return str(md5)

    # ---- atomic partitions -----------------------------------------------------------------------------------
    def asset_dir(self, asset: str) -> Path:
        """Folder of an asset that is not partitioned by singer (``training_set``, ``evaluation_report``)."""
        return self.derived_dir / asset

    def write_partition(self, asset: str, singer: str):
        """Atomically replace ``data/derived/<asset>/<singer>`` (see :func:`atomic_dir`).

        First removes temp folders that killed writers left beside it: one entry per singer, so cheap."""
        final = self.partition_dir(asset, singer)
        sweep_stale_temps(final.parent)
        return atomic_dir(final)

    def write_asset(self, asset: str):
        """Atomically replace ``data/derived/<asset>`` (see :func:`atomic_dir`), after sweeping killed writers'
        temp folders beside it."""
        sweep_stale_temps(self.derived_dir)
        return atomic_dir(self.asset_dir(asset))

    def resolve(self, path: str | Path) -> Path:
        """A workspace-relative path (as stored in manifests) made absolute."""
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    def remove_partition(self, asset: str, singer: str) -> bool:
        path = self.partition_dir(asset, singer)
        if path.exists():
            shutil.rmtree(path)
            return True
        return False

    # ---- the workspace lock ----------------------------------------------------------------------------------
    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_DIR / "workspace.lock"

    @property
    def lock_holder_file(self) -> Path:
        """Who holds the lock (pid, purpose, command, since), so that a waiter can say what it waits for."""
        return self.root / LOCK_DIR / "workspace.lock.json"

    def lock_holder(self) -> dict | None:
        try:
            return json.loads(self.lock_holder_file.read_text())
        except (OSError, ValueError):
            return None

    def _describe_holder(self) -> str:
        holder = self.lock_holder()
        if not holder:
            return "another process"
        pid = holder.get("pid")
        whose = " (this process, another thread)" if pid == os.getpid() else ""
        return (f"{holder.get('purpose', '?')} held by pid {pid}{whose} since {holder.get('since', '?')} "
                f"(`{holder.get('command', '?')}`)")

    @contextlib.contextmanager
    def lock(self, purpose: str, timeout: float | None = None,
             log: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the workspace lock for a step that must not interleave with another (registering or removing a
        singer, DVC commands, promotion). Re-entrant within a thread.

        A second caller says what it waits for ("<its purpose>: waiting for <purpose> held by pid N ...") through ``log``
        (default: stderr) and gives up after ``timeout`` seconds (default ``$SVC_LOCK_TIMEOUT``, else 600;
        0 = do not wait) with :class:`WorkspaceBusy`, before it has changed anything. The lock is an OS file
        lock (flock): a killed holder releases it with its last breath, so there is no stale lock to remove.
        """
        from filelock import Timeout

        timeout = lock_timeout_s() if timeout is None else timeout
        lock_dir = self.lock_file.parent
        if not lock_dir.is_dir():
            lock_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(lock_dir / ".gitignore", "# the workspace lock: runtime state, never versioned\n*\n")
        file_lock = _file_lock(self.lock_file)
        try:
            file_lock.acquire(timeout=0)
        except Timeout:
            if timeout > 0:
                (log or _stderr)(f"{purpose}: waiting for {self._describe_holder()} on workspace {self.root} "
                                 f"(up to {timeout:.0f} s; ${LOCK_TIMEOUT_ENV} changes this)")
            try:
                file_lock.acquire(timeout=timeout)
            except Timeout:
                raise WorkspaceBusy(
                    f"workspace {self.root} is busy: {self._describe_holder()}; gave up waiting for it after "
                    f"{timeout:.0f} s, so {purpose} changed nothing. Run it again when that has finished (the lock "
                    f"is released when its process ends, even if killed), or wait longer with ${LOCK_TIMEOUT_ENV}."
                ) from None
        outermost = file_lock.lock_counter == 1
        try:
            if outermost:
                atomic_write_text(self.lock_holder_file, json.dumps({
                    "pid": os.getpid(), "purpose": purpose, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "?",
                }))
            yield
        finally:
            if outermost:
                self.lock_holder_file.unlink(missing_ok=True)
            file_lock.release()

    # ---- external tools --------------------------------------------------------------------------------------
    def run_tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run git/dvc in the workspace. DVC commands hold the workspace lock: DVC's own repo lock fails at once
        instead of waiting, so two `svc` commands that both run `dvc add` would otherwise make one of them fail."""
        exe = args[0]
        if exe in ("dvc", "dagster", "mlflow"):
            local = Path(sys.executable).parent / exe
            if local.exists():
                exe = str(local)
        guard = self.lock(" ".join(args[:2])) if args[0] == "dvc" else contextlib.nullcontext()
        with guard:
            proc = subprocess.run([exe, *args[1:]], cwd=self.root, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise WorkspaceError(
                f"`{' '.join(args)}` failed in {self.root} (exit {proc.returncode}):\n{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def ensure_runtime_dirs(self) -> None:
        """Create the git-ignored folders that a fresh clone lacks. Idempotent and cheap."""
        for path in (self.raw_dir, self.derived_dir, self.mlflow_dir / "artifacts", self.dagster_home):
            path.mkdir(parents=True, exist_ok=True)
        dagster_yaml = self.dagster_home / "dagster.yaml"
        if not dagster_yaml.exists():
            atomic_write_text(dagster_yaml, DAGSTER_YAML)


CONFIG_DEP_NOTE = "# config named by svc.yaml (svc init updates)"


def with_config_deps(ws: Workspace, dvc_yaml: str) -> str:
    """``dvc_yaml`` with every stage that depends on ``svc.yaml`` also depending on the config files it names (the
    profile, then each file it extends): workspace-relative inside the workspace, absolute outside it (a profile in
    the installed project's configs/). Lines written before for another config are replaced."""
    from svc_model.config import config_files

    kept = [line for line in dvc_yaml.splitlines(keepends=True) if not line.rstrip().endswith(CONFIG_DEP_NOTE)]
    deps = []
    for path in config_files(ws.settings.config, base_dir=ws.root):
        path = path.resolve()
        dep = path.relative_to(ws.root) if path.is_relative_to(ws.root) else path
        deps.append(f"{dep}  {CONFIG_DEP_NOTE}")
    out = []
    for line in kept:
        out.append(line)
        if line.strip() == "- svc.yaml":
            indent = line[: len(line) - len(line.lstrip())]
            out += [f"{indent}- {dep}\n" for dep in deps]
    return "".join(out)


def init_workspace(root: str | Path, config: str = "tiny") -> Workspace:
    """Create (or complete) a workspace: folders, ``svc.yaml``, git + DVC with a local default remote, MLflow store.

    Idempotent: running it on an existing workspace only adds what is missing.
    """
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings_file = root / WORKSPACE_FILE
    if not settings_file.exists():
        atomic_write_text(
            settings_file,
            "# VoiceCraft SVC workspace settings\n"
            f"config: {config}            # a profile in configs/ or a YAML path relative to this folder\n"
            "mlflow_tracking_uri: null   # null = sqlite:///<workspace>/mlflow/mlflow.db\n"
            "registered_model_name: svc\n"
        )
    ws = Workspace(root)
    ws.settings  # fail fast on a malformed svc.yaml
    ws.ensure_runtime_dirs()
    (root / "mlflow" / ".gitkeep").touch()
    if not (root / "dvc.yaml").exists():
        atomic_write_text(root / "dvc.yaml", with_config_deps(ws, DVC_YAML))
    else:  # the config svc.yaml names may have changed since: keep the stages' config deps in step
        current = (root / "dvc.yaml").read_text()
        if with_config_deps(ws, current) != current:
            atomic_write_text(root / "dvc.yaml", with_config_deps(ws, current))
    gitignore = root / ".gitignore"
    if not gitignore.exists():
        atomic_write_text(gitignore, GITIGNORE)
    if not (root / ".git").exists():
        ws.run_tool("git", "init", "-q", "-b", "main")
    if not (root / ".dvc").exists():
        ws.run_tool("dvc", "init", "-q")
        ws.run_tool("dvc", "config", "core.autostage", "true")
        ws.run_tool("dvc", "config", "core.analytics", "false")
    remotes = ws.run_tool("dvc", "remote", "list").stdout
    if not remotes.strip():
        (root / DVC_REMOTE_DIR).mkdir(exist_ok=True)
        # A relative url is stored relative to .dvc/config, so the workspace can move.
        ws.run_tool("dvc", "remote", "add", "-d", DVC_REMOTE_NAME, DVC_REMOTE_DIR)
    init_mlflow(ws)
    ws.run_tool("git", "add", "-A")
    return ws


def init_mlflow(ws: Workspace) -> None:
    """Create the tracking store and the ``svc`` experiment with an absolute artifact location."""
    if ws.settings.mlflow_tracking_uri:  # a tracking server owns its own artifact location
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ws.tracking_uri)
    if client.get_experiment_by_name(EXPERIMENT_NAME) is None:
        client.create_experiment(EXPERIMENT_NAME, artifact_location=ws.artifact_root)
