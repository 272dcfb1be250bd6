"""The Singers tab: what the workspace holds per singer, and adding a singer (`svc add-singer`, then `svc build`)."""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from assets.workspace import Workspace, WorkspaceError, validate_singer_name
from orchestration.studio.common import Progress, StudioError, check_audio, no_progress


class SingersTab:
    def __init__(self, ws: Workspace, max_upload_s: float, log=print):
        self.ws = ws
        self.max_upload_s = max_upload_s
        self.log = log  # where add-singer and build say what they do (the studio's terminal)

    def overview(self) -> tuple[pd.DataFrame, str]:
        """One row per singer (recordings, segments, minutes, status), and a line on training and the registry."""
        from orchestration.status import workspace_status

        st = workspace_status(self.ws)
        table = pd.DataFrame(
            [{"singer": r.name, "recordings": r.files, "segments": r.segments, "minutes": round(r.minutes, 2),
              "status": r.state, "DVC md5": (r.dvc_md5 or "")[:12]} for r in st.singers],
            columns=["singer", "recordings", "segments", "minutes", "status", "DVC md5"])
        note = (f"Training set: **{st.training['training_set']}**; production: "
                f"**{'version ' + st.production if st.production else 'none'}**, candidate: "
                f"**{'version ' + st.candidate if st.candidate else 'none'}**.")
        if st.training["training_set"] != "fresh" and st.singers:
            note += " Train in the Train tab to include every singer's current recordings."
        return table, note

    def add_singer(self, name: str | None, files: Iterable[str | Path] | None = None,
                   recording: str | Path | None = None, progress: Progress = no_progress) -> str:
        """``svc add-singer NAME FILES`` (copy, validate, DVC add and push, register), then build the singer's assets.

        Every upload is checked first, so a bad one changes nothing."""
        from orchestration.build import BuildError, build, open_instance
        from orchestration.singers import add_singer

        name = (name or "").strip()
        if not name:
            raise StudioError("Enter a name for the singer.")
        try:
            validate_singer_name(name)
        except WorkspaceError as exc:
            raise StudioError(str(exc)) from None
        if name in self.ws.singers() or self.ws.singer_raw_dir(name).exists():
            raise StudioError(f"A singer named {name!r} already exists; choose another name.")
        uploads = [Path(f) for f in files or []]
        if not uploads and not recording:
            raise StudioError("Add at least one recording: upload files or record one.")
        problems = []
        for path in uploads + ([Path(recording)] if recording else []):
            try:
                check_audio(self.ws, path, "recording", self.max_upload_s)
            except StudioError as exc:
                problems.append(str(exc))
        if problems:
            raise StudioError("Nothing was added. " + " ".join(problems))
        instance = open_instance(self.ws)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if recording:  # the browser names every recording alike; give it a name worth keeping
                    named = Path(tmp) / f"recording-{time.strftime('%Y%m%d-%H%M%S')}{Path(recording).suffix}"
                    shutil.copy(recording, named)
                    uploads.append(named)
                progress(0.05, "copying, validating and versioning the recordings (DVC)")
                report = add_singer(self.ws, name, uploads, instance=instance, log=self.log)
            progress(0.3, f"building {name}'s clean audio and features (Dagster)")
            try:
                build(self.ws, singers=[name], instance=instance, log=self.log)
            except BuildError as exc:
                raise StudioError(f"Singer {name!r} was added, but building its assets failed: {exc}") from None
        except WorkspaceError as exc:
            raise StudioError(str(exc)) from None
        finally:
            instance.dispose()
        skipped = "".join(f"\n- skipped {Path(p).name}: {why}" for p, why in report.skipped)
        return (f"Added **{name}**: {len(report.added)} recording(s), {report.seconds:.1f} s, DVC md5 "
                f"`{report.data_version}`; its clean audio and features are built. Train in the Train tab to "
                f"include it in the model.{skipped}")
