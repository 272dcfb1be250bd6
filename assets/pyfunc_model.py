"""The MLflow pyfunc that serves conversion: ``models:/svc@production`` -> something that converts audio.

Logged as "models from code" (this file is stored with the model and executed on load) with ``svc_model``'s code
(``code_paths``); the weights travel as the ``model`` artifact: ``generator.safetensors`` plus JSON config and
singer table (:mod:`svc_model.weights`). Nothing pickled is stored or loaded. This file imports only mlflow,
pandas and ``svc_model`` (never ``assets``: the model must load where the pipeline is not installed).

``predict`` takes a DataFrame, one conversion per row (MLflow's schema check wants every row of one DataFrame to
use the same source column). The source audio comes as data:

- ``audio_base64``: the bytes of an audio file (WAV, FLAC, Ogg, MP3 or M4A), base64-encoded; or
- ``audio`` (an array of float samples, one channel) with ``sample_rate``; or
- ``source``: a path on the serving machine, accepted only under the configured audio root.

``target`` is a singer name, a JSON blend such as ``{"alice": 0.7, "bob": 0.3}``, or a reference recording's path
(under the audio root). Optional: ``pitch_shift`` (semitones or "auto"), ``seed`` (the same seed gives the same
audio as ``svc convert --seed``), ``deterministic``, and ``output`` (a path under the audio root to also write).
Each row returns ``audio_base64`` (a 16-bit WAV, as ``svc convert -o out.wav`` writes it), ``sample_rate``, the
``target`` and ``pitch_shift`` applied, ``seconds`` of audio and ``output`` ("" when none was asked for).

Server paths: refused unless an audio root is configured, by ``model_config={"audio_root": DIR}`` at load time
(``mlflow.pyfunc.load_model(uri, model_config=...)``, or MLflow's ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` for
``mlflow models serve``) or the ``SVC_PYFUNC_AUDIO_ROOT`` environment variable; then
only paths that resolve (symlinks and ``..`` followed) inside it are read or written, relative paths taken from it.
``model_config`` may also set ``max_audio_mb`` (decoded base64 size limit, default 50) and ``weights_root`` (where
feature-extractor weights such as ``models/hubert/...`` are found; default: the working directory).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd

import mlflow

AUDIO_ROOT_ENV = "SVC_PYFUNC_AUDIO_ROOT"
DEFAULT_MAX_AUDIO_MB = 50.0


class PathRefused(ValueError):
    """A server path outside the configured audio root, or any path when none is configured."""


def _sniff_suffix(data: bytes) -> str | None:
    """The file type of encoded audio bytes, from their magic numbers (the decoders need a suffix)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return ".wav"
    if data[:4] == b"fLaC":
        return ".flac"
    if data[:4] == b"OggS":
        return ".ogg"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return ".mp3"
    if data[4:8] == b"ftyp":
        return ".m4a"
    return None


