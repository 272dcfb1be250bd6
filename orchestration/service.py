"""What the CLI and the studio both do, in one place each.

- launching `svc train` in a process of its own (:func:`train_command`, :func:`run_training`, :func:`start_training`);
- adding a singer and saying what happened (:func:`add_singer_reported`);
- promotion with who did it on record (:func:`promote`) and the audit log (:func:`audit`);
- the evaluation's metrics, read from the report's ``metrics.json`` (:func:`evaluation_metrics`);
- the pitch-shift limit: :data:`MAX_PITCH_SHIFT` and :func:`check_pitch_shift` live in ``svc_model.infer``, where
  the converter validates with them, and are re-exported here for the CLI and the studio.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from assets.training import USER_TAG
from assets.workspace import Workspace
from svc_model.infer import MAX_PITCH_SHIFT, check_pitch_shift

__all__ = [
    "LOCAL_USER",
    "MAX_PITCH_SHIFT",
    "TRAIN_RUN_TAGS",
    "USER_TAG",
    "TrainingFailed",
    "add_singer_reported",
    "audit",
    "check_pitch_shift",
    "evaluation_metrics",
    "promote",
    "run_training",
    "start_training",
    "train_command",
]

TRAIN_RUN_TAGS = {"svc/launched_by": "svc train"}  # the Dagster tag of every `svc train` run (demo, CLI, studio)
LOCAL_USER = "local"  # who acts in a studio bound to loopback without --auth: whoever sits at this machine

# Who promoted and who launched training, one line per action; `svc studio` sends it to the terminal and to
# logs/audit.log in the workspace.
audit_log = logging.getLogger("svc.audit")


class TrainingFailed(RuntimeError):
    """`svc train` exited with an error (its own message is in its output)."""


def audit(user: str, action: str) -> None:
    audit_log.info("%s: %s", user, action)


# ---- launching training -------------------------------------------------------------------------------------------
def train_command(ws: Workspace, args: list[str], *, tags: dict[str, str] | None = None) -> list[str]:
    """The `svc train` command line for ``ws``: the installed `svc` beside this Python, ``args``, a ``--tag`` each."""
    return ([str(Path(sys.executable).parent / "svc"), "-C", str(ws.root), "train", *args]
            + [f"--tag={key}={value}" for key, value in (tags or {}).items()])


def run_training(ws: Workspace, args: list[str]) -> None:
    """`svc train ARGS` in a process of its own, its output on this terminal; raises :class:`TrainingFailed`.

    A process of its own, as a run launched from the Dagster UI would be: the feature extractors' thread pools
    (CTranslate2 brings its own OpenMP) would otherwise compete with training for the cores."""
    code = subprocess.call(train_command(ws, args))
    if code != 0:
        raise TrainingFailed(f"training failed (exit {code})")


def start_training(ws: Workspace, args: list[str], log_path: Path, *, user: str,
                   tags: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `svc train ARGS` in the background, its output to ``log_path``; the run is tagged with ``user``
    (``svc/user``: copied to the MLflow run and the registered version as ``launched_by``)."""
    cmd = train_command(ws, args, tags={**(tags or {}), USER_TAG: user})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=ws.root, env=ws.env())
    audit(user, f"launched training (pid {process.pid}): {' '.join(cmd[3:])}; log {log_path}")
    return process


# ---- singers ------------------------------------------------------------------------------------------------------
def add_singer_reported(ws: Workspace, name: str, paths: list, *, append: bool, push: bool, instance,
                        echo: Callable[[str], None]) -> None:
    """``svc add-singer``: add the recordings, then say what was added, skipped, versioned and registered."""
    from orchestration.jobs import PER_SINGER_ASSETS
    from orchestration.singers import add_singer

    echo(f"{'appending to' if append else 'adding'} singer {name!r} in {ws.root}")
    report = add_singer(ws, name, paths, append=append, instance=instance, push=push, log=echo)
    echo(f"added {len(report.added)} file(s), {report.seconds:.1f} s of audio; skipped {len(report.skipped)}")
    for source, reason in report.skipped:
        echo(f"  skipped {source}: {reason}")
    echo(f"DVC: data/raw/{name}.dvc md5 {report.data_version}"
         + (f" (was {report.previous_version})" if report.previous_version else "")
         + (", pushed to the workspace remote" if report.pushed else ", not pushed"))
    echo(f"Dagster: partition {name!r} registered in 'singers'")
    echo(f"will rebuild: {', '.join(f'{a}[{name}]' for a in PER_SINGER_ASSETS)}; "
         f"run `svc -C {ws.root} build`, or let `svc ui` (daemon) pick it up")


# ---- promotion ----------------------------------------------------------------------------------------------------
def promote(ws: Workspace, version: str | None = None, *, force: bool = False, reason: str | None = None,
            user: str):
    """:func:`assets.promotion.promote`, with ``user`` recorded on the version (``promotion.by``) and in the audit
    log, refusals included. Raises :class:`assets.promotion.PromotionError`."""
    from assets.promotion import PromotionError
    from assets.promotion import promote as do_promote

    what = f"version {version}" if version else "the candidate"
    try:
        done = do_promote(ws, version, force=force, reason=reason, by=user)
    except PromotionError as exc:
        audit(user, f"promotion of {what} refused: {exc}")
        raise
    audit(user, done.message)
    return done


# ---- evaluation ---------------------------------------------------------------------------------------------------
def evaluation_metrics(ws: Workspace, version: str | int | None = None) -> dict | None:
    """The overall metrics of the last evaluation (``evaluation_report/metrics.json``), or ``None`` when there is
    none, or when it evaluated another version than ``version``."""
    path = ws.asset_dir("evaluation_report") / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); rebuild evaluation_report") from None
    if version is not None and str(metrics.get("model_version")) != str(version):
        return None
    return metrics
