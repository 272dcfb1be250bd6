"""The studio (``svc studio``): a Gradio app to convert, add singers, train and promote on one workspace.

:class:`Studio` holds the logic in plain methods that take the page's values and raise :class:`StudioError` with
a message for the page; the tests call them directly. :func:`build_app` is only the layout and the wiring.
Everything goes through the code paths of the CLI: ``add_singer`` and ``build`` (``svc add-singer``, ``svc build``),
a ``svc train`` process (a Dagster run on the workspace's instance), ``promote`` (``svc promote``).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from assets.workspace import Workspace, WorkspaceError, validate_singer_name

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_S = 300.0  # uploads are held in memory and converted while the page waits
TARGET_KINDS = ("Singer", "Reference recording", "Blend")
BLEND_SLOTS = 3
PITCH_RANGE = 12  # semitones either way
FINE_TUNE, FROM_SCRATCH = "Fine-tune from production", "From scratch"
LOSS_TERMS = ("mel", "stft")  # the reconstruction losses; the adversarial and KL terms swing too much to read
STUDIO_RUN_TAG = "svc/studio_launch"  # Dagster run tag by which the studio finds the training run it launched
TRAIN_RUN_TAGS = {"svc/launched_by": "svc train"}  # every `svc train` run (demo, CLI, studio)
# Progress callback: fraction done (0..1) and what is happening.
Progress = Callable[[float, str], None]


class StudioError(Exception):
    """Bad input or a refused action; the message is shown in the page as it is."""


@dataclass
class Conversion:
    audio_path: Path  # the converted audio, under outputs/studio
    f0: pd.DataFrame  # seconds, f0_hz (NaN where unvoiced), curve
    summary: str  # markdown: model, target, shift, timing


@dataclass
class TrainingLaunch:
    token: str  # value of STUDIO_RUN_TAG on the run
    process: subprocess.Popen
    log_path: Path


@dataclass
class TrainingView:
    """One training run as the Train tab shows it: the studio's own launch, else the latest `svc train` run."""

    state: str  # "none" | "starting" | "running" | "succeeded" | "failed"
    status: str  # markdown
    step: int = 0
    steps: int = 0
    losses: pd.DataFrame = field(default_factory=lambda: _losses([]))
    links: str = ""  # markdown: Dagster run, MLflow run, TensorBoard
    report: str = ""  # markdown: the evaluation report
    figures: list[Path] = field(default_factory=list)  # the report's figures
    version: str | None = None  # the registered version the run made
    promotable: bool = False  # registered, and not in production

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")


def _losses(history: list[dict]) -> pd.DataFrame:
    """``history.jsonl`` rows in long form (step, loss, value) for the loss plot."""
    rows = [(r["step"], k, r[k]) for r in history for k in LOSS_TERMS if k in r]
    return pd.DataFrame(rows, columns=["step", "loss", "value"]).astype({"step": "int64", "value": "float64"})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "output"


