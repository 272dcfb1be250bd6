"""What the workspace holds, as `svc status` and the studio's Singers tab show it.

Per singer: recordings, segments, minutes, the DVC md5 and each per-singer asset's status (as the Dagster UI
computes it); the cross-singer assets; and the registry's production and candidate versions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg

from assets.partitions import SINGERS
from assets.workspace import Workspace
from orchestration.jobs import PER_SINGER_ASSETS, TRAINING_ASSETS


@dataclass
class SingerStatus:
    name: str
    dvc_md5: str | None
    registered: bool
    files: int = 0  # recordings in data/raw/<singer>
    segments: int = 0  # sliced segments in clean_audio (0 until it is materialized)
    minutes: float = 0.0
    assets: dict[str, str] = field(default_factory=dict)  # asset -> "fresh" | "stale" | "missing" | "unregistered"

    @property
    def state(self) -> str:
        """One word for the whole singer: the worst of its assets."""
        for word in ("unregistered", "missing", "stale"):
            if word in self.assets.values():
                return word
        return "materialized"


@dataclass
class WorkspaceStatus:
    singers: list[SingerStatus]
    training: dict[str, str]  # cross-singer asset -> status
    production: str | None  # registered model version numbers
    candidate: str | None


def workspace_status(ws: Workspace, instance: dg.DagsterInstance | None = None) -> WorkspaceStatus:
    from assets import tracking
    from orchestration.build import open_instance, status_resolver
    from orchestration.definitions import build_definitions
    from svc_model.audio import is_audio_file
    from svc_model.preprocess import MANIFEST, load_manifest

    own = instance is None
    instance = instance or open_instance(ws)
    try:
        status = status_resolver(build_definitions(ws), instance)
        registered = set(instance.get_dynamic_partitions(SINGERS))
        singers = []
        for name in ws.singers():
            raw = ws.singer_raw_dir(name)
            row = SingerStatus(name, ws.singer_data_version(name), name in registered,
                               files=sum(1 for p in raw.rglob("*") if p.is_file() and is_audio_file(p))
                               if raw.is_dir() else 0)
            row.assets = {a: status(a, name) if row.registered else "unregistered" for a in PER_SINGER_ASSETS}
            clean = ws.partition_dir("clean_audio", name)
            if (clean / MANIFEST).is_file():
                manifest = load_manifest(clean)
                row.segments, row.minutes = len(manifest), float(manifest["duration_s"].sum()) / 60
            singers.append(row)
        training = {a: status(a, None) for a in TRAINING_ASSETS}
    finally:
        if own:
            instance.dispose()
    production = tracking.alias_version(ws, tracking.PRODUCTION)
    candidate = tracking.alias_version(ws, tracking.CANDIDATE)
    return WorkspaceStatus(singers, training, production and str(production.version),
                           candidate and str(candidate.version))
