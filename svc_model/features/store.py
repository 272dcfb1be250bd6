"""Run an extractor over a partition's segments and store one ``.npy`` per segment plus a manifest."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from svc_model.audio import read_wav
from svc_model.features.base import FeatureExtractor

MANIFEST = "manifest.parquet"


@dataclass
class ExtractionResult:
    manifest: pd.DataFrame
    seconds: float
    audio_seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def rtf(self) -> float:
        """Real-time factor: compute seconds per second of audio (below 1 is faster than real time)."""
        return self.seconds / self.audio_seconds if self.audio_seconds else float("nan")


def _segment_name(segment_id: str) -> str:
    return segment_id.split("/", 1)[-1]


def extract_to_dir(
    extractor: FeatureExtractor,
    segments: pd.DataFrame,
    out_dir: Path,
    chunk: int = 32,
    log: Callable[[str], None] = print,
) -> ExtractionResult:
    """Extract ``extractor.feature`` for every row of a ``clean_audio`` manifest (absolute ``path_16k``).

    Segments go to the extractor ``chunk`` at a time (each chunk is batched inside the extractor), so memory
    stays bounded for singers with hours of audio. Writes ``<segment>.npy`` files and ``manifest.parquet``.
    """
    rows, started, audio_seconds = [], time.perf_counter(), 0.0
    stored = []
    ids = list(segments["segment_id"])
    paths = list(segments["path_16k"])
    for start in range(0, len(ids), chunk):
        batch_ids, batch_paths = ids[start : start + chunk], paths[start : start + chunk]
        audios = []
        for p in batch_paths:
            audio, sr = read_wav(p)
            if sr != 16000:
                raise ValueError(f"{p}: expected a 16 kHz segment, got {sr} Hz")
            audios.append(audio)
        feats = extractor.extract_batch(audios)
        for seg_id, audio, arr in zip(batch_ids, audios, feats):
            name = f"{_segment_name(seg_id)}.npy"
            np.save(out_dir / name, arr.astype(np.float32))
            audio_seconds += len(audio) / 16000
            row = {"segment_id": seg_id, "path": name, "frames": int(arr.shape[0]) if arr.ndim > 1 else 1,
                   "dim": int(arr.shape[-1]), "finite": bool(np.isfinite(arr).all())}
            if extractor.feature == "pitch":
                voiced = arr[:, 1] > 0
                row["voiced_ratio"] = float(voiced.mean()) if len(voiced) else 0.0
                row["median_f0_hz"] = float(np.median(arr[voiced, 0])) if voiced.any() else 0.0
            rows.append(row)
            stored.append(arr)
        log(f"{extractor.backend}: {min(start + chunk, len(ids))}/{len(ids)} segments")
    manifest = pd.DataFrame(rows)
    manifest["backend"] = extractor.backend
    manifest["pretrained"] = extractor.pretrained
    encoder = extractor.describe().get("encoder")
    if encoder is not None:  # speaker embeddings: which encoder (backend + weights hash); never mix two
        manifest["encoder"] = encoder
    vec_backend = extractor.describe().get("vec_backend")
    if vec_backend is not None:  # vec: transformers (a HuBERT layer) or hubert-soft (units); never mix two
        manifest["vec_backend"] = vec_backend
    extra: dict = {}
    if extractor.feature == "speaker_embedding" and stored:
        from svc_model.features.speaker import mean_embedding

        mean = mean_embedding(np.stack(stored), normalize=getattr(extractor, "unit_norm", True))
        np.save(out_dir / "mean.npy", mean)
        extra["mean_path"] = "mean.npy"
        extra["norms"] = [float(np.linalg.norm(e)) for e in stored] + [float(np.linalg.norm(mean))]
    if extractor.feature == "pitch" and stored:
        f0 = np.concatenate([a[a[:, 1] > 0, 0] for a in stored])
        extra["voiced_ratio"] = float(np.mean(np.concatenate([a[:, 1] for a in stored])))
        extra["median_f0_hz"] = float(np.median(f0)) if len(f0) else 0.0
    manifest.to_parquet(out_dir / MANIFEST, index=False)
    return ExtractionResult(manifest, time.perf_counter() - started, audio_seconds, extra)


# --- checks on a stored partition (what the Dagster asset checks run) --------------------------------------------

FRAME_TOLERANCE = 1  # frames at the feature's own rate: flooring N samples to whole hops loses less than one


def stored_shape(path: Path) -> tuple[int, ...]:
    """The shape of a ``.npy`` file from its header alone (the data is not read; never unpickles)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
        else:
            return tuple(np.load(path, allow_pickle=False).shape)
    return tuple(shape)


