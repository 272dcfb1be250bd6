"""Parallel builds and the "gpu" concurrency pool: several singers' runs at once, one pooled step at a time.

The pool decisions are unit-tested; the slow test builds four singers with ``parallel=2`` and reads, from the
workspace's Dagster instance, when each run and each step started and ended.
"""
import dagster as dg
import numpy as np
import pytest
from click.testing import CliRunner

from assets.workspace import Workspace
from orchestration.build import build, open_instance, partition_statuses
from orchestration.cli import main
from orchestration.definitions import build_definitions
from orchestration.jobs import PER_SINGER_ASSETS
from orchestration.pools import (
    FEATURE_ASSETS,
    GPU_POOL,
    ensure_pool_limit,
    pooled_assets,
)
from orchestration.singers import add_singer
from tests.conftest import clip, write

quiet = lambda _: None
SINGERS = {"alto": "speaker-a", "bass": "speaker-b", "tenor": "speaker-c", "treble": "speaker-d"}


def set_gpu_pool(ws: Workspace, mode: str) -> None:
    path = ws.root / "svc.yaml"
    path.write_text(path.read_text() + f"gpu_pool: {mode}\n")


# ---- which steps are pooled -------------------------------------------------------------------------------------
def test_pool_follows_the_device():
    # CPU work is never held back: on a machine without a GPU, auto pools nothing.
    assert pooled_assets("auto", "auto", cuda=False) == set()
    # With a GPU, the extractors and training take turns for it...
    assert pooled_assets("auto", "auto", cuda=True) == {*FEATURE_ASSETS, "svc_checkpoint"}
    # ...unless the features are pinned to the CPU: then only training does.
    assert pooled_assets("auto", "cpu", cuda=True) == {"svc_checkpoint"}
    assert pooled_assets("never", "cuda", cuda=True) == set()
    assert pooled_assets("always", "cpu", cuda=False) == {*FEATURE_ASSETS, "svc_checkpoint"}
    with pytest.raises(ValueError, match="gpu_pool 'sometimes'"):
        pooled_assets("sometimes", "auto", cuda=False)


def test_definitions_put_exactly_the_heavy_steps_in_the_pool(workspace, monkeypatch):
    monkeypatch.setattr("orchestration.pools.cuda_present", lambda: False)

    def pools() -> dict[str, str | None]:
        return {a.key.to_user_string(): a.op.pool for a in build_definitions(workspace).assets
                if isinstance(a, dg.AssetsDefinition) and a.is_executable}

    assert set(pools().values()) == {None}, "auto on a CPU-only machine pools nothing"
    set_gpu_pool(workspace, "always")
    got = pools()
    assert {k for k, v in got.items() if v == GPU_POOL} == {*FEATURE_ASSETS, "svc_checkpoint"}
    assert got["clean_audio"] is None and got["training_set"] is None and got["evaluation_report"] is None


class _Settings(dg.Config):
    scale: int = 1


class _Store(dg.ConfigurableResource):
    offset: int


def test_a_pooled_asset_keeps_its_config_resources_checks_and_metadata(tmp_path):
    from orchestration.pools import with_pool

    @dg.asset(check_specs=[dg.AssetCheckSpec("positive", asset="heavy")], code_version="7",
              group_name="features", description="a heavy step")
    def heavy(context: dg.AssetExecutionContext, config: _Settings, store: _Store):
        value = 21 * config.scale + store.offset
        yield dg.Output(value, metadata={"value": value})
        yield dg.AssetCheckResult(check_name="positive", passed=value > 0)

    pooled = with_pool(heavy, GPU_POOL)
    assert pooled.op.pool == GPU_POOL and heavy.op.pool is None
    spec = next(iter(pooled.specs))
    assert (spec.code_version, spec.group_name, spec.description) == ("7", "features", "a heavy step")
    (tmp_path / "dagster.yaml").write_text("concurrency:\n  pools:\n    default_limit: 1\n")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        result = dg.materialize([pooled], instance=instance, resources={"store": _Store(offset=0)},
                                run_config={"ops": {"heavy": {"config": {"scale": 2}}}})
        assert result.output_for_node("heavy") == 42
        [check] = result.get_asset_check_evaluations()
        assert check.passed
        # Dagster creates a pool's slots on the first claim of a step in it: the step asked for a gpu slot.
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 1
        unpooled = dg.materialize([heavy], instance=instance, resources={"store": _Store(offset=1)})
        assert unpooled.output_for_node("heavy") == 22, "the original is untouched"
    finally:
        instance.dispose()


