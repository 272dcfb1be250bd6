"""The "gpu" concurrency pool: one heavy step per GPU at a time, whatever runs at once.

Several singer runs may execute together (``svc build --parallel``, or the daemon's run queue). The steps that put
a model on the GPU (the feature extractors, training) take a slot of Dagster's pool ``gpu`` first, so that one
GPU runs one of them at a time; every other step (decoding and slicing audio, manifests, evaluation...) runs
freely. Dagster enforces pools in the run worker, step by step ("op" granularity), with the slots kept in the
instance's storage, so the limit holds across processes: `svc build`'s workers, the daemon's runs, the UI's.

Which steps take a slot is decided when the Definitions are built, from the workspace's ``gpu_pool`` setting
(``svc.yaml``):

- ``auto`` (default): the feature extractors when ``features.device`` is ``cuda``, or ``auto`` on a machine with
  an NVIDIA driver; ``svc_checkpoint`` on such a machine. On a CPU-only machine nothing is pooled: the pool must
  not hold back CPU work.
- ``always``: those steps take a slot even on the CPU (tests use it to exercise the limit).
- ``never``: nothing is pooled.

The limit is the instance's: ``concurrency: pools: default_limit`` in ``.dagster/dagster.yaml`` (1, as `svc init`
writes it), or ``dagster instance concurrency set gpu N`` / the UI's Deployment > Concurrency page. An instance
with neither gets ``gpu`` = 1 from :func:`ensure_pool_limit` (`svc build` calls it).

Cheap on purpose (no torch): the UI loads the code location on every reload.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import dagster as dg

GPU_POOL = "gpu"
DEFAULT_GPU_SLOTS = 1  # one heavy step per GPU: the extractors and training address cuda:0
FEATURE_ASSETS = ("pitch", "ppg", "vec", "speaker_embedding")
TRAINING_ASSETS = ("svc_checkpoint",)
GPU_POOL_MODES = ("auto", "always", "never")


def cuda_present() -> bool:
    """Whether this machine has an NVIDIA GPU that a step would use, without importing torch: the driver is
    loaded and ``CUDA_VISIBLE_DEVICES`` does not hide every device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def pooled_assets(mode: str, features_device: str, cuda: bool | None = None) -> set[str]:
    """The assets whose step takes a ``gpu`` slot, for ``gpu_pool: mode`` and ``features.device``."""
    if mode not in GPU_POOL_MODES:
        raise ValueError(f"svc.yaml: gpu_pool {mode!r} is not one of {list(GPU_POOL_MODES)}")
    if mode == "never":
        return set()
    if mode == "always":
        return {*FEATURE_ASSETS, *TRAINING_ASSETS}
    cuda = cuda_present() if cuda is None else cuda
    pooled = set(TRAINING_ASSETS) if cuda else set()
    if features_device == "cuda" or (features_device == "auto" and cuda):
        pooled.update(FEATURE_ASSETS)
    return pooled


def with_pool(asset: dg.AssetsDefinition, pool: str | None) -> dg.AssetsDefinition:
    """``asset`` with its op in ``pool`` (None: in none). Dagster has no public way to change the pool of a
    decorated asset, so the op is rebuilt as ``OpDefinition.with_replaced_properties`` does (an internal API,
    pinned by dagster<1.14); everything else about the asset is kept."""
    from dagster._core.definitions.assets.definition.assets_definition import AssetsDefinition

    op = asset.op
    if op.pool == pool:
        return asset
    node = dg.OpDefinition.dagster_internal_init(
        name=op.name,
        ins={i.name: dg.In.from_definition(i) for i in op.input_defs},
        outs={o.name: dg.Out.from_definition(o) for o in op.output_defs},
        compute_fn=op.compute_fn,
        config_schema=op.config_schema,
        description=op.description,
        tags=op.tags,
        required_resource_keys=op.required_resource_keys,
        code_version=op._version,
        retry_policy=op.retry_policy,
        version=None,
        pool=pool,
    )
    return AssetsDefinition.dagster_internal_init(**{**asset.get_attributes_dict(), "node_def": node})


def apply_pools(assets: Iterable, pooled: set[str]) -> list:
    """``assets`` with every single-asset definition named in ``pooled`` moved into the ``gpu`` pool."""
    out = []
    for asset in assets:
        single = isinstance(asset, dg.AssetsDefinition) and asset.is_executable and len(asset.keys) == 1
        if single and asset.key.to_user_string() in pooled:
            asset = with_pool(asset, GPU_POOL)
        out.append(asset)
    return out


def ensure_pool_limit(instance: dg.DagsterInstance, pool: str = GPU_POOL, limit: int = DEFAULT_GPU_SLOTS) -> int | None:
    """Make sure ``pool`` has a limit in ``instance``; returns the limit in force (None: the storage has no pools).

    A limit set by hand (``dagster instance concurrency set``, the UI) or the instance's ``pools: default_limit``
    wins. Only a pool with neither (a workspace made before pools existed) gets ``limit``: without it Dagster
    would not limit the pool at all."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return None
    if pool in storage.get_concurrency_keys():
        return storage.get_concurrency_info(pool).slot_count
    default = instance.get_concurrency_config().pool_config.default_pool_limit
    if default is not None:
        return default  # Dagster sets the pool to it on the first claim
    storage.set_concurrency_slots(pool, limit)
    return limit


# The storage calls that assign, claim and free pool slots. Each is a sequence of statements (count the free
# slots, queue the step, pick a free slot row, write the step into it) that SQLite commits one by one.
_SLOT_CALLS = ("claim_concurrency_slot", "free_concurrency_slot_for_step", "free_concurrency_slots_for_run",
               "initialize_concurrency_limit_to_default", "set_concurrency_slots")


def serialize_sqlite_slot_claims() -> None:
    """Make Dagster's SQLite pool slots hold their limit across processes. Idempotent.

    On Postgres, claiming a slot locks its row (``SELECT ... FOR UPDATE SKIP LOCKED``). SQLite ignores that, so
    two processes that claim at the same instant can both read the same free slot row and both write their step
    into it: with a limit of 1, two pooled steps ran at once in this project's test of four singers built two at
    a time. Here each of those calls runs under a file lock beside the event log (``concurrency.lock``), which
    makes every claim and free a single step for all processes that load this module: `svc build`'s workers
    and, because the code location imports it, the run workers that the daemon launches. A patch of Dagster's
    SQLite storage classes, pinned by dagster<1.14; Postgres storage is left alone.
    """
    from dagster._core.storage.event_log.sqlite.consolidated_sqlite_event_log import (
        ConsolidatedSqliteEventLogStorage,
    )
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

    for cls in (SqliteEventLogStorage, ConsolidatedSqliteEventLogStorage):
        for name in _SLOT_CALLS:
            method = getattr(cls, name)
            if not getattr(method, "_svc_serialized", False):
                setattr(cls, name, _under_slot_lock(method))


def _under_slot_lock(method):
    import functools

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with _slot_lock(os.path.join(self._base_dir, "concurrency.lock")):
            return method(self, *args, **kwargs)

    locked._svc_serialized = True
    return locked


_SLOT_LOCKS: dict[str, object] = {}


def _slot_lock(path: str):
    # One FileLock per file in a process: it is re-entrant within a thread (a free that assigns the next claim).
    from filelock import FileLock

    lock = _SLOT_LOCKS.get(path)
    if lock is None:
        # preserve_lock_file: unlinking on release lets a waiter lock a file that is already gone.
        lock = _SLOT_LOCKS.setdefault(path, FileLock(path, preserve_lock_file=True))
    return lock
