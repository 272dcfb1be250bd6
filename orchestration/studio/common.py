"""What every tab of the studio shares: the error the page shows, progress callbacks, the upload check."""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from assets.workspace import Workspace

DEFAULT_MAX_UPLOAD_S = 300.0  # uploads are held in memory and converted while the page waits
DEFAULT_MAX_UPLOAD_MB = 100  # bytes Gradio accepts per uploaded file (5 min of 48 kHz 24-bit stereo WAV is 83 MB)

# Progress callback: fraction done (0..1) and what is happening.
Progress = Callable[[float, str], None]


class StudioError(Exception):
    """Bad input or a refused action; the message is shown in the page as it is."""


def no_progress(fraction: float, desc: str) -> None:
    """The progress callback when nobody watches."""


def check_audio(ws: Workspace, path: str | Path | None, what: str, max_upload_s: float) -> Path:
    """An upload or recording the studio accepts: decodable, not silent, at most ``max_upload_s`` long.

    The length is read from the file's header first (:func:`svc_model.audio.load_recording`): a file that declares
    more than the limit is refused without being decoded."""
    from svc_model.audio import AudioError, load_recording

    if not path:
        raise StudioError(f"No audio for {what}: upload a file or record one.")
    path = Path(path)
    audio_cfg = ws.config().audio
    limits = audio_cfg.model_copy(update={"max_file_s": min(audio_cfg.max_file_s, max_upload_s)})
    try:
        load_recording(path, limits)
    except AudioError as exc:
        raise StudioError(f"{what} ({path.name}): {exc.problem}") from None
    return path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "output"
