"""MLflow for a workspace: the experiment, training-run logging, the registry and its aliases.

Aliases: ``production`` is what conversion uses; ``candidate`` is the newest evaluated version. Stages are not
used (deprecated in MLflow).
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from assets.workspace import EXPERIMENT_NAME, Workspace, init_mlflow
from svc_model.train import TrainerCallback

PRODUCTION = "production"
CANDIDATE = "candidate"
UI_PORT = 5000


def client(ws: Workspace):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=ws.tracking_uri, registry_uri=ws.tracking_uri)


def experiment_id(ws: Workspace) -> str:
    init_mlflow(ws)
    return client(ws).get_experiment_by_name(EXPERIMENT_NAME).experiment_id


def run_url(ws: Workspace, run_id: str) -> str:
    """Where the run is in ``mlflow ui`` (started with the command the demo prints)."""
    return f"http://127.0.0.1:{UI_PORT}/#/experiments/{experiment_id(ws)}/runs/{run_id}"


def git_commit(ws: Workspace) -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True)
    commit = proc.stdout.strip() if proc.returncode == 0 else "none"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ws.root, capture_output=True, text=True).stdout
    return commit + ("-dirty" if dirty.strip() else "")


def log_params(mlflow_client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:500]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[i : i + 100])


class MlflowTrainingCallback(TrainerCallback):
    """Every loss term per step (batched writes), validation audio and mel images as artifacts."""

    def __init__(self, mlflow_client, run_id: str, sample_rate: int, flush_every: int = 10):
        self.client, self.run_id, self.sample_rate, self.flush_every = mlflow_client, run_id, sample_rate, flush_every
        self._pending = []

    def on_step(self, step: int, losses: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(f"train/{k}", float(v), now, step) for k, v in losses.items()]
        if step % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[i : i + 1000])
        self._pending = []

    def on_validation(self, step: int, metrics: dict[str, float], samples: list[dict]) -> None:
        from svc_model.audio import write_audio
        from svc_model.train import mel_image

        self.flush()
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, f"valid/{k}", float(v), step=step)
        with tempfile.TemporaryDirectory() as tmp:
            for i, s in enumerate(samples):
                name = s["segment_id"].replace("/", "__")
                write_audio(Path(tmp) / f"{i:02d}-{name}-generated.wav", s["audio"], self.sample_rate)
                write_audio(Path(tmp) / f"{i:02d}-{name}-reference.wav", s["reference"], self.sample_rate)
                _save_png(Path(tmp) / f"{i:02d}-{name}-mel.png", mel_image(s["mel"]))
            self.client.log_artifacts(self.run_id, tmp, artifact_path=f"validation/step-{step:08d}")

    def on_end(self, trainer) -> None:
        self.flush()


def _save_png(path: Path, image) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(str(path), image)


def register_checkpoint(ws: Workspace, run_id: str, checkpoint: Path, tags: dict[str, str] | None = None):
    """Log the checkpoint as a pyfunc in ``run_id`` and register a new version of the workspace's model."""
    import contextlib

    import mlflow
    from assets import pyfunc_model

    mlflow.set_tracking_uri(ws.tracking_uri)
    mlflow.set_registry_uri(ws.tracking_uri)
    name = ws.settings.registered_model_name
    active = mlflow.active_run()
    reuse = active is not None and active.info.run_id == run_id
    with contextlib.nullcontext() if reuse else mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=pyfunc_model.__file__, artifacts={"checkpoint": str(checkpoint)},
            signature=pyfunc_signature(), pip_requirements=["voicecraft-svc"], registered_model_name=name,
            await_registration_for=60)
    version = client(ws).get_model_version(name, str(info.registered_model_version))
    for key, value in (tags or {}).items():
        client(ws).set_model_version_tag(name, version.version, key, str(value))
    return version


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "source"), ColSpec("string", "target"), ColSpec("string", "output"),
                     ColSpec("string", "pitch_shift", required=False)])
    outputs = Schema([ColSpec("string", "output"), ColSpec("string", "target"), ColSpec("double", "pitch_shift"),
                      ColSpec("double", "seconds")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def model_versions(ws: Workspace) -> list:
    name = ws.settings.registered_model_name
    c = client(ws)
    try:
        found = c.search_model_versions(f"name='{name}'")
    except Exception:
        return []
    # search results carry no aliases; a get per version does
    return sorted((c.get_model_version(name, v.version) for v in found), key=lambda v: int(v.version))


def alias_version(ws: Workspace, alias: str):
    """The model version an alias points at, or ``None``."""
    from mlflow.exceptions import MlflowException

    try:
        return client(ws).get_model_version_by_alias(ws.settings.registered_model_name, alias)
    except MlflowException:
        return None


def download_checkpoint(ws: Workspace, version) -> Path:
    """The checkpoint file of a registered version (downloaded from its artifacts, cached by MLflow)."""
    import mlflow

    mlflow.set_tracking_uri(ws.tracking_uri)
    mlflow.set_registry_uri(ws.tracking_uri)
    uri = f"models:/{ws.settings.registered_model_name}/{version.version}"
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=ws.tracking_uri)
    found = sorted(Path(local).rglob("*.pt"))
    if not found:
        raise FileNotFoundError(f"model version {version.version}: no checkpoint among its artifacts ({local})")
    return found[0]
