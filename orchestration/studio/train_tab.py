"""The Train tab: launch `svc train` (one Dagster run), follow it, read its evaluation, promote the result.

Who launched and who promoted is recorded (:mod:`orchestration.service`): the signed-in user, or ``local``."""
from __future__ import annotations

import logging
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from assets.workspace import Workspace
from orchestration import service
from orchestration.studio.common import StudioError

log = logging.getLogger(__name__)

FINE_TUNE, FROM_SCRATCH = "Fine-tune from production", "From scratch"
LOSS_TERMS = ("mel", "stft")  # the reconstruction losses; the adversarial and KL terms swing too much to read
STUDIO_RUN_TAG = "svc/studio_launch"  # Dagster run tag by which the studio finds the training run it launched
# The evaluation's overall metrics as the tab lists them, in this order (metrics.json has them all).
METRICS = ("f0_corr", "f0_rmse_cents", "vuv_error", "target_similarity", "source_similarity", "similarity_gap",
           "reconstruction_mel", "rtf")


@dataclass
class TrainingLaunch:
    token: str  # value of STUDIO_RUN_TAG on the run
    process: subprocess.Popen
    log_path: Path


def _losses(history: list[dict]) -> pd.DataFrame:
    """``history.jsonl`` rows in long form (step, loss, value) for the loss plot."""
    rows = [(r["step"], k, r[k]) for r in history for k in LOSS_TERMS if k in r]
    return pd.DataFrame(rows, columns=["step", "loss", "value"]).astype({"step": "int64", "value": "float64"})


def _metrics_table(metrics: dict | None) -> pd.DataFrame:
    rows = [(k, float(metrics[k])) for k in METRICS if metrics and k in metrics]
    return pd.DataFrame(rows, columns=["metric", "value"]).astype({"value": "float64"})


@dataclass
class TrainingView:
    """One training run as the Train tab shows it: the studio's own launch, else the latest `svc train` run."""

    state: str  # "none" | "starting" | "running" | "succeeded" | "failed"
    status: str  # markdown
    step: int = 0
    steps: int = 0
    losses: pd.DataFrame = field(default_factory=lambda: _losses([]))
    links: str = ""  # markdown: Dagster run, MLflow run, TensorBoard
    evaluation: str = ""  # markdown: which version the evaluation measured, its verdict, where the full report is
    metrics: pd.DataFrame = field(default_factory=lambda: _metrics_table(None))  # from the report's metrics.json
    figures: list[Path] = field(default_factory=list)  # the report's figures
    version: str | None = None  # the registered version the run made
    promotable: bool = False  # registered, and not in production

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")


