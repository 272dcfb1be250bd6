"""Sensors: register singers that appear as ``data/raw/<singer>.dvc``.

The sensor only adds the partition and records observations; the automation sensor's eager conditions then
build the new (newly missing) partitions, exactly as for `svc add-singer`. A run launched here as well raced
with them: with CI timing, eager re-requested ``vec`` for a singer whose run had just materialized it.
Changed recordings likewise only need a new observation of ``raw_recordings``.
"""

import dagster as dg

from assets.partitions import SINGERS, singers_partitions
from assets.resources import WorkspaceResource
from assets.workspace import WorkspaceBusy
from orchestration.singers import plan_singer_sync, raw_recordings_observation, roster_observation


@dg.sensor(
    name="singer_sensor",
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers a partition for every new data/raw/<singer>.dvc (the automation sensor builds it); "
    "records a new raw_recordings data version when a singer's DVC md5 changes.",
)
def singer_sensor(context: dg.SensorEvaluationContext, workspace: WorkspaceResource) -> dg.SensorResult:
    ws = workspace.get()
    try:
        # Not while `svc add-singer`/`remove-singer` holds the workspace lock: their folder, .dvc file and partition
        # change together, and a look in between would see a singer half added or half removed.
        with ws.lock("singer_sensor", timeout=0, log=context.log.info):
            for folder in ws.untracked_singer_dirs():
                context.log.warning(f"data/raw/{folder}/ is not tracked by DVC yet; run `dvc add data/raw/{folder}`")
            plan = plan_singer_sync(ws, context.instance)
    except WorkspaceBusy as exc:
        return dg.SensorResult(skip_reason=f"the next tick will look again: {exc}")
    if not plan.new and not plan.changed:
        return dg.SensorResult(skip_reason="no new or changed singers")
    events = [raw_recordings_observation(s, plan.versions[s]) for s in plan.new + plan.changed]
    if plan.new:
        events.append(roster_observation([*context.instance.get_dynamic_partitions(SINGERS), *plan.new]))
    context.log.info(f"new singers: {plan.new}; changed recordings: {plan.changed}")
    return dg.SensorResult(
        dynamic_partitions_requests=[singers_partitions.build_add_request(plan.new)] if plan.new else [],
        asset_events=events,
    )
