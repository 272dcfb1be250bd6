"""Promotion: moving the registry alias ``production``. Shared by ``svc promote`` and the ``production_model`` asset.

Rules: a version needs an evaluation whose checks passed, and must not be worse than the current production on
the primary metric, unless forced with a reason (recorded as tags). ``candidate`` marks the newest evaluated
version. Rollback moves ``production`` back to the version it replaced.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from assets import tracking
from assets.workspace import Workspace, WorkspaceBusy

EVAL_PASSED = "eval.passed"
EVAL_FAILED_CHECKS = "eval.failed_checks"
PREVIOUS = "promotion.previous_production"


class PromotionError(RuntimeError):
    """A promotion was refused; the message says why and how to override."""


@contextlib.contextmanager
def _registry_lock(ws: Workspace, purpose: str):
    """The workspace lock around read-current-production-then-move-the-alias: two promotions that interleave
    would both record the same "previous production", and a rollback would then skip a version."""
    try:
        with ws.lock(purpose):
            yield
    except WorkspaceBusy as exc:
        raise PromotionError(str(exc)) from None


@dataclass
class Promotion:
    version: str
    previous: str | None
    forced: bool
    message: str


def _primary(ws: Workspace):
    from svc_model.evaluate import HIGHER_IS_BETTER

    metric = ws.config().evaluation.primary_metric
    return metric, HIGHER_IS_BETTER[metric]


def promote(ws: Workspace, version: str | int | None = None, *, force: bool = False, reason: str | None = None,
            by: str | None = None) -> Promotion:
    """``by``: who promoted (the studio's signed-in user), recorded on the version as ``promotion.by``."""
    with _registry_lock(ws, f"promote {'the candidate' if version is None else f'version {version}'}"):
        return _promote(ws, version, force=force, reason=reason, by=by)


def _promote(ws: Workspace, version: str | int | None, *, force: bool, reason: str | None,
             by: str | None = None) -> Promotion:
    client = tracking.client(ws)
    name = ws.settings.registered_model_name
    if force and not (reason and reason.strip()):
        raise PromotionError("--force needs --reason TEXT (it is recorded on the model version)")
    if version is None:
        candidate = tracking.alias_version(ws, tracking.CANDIDATE)
        if candidate is None:
            raise PromotionError(f"no version of {name!r} is marked 'candidate' (none evaluated yet); "
                                 f"run the evaluation or name a version")
        version = candidate.version
    try:
        mv = client.get_model_version(name, str(version))
    except Exception as exc:
        known = ", ".join(v.version for v in tracking.model_versions(ws)) or "none"
        raise PromotionError(f"model {name!r} has no version {version} (versions: {known})") from exc
    tags = mv.tags or {}
    problems = []
    if EVAL_PASSED not in tags:
        problems.append(f"version {mv.version} has no evaluation")
    elif tags[EVAL_PASSED] != "true":
        problems.append(f"version {mv.version} failed its evaluation checks: {tags.get(EVAL_FAILED_CHECKS, '?')}")
    current = tracking.alias_version(ws, tracking.PRODUCTION)
    metric, higher = _primary(ws)
    if current is not None and str(current.version) == str(mv.version):
        raise PromotionError(f"version {mv.version} is already in production")
    if current is not None and not problems:
        new_value, old_value = tags.get(f"eval.{metric}"), (current.tags or {}).get(f"eval.{metric}")
        if new_value is not None and old_value is not None:
            worse = float(new_value) < float(old_value) if higher else float(new_value) > float(old_value)
            if worse:
                problems.append(f"version {mv.version} is worse than production (version {current.version}) on "
                                f"{metric}: {float(new_value):.4f} vs {float(old_value):.4f} "
                                f"({'higher' if higher else 'lower'} is better)")
    if problems and not force:
        raise PromotionError("; ".join(problems) + ". Use --force --reason TEXT to promote anyway.")
    client.set_registered_model_alias(name, tracking.PRODUCTION, mv.version)
    client.set_model_version_tag(name, mv.version, PREVIOUS, str(current.version) if current else "")
    client.set_model_version_tag(name, mv.version, "promotion.time", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if by:
        client.set_model_version_tag(name, mv.version, "promotion.by", by)
    if force:
        client.set_model_version_tag(name, mv.version, "promotion.forced", "true")
        client.set_model_version_tag(name, mv.version, "promotion.reason", reason)
        client.set_model_version_tag(name, mv.version, "promotion.overridden", "; ".join(problems) or "nothing")
    message = (f"production -> version {mv.version}" + (f" (was {current.version})" if current else "")
               + (f"; FORCED: {reason}" if force else ""))
    return Promotion(str(mv.version), str(current.version) if current else None, force, message)


def rollback(ws: Workspace) -> Promotion:
    with _registry_lock(ws, "rollback"):
        return _rollback(ws)


def _rollback(ws: Workspace) -> Promotion:
    client = tracking.client(ws)
    name = ws.settings.registered_model_name
    current = tracking.alias_version(ws, tracking.PRODUCTION)
    if current is None:
        raise PromotionError("nothing is in production, nothing to roll back")
    previous = (current.tags or {}).get(PREVIOUS)
    if not previous:
        raise PromotionError(f"version {current.version} replaced no earlier production version; nothing to roll back to")
    client.set_registered_model_alias(name, tracking.PRODUCTION, previous)
    client.set_model_version_tag(name, current.version, "promotion.rolled_back", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return Promotion(str(previous), str(current.version), False, f"production -> version {previous} (rolled back from {current.version})")
