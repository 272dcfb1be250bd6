"""Dagster resources. Heavy models are loaded lazily, once per process."""
from __future__ import annotations

from pathlib import Path

import dagster as dg

from assets.workspace import Workspace


class WorkspaceResource(dg.ConfigurableResource):
    """The storage root and settings of a workspace; every asset reads and writes files through it."""

    root: str

    def get(self) -> Workspace:
        return Workspace(Path(self.root))


_EXTRACTORS: dict[tuple[str, str], object] = {}


class FeatureExtractorsResource(dg.ConfigurableResource):
    """Feature extractors for the workspace's config, loaded once per process and reused by every asset."""

    root: str

    def get(self, feature: str):
        from svc_model.features import build_extractor

        ws = Workspace(Path(self.root))
        cfg = ws.config().features
        key = (feature, cfg.model_dump_json())
        if key not in _EXTRACTORS:
            _EXTRACTORS[key] = build_extractor(feature, cfg, root=ws.root)
        return _EXTRACTORS[key]