class Studio:
    """The studio's logic on one workspace. One instance serves every browser tab of a `svc studio` process."""

    def __init__(self, ws: Workspace, *, dagster_url: str = "http://127.0.0.1:3000",
                 tensorboard_url: str = "http://127.0.0.1:6006", max_upload_s: float = DEFAULT_MAX_UPLOAD_S):
        self.ws = ws
        self.dagster_url = dagster_url.rstrip("/")
        self.tensorboard_url = tensorboard_url
        self.max_upload_s = max_upload_s
        self._converters: dict[str, object] = {}  # model version -> Converter (model and extractors loaded once)
        self._lock = threading.Lock()  # page events run on worker threads
        self._launch: TrainingLaunch | None = None

    # ---- audio in --------------------------------------------------------------------------------------------
    def check_audio(self, path: str | Path | None, what: str) -> Path:
        """An upload or recording that the studio accepts: decodable, not silent, at most ``max_upload_s``."""
        from svc_model.audio import AudioError, load_recording

        if not path:
            raise StudioError(f"No audio for {what}: upload a file or record one.")
        path = Path(path)
        audio_cfg = self.ws.config().audio
        limits = audio_cfg.model_copy(update={"max_file_s": min(audio_cfg.max_file_s, self.max_upload_s)})
        try:
            load_recording(path, limits)
        except AudioError as exc:
            raise StudioError(f"{what} ({path.name}): {exc.problem}") from None
        return path

    # ---- Convert tab -----------------------------------------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        """``(label, value)`` for the model picker: the aliases first, then every registered version."""
        from assets import tracking

        versions = tracking.model_versions(self.ws)
        choices = []
        for alias in (tracking.PRODUCTION, tracking.CANDIDATE):
            found = [v for v in versions if alias in (getattr(v, "aliases", None) or [])]
            if found:
                choices.append((f"{alias} (version {found[0].version})", alias))
        return choices + [(f"version {v.version}", str(v.version)) for v in reversed(versions)]

    def _model_version(self, model: str):
        from assets import tracking

        name = self.ws.settings.registered_model_name
        if model in (tracking.PRODUCTION, tracking.CANDIDATE):
            mv = tracking.alias_version(self.ws, model)
            if mv is None:
                raise StudioError(f"No version of the model {name!r} is {model!r} yet: train one in the Train tab "
                                  f"and promote it.")
            return mv
        from mlflow.exceptions import MlflowException

        try:
            return tracking.client(self.ws).get_model_version(name, str(model))
        except MlflowException:
            raise StudioError(f"The model {name!r} has no version {model!r}.") from None

    def converter(self, model: str = "production"):
        """The converter for ``model`` (an alias or a version number) and a label naming the version."""
        from assets import tracking
        from svc_model.infer import Converter

        mv = self._model_version(model)
        with self._lock:
            if mv.version not in self._converters:
                checkpoint = tracking.download_checkpoint(self.ws, mv)
                self._converters[mv.version] = Converter.from_checkpoint(checkpoint, root=self.ws.root)
        alias = f" ({model})" if not str(model).isdigit() else ""
        return self._converters[mv.version], f"{self.ws.settings.registered_model_name} version {mv.version}{alias}"

    def describe_model(self, model: str = "production") -> tuple[str, list[str]]:
        """Markdown naming the model version, and the singers it knows; a missing model is a message, not an error."""
        try:
            converter, label = self.converter(model)
        except StudioError as exc:
            return str(exc), []
        singers = sorted(converter.singers)
        return f"Model: **{label}**, singers: {', '.join(singers) or 'none'}", singers

    def _target(self, kind: str, singer: str | None, reference: str | Path | None,
                blend: Iterable[tuple[str | None, float]]):
        if kind == "Singer":
            if not singer:
                raise StudioError("Pick a target singer.")
            return singer
        if kind == "Reference recording":
            return str(self.check_audio(reference, "the reference recording"))
        if kind == "Blend":
            weights: dict[str, float] = {}
            for name, weight in blend:
                if name:  # the same singer in two slots adds up
                    weights[name] = weights.get(name, 0.0) + float(weight or 0.0)
            if not weights:
                raise StudioError("Pick at least one singer for the blend.")
            return weights
        raise StudioError(f"Unknown target kind {kind!r}; choose one of {', '.join(TARGET_KINDS)}.")

    def convert(self, source: str | Path | None, *, model: str = "production", target_kind: str = "Singer",
                singer: str | None = None, reference: str | Path | None = None,
                blend: Iterable[tuple[str | None, float]] = (), pitch_shift: float | str = 0,
                progress: Progress | None = None) -> Conversion:
        """Convert ``source`` into a singer, a reference recording's voice or a blend; writes outputs/studio/."""
        from svc_model.audio import AudioError, resample, write_audio

        progress = progress or (lambda fraction, desc: None)
        source = self.check_audio(source, "the source")
        if pitch_shift != "auto" and (not isinstance(pitch_shift, (int, float)) or abs(pitch_shift) > PITCH_RANGE):
            raise StudioError(f"Pitch shift must be 'auto' or -{PITCH_RANGE}..{PITCH_RANGE} semitones, "
                              f"got {pitch_shift!r}.")
        target = self._target(target_kind, singer, reference, blend)
        progress(0.0, "loading the model")
        converter, label = self.converter(model)
        try:
            result = converter.convert(str(source), target, pitch_shift, progress=lambda done, total: progress(
                done / total, f"converting piece {done}/{total}"))
        except AudioError as exc:
            raise StudioError(f"{Path(exc.path).name}: {exc.problem}") from None
        except (ValueError, FileNotFoundError) as exc:
            raise StudioError(str(exc)) from None
        progress(1.0, "measuring the output's pitch")
        out = (self.ws.outputs_dir / "studio"
               / f"{_slug(source.stem)}-to-{_slug(result.target)}-{time.strftime('%Y%m%d-%H%M%S')}.wav")
        write_audio(out, result.audio, result.sample_rate)
        # The output's own f0, measured as the source's was: how well the model followed the requested pitch.
        measured = converter.extractor("pitch").extract(resample(result.audio, result.sample_rate, 16000))[:, 0]
        curves = {"source": result.source_f0, "output": measured}
        voiced = result.source_f0 > 0
        followed = float((measured[: len(voiced)] > 0)[voiced[: len(measured)]].mean()) if voiced.any() else 0.0
        if result.pitch_shift:
            curves[f"requested ({result.pitch_shift:+.0f} st)"] = result.output_f0
        f0 = pd.concat([pd.DataFrame({"seconds": pd.RangeIndex(len(v)) / 100, "f0_hz": pd.Series(v).where(v > 0),
                                      "curve": name}) for name, v in curves.items()], ignore_index=True)
        summary = (f"Converted **{source.name}** into **{result.target}** with **{label}**: pitch shift "
                   f"{result.pitch_shift:+.0f} semitones, {len(result.audio) / result.sample_rate:.1f} s of audio in "
                   f"{result.chunks} piece(s), {result.seconds:.1f} s; the output is voiced in {followed:.0%} of the "
                   f"source's voiced frames. Saved as `{self.ws.relative(out)}`.")
        return Conversion(out, f0, summary)

    # ---- Singers tab -----------------------------------------------------------------------------------------
    def singers_overview(self) -> tuple[pd.DataFrame, str]:
        """One row per singer (recordings, segments, minutes, status), and a line on training and the registry."""
        from orchestration.status import workspace_status

        st = workspace_status(self.ws)
        table = pd.DataFrame(
            [{"singer": r.name, "recordings": r.files, "segments": r.segments, "minutes": round(r.minutes, 2),
              "status": r.state, "DVC md5": (r.dvc_md5 or "")[:12]} for r in st.singers],
            columns=["singer", "recordings", "segments", "minutes", "status", "DVC md5"])
        note = (f"Training set: **{st.training['training_set']}**; production: "
                f"**{'version ' + st.production if st.production else 'none'}**, candidate: "
                f"**{'version ' + st.candidate if st.candidate else 'none'}**.")
        if st.training["training_set"] != "fresh" and st.singers:
            note += " Train in the Train tab to include every singer's current recordings."
        return table, note

    def add_singer(self, name: str | None, files: Iterable[str | Path] | None = None,
                   recording: str | Path | None = None, progress: Progress | None = None) -> str:
        """``svc add-singer NAME FILES`` (copy, validate, DVC add and push, register), then build the singer's assets.

        Every upload is checked first, so a bad one changes nothing."""
        from orchestration.build import BuildError, build, open_instance
        from orchestration.singers import add_singer

        progress = progress or (lambda fraction, desc: None)
        name = (name or "").strip()
        if not name:
            raise StudioError("Enter a name for the singer.")
        try:
            validate_singer_name(name)
        except WorkspaceError as exc:
            raise StudioError(str(exc)) from None
        if name in self.ws.singers() or self.ws.singer_raw_dir(name).exists():
            raise StudioError(f"A singer named {name!r} already exists; choose another name.")
        uploads = [Path(f) for f in files or []]
        if not uploads and not recording:
            raise StudioError("Add at least one recording: upload files or record one.")
        problems = []
        for path in uploads + ([Path(recording)] if recording else []):
            try:
                self.check_audio(path, "recording")
            except StudioError as exc:
                problems.append(str(exc))
        if problems:
            raise StudioError("Nothing was added. " + " ".join(problems))
        instance = open_instance(self.ws)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if recording:  # the browser names every recording alike; give it a name worth keeping
                    named = Path(tmp) / f"recording-{time.strftime('%Y%m%d-%H%M%S')}{Path(recording).suffix}"
                    shutil.copy(recording, named)
                    uploads.append(named)
                progress(0.05, "copying, validating and versioning the recordings (DVC)")
                report = add_singer(self.ws, name, uploads, instance=instance, log=log.info)
            progress(0.3, f"building {name}'s clean audio and features (Dagster)")
            try:
                build(self.ws, singers=[name], instance=instance, log=log.info)
            except BuildError as exc:
                raise StudioError(f"Singer {name!r} was added, but building its assets failed: {exc}") from None
        except WorkspaceError as exc:
            raise StudioError(str(exc)) from None
        finally:
            instance.dispose()
        skipped = "".join(f"\n- skipped {Path(p).name}: {why}" for p, why in report.skipped)
        return (f"Added **{name}**: {len(report.added)} recording(s), {report.seconds:.1f} s, DVC md5 "
                f"`{report.data_version}`; its clean audio and features are built. Train in the Train tab to "
                f"include it in the model.{skipped}")

    # ---- Train tab -------------------------------------------------------------------------------------------
    def launch_training(self, mode: str = FINE_TUNE, steps: float | None = None, device: str = "auto") -> str:
        """Start ``svc train`` (one Dagster run on the workspace's instance) in a process of its own.

        Training shares no process with the feature extractors, whose thread pools would compete for the cores.
        Returns the launch token, the value of the run's ``svc/studio_launch`` tag."""
        from assets import tracking
        from orchestration.status import workspace_status

        if self._launch is not None and self._launch.process.poll() is None:
            raise StudioError("A training run launched here is still running; wait for it to finish.")
        if mode not in (FINE_TUNE, FROM_SCRATCH):
            raise StudioError(f"Choose {FINE_TUNE!r} or {FROM_SCRATCH!r}.")
        if steps is not None and (steps != int(steps) or int(steps) < 1):
            raise StudioError(f"Steps must be a whole number of at least 1, got {steps!r}.")
        if device not in ("auto", "cpu", "cuda"):
            raise StudioError(f"Device must be auto, cpu or cuda, got {device!r}.")
        st = workspace_status(self.ws)
        if not st.singers:
            raise StudioError("No singers yet: add one in the Singers tab first.")
        unbuilt = [f"{r.name} ({r.state})" for r in st.singers if r.state != "materialized"]
        if unbuilt:
            raise StudioError(f"Build these singers' assets first: {', '.join(unbuilt)}; run "
                              f"`svc -C {self.ws.root} build`.")
        if mode == FINE_TUNE and tracking.alias_version(self.ws, tracking.PRODUCTION) is None:
            raise StudioError(f"Nothing is in production to fine-tune from; choose {FROM_SCRATCH!r}.")
        token = uuid.uuid4().hex
        log_path = self.ws.root / "logs" / f"studio-train-{token[:8]}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(sys.executable).parent / "svc"), "-C", str(self.ws.root), "train", "--device", device,
               "--tag", f"{STUDIO_RUN_TAG}={token}"]
        # `svc train` alone starts from production, else base, else scratch: from scratch must be asked for.
        cmd += (["--fine-tune"] if mode == FINE_TUNE else ["--from-scratch"]) + (["--steps", str(int(steps))] if steps else [])
        with log_path.open("w") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=self.ws.root, env=self.ws.env())
        log.info("training launched (pid %s): %s; log %s", process.pid, " ".join(cmd), log_path)
        self._launch = TrainingLaunch(token, process, log_path)
        return token

    def training_view(self) -> TrainingView:
        """The training run launched here (or, before one is, the latest `svc train` run): status, progress, loss
        curve, links, and once it has finished, the evaluation report."""
        import dagster as dg

        from orchestration.build import open_instance

        launch = self._launch
        instance = open_instance(self.ws)
        try:
            tags = {STUDIO_RUN_TAG: launch.token} if launch else TRAIN_RUN_TAGS
            runs = instance.get_runs(dg.RunsFilter(tags=tags), limit=1)
        finally:
            instance.dispose()
        exit_code = launch.process.poll() if launch else None
        if not runs:
            if launch is None:
                return TrainingView("none", "No training run yet.", links=self._tensorboard_link())
            if exit_code is None:
                return TrainingView("starting", "Starting `svc train`...", links=self._tensorboard_link())
            return TrainingView("failed", f"Training failed before its Dagster run started (exit {exit_code}): "
                                          f"{self._log_error(launch.log_path)}", links=self._tensorboard_link())
        return self._run_view(runs[0], launch, exit_code)

    def _run_view(self, run, launch: TrainingLaunch | None, exit_code: int | None) -> TrainingView:
        import dagster as dg

        from assets import tracking

        config = (run.run_config or {}).get("ops", {}).get("svc_checkpoint", {}).get("config", {})
        start = config.get("start_from", "scratch")  # runs from before start_from trained from scratch by default
        mode = ("fine-tune" if config.get("fine_tune") or start in ("production", "base") else
                "from scratch" if start == "scratch" else "production, else base, else scratch")
        view = TrainingView("running", "", steps=int(config.get("steps") or self.ws.config().train.steps))
        history = self.ws.runs_dir / f"dagster-{run.run_id[:8]}" / "history.jsonl"
        if history.is_file():
            rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
            view.step = int(rows[-1]["step"]) if rows else 0
            view.losses = _losses(rows)
        mlflow_run = self._mlflow_run(run.run_id)
        view.links = " · ".join(
            [f"[Dagster run {run.run_id[:8]}]({self.dagster_url}/runs/{run.run_id})"]
            + ([f"[MLflow run {mlflow_run.info.run_id[:8]}]({tracking.run_url(self.ws, mlflow_run.info.run_id)})"]
               if mlflow_run else [])
            + [self._tensorboard_link()])
        if run.status == dg.DagsterRunStatus.SUCCESS:
            view.state = "succeeded"
        elif run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED) or (
                exit_code is not None and exit_code != 0):
            view.state = "failed"
        if view.state == "failed":
            reason = self._log_error(launch.log_path) if launch else "see the Dagster run"
            view.status = f"Training run {run.run_id[:8]} ({mode}) **failed** at step {view.step}: {reason}"
            return view
        if view.state == "running":
            phase = ("preparing the training set" if not view.step else
                     f"training, step {view.step} of {view.steps}" if view.step < view.steps else
                     "validating, registering and evaluating the model")
            view.status = f"Training run {run.run_id[:8]} ({mode}): {phase}."
            return view
        view.status = f"Training run {run.run_id[:8]} ({mode}) finished: {view.step} steps."
        self._add_evaluation(view, mlflow_run)
        return view

    def _add_evaluation(self, view: TrainingView, mlflow_run) -> None:
        """The registered version the run made, its evaluation verdict and report, and whether it can be promoted."""
        from assets import tracking
        from assets.promotion import EVAL_FAILED_CHECKS, EVAL_PASSED

        if mlflow_run is None:
            return
        name = self.ws.settings.registered_model_name
        client = tracking.client(self.ws)
        versions = client.search_model_versions(f"name='{name}' and run_id='{mlflow_run.info.run_id}'")
        if not versions:
            return
        mv = client.get_model_version(name, max(versions, key=lambda v: int(v.version)).version)
        view.version = str(mv.version)
        tags = mv.tags or {}
        verdict = {"true": "passed its evaluation checks",
                   "false": f"failed its evaluation checks ({tags.get(EVAL_FAILED_CHECKS, '?')})"}.get(
            tags.get(EVAL_PASSED), "has no evaluation")
        production = tracking.alias_version(self.ws, tracking.PRODUCTION)
        in_production = production is not None and str(production.version) == view.version
        view.promotable = not in_production
        view.status += (f" Registered **{name} version {view.version}**, which {verdict}"
                        + (" and is in production." if in_production else "."))
        report_dir = self.ws.asset_dir("evaluation_report")
        metrics = report_dir / "metrics.json"
        if metrics.is_file() and str(json.loads(metrics.read_text()).get("model_version")) == view.version:
            # The images are shown beside the report: the page cannot resolve the report's relative links.
            view.report = re.sub(r"!\[[^\]]*\]\([^)]*\)\n*", "", (report_dir / "report.md").read_text())
            view.figures = [p for p in (report_dir / "f0_overlays.png", report_dir / "similarity.png") if p.is_file()]

    def _mlflow_run(self, dagster_run_id: str):
        from assets import tracking

        found = tracking.client(self.ws).search_runs(
            [tracking.experiment_id(self.ws)], filter_string=f"tags.dagster_run_id = '{dagster_run_id}'", max_results=1)
        return found[0] if found else None

    def _tensorboard_link(self) -> str:
        return f"[TensorBoard]({self.tensorboard_url}) (`svc -C {self.ws.root} tensorboard`)"

    @staticmethod
    def _log_error(log_path: Path) -> str:
        """The reason a `svc train` process gave: its ``error:`` line, else the last line it wrote."""
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines or [f"no output (see {log_path})"])[-1].removeprefix("error:").strip()

    def promote(self, version: str | None, force: bool = False, reason: str | None = None) -> str:
        """``svc promote VERSION [--force --reason TEXT]``: the same rules, the same messages."""
        from assets.promotion import PromotionError, promote

        if not version:
            raise StudioError("No trained version to promote yet.")
        try:
            return promote(self.ws, version, force=force, reason=reason or None).message
        except PromotionError as exc:
            raise StudioError(str(exc)) from None


