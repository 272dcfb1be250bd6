"""Headless materialization: what "materialize unsynced and missing" does in the UI, for the CLI and the demo."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import dagster as dg

from assets.partitions import SINGERS
from assets.workspace import Workspace
from orchestration.jobs import PER_SINGER_ASSETS, TRAINING_ASSETS
from orchestration.singers import plan_singer_sync, register_singer


def open_instance(ws: Workspace) -> dg.DagsterInstance:
    """The workspace's persistent Dagster instance (``<workspace>/.dagster``)."""
    ws.ensure_runtime_dirs()
    if (ws.dagster_home / "history" / "runs.db").exists():
        return dg.DagsterInstance.from_config(str(ws.dagster_home))
    # A fresh instance creates its SQLite tables on open: two `svc` commands doing that at once on a new workspace
    # fail with "table jobs already exists". Only the first open takes the workspace lock; later ones never wait.
    with ws.lock("creating the Dagster instance"):
        return dg.DagsterInstance.from_config(str(ws.dagster_home))


def sync_singers(ws: Workspace, instance: dg.DagsterInstance) -> list[str]:
    """Register every DVC-tracked singer and record changed data versions; returns the singers touched."""
    plan = plan_singer_sync(ws, instance)
    for singer in plan.new + plan.changed:
        register_singer(ws, instance, singer)
    return plan.new + plan.changed


def partition_statuses(
    defs: dg.Definitions, instance: dg.DagsterInstance, assets: Iterable[str], singers: Iterable[str]
) -> dict[tuple[str, str], str]:
    """``{(asset, singer): "fresh" | "stale" | "missing"}`` as the Dagster UI computes it."""
    status = status_resolver(defs, instance)
    return {(asset, singer): status(asset, singer) for asset in assets for singer in singers}


def asset_status(defs: dg.Definitions, instance: dg.DagsterInstance, asset: str) -> str:
    """"fresh" | "stale" | "missing" for an asset that is not partitioned (training_set, svc_checkpoint...)."""
    return status_resolver(defs, instance)(asset, None)


def status_resolver(defs: dg.Definitions, instance: dg.DagsterInstance) -> Callable[[str, str | None], str]:
    """``status(asset, partition_or_None)`` -> "fresh" | "stale" | "missing", cached for one look at the instance.

    Dagster's own resolver (the one behind the UI's "unsynced" labels) calls an asset stale once an upstream has
    been rebuilt; this one also calls it stale while an upstream is stale or missing, because it will change when
    the upstream is rebuilt. That is what "materialize unsynced" in the UI would do, and what `svc build` does.
    """
    # An internal API of Dagster, pinned by dagster<1.14.
    from functools import cache

    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    graph = defs.resolve_asset_graph()
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    names = {StaleStatus.FRESH: "fresh", StaleStatus.STALE: "stale", StaleStatus.MISSING: "missing"}
    singers = instance.get_dynamic_partitions(SINGERS)
    ws = defs.resources["workspace"].get()

    @cache
    def status(asset: str, partition: str | None) -> str:
        key = dg.AssetKey(asset)
        own = names[resolver.get_status(key, partition)]
        if own != "fresh":
            return own
        # Dagster's SQLite storage cannot wipe one partition's history: a singer removed and added again under the
        # same name would look built, so a partition whose folder is gone counts as missing.
        if partition and not ws.partition_dir(asset, partition).is_dir():
            return "missing"
        for parent in sorted(graph.get(key).parent_keys):
            node = graph.get(parent)
            if node.is_external:  # sources (recordings, roster) already show in the asset's own status
                continue
            parts = [None] if not node.is_partitioned else [partition] if partition else singers
            if any(status(parent.to_user_string(), p) != "fresh" for p in parts):
                return "stale"
        return "fresh"

    return status


class BuildError(RuntimeError):
    """One or more partition runs failed; the message has each failure's reason."""


def _failure_reason(result: dg.ExecuteInProcessResult) -> str:
    reasons = []
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        if data.user_failure_data and data.user_failure_data.description:
            reasons.append(data.user_failure_data.description)
        elif data.error:
            reasons.append(data.error.message.strip())
    return "; ".join(reasons) or "run failed (see the Dagster run log)"


