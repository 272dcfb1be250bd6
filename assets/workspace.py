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
concurrency:
  runs:
    max_concurrent_runs: 2   # runs the daemon starts at once (`svc build --parallel N`: N at once)
  pools:
    default_limit: 1         # steps at once in a pool with no limit of its own: "gpu" (orchestration/pools.py)
"""

# The same instance on a shared Postgres (svc.yaml: dagster_postgres_url). The URL is read from the environment, never
# written here (this file is versioned): `svc ui` and `svc` commands set it from svc.yaml, or from the variable itself.
DAGSTER_POSTGRES_ENV = "SVC_DAGSTER_POSTGRES_URL"
MLFLOW_TRACKING_ENV = "SVC_MLFLOW_TRACKING_URI"
# DAGSTER_YAML with its storage on Postgres: the same settings, so that a change to one reaches the other.
DAGSTER_YAML_POSTGRES = (
    "# Dagster instance of this workspace (DAGSTER_HOME). Runs, events and schedules are stored in the Postgres\n"
    f"# database that svc.yaml's dagster_postgres_url names (or ${DAGSTER_POSTGRES_ENV}); `svc` writes this file,\n"
    "# and sets the variable for the processes it starts.\n"
    + DAGSTER_YAML.split("\n", 1)[1]
    + f"storage:\n  postgres:\n    postgres_url:\n      env: {DAGSTER_POSTGRES_ENV}\n"
)
# What `svc` wrote before: switched to DAGSTER_YAML_POSTGRES when svc.yaml names a Postgres.
GENERATED_DAGSTER_YAMLS = (
    ("# Dagster instance of this workspace (DAGSTER_HOME). Storage defaults to SQLite in this folder.\n"
     "telemetry:\n  enabled: false\nrun_queue:\n  max_concurrent_runs: 2\n"),
)
POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg2")
MLFLOW_SERVER_SCHEMES = ("http", "https")

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


def redact_url(url: str | None) -> str | None:
    """``url`` with its password (if any) replaced by ``***``: for messages and logs."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[1]}"))


def url_has_password(url: str | None) -> bool:
    from urllib.parse import urlsplit

    return bool(url) and urlsplit(url).password is not None


def validate_postgres_url(url: str, what: str = "dagster_postgres_url") -> str:
    """``postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE``, as SQLAlchemy (dagster-postgres) takes it."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except (ValueError, TypeError) as exc:
        raise WorkspaceError(f"{what}: {redact_url(str(url))!r} is not a URL: {exc}") from None
    hint = "postgresql://USER@HOST:PORT/DATABASE (the password in PGPASSWORD or ~/.pgpass, not in svc.yaml)"
    if parts.scheme not in POSTGRES_SCHEMES:
        extra = " (SQLAlchemy needs 'postgresql://', not 'postgres://')" if parts.scheme == "postgres" else ""
        raise WorkspaceError(f"{what}: {redact_url(url)!r} is not a Postgres URL{extra}; use {hint}")
    if not parts.hostname or not parts.path.strip("/"):
        raise WorkspaceError(f"{what}: {redact_url(url)!r} needs a host and a database name; use {hint}")
    return url


def validate_mlflow_server_url(url: str, what: str = "--mlflow") -> str:
    """An MLflow tracking server: ``http(s)://HOST:PORT``."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018
    except (ValueError, TypeError) as exc:
        raise WorkspaceError(f"{what}: {redact_url(str(url))!r} is not a URL: {exc}") from None
    if parts.scheme not in MLFLOW_SERVER_SCHEMES or not parts.hostname:
        raise WorkspaceError(
            f"{what}: {redact_url(url)!r} is not an MLflow tracking server URL; use http://HOST:PORT or "
            "https://HOST (started with `mlflow server --backend-store-uri postgresql://... --serve-artifacts`)"
        )
    if url_has_password(url):
        raise WorkspaceError(f"{what}: put the server's login in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, "
                             "not in the URL (svc.yaml is versioned)")
    return url.rstrip("/")