@dataclass
class FrameCheck:
    """Stored feature frames against the clean audio's duration, per segment."""

    segments: int
    mismatched: list[str]  # "segment: 480 frames, expected 512 +- 1 (5.12 s)"
    missing: list[str]  # segments with no feature file (or no manifest row)
    worst_offset: float  # frames

    @property
    def passed(self) -> bool:
        return self.segments > 0 and not self.mismatched and not self.missing


def check_frames(clean: pd.DataFrame, feature_dir: Path, frame_rate: int,
                 tolerance: int = FRAME_TOLERANCE) -> FrameCheck:
    """Every segment of a ``clean_audio`` manifest (``segment_id``, ``duration_s``) against the ``.npy`` that the
    feature partition stores for it: its frame count must be within ``tolerance`` frames of
    ``duration_s * frame_rate``. Reads the files' headers, not the feature manifest, so a file that was cut short,
    written by something else, or left from before the audio was re-sliced is caught."""
    manifest = pd.read_parquet(feature_dir / MANIFEST).set_index("segment_id")
    mismatched, missing, worst = [], [], 0.0
    for seg_id, seconds in zip(clean["segment_id"], clean["duration_s"]):
        if seg_id not in manifest.index or not (feature_dir / manifest.loc[seg_id, "path"]).is_file():
            missing.append(seg_id)
            continue
        frames = stored_shape(feature_dir / manifest.loc[seg_id, "path"])[0]
        expected = float(seconds) * frame_rate
        offset = abs(frames - expected)
        worst = max(worst, offset)
        if offset > tolerance:
            mismatched.append(f"{seg_id}: {frames} frames, expected {expected:.1f} +- {tolerance} "
                              f"({float(seconds):.2f} s at {frame_rate} Hz)")
    return FrameCheck(len(clean), mismatched, missing, round(worst, 2))


MIN_EMBEDDING_NORM = 0.1  # resemblyzer's are 1; mozilla-lstm's (means of 10 unit vectors) measure 0.7-1
NORM_TOLERANCE = 1e-3  # |norm - 1| for unit-norm encoders; how far above 1 a mean of unit vectors may read
MEAN_TOLERANCE = 1e-5


@dataclass
class EmbeddingCheck:
    segments: int
    problems: list[str]

    @property
    def passed(self) -> bool:
        return self.segments > 0 and not self.problems


def check_embeddings(clean: pd.DataFrame, feature_dir: Path, dim: int, unit_norm: bool) -> EmbeddingCheck:
    """A speaker_embedding partition against what its encoder must give: one ``(dim,)`` finite vector per clean
    segment with a norm in [MIN_EMBEDDING_NORM, 1] (exactly 1 for unit-norm encoders), not all the same vector
    (an encoder fed silence, or a broken one, gives one vector for everything), and ``mean.npy`` equal to the
    mean of the segments' vectors (renormalized for unit-norm encoders), i.e. not left from other files."""
    from svc_model.features.speaker import mean_embedding, norm_error

    manifest = pd.read_parquet(feature_dir / MANIFEST).set_index("segment_id")
    problems, vectors = [], []
    for seg_id in clean["segment_id"]:
        path = feature_dir / manifest.loc[seg_id, "path"] if seg_id in manifest.index else None
        if path is None or not path.is_file():
            problems.append(f"{seg_id}: no embedding file")
            continue
        e = np.load(path, allow_pickle=False)
        if e.shape != (dim,):
            problems.append(f"{path.name}: shape {e.shape}, the encoder gives ({dim},)")
            continue
        norm = float(np.linalg.norm(e))
        if not np.isfinite(e).all():
            problems.append(f"{path.name}: NaN or inf")
        elif norm < MIN_EMBEDDING_NORM or norm_error([norm], unit=unit_norm) > NORM_TOLERANCE:
            problems.append(f"{path.name}: norm {norm:.4f}, expected {'1' if unit_norm else f'{MIN_EMBEDDING_NORM}..1'}")
        else:
            vectors.append(e)
    if len(vectors) >= 2 and float(np.abs(np.stack(vectors) - vectors[0]).max()) < 1e-6:
        problems.append(f"all {len(vectors)} segments have the same embedding")
    mean_path = feature_dir / "mean.npy"
    if not mean_path.is_file():
        problems.append("mean.npy is missing")
    elif vectors and not problems:
        stored = np.load(mean_path, allow_pickle=False)
        expected = mean_embedding(np.stack(vectors), normalize=unit_norm)
        if stored.shape != expected.shape:
            problems.append(f"mean.npy has shape {stored.shape}, the encoder gives ({dim},)")
        elif float(np.abs(stored - expected).max()) > MEAN_TOLERANCE:
            problems.append(f"mean.npy is not the mean of the segments' embeddings (max difference "
                            f"{float(np.abs(stored - expected).max()):.2e})")
    return EmbeddingCheck(len(clean), problems)
