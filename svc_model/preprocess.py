"""Turn one singer's recordings into clean, sliced segments at the model and feature rates."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from svc_model.audio import (
    AudioError,
    find_segments,
    is_audio_file,
    load_recording,
    normalize_loudness,
    resample,
    write_audio,
)
from svc_model.config import AudioConfig

MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = [
    "segment_id",
    "singer",
    "source_file",
    "start_s",
    "end_s",
    "duration_s",
    "sample_rate",
    "feature_sample_rate",
    "path",
    "path_16k",
]


@dataclass
class CleanResult:
    manifest: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    source_seconds: float = 0.0
    files_used: int = 0

    @property
    def segment_seconds(self) -> float:
        return float(self.manifest["duration_s"].sum()) if len(self.manifest) else 0.0


class NoUsableAudioError(ValueError):
    """A singer folder where no recording survived validation."""


def list_recordings(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Audio files under ``folder`` (recursive, sorted) and ``(file, reason)`` for everything else."""
    files, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if path.name.startswith("."):
            continue
        if is_audio_file(path):
            files.append(path)
        else:
            skipped.append((rel, f"not an audio file (extension {path.suffix or 'none'!r})"))
    return files, skipped


def _file_keys(rel_paths: list[str]) -> dict[str, str]:
    """Stable, filename-safe key per source file; the extension is kept only where stems collide."""

    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "clip"

    stems = [clean(str(Path(r).with_suffix(""))) for r in rel_paths]
    keys = {}
    for rel, stem in zip(rel_paths, stems):
        keys[rel] = stem if stems.count(stem) == 1 else clean(rel)
    return keys


def clean_singer(
    raw_dir: Path,
    out_dir: Path,
    singer: str,
    cfg: AudioConfig,
    log: Callable[[str], None] = print,
) -> CleanResult:
    """Validate, normalize and slice every recording in ``raw_dir``; write segments and a manifest to ``out_dir``.

    ``out_dir`` receives ``wav/<segment>.wav`` at ``cfg.sample_rate``, ``wav16k/<segment>.wav`` at
    ``cfg.feature_sample_rate`` and ``manifest.parquet`` (paths relative to ``out_dir``). ``raw_dir`` is only
    read. Unusable files are skipped and listed in ``CleanResult.skipped``; if nothing is usable,
    :class:`NoUsableAudioError` names every file and its problem.
    """
    if not raw_dir.is_dir():
        raise FileNotFoundError(
            f"{raw_dir}: recordings folder not found (if it is DVC-tracked, run `dvc pull {raw_dir}.dvc`)"
        )
    files, skipped = list_recordings(raw_dir)
    rel_paths = [str(p.relative_to(raw_dir)) for p in files]
    keys = _file_keys(rel_paths)
    rows, notes = [], []
    source_seconds, used = 0.0, 0
    started = time.perf_counter()
    for i, (path, rel) in enumerate(zip(files, rel_paths), 1):
        try:
            rec = load_recording(path, cfg)
        except AudioError as exc:
            skipped.append((rel, exc.problem))
            log(f"[{singer}] skip {rel}: {exc.problem}")
            continue
        for note in rec.notes:
            notes.append((rel, note))
        # Resample first: resampling after the peak limit could push inter-sample peaks over it.
        audio = resample(rec.audio, rec.sample_rate, cfg.sample_rate)
        audio = normalize_loudness(audio, cfg.sample_rate, cfg.loudness_lufs, cfg.peak_dbfs)
        segments = find_segments(audio, cfg.sample_rate, cfg)
        if not segments:
            skipped.append((rel, f"no segment of at least {cfg.min_segment_s:.1f} s above the silence threshold"))
            log(f"[{singer}] skip {rel}: no usable segment")
            continue
        used += 1
        source_seconds += rec.duration_s
        for j, (start, end) in enumerate(segments):
            seg_name = f"{keys[rel]}_{j:03d}"
            piece = audio[start:end]
            write_audio(out_dir / "wav" / f"{seg_name}.wav", piece, cfg.sample_rate)
            write_audio(
                out_dir / "wav16k" / f"{seg_name}.wav",
                resample(piece, cfg.sample_rate, cfg.feature_sample_rate),
                cfg.feature_sample_rate,
            )
            rows.append(
                {
                    "segment_id": f"{singer}/{seg_name}",
                    "singer": singer,
                    "source_file": rel,
                    "start_s": start / cfg.sample_rate,
                    "end_s": end / cfg.sample_rate,
                    "duration_s": (end - start) / cfg.sample_rate,
                    "sample_rate": cfg.sample_rate,
                    "feature_sample_rate": cfg.feature_sample_rate,
                    "path": f"wav/{seg_name}.wav",
                    "path_16k": f"wav16k/{seg_name}.wav",
                }
            )
        log(f"[{singer}] {i}/{len(files)} {rel}: {rec.duration_s:.1f} s -> {len(segments)} segments")
    if not rows:
        detail = "; ".join(f"{f}: {why}" for f, why in skipped) or "the folder has no files"
        raise NoUsableAudioError(f"{raw_dir}: no usable audio for singer {singer!r} ({detail})")
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest.to_parquet(out_dir / MANIFEST, index=False)
    log(
        f"[{singer}] {len(manifest)} segments, {manifest['duration_s'].sum():.1f} s from {used} files "
        f"in {time.perf_counter() - started:.1f} s; {len(skipped)} skipped"
    )
    return CleanResult(manifest=manifest, skipped=skipped, notes=notes, source_seconds=source_seconds, files_used=used)


def load_manifest(partition_dir: Path) -> pd.DataFrame:
    """Read a partition's manifest and make its paths absolute."""
    manifest = pd.read_parquet(partition_dir / MANIFEST)
    for col in ("path", "path_16k"):
        if col in manifest:
            manifest[col] = [str(partition_dir / p) for p in manifest[col]]
    return manifest


def segment_stats(durations: np.ndarray) -> dict[str, float]:
    d = np.asarray(durations, dtype=float)
    if d.size == 0:
        return {"segments": 0, "hours": 0.0}
    return {
        "segments": int(d.size),
        "hours": float(d.sum() / 3600),
        "min_s": float(d.min()),
        "median_s": float(np.median(d)),
        "max_s": float(d.max()),
    }
