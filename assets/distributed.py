"""Training on several processes: the trainer under ``torchrun`` (``torch.distributed.run``), launched by the
``svc_checkpoint`` asset when its ``nproc`` is above 1.

The asset stays the one place that owns the MLflow run and registers the version. It writes a *spec* (the config,
the manifest, the run folder, the start point, the MLflow run to log to) into the run folder and starts
``python -m torch.distributed.run --nproc-per-node N -m assets.distributed SPEC``. Every rank builds the same
:class:`svc_model.train.Trainer`, which joins the process group (NCCL on GPUs, gloo on the CPU) and wraps its
networks in DistributedDataParallel; rank 0 alone logs to MLflow and TensorBoard, writes checkpoints, and writes
``result.json`` for the asset. torchrun's own agent watches the ranks: when one dies, it stops the others and exits
with that rank's error, which the asset reports.

Multi-node runs use torchrun's rendezvous flags (``--nnodes``, ``--rdzv-backend``, ``--rdzv-endpoint``): see the
README's "Training on several GPUs" section.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SPEC_FILE = "distributed-spec.json"
RESULT_FILE = "distributed-result.json"
MANIFEST_FILE = "distributed-manifest.parquet"


class DistributedTrainingFailed(RuntimeError):
    """A rank failed; the message carries torchrun's account of which rank and why."""


@dataclass
class DistributedResult:
    """What rank 0 reports back: the fields of :class:`svc_model.train.TrainResult` the asset uses, and the
    resume it found."""

    step: int
    checkpoint: Path | None
    last_losses: dict
    validation: dict
    seconds: float
    resumed_from: Path | None
    resumed_step: int | None


def launch(*, nproc: int, cfg, manifest, run_dir: Path, device: str, init_from: Path | None, target_steps: int,
           tracking_uri: str | None = None, run_id: str | None = None, log: Callable[[str], None] = print,
           timeout_s: float | None = None) -> DistributedResult:
    """Train ``cfg`` on ``manifest`` (absolute feature paths) in ``run_dir`` with ``nproc`` processes on this
    node, up to ``target_steps``; rank 0 logs to the MLflow run ``run_id`` when given. Output lines go to ``log``.
    Raises :class:`DistributedTrainingFailed` naming the failed rank."""
    from svc_model.storage import atomic_path, atomic_write_text

    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    if device == "cuda" or device == "auto":
        import torch

        if torch.cuda.is_available() and nproc > torch.cuda.device_count():
            raise ValueError(f"nproc {nproc} > {torch.cuda.device_count()} visible GPU(s): one process per GPU")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / MANIFEST_FILE
    with atomic_path(manifest_path) as tmp:
        manifest.to_parquet(tmp, index=False)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)  # never read a previous attempt's result
    spec = {"config": cfg.model_dump(mode="json"), "manifest": str(manifest_path), "run_dir": str(run_dir),
            "device": device, "init_from": str(init_from) if init_from else None, "target_steps": int(target_steps),
            "tracking_uri": tracking_uri, "run_id": run_id}
    spec_path = run_dir / SPEC_FILE
    atomic_write_text(spec_path, json.dumps(spec, indent=2))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               # a dead rank ends the run at once (the agent stops the others), never a retry of the whole group
               "--max-restarts=0", "--monitor-interval=0.5", "-m", "assets.distributed", str(spec_path)]
    log(f"starting {nproc} training processes: {' '.join(command[1:])}")
    tail: deque[str] = deque(maxlen=60)
    # The cores shared out among the ranks (torchrun would give each one thread), unless the caller chose.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True) as process:
        try:
            for line in process.stdout:
                line = line.rstrip()
                tail.append(line)
                log(line)
            code = process.wait(timeout=timeout_s)
        except BaseException:  # the asset's run was cancelled (or timed out): take the ranks down with it
            _terminate_group(process)
            raise
    if code != 0:
        raise DistributedTrainingFailed(f"distributed training failed (torchrun exit {code}): {failure_summary(tail)}")
    result_path = run_dir / RESULT_FILE
    if not result_path.is_file():
        raise DistributedTrainingFailed(f"{result_path}: rank 0 ended without writing its result")
    raw = json.loads(result_path.read_text())
    return DistributedResult(step=int(raw["step"]), checkpoint=Path(raw["checkpoint"]) if raw["checkpoint"] else None,
                             last_losses=raw["last_losses"], validation=raw["validation"],
                             seconds=float(raw["seconds"]),
                             resumed_from=Path(raw["resumed_from"]) if raw["resumed_from"] else None,
                             resumed_step=raw["resumed_step"])


def _terminate_group(process: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def failure_summary(lines) -> str:
    """torchrun's "Root Cause" block (rank, exit code, signal or traceback) from its output, else the last lines."""
    lines = list(lines)
    for i, line in enumerate(lines):
        if "Root Cause" in line:
            block = [ln.strip() for ln in lines[i + 1:] if ln.strip() and not set(ln.strip()) <= set("-=")]
            return " ".join(block[:12])
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return " | ".join((errors or lines)[-5:])


def _worker(spec_path: str) -> None:
    """One rank: build the trainer from the spec, train to the target, rank 0 writes the result."""
    import pandas as pd

    from svc_model.config import SVCConfig
    from svc_model.storage import atomic_write_text
    from svc_model.train import Trainer

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", 0))
    cfg = SVCConfig.model_validate(spec["config"])
    manifest = pd.read_parquet(spec["manifest"])
    run_dir = Path(spec["run_dir"])

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    def warn(message: str) -> None:
        print(f"warning (rank {rank}): {message}", file=sys.stderr, flush=True)

    trainer = Trainer(cfg, manifest, run_dir, device=spec["device"],
                      init_from=spec["init_from"], resume=True, log=log, warn=warn)
    monitor = None
    try:
        if rank == 0 and spec.get("run_id"):
            import mlflow
            from mlflow.tracking import MlflowClient

            from assets.tracking import MlflowTrainingCallback

            mlflow.set_tracking_uri(spec["tracking_uri"])
            trainer.callbacks.append(MlflowTrainingCallback(MlflowClient(spec["tracking_uri"]), spec["run_id"],
                                                            cfg.audio.sample_rate))
            monitor = _system_metrics(spec["run_id"])
        resumed_step = trainer.step if trainer.resumed_from is not None else None
        print(f"rank {rank}/{trainer.world_size} on {trainer.device}: batch {cfg.train.batch_size} per rank, "
              f"global {cfg.train.batch_size * trainer.world_size}", flush=True)
        result = trainer.fit(max(0, int(spec["target_steps"]) - trainer.step))
        if rank == 0:
            atomic_write_text(run_dir / RESULT_FILE, json.dumps({
                "step": result.step, "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                "last_losses": result.history[-1] if result.history else {}, "validation": result.validation,
                "seconds": result.seconds,
                "resumed_from": str(trainer.resumed_from) if trainer.resumed_from is not None else None,
                "resumed_step": resumed_step}))
    finally:
        if monitor is not None:
            monitor.finish()
        trainer.close()


def _system_metrics(run_id: str):
    """MLflow's system-metrics sampler for rank 0 (the asset's process does not sample while ranks write: one
    writer at a time for a SQLite store)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:  # an MLflow without the monitor: train without system metrics
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=float(
        os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 5)), samples_before_logging=1)
    monitor.start()
    return monitor


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    if len(sys.argv) != 2:
        sys.exit("usage: python -m torch.distributed.run --nproc-per-node N -m assets.distributed SPEC.json")
    record(_worker)(sys.argv[1])


if __name__ == "__main__":
    main()
