"""The Dagster code location. Loads fast: no torch, whisper or transformers import happens here.

``dagster dev -m orchestration.definitions`` (or ``svc ui``) serves the workspace named by ``$SVC_WORKSPACE``,
else the one around the current directory, else the project root.
"""
from __future__ import annotations

import dagster as dg

from assets.evaluation import evaluation_report, production_model
from assets.features import FEATURE_CHECKS, pitch, ppg, speaker_embedding, vec
from assets.ingest import clean_audio, raw_recordings, singer_roster
from assets.resources import FeatureExtractorsResource, WorkspaceResource
from assets.training import svc_checkpoint, training_set
from assets.workspace import Workspace
from orchestration.jobs import build_singer_job, promote_job, train_job
from orchestration.pools import serialize_sqlite_slot_claims
from orchestration.sensors import singer_sensor

ASSETS = [raw_recordings, singer_roster, clean_audio, pitch, ppg, vec, speaker_embedding, training_set, svc_checkpoint,
          evaluation_report, production_model]
ASSET_CHECKS = FEATURE_CHECKS

# Every process that loads this code location (the daemon's run workers, `svc build` and its workers) claims
# "gpu" pool slots one at a time on SQLite storage.
serialize_sqlite_slot_claims()

# Eager conditions only act while this sensor runs (under `dagster dev` or the daemon).
automation_sensor = dg.AutomationConditionSensorDefinition(
    "svc_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=15,
)


def build_definitions(workspace: Workspace | None = None) -> dg.Definitions:
    """The workspace's Definitions. Code versions follow its config (``assets.versions``), and so do concurrency
    pools (``orchestration.pools``), so materialize through ``defs.assets`` / ``defs.asset_checks``, not the bare
    ``ASSETS``, or the recorded versions will not match."""
    from assets.versions import bind_code_versions
    from orchestration.pools import apply_pools, pooled_assets

    ws = workspace or Workspace.discover()
    cfg = ws.config()
    # The steps that would run on a GPU take a slot of the "gpu" concurrency pool (orchestration.pools).
    pooled = pooled_assets(ws.settings.gpu_pool, cfg.features.device)
    return dg.Definitions(
        assets=apply_pools(bind_code_versions(ASSETS, cfg), pooled),
        asset_checks=ASSET_CHECKS,
        sensors=[singer_sensor, automation_sensor],
        jobs=[build_singer_job, train_job, promote_job],
        resources={
            "workspace": WorkspaceResource(root=str(ws.root)),
            "extractors": FeatureExtractorsResource(root=str(ws.root)),
        },
    )


defs = build_definitions()