def _present(value) -> bool:
    """A DataFrame cell holds a value (not None/NaN, not an empty string)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, str) and not value.strip())


class SVCModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from svc_model.infer import Converter

        config = dict(context.model_config or {})
        root = config.get("audio_root") or os.environ.get(AUDIO_ROOT_ENV)
        self.audio_root = Path(root).expanduser().resolve() if root else None
        self.max_audio_bytes = int(float(config.get("max_audio_mb", DEFAULT_MAX_AUDIO_MB)) * 1e6)
        self.converter = Converter.from_checkpoint(context.artifacts["model"], root=config.get("weights_root") or None)

    # ---- paths -----------------------------------------------------------------------------------------------
    def server_path(self, text: str, what: str) -> Path:
        """``text`` as a path inside the audio root, or :class:`PathRefused` naming the path and the root."""
        if self.audio_root is None:
            raise PathRefused(f"{what} {text!r}: server paths are refused (no audio root is configured); send the "
                              f"audio as data (audio_base64, or audio + sample_rate), or load the model with "
                              f"model_config={{'audio_root': DIR}} (or set {AUDIO_ROOT_ENV}) to allow paths under DIR")
        path = Path(text).expanduser()
        resolved = (path if path.is_absolute() else self.audio_root / path).resolve()
        if not resolved.is_relative_to(self.audio_root):
            raise PathRefused(f"{what} {text!r} resolves to {resolved}, outside the audio root {self.audio_root}; "
                              f"refused")
        return resolved

    # ---- one row ---------------------------------------------------------------------------------------------
    def _source(self, record: dict, tmp: Path, row: int):
        """``(source, source_sr)`` for :meth:`Converter.convert`: a file path, or an array and its rate."""
        import numpy as np

        given = [k for k in ("audio_base64", "audio", "source") if _present(record.get(k))]
        if len(given) != 1:
            raise ValueError(f"row {row}: give exactly one source: audio_base64, audio (+ sample_rate) or source "
                             f"(got {', '.join(given) or 'none'})")
        if given[0] == "audio_base64":
            text = record["audio_base64"]
            if len(text) * 3 // 4 > self.max_audio_bytes:
                raise ValueError(f"row {row}: audio_base64 is over the {self.max_audio_bytes / 1e6:g} MB limit")
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError, TypeError) as exc:
                raise ValueError(f"row {row}: audio_base64 is not valid base64 ({exc})") from None
            suffix = _sniff_suffix(data)
            if suffix is None:
                raise ValueError(f"row {row}: audio_base64 holds no recognized audio file (WAV, FLAC, Ogg, MP3 or "
                                 f"M4A bytes expected)")
            path = tmp / f"source-{row}{suffix}"
            path.write_bytes(data)  # this call's own temp folder; the decoders read files
            return path, None
        if given[0] == "audio":
            rate = record.get("sample_rate")
            if not _present(rate) or int(rate) <= 0:
                raise ValueError(f"row {row}: audio given as samples needs a positive sample_rate")
            try:
                samples = np.asarray(record["audio"], dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"row {row}: audio is not an array of numbers ({exc})") from None
            if samples.ndim != 1:
                raise ValueError(f"row {row}: audio must be one channel of samples, got shape {list(samples.shape)}")
            return samples, int(rate)
        return str(self.server_path(str(record["source"]), f"row {row}: source")), None

    def _target(self, text, row: int):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"row {row}: target is required (a singer name, a JSON blend, or a reference path)")
        if text.strip().startswith("{"):
            try:
                blend = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"row {row}: target blend is not valid JSON ({exc})") from None
            if not isinstance(blend, dict):
                raise ValueError(f"row {row}: target blend must be a JSON object of singer: weight")
            return blend
        if text in self.converter.singers:
            return text
        if ("/" in text or os.sep in text or Path(text).suffix) or self.audio_root is not None:
            path = self.server_path(text, f"row {row}: target reference")
            if path.is_file():
                return str(path)
        known = ", ".join(sorted(self.converter.singers)) or "none"
        raise ValueError(f"row {row}: unknown singer {text!r} (known: {known})")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from svc_model.audio import write_audio

        rows = []
        with tempfile.TemporaryDirectory(prefix="svc-pyfunc-") as tmp:
            tmp = Path(tmp)
            for row, record in enumerate(model_input.to_dict("records")):
                target = self._target(record.get("target"), row)
                output = self.server_path(str(record["output"]), f"row {row}: output") \
                    if _present(record.get("output")) else None
                source, source_sr = self._source(record, tmp, row)
                shift = record.get("pitch_shift")
                seed = record.get("seed")
                result = self.converter.convert(
                    source, target, shift if _present(shift) else 0, source_sr=source_sr,
                    seed=int(seed) if _present(seed) else 0,
                    deterministic=bool(record.get("deterministic")) if _present(record.get("deterministic")) else False)
                wav = tmp / f"converted-{row}.wav"
                write_audio(wav, result.audio, result.sample_rate)
                if output is not None:
                    write_audio(output, result.audio, result.sample_rate)
                rows.append({"audio_base64": base64.b64encode(wav.read_bytes()).decode("ascii"),
                             "sample_rate": result.sample_rate, "target": result.target,
                             "pitch_shift": result.pitch_shift, "seconds": len(result.audio) / result.sample_rate,
                             "output": str(output) if output is not None else ""})
        return pd.DataFrame(rows)


mlflow.models.set_model(SVCModel())