# ---- the page --------------------------------------------------------------------------------------------------
def _f0_figure(f0: pd.DataFrame):
    """Source against output f0; unvoiced frames are gaps (a line plot would join them)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3), layout="constrained")
    ax = fig.add_subplot()
    for name, curve in f0.groupby("curve", sort=False):
        ax.plot(curve["seconds"], curve["f0_hz"], label=name, linestyle="--" if name.startswith("requested") else "-",
                linewidth=1.2)
    ax.set_title("f0: source against output", fontsize=10)
    ax.set_xlabel("seconds")
    ax.set_ylabel("f0 (Hz)")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def _progress_html(view: TrainingView) -> str:
    if not view.steps or view.state == "none":
        return ""
    return f"<progress value='{view.step}' max='{view.steps}' style='width:100%'></progress>"


def build_app(studio: Studio):
    """The Gradio layout: three tabs wired to :class:`Studio`'s methods."""
    import gradio as gr

    def on(trigger, fn, inputs, outputs, message):
        """Run ``fn`` on ``trigger``. A StudioError (or an unexpected error, whose trace goes to the terminal) is
        shown in the ``message`` output; the other outputs keep what they show."""
        at = outputs.index(message)

        @functools.wraps(fn)  # Gradio reads fn's signature for its gr.Progress argument
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except StudioError as exc:
                text = f"**Error:** {exc}"
            except Exception as exc:
                log.exception("studio: %s failed", fn.__name__)
                text = (f"**Unexpected error** ({type(exc).__name__}): {exc}. The details are in the terminal "
                        f"running `svc studio`.")
            return tuple(text if i == at else gr.skip() for i in range(len(outputs)))

        return trigger(guarded, inputs, outputs)

    ws = studio.ws
    with gr.Blocks(title="VoiceCraft SVC studio", analytics_enabled=False) as app:
        gr.Markdown(f"# VoiceCraft SVC studio\nWorkspace `{ws.root}`")
        page_message = gr.Markdown()
        with gr.Tab("Convert", id="convert"):
            with gr.Row():
                with gr.Column():
                    source = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Source: upload or record",
                                      elem_id="source")
                    model = gr.Dropdown([("production", "production")], value="production", label="Model",
                                        elem_id="model")
                    model_note = gr.Markdown()
                    target_kind = gr.Radio(list(TARGET_KINDS), value="Singer", label="Target")
                    singer = gr.Dropdown(label="Singer", elem_id="singer")
                    reference = gr.Audio(sources=["upload", "microphone"], type="filepath", visible=False,
                                         label="Reference recording: sound like me")
                    with gr.Group(visible=False) as blend_group:
                        blend_names, blend_weights = [], []
                        for i in range(BLEND_SLOTS):
                            with gr.Row():
                                blend_names.append(gr.Dropdown(label=f"Singer {i + 1}"))
                                blend_weights.append(gr.Slider(0, 1, value=0.5 if i < 2 else 0.0, step=0.05,
                                                               label="Weight"))
                    auto_pitch = gr.Checkbox(label="Auto pitch: move to the target's median pitch", value=False)
                    semitones = gr.Slider(-PITCH_RANGE, PITCH_RANGE, value=0, step=1, label="Pitch shift (semitones)")
                    convert_button = gr.Button("Convert", variant="primary", elem_id="convert")
                with gr.Column():
                    output = gr.Audio(label="Converted", type="filepath", interactive=False, elem_id="output")
                    summary = gr.Markdown(elem_id="summary")
                    f0_plot = gr.Plot(label="f0", show_label=False)

        with gr.Tab("Singers", id="singers"):
            singer_table = gr.Dataframe(label="Singers", interactive=False)
            singers_note = gr.Markdown()
            with gr.Group():
                gr.Markdown("### Add a singer\nThe same path as `svc add-singer`: the recordings are validated, "
                            "versioned with DVC and registered in Dagster, then the singer's assets are built.")
                new_name = gr.Textbox(label="Name", placeholder="letters, digits, - and _", elem_id="new-name")
                new_files = gr.File(label="Recordings", file_count="multiple", type="filepath", elem_id="new-files")
                new_recording = gr.Audio(sources=["microphone"], type="filepath", label="Or record one")
                add_button = gr.Button("Add singer", variant="primary")
            add_result = gr.Markdown(elem_id="add-result")

        with gr.Tab("Train", id="train"):
            gr.Markdown("Each training is one Dagster run (training set, checkpoint in MLflow, evaluation) on this "
                        f"workspace's instance. {studio._tensorboard_link()}")
            with gr.Row():
                mode = gr.Radio([FINE_TUNE, FROM_SCRATCH], value=FINE_TUNE, label="Start from")
                steps = gr.Number(label="Steps", value=ws.config().train.steps, precision=0, minimum=1,
                                  elem_id="steps")
                device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device", elem_id="device")
            launch_button = gr.Button("Launch training", variant="primary", elem_id="launch")
            train_message = gr.Markdown(elem_id="train-message")
            train_status = gr.Markdown(elem_id="train-status")
            train_progress = gr.HTML()
            train_links = gr.Markdown()
            loss_plot = gr.LinePlot(x="step", y="value", color="loss", title="Training losses", height=280)
            with gr.Group(visible=False) as promote_group:
                with gr.Row():
                    force = gr.Checkbox(label="Force (--force): despite a failing or worse evaluation", value=False)
                    reason = gr.Textbox(label="Reason (--reason), recorded on the version")
                promote_button = gr.Button("Promote to production", variant="primary", elem_id="promote")
            report = gr.Markdown()
            figures = gr.Gallery(label="Evaluation figures", columns=2, height="auto")
            version_state = gr.State(None)
            timer = gr.Timer(2.0, active=False)

        # ---- Convert
        def model_changed(chosen):
            note, names = studio.describe_model(chosen or "production")
            first = names[0] if names else None
            second = names[1] if len(names) > 1 else None
            return (note, gr.Dropdown(choices=names, value=first),
                    *[gr.Dropdown(choices=names, value=v) for v in (first, second, *[None] * (BLEND_SLOTS - 2))])

        model_outputs = [model_note, singer, *blend_names]
        on(model.change, model_changed, model, model_outputs, model_note)

        def kind_changed(kind):
            return (gr.Dropdown(visible=kind == "Singer"), gr.Audio(visible=kind == "Reference recording"),
                    gr.Group(visible=kind == "Blend"))

        target_kind.change(kind_changed, target_kind, [singer, reference, blend_group])
        auto_pitch.change(lambda auto: gr.Slider(interactive=not auto), auto_pitch, semitones)

        def convert(source, model, kind, singer, reference, auto, shift, *blend, progress=gr.Progress()):
            done = studio.convert(source, model=model or "production", target_kind=kind, singer=singer,
                                  reference=reference, blend=zip(blend[:BLEND_SLOTS], blend[BLEND_SLOTS:]),
                                  pitch_shift="auto" if auto else shift,
                                  progress=lambda fraction, desc: progress(fraction, desc=desc))
            return str(done.audio_path), done.summary, _f0_figure(done.f0)

        on(convert_button.click, convert, [source, model, target_kind, singer, reference, auto_pitch, semitones,
                                           *blend_names, *blend_weights], [output, summary, f0_plot], summary)

        # ---- Singers
        def add(name, files, recording, progress=gr.Progress()):
            message = studio.add_singer(name, files, recording,
                                        progress=lambda fraction, desc: progress(fraction, desc=desc))
            return (message, *studio.singers_overview(), gr.Textbox(value=""), gr.File(value=None),
                    gr.Audio(value=None))

        on(add_button.click, add, [new_name, new_files, new_recording],
           [add_result, singer_table, singers_note, new_name, new_files, new_recording], add_result)

        # ---- Train
        def show_training():
            view = studio.training_view()
            return (view.status, _progress_html(view), view.links, view.losses, gr.Group(visible=view.promotable),
                    view.report, [str(p) for p in view.figures], view.version, gr.Timer(active=view.active))

        training_outputs = [train_status, train_progress, train_links, loss_plot, promote_group, report, figures,
                            version_state, timer]

        def launch(mode, steps, device):
            studio.launch_training(mode, steps, device)
            return "", *show_training()

        on(launch_button.click, launch, [mode, steps, device], [train_message, *training_outputs], train_message)
        on(timer.tick, show_training, None, training_outputs, train_status)

        def load_models():
            """The model picker, on production (as `svc convert` defaults to)."""
            return gr.Dropdown(choices=studio.model_choices() or [("none registered yet", "production")],
                               value="production")

        def promote(version, force, reason):
            return studio.promote(version, force, reason), load_models(), *show_training()

        on(promote_button.click, promote, [version_state, force, reason], [train_message, model, *training_outputs],
           train_message)

        # ---- on page load: what the workspace holds now
        def load_page():
            return "", load_models(), *studio.singers_overview(), *show_training()

        loaded = on(app.load, load_page, None, [page_message, model, singer_table, singers_note, *training_outputs],
                    page_message)
        on(loaded.then, model_changed, model, model_outputs, model_note)
    return app


def serve(studio: Studio, *, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run the studio until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the studio works offline
    app = build_app(studio)
    # Gradio serves only files under allowed paths: the conversions and the evaluation report's figures.
    app.queue().launch(server_name=host, server_port=port, show_error=False,
                       allowed_paths=[str(studio.ws.outputs_dir), str(studio.ws.asset_dir("evaluation_report"))])
