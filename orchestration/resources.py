"""Dagster resources. Heavy models are loaded lazily, once per process."""
from __future__ import annotations

from pathlib import Path

import dagster as dg

from orchestration.workspace import Workspace


class WorkspaceResource(dg.ConfigurableResource):
    """The storage root and settings of a workspace; every asset reads and writes files through it."""

    root: str

    def get(self) -> Workspace:
        return Workspace(Path(self.root))