def test_new_workspaces_limit_the_pool_and_the_run_queue(instance):
    # svc init's dagster.yaml: the daemon's queue starts 2 runs at once; any pool without a limit gets 1.
    assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 2
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    assert ensure_pool_limit(instance) == 1
    assert GPU_POOL not in instance.event_log_storage.get_concurrency_keys(), "the yaml's default applies lazily"


def test_an_instance_without_pool_settings_gets_one_gpu_slot(tmp_path):
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\nrun_queue:\n  max_concurrent_runs: 3\n")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 3
        assert ensure_pool_limit(instance) == 1
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 1
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 2)  # set by hand: kept
        assert ensure_pool_limit(instance) == 2
    finally:
        instance.dispose()


def test_parallel_must_be_positive(workspace, instance):
    with pytest.raises(ValueError, match="parallel must be 1 or more"):
        build(workspace, instance=instance, parallel=0, log=quiet)
    result = CliRunner().invoke(main, ["-C", str(workspace.root), "build", "--parallel", "0"])
    assert result.exit_code != 0 and "--parallel" in result.output


def _claim_and_free(home: str, worker: int, claims: int, spans) -> None:
    """A process that loads the code location (as a run worker does), then claims and frees one gpu slot
    ``claims`` times, holding it 10 ms each time; the intervals it held a slot go to ``spans``."""
    import time

    import orchestration.definitions  # noqa: F401 - what every run worker imports

    instance = dg.DagsterInstance.from_config(home)
    storage = instance.event_log_storage
    held = []
    for i in range(claims):
        while not storage.claim_concurrency_slot(GPU_POOL, f"run-{worker}", f"step-{i}").is_claimed:
            time.sleep(0.005)
        start = time.time()
        time.sleep(0.01)
        held.append((start, time.time()))
        storage.free_concurrency_slot_for_step(f"run-{worker}", f"step-{i}")
    spans.put(held)
    instance.dispose()


@pytest.mark.slow
def test_sqlite_slot_claims_hold_the_limit_across_processes(tmp_path):
    import multiprocessing

    # Without the file lock (orchestration.pools.serialize_sqlite_slot_claims), processes that claim at the same
    # instant on SQLite can both take the one slot: unlocked, 2 of 6 runs of this (3-4 processes, 40-80 claims
    # each) had two holders at once. Timing-dependent, so this catches a lost lock often, not always.
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, 1)
    instance.dispose()
    ctx = multiprocessing.get_context("spawn")
    spans = ctx.Queue()
    workers = [ctx.Process(target=_claim_and_free, args=(str(tmp_path), w, 30, spans)) for w in range(3)]
    for w in workers:
        w.start()
    held = [span for _ in workers for span in spans.get(timeout=300)]
    for w in workers:
        w.join(timeout=60)
    assert len(held) == 90
    assert _max_overlap(held) == 1


# ---- four singers at once ---------------------------------------------------------------------------------------
def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an interval that ends as another starts does not overlap it)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, delta in edges:  # at equal times the end (-1) sorts first
        open_now += delta
        peak = max(peak, open_now)
    return peak


