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