class TrainTab:
    def __init__(self, ws: Workspace, *, dagster_url: str = "http://127.0.0.1:3000",
                 tensorboard_url: str = "http://127.0.0.1:6006"):
        self.ws = ws
        self.dagster_url = dagster_url.rstrip("/")
        self.tensorboard_url = tensorboard_url
        self._launch: TrainingLaunch | None = None

    def launch_training(self, mode: str = FINE_TUNE, steps: float | None = None, device: str = "auto",
                        nproc: float = 1, *, user: str) -> str:
        """Start ``svc train`` (one Dagster run on the workspace's instance) in a process of its own, on behalf of
        ``user``; ``nproc`` > 1 trains with that many processes (``svc train --nproc``). Returns the launch token,
        the value of the run's ``svc/studio_launch`` tag."""
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
        if nproc is None or nproc != int(nproc) or int(nproc) < 1:
            raise StudioError(f"Processes must be a whole number of at least 1, got {nproc!r}.")
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
        # `svc train` alone starts from production, else base, else scratch: from scratch must be asked for.
        args = (["--device", device, "--fine-tune" if mode == FINE_TUNE else "--from-scratch"]
                + (["--steps", str(int(steps))] if steps else []) + (["--nproc", str(int(nproc))] if nproc > 1 else []))
        log_path = self.ws.root / "logs" / f"studio-train-{token[:8]}.log"
        process = service.start_training(self.ws, args, log_path, user=user, tags={STUDIO_RUN_TAG: token})
        self._launch = TrainingLaunch(token, process, log_path)
        return token

    def view(self) -> TrainingView:
        """The training run launched here (or, before one is, the latest `svc train` run): status, progress, loss
        curve, links, and once it has finished, the evaluation."""
        import dagster as dg

        from orchestration.build import open_instance

        launch = self._launch
        instance = open_instance(self.ws)
        try:
            tags = {STUDIO_RUN_TAG: launch.token} if launch else service.TRAIN_RUN_TAGS
            runs = instance.get_runs(dg.RunsFilter(tags=tags), limit=1)
        finally:
            instance.dispose()
        exit_code = launch.process.poll() if launch else None
        if not runs:
            if launch is None:
                return TrainingView("none", "No training run yet.", links=self.tensorboard_link())
            if exit_code is None:
                return TrainingView("starting", "Starting `svc train`...", links=self.tensorboard_link())
            return TrainingView("failed", f"Training failed before its Dagster run started (exit {exit_code}): "
                                          f"{_log_error(launch.log_path)}", links=self.tensorboard_link())
        return self._run_view(runs[0], launch, exit_code)

    def _run_view(self, run, launch: TrainingLaunch | None, exit_code: int | None) -> TrainingView:
        import dagster as dg

        from assets import tracking

        config = (run.run_config or {}).get("ops", {}).get("svc_checkpoint", {}).get("config", {})
        start = config.get("start_from", "scratch")  # runs from before start_from trained from scratch by default
        mode = ("fine-tune" if config.get("fine_tune") or start in ("production", "base") else
                "from scratch" if start == "scratch" else "production, else base, else scratch")
        view = TrainingView("running", "", steps=int(config.get("steps") or self.ws.config().train.steps))
        from assets.training_set import read_history, run_folder_of

        folder = run_folder_of(self.ws, run.run_id)  # runs/dagster-<training key>, shared by resumed attempts
        if folder is not None:
            rows = read_history(folder)
            view.step = int(rows[-1]["step"]) if rows else 0
            view.losses = _losses(rows)
        mlflow_run = self._mlflow_run(run.run_id)
        view.links = " · ".join(
            [f"[Dagster run {run.run_id[:8]}]({self.dagster_url}/runs/{run.run_id})"]
            + ([f"[MLflow run {mlflow_run.info.run_id[:8]}]({tracking.run_url(self.ws, mlflow_run.info.run_id)})"]
               if mlflow_run else [])
            + [self.tensorboard_link()])
        if run.status == dg.DagsterRunStatus.SUCCESS:
            view.state = "succeeded"
        elif run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED) or (
                exit_code is not None and exit_code != 0):
            view.state = "failed"
        if view.state == "failed":
            reason = _log_error(launch.log_path) if launch else "see the Dagster run"
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
        """The registered version the run made, its evaluation verdict and metrics, and whether it can be promoted."""
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
        metrics = service.evaluation_metrics(self.ws, view.version)
        if metrics is None:  # the last evaluation measured another version (or there is none yet)
            return
        report_dir = self.ws.asset_dir("evaluation_report")
        view.evaluation = (f"### Evaluation of {name} version {view.version}\nHeld-out segments of every singer "
                           f"into every singer; the full report: `{self.ws.relative(report_dir / 'report.html')}`.")
        view.metrics = _metrics_table(metrics)
        # The images are shown beside the metrics: the page cannot resolve the report's relative links.
        view.figures = [p for p in (report_dir / "f0_overlays.png", report_dir / "similarity.png") if p.is_file()]

    def _mlflow_run(self, dagster_run_id: str):
        from assets import tracking

        found = tracking.client(self.ws).search_runs(
            [tracking.experiment_id(self.ws)], filter_string=f"tags.dagster_run_id = '{dagster_run_id}'", max_results=1)
        return found[0] if found else None

    def tensorboard_link(self) -> str:
        return f"[TensorBoard]({self.tensorboard_url}) (`svc -C {self.ws.root} tensorboard`)"

    def promote(self, version: str | None, force: bool = False, reason: str | None = None, *, user: str) -> str:
        """``svc promote VERSION [--force --reason TEXT]`` on behalf of ``user``: the same rules, the same messages;
        ``user`` is recorded on the version and in the audit log."""
        from assets.promotion import PromotionError

        if not version:
            raise StudioError("No trained version to promote yet.")
        try:
            return service.promote(self.ws, version, force=force, reason=reason or None, user=user).message
        except PromotionError as exc:
            raise StudioError(str(exc)) from None


def _log_error(log_path: Path) -> str:
    """The reason a `svc train` process gave: its ``error:`` line, else the last line it wrote."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [f"no output (see {log_path})"])[-1].removeprefix("error:").strip()