@dataclass
class BuildStep:
    singer: str
    assets: list[str]
    seconds: float
    run_id: str


def build(
    ws: Workspace,
    *,
    assets: Iterable[str] = PER_SINGER_ASSETS,
    singers: Iterable[str] | None = None,
    instance: dg.DagsterInstance | None = None,
    log: Callable[[str], None] = print,
) -> list[BuildStep]:
    """Materialize the stale or missing partitions of ``assets``, one in-process run per singer.

    The runs are recorded in the workspace's instance, so they show in the Dagster UI's run history.
    """
    from orchestration.definitions import build_definitions

    instance = instance or open_instance(ws)
    sync_singers(ws, instance)
    defs = build_definitions(ws)
    assets = list(assets)
    known = instance.get_dynamic_partitions(SINGERS)
    singers = sorted(known) if singers is None else list(singers)
    unknown = sorted(set(singers) - set(known))
    if unknown:
        raise ValueError(f"unknown singer(s) {unknown}; known: {sorted(known)}")
    statuses = partition_statuses(defs, instance, assets, singers)
    steps, failures = [], []
    for singer in singers:
        todo = [a for a in assets if statuses[(a, singer)] != "fresh"]
        if not todo:
            continue
        log(f"materializing {', '.join(f'{a}[{singer}]' for a in todo)}")
        started = time.perf_counter()
        result = dg.materialize(
            [*defs.assets, *defs.asset_checks],  # the workspace's code versions (assets.versions)
            selection=[dg.AssetKey(a) for a in todo],
            partition_key=singer,
            instance=instance,
            resources=defs.resources,
            tags={"svc/launched_by": "svc build"},
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
            raise_on_error=False,
        )
        if result.success:
            steps.append(BuildStep(singer, todo, time.perf_counter() - started, result.run_id))
        else:
            failures.append(f"{singer} (run {result.run_id[:8]}): {_failure_reason(result)}")
            log(f"FAILED {singer}: {failures[-1]}")
    if not steps and not failures:
        log("nothing to do: every selected partition is up to date")
    if failures:
        raise BuildError("build failed for " + "\n".join(failures))
    return steps


def materialize_training(ws: Workspace, *, steps: int | None = None, fine_tune: bool = False, device: str = "auto",
                         instance: dg.DagsterInstance | None = None, extra_assets: Iterable[str] = (),
                         tags: dict[str, str] | None = None, start_from: str = "auto") -> dict:
    """Run training_set, svc_checkpoint, evaluation_report (and ``extra_assets``) in one in-process run.

    ``start_from``: auto (production, else base, else scratch) | production | base | scratch; ``fine_tune`` is
    the older flag for production (see :func:`assets.pretrained.resolve_start_point`).

    ``tags`` are added to the run's tags, so a launcher (the studio) can find its run in the instance.

    Returns ``{asset: metadata}`` of what materialized; raises :class:`BuildError` with the reason on failure.
    """
    from orchestration.definitions import build_definitions

    instance = instance or open_instance(ws)
    sync_singers(ws, instance)
    defs = build_definitions(ws)
    selection = [*TRAINING_ASSETS, *extra_assets]
    training = {"steps": steps, "start_from": start_from, "fine_tune": fine_tune, "device": device}
    run_config = {"ops": {"svc_checkpoint": {"config": training}},
                  "loggers": {"console": {"config": {"log_level": "INFO"}}}}
    result = dg.materialize([*defs.assets, *defs.asset_checks], selection=[dg.AssetKey(a) for a in selection],
                            instance=instance, resources=defs.resources, run_config=run_config,
                            tags={**(tags or {}), "svc/launched_by": "svc train"}, raise_on_error=False)
    if not result.success:
        raise BuildError(f"training run {result.run_id[:8]} failed: {_failure_reason(result)}")
    return {
        event.asset_key.to_user_string(): {k: v.value for k, v in event.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    } | {"run_id": result.run_id}
