"""Headless materialization: what "materialize unsynced and missing" does in the UI, for the CLI and the demo."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import dagster as dg

from assets.partitions import SINGERS
from assets.workspace import Workspace
from orchestration.jobs import PER_SINGER_ASSETS, TRAINING_ASSETS
from orchestration.singers import plan_singer_sync, register_singer


def open_instance(ws: Workspace) -> dg.DagsterInstance:
    """The workspace's persistent Dagster instance (``<workspace>/.dagster``; its storage on Postgres where
    ``svc.yaml`` names one: :mod:`orchestration.shared_instance`)."""
    ws.ensure_runtime_dirs()
    if ws.dagster_postgres_url:
        from orchestration.shared_instance import open_postgres

        return open_postgres(ws)
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


BUILD_TAGS = {"svc/launched_by": "svc build"}


def _materialize_singer(defs: dg.Definitions, instance: dg.DagsterInstance, singer: str,
                        todo: list[str]) -> tuple[BuildStep | None, str | None]:
    """One in-process run of ``todo`` for ``singer``: ``(step, None)`` on success, ``(None, reason)`` on failure."""
    started = time.perf_counter()
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],  # the workspace's code versions (assets.versions) and pools
        selection=[dg.AssetKey(a) for a in todo],
        partition_key=singer,
        instance=instance,
        resources=defs.resources,
        tags=BUILD_TAGS,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        raise_on_error=False,
    )
    if result.success:
        return BuildStep(singer, todo, time.perf_counter() - started, result.run_id), None
    return None, f"{singer} (run {result.run_id[:8]}): {_failure_reason(result)}"


# ---- parallel builds: one worker process per concurrent singer run ----------------------------------------------
# A worker keeps its instance, Definitions and (through the extractors resource) its models for every singer
# that it builds, as the one process of a serial build does.
_WORKER: dict = {}


def _worker_init(root: str, threads: int) -> None:
    # Before torch or CTranslate2 load: N workers share the cores instead of each starting a thread per core.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    _WORKER["root"] = root


def _worker_build(singer: str, todo: list[str]) -> tuple[BuildStep | None, str | None]:
    from orchestration.definitions import build_definitions

    if "instance" not in _WORKER:
        ws = Workspace(Path(_WORKER["root"]))
        _WORKER["instance"] = open_instance(ws)
        _WORKER["defs"] = build_definitions(ws)
    try:
        return _materialize_singer(_WORKER["defs"], _WORKER["instance"], singer, todo)
    except Exception as exc:  # noqa: BLE001 - outside the run (instance, Definitions): report it, build the rest
        return None, f"{singer}: {type(exc).__name__}: {exc}"


def _build_in_parallel(ws: Workspace, plan: list[tuple[str, list[str]]], parallel: int,
                       log: Callable[[str], None]) -> tuple[list[BuildStep], list[str]]:
    """``plan``'s singer runs in ``parallel`` worker processes, each run recorded in the workspace's instance."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // parallel)
    steps, failures = [], []
    # spawn, not fork: a forked child would inherit the parent's open SQLite connections (and CUDA cannot fork).
    with ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(str(ws.root), threads)) as pool:
        futures = {}
        for singer, todo in plan:
            log(f"materializing {', '.join(f'{a}[{singer}]' for a in todo)}")
            futures[pool.submit(_worker_build, singer, todo)] = singer
        for future in as_completed(futures):
            singer = futures[future]
            try:
                step, failure = future.result()
            except BrokenProcessPool as exc:  # a worker died (killed, out of memory): its runs did not finish
                step, failure = None, f"{singer}: the worker process died ({exc})"
            if step:
                steps.append(step)
                log(f"built {singer} in {step.seconds:.1f} s (run {step.run_id[:8]})")
            else:
                failures.append(failure)
                log(f"FAILED {failure}")
    order = [singer for singer, _ in plan]
    return sorted(steps, key=lambda s: order.index(s.singer)), failures


def build(
    ws: Workspace,
    *,
    assets: Iterable[str] = PER_SINGER_ASSETS,
    singers: Iterable[str] | None = None,
    instance: dg.DagsterInstance | None = None,
    log: Callable[[str], None] = print,
    parallel: int = 1,
) -> list[BuildStep]:
    """Materialize the stale or missing partitions of ``assets``, one run per singer.

    ``parallel`` = 1: the runs execute one after another in this process. ``parallel`` > 1: up to that many
    singers' runs execute at once, each in a worker process of its own (spawned; each loads the extractors once
    and keeps them for the next singer), on the workspace's instance. Steps in the ``gpu`` concurrency pool
    (:mod:`orchestration.pools`) still take turns for its slots; every other step runs freely.

    The runs are recorded in the workspace's instance, so they show in the Dagster UI's run history.
    """
    from orchestration.definitions import build_definitions
    from orchestration.pools import ensure_pool_limit

    if parallel < 1:
        raise ValueError(f"parallel must be 1 or more, not {parallel}")
    instance = instance or open_instance(ws)
    if parallel > 1 and instance.is_ephemeral:
        raise ValueError("a parallel build needs the workspace's persistent instance, not an ephemeral one")
    sync_singers(ws, instance)
    defs = build_definitions(ws)
    assets = list(assets)
    known = instance.get_dynamic_partitions(SINGERS)
    singers = sorted(known) if singers is None else list(singers)
    unknown = sorted(set(singers) - set(known))
    if unknown:
        raise ValueError(f"unknown singer(s) {unknown}; known: {sorted(known)}")
    statuses = partition_statuses(defs, instance, assets, singers)
    plan = [(singer, todo) for singer in singers if (todo := [a for a in assets if statuses[(a, singer)] != "fresh"])]
    if plan:
        ensure_pool_limit(instance)
    if len(plan) > 1 and parallel > 1:
        steps, failures = _build_in_parallel(ws, plan, min(parallel, len(plan)), log)
    else:
        steps, failures = [], []
        for singer, todo in plan:
            log(f"materializing {', '.join(f'{a}[{singer}]' for a in todo)}")
            step, failure = _materialize_singer(defs, instance, singer, todo)
            if step:
                steps.append(step)
            else:
                failures.append(failure)
                log(f"FAILED {failure}")
    if not steps and not failures:
        log("nothing to do: every selected partition is up to date")
    if failures:
        raise BuildError("build failed for " + "\n".join(failures))
    return steps


def materialize_training(ws: Workspace, *, steps: int | None = None, fine_tune: bool = False, device: str = "auto",
                         instance: dg.DagsterInstance | None = None, extra_assets: Iterable[str] = (),
                         tags: dict[str, str] | None = None, start_from: str = "auto", nproc: int = 1) -> dict:
    """Run training_set, svc_checkpoint, evaluation_report (and ``extra_assets``) in one in-process run.

    ``start_from``: auto (production, else base, else scratch) | production | base | scratch; ``fine_tune`` is
    the older flag for production (see :func:`assets.pretrained.resolve_start_point`).

    ``tags`` are added to the run's tags, so a launcher (the studio) can find its run in the instance.
    ``nproc`` > 1 trains with that many processes under torchrun (see :mod:`assets.distributed`).

    Returns ``{asset: metadata}`` of what materialized; raises :class:`BuildError` with the reason on failure.
    """
    from orchestration.definitions import build_definitions

    instance = instance or open_instance(ws)
    sync_singers(ws, instance)
    defs = build_definitions(ws)
    selection = [*TRAINING_ASSETS, *extra_assets]
    training = {"steps": steps, "start_from": start_from, "fine_tune": fine_tune, "device": device, "nproc": nproc}
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