def _step_intervals(instance: dg.DagsterInstance, run_id: str) -> dict[str, tuple[float, float]]:
    """``{step_key: (start, end)}`` from the run's STEP_START and STEP_SUCCESS events in the instance."""
    starts, ends = {}, {}
    for record in instance.get_records_for_run(run_id).records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[event.step_key] = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            ends[event.step_key] = entry.timestamp
    assert starts.keys() == ends.keys(), f"run {run_id}: steps started {sorted(starts)} ended {sorted(ends)}"
    return {key: (starts[key], ends[key]) for key in starts}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_four_singers_build_at_once_while_the_gpu_pool_holds_one_step(workspace, instance, voices_dir):
    set_gpu_pool(workspace, "always")  # pool the extractors even on this CPU, so that the limit is exercised
    for singer, speaker in SINGERS.items():
        add_singer(workspace, singer, clip(voices_dir, speaker, 1), instance=instance, push=False, log=quiet)

    steps = build(workspace, instance=instance, parallel=2, log=quiet)

    assert [s.singer for s in steps] == sorted(SINGERS)
    assert all(s.assets == PER_SINGER_ASSETS for s in steps)
    limit = instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count
    assert limit == 1, "svc init's dagster.yaml: one gpu slot"

    runs = {s.singer: instance.get_run_record_by_id(s.run_id) for s in steps}
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in runs.values())
    assert {r.dagster_run.tags.get("dagster/partition") for r in runs.values()} == set(SINGERS)
    run_spans = [(r.start_time, r.end_time) for r in runs.values()]
    # A serial loop (parallel ignored) never has two runs open at once; a pool of more workers than asked has 3+.
    assert _max_overlap(run_spans) == 2, f"runs overlapped {_max_overlap(run_spans)} at most: {run_spans}"

    pooled, free = [], []  # (singer, step key, (start, end)): the extractors; clean_audio and the checks
    for step in steps:
        for key, span in _step_intervals(instance, step.run_id).items():
            (pooled if key in FEATURE_ASSETS else free).append((step.singer, key, span))
    assert len(pooled) == 4 * len(FEATURE_ASSETS) and "clean_audio" in {k for _, k, _ in free}
    # The pool ignored (a step that takes no slot, or a limit of none) lets two workers extract at once.
    peak = _max_overlap([span for _, _, span in pooled])
    assert peak == 1, f"{peak} pooled steps ran at once with a limit of {limit}"
    # CPU work is not held back: only the extractors take a slot; clean_audio and the checks are in no pool (a
    # pool on every step would make them wait). Whether one of them happened to run beside another singer's
    # pooled step depends on timing (a CI rehearsal saw none), so that is reported, not asserted.
    defs = build_definitions(workspace)
    pools = {a.key.to_user_string(): a.op.pool for a in defs.assets
             if isinstance(a, dg.AssetsDefinition) and a.is_executable and len(a.keys) == 1}
    assert {k for k, v in pools.items() if v == GPU_POOL} == set(FEATURE_ASSETS) | {"svc_checkpoint"}, pools
    assert pools["clean_audio"] is None
    beside = [(s, k, t) for s, k, (a, b) in free for t, _, (c, d) in pooled if t != s and a < d and c < b]
    print(f"unpooled steps that ran beside another singer's pooled step: {len(beside)}")
    # Nothing is left holding a slot once the build returns.
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots == []

    # The instance agrees that everything is built.
    statuses = partition_statuses(build_definitions(workspace), instance, PER_SINGER_ASSETS, SINGERS)
    assert set(statuses.values()) == {"fresh"}
    assert build(workspace, instance=instance, parallel=2, log=quiet) == [], "nothing left to do"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_svc_build_parallel_builds_the_others_when_one_singer_fails(workspace, voices_dir):
    instance = open_instance(workspace)
    try:
        for singer in ("alto", "bass"):
            add_singer(workspace, singer, clip(voices_dir, SINGERS[singer], 1), instance=instance, push=False,
                       log=quiet)
        mute = workspace.singer_raw_dir("mute")  # the manual route: a folder, then `dvc add`
        write(mute / "a.wav", np.zeros(64000, np.float32), 32000)
        workspace.run_tool("dvc", "add", "-q", "data/raw/mute")
    finally:
        instance.dispose()

    result = CliRunner().invoke(main, ["-C", str(workspace.root), "build", "--parallel", "3",
                                       "--asset", "clean_audio"])

    # A failed run must fail the command and name its reason, without losing the other workers' runs.
    assert result.exit_code == 1, result.output
    assert "FAILED mute" in result.output and "a.wav: silent" in result.output
    instance = open_instance(workspace)
    try:
        statuses = partition_statuses(build_definitions(workspace), instance, ["clean_audio"], ["alto", "bass", "mute"])
        runs = instance.get_run_records(dg.RunsFilter(tags={"svc/launched_by": "svc build"}))
    finally:
        instance.dispose()
    assert statuses == {("clean_audio", "alto"): "fresh", ("clean_audio", "bass"): "fresh",
                        ("clean_audio", "mute"): "missing"}
    assert sorted(r.dagster_run.status.value for r in runs) == ["FAILURE", "SUCCESS", "SUCCESS"]