@dataclass(frozen=True)
class WorkspaceSettings:
    """What ``svc.yaml`` holds, with ``$SVC_DAGSTER_POSTGRES_URL`` / ``$SVC_MLFLOW_TRACKING_URI`` overriding it."""

    config: str = "tiny"
    mlflow_tracking_uri: str | None = None  # None: sqlite:///<workspace>/mlflow/mlflow.db
    registered_model_name: str = "svc"
    dagster_postgres_url: str | None = None  # None: SQLite in <workspace>/.dagster
    gpu_pool: str = "auto"  # auto | always | never: which steps take a "gpu" pool slot (orchestration/pools.py)

    def __post_init__(self):
        if self.dagster_postgres_url:
            validate_postgres_url(self.dagster_postgres_url)


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
        # The environment names the shared servers (and keeps a password out of the versioned svc.yaml).
        for key, env in (("dagster_postgres_url", DAGSTER_POSTGRES_ENV), ("mlflow_tracking_uri", MLFLOW_TRACKING_ENV)):
            if os.environ.get(env):
                raw[key] = os.environ[env]
        try:
            return WorkspaceSettings(**raw)
        except WorkspaceError as exc:
            raise WorkspaceError(f"{path}: {exc}") from None

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
    def tracking_server(self) -> bool:
        """MLflow is a tracking server (``http(s)://``): it owns the artifact store, clients download through it."""
        return self.tracking_uri.split(":", 1)[0] in MLFLOW_SERVER_SCHEMES

    @property
    def dagster_postgres_url(self) -> str | None:
        """The shared Dagster storage (Postgres) as SQLAlchemy takes it, or ``None`` for SQLite in ``.dagster``.

        ``postgresql://`` is made ``postgresql+psycopg2://``: SQLAlchemy 2.1 reads the bare scheme as psycopg 3,
        and dagster-postgres brings psycopg2."""
        url = self.settings.dagster_postgres_url
        if url and url.startswith("postgresql://"):
            url = "postgresql+psycopg2://" + url.removeprefix("postgresql://")
        return url

    @property
    def artifact_root(self) -> str:
        return (self.mlflow_dir / "artifacts").as_uri()

    def env(self) -> dict[str, str]:
        """Environment for child processes (dagster dev, mlflow ui) so they see this workspace."""
        env = dict(os.environ)
        env["DAGSTER_HOME"] = str(self.dagster_home)
        env["SVC_WORKSPACE"] = str(self.root)
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        postgres = self.dagster_postgres_url
        if postgres:  # dagster.yaml reads it from there (see DAGSTER_YAML_POSTGRES)
            env[DAGSTER_POSTGRES_ENV] = postgres
        else:
            env.pop(DAGSTER_POSTGRES_ENV, None)
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
        wanted = DAGSTER_YAML_POSTGRES if self.dagster_postgres_url else DAGSTER_YAML
        try:
            current = dagster_yaml.read_text()
        except FileNotFoundError:
            current = None
        # Switch between SQLite and Postgres as svc.yaml says (from any file svc wrote); a dagster.yaml edited by
        # hand is left alone, and so is an older default while the storage stays SQLite.
        ours = (DAGSTER_YAML, *GENERATED_DAGSTER_YAMLS) if wanted == DAGSTER_YAML_POSTGRES else (DAGSTER_YAML_POSTGRES,)
        if current is None or current in ours:
            atomic_write_text(dagster_yaml, wanted)


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


def set_settings(root: str | Path, **values: str | None) -> None:
    """Set top-level keys of ``svc.yaml`` in place, keeping its comments and the other lines."""
    path = Path(root) / WORKSPACE_FILE
    lines = path.read_text().splitlines(keepends=True)
    for key, value in values.items():
        line = f"{key}: {'null' if value is None else json.dumps(value)}\n"  # a JSON string is valid YAML
        found = [i for i, text in enumerate(lines) if re.match(rf"{re.escape(key)}\s*:", text)]
        if found:
            comment = re.search(r"\s+#.*$", lines[found[0]].rstrip("\n"))
            lines[found[0]] = line.rstrip("\n") + (comment.group(0) if comment else "") + "\n"
        else:
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines.append(line)
    atomic_write_text(path, "".join(lines))


def init_workspace(root: str | Path, config: str = "tiny", *, postgres_url: str | None = None,
                   mlflow_uri: str | None = None) -> Workspace:
    """Create (or complete) a workspace: folders, ``svc.yaml``, git + DVC with a local default remote, MLflow store.

    ``postgres_url`` / ``mlflow_uri``: a shared instance (Dagster storage on Postgres, an MLflow tracking server),
    written into ``svc.yaml`` (also on an existing workspace). Idempotent: otherwise, running it on an existing
    workspace only adds what is missing.
    """
    if postgres_url is not None:
        validate_postgres_url(postgres_url, "--postgres")
    if mlflow_uri is not None:
        mlflow_uri = validate_mlflow_server_url(mlflow_uri)
        check_tracking_server(mlflow_uri)  # before anything is written
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings_file = root / WORKSPACE_FILE
    if not settings_file.exists():
        atomic_write_text(
            settings_file,
            "# VoiceCraft SVC workspace settings\n"
            f"config: {config}            # a profile in configs/ or a YAML path relative to this folder\n"
            "mlflow_tracking_uri: null   # null = sqlite:///<workspace>/mlflow/mlflow.db; or http://HOST:PORT (a server)\n"
            "registered_model_name: svc\n"
            "dagster_postgres_url: null  # null = SQLite in .dagster/; or postgresql://USER@HOST:PORT/DB (shared)\n"
        )
    shared = {k: v for k, v in (("dagster_postgres_url", postgres_url), ("mlflow_tracking_uri", mlflow_uri)) if v}
    if shared:
        set_settings(root, **shared)
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
    if ws.tracking_server and mlflow_uri is None:
        check_tracking_server(ws.tracking_uri)
    init_mlflow(ws)
    ws.run_tool("git", "add", "-A")
    return ws


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """Fail at once, clearly, when the MLflow tracking server does not answer (MLflow's own client retries for
    minutes)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise WorkspaceError(f"MLflow tracking server {redact_url(uri)} does not answer ({exc}); start it with "
                             "`mlflow server --backend-store-uri postgresql://... --serve-artifacts "
                             "--artifacts-destination DIR --host HOST --port PORT`") from None


def init_mlflow(ws: Workspace) -> None:
    """Create the tracking store and the ``svc`` experiment: with an absolute artifact location under the
    workspace for a database store; on a tracking server (``http(s)://``), where the server puts artifacts
    (proxied through it with ``--serve-artifacts``)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ws.tracking_uri)
    if client.get_experiment_by_name(EXPERIMENT_NAME) is not None:
        return
    try:
        if ws.tracking_server:  # the server owns the artifact location
            client.create_experiment(EXPERIMENT_NAME)
        else:
            client.create_experiment(EXPERIMENT_NAME, artifact_location=ws.artifact_root)
    except MlflowException:
        # A clone of this workspace (another machine) created it first: that is the same experiment.
        if client.get_experiment_by_name(EXPERIMENT_NAME) is None:
            raise
