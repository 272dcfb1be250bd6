"""Workspaces: a folder with recordings, derived data, an MLflow store, a Dagster home and a DVC repo.

Every file path the pipeline uses comes from :class:`Workspace`, so the storage root can later move to an
object store by changing this one place. This module imports neither dagster nor torch: the CLI and the
Definitions load it cheaply.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from svc_model.storage import atomic_dir

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORKSPACE_FILE = "svc.yaml"
DVC_REMOTE_NAME = "local"
DVC_REMOTE_DIR = ".dvc-remote"
EXPERIMENT_NAME = "svc"
SINGER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

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
# outputs persist between runs and `dvc repro` only does the work that changed.
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
        """Atomically replace ``data/derived/<asset>/<singer>`` (see :func:`atomic_dir`)."""
        return atomic_dir(self.partition_dir(asset, singer))

    def write_asset(self, asset: str):
        """Atomically replace ``data/derived/<asset>`` (see :func:`atomic_dir`)."""
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

    # ---- external tools --------------------------------------------------------------------------------------
    def run_tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run git/dvc in the workspace. DVC takes a repo lock: never call this from parallel partition runs."""
        exe = args[0]
        if exe in ("dvc", "dagster", "mlflow"):
            local = Path(sys.executable).parent / exe
            if local.exists():
                exe = str(local)
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
            dagster_yaml.write_text(DAGSTER_YAML)


def init_workspace(root: str | Path, config: str = "tiny") -> Workspace:
    """Create (or complete) a workspace: folders, ``svc.yaml``, git + DVC with a local default remote, MLflow store.

    Idempotent: running it on an existing workspace only adds what is missing.
    """
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings_file = root / WORKSPACE_FILE
    if not settings_file.exists():
        settings_file.write_text(
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
        (root / "dvc.yaml").write_text(DVC_YAML)
    gitignore = root / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(GITIGNORE)
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
