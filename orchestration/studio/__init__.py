"""The studio (``svc studio``): a Gradio app to convert, add singers, train and promote on one workspace.

One module per tab, each a class of plain methods that take the page's values and raise :class:`StudioError` with
a message for the page (the tests call them directly): :mod:`.convert_tab`, :mod:`.singers_tab`, :mod:`.train_tab`,
:mod:`.live_tab` (the microphone streamed over a WebSocket to the streaming converter).
They go through the code paths of the CLI (:mod:`orchestration.service`, ``add_singer``, ``build``, a ``svc train``
process, ``promote``). :mod:`.app` is the layout, the wiring, authentication and the upload limits.
"""
from __future__ import annotations

import logging

from assets.workspace import Workspace
from orchestration.studio.common import DEFAULT_MAX_UPLOAD_S, StudioError
from orchestration.studio.convert_tab import ConvertTab
from orchestration.studio.live_tab import LiveTab
from orchestration.studio.singers_tab import SingersTab
from orchestration.studio.train_tab import FINE_TUNE, FROM_SCRATCH, TrainTab

__all__ = ["FINE_TUNE", "FROM_SCRATCH", "Studio", "StudioError"]


class Studio:
    """The studio on one workspace: one object per tab. One instance serves every browser tab of a process."""

    def __init__(self, ws: Workspace, *, dagster_url: str = "http://127.0.0.1:3000",
                 tensorboard_url: str = "http://127.0.0.1:6006", max_upload_s: float = DEFAULT_MAX_UPLOAD_S):
        self.ws = ws
        self.max_upload_s = max_upload_s
        self.convert_tab = ConvertTab(ws, max_upload_s)
        self.singers_tab = SingersTab(ws, max_upload_s, log=logging.getLogger(__name__).info)
        self.train_tab = TrainTab(ws, dagster_url=dagster_url, tensorboard_url=tensorboard_url)
        self.live_tab = LiveTab(lambda: self.convert_tab.converter("production"))
