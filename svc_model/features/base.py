"""The shared base of the feature extractors: device choice, batching, the missing-weights error.

Every extractor takes 16 kHz mono float32 segments and returns one array per segment, frame-aligned with
the model's 100 Hz grid (``frames_100hz``): pitch at 100 Hz, PPG and vec at 50 Hz (repeated x2 later).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

FEATURE_SR = 16000
HOP_100HZ = 160  # samples at 16 kHz = 320 at 32 kHz
HOP_50HZ = 320


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on disk and cannot be downloaded. The message says where to put them."""


def frames_100hz(n_samples_16k: int) -> int:
    return n_samples_16k // HOP_100HZ


def frames_50hz(n_samples_16k: int) -> int:
    return n_samples_16k // HOP_50HZ


def pick_device(requested: str = "auto"):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available; use device: auto or cpu")
    return torch.device(requested)


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (sorted), so padding costs little."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def fit_frames(x: np.ndarray, n: int) -> np.ndarray:
    """Trim or edge-pad the time axis (axis 0) to exactly ``n`` frames."""
    if len(x) >= n:
        return x[:n]
    pad = [(0, n - len(x))] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, pad, mode="edge") if len(x) else np.zeros((n, *x.shape[1:]), dtype=x.dtype)


class FeatureExtractor(ABC):
    """One feature, one backend. Subclasses load their model once, in ``__init__``."""

    feature: str = ""
    frame_rate: int = 100

    def __init__(self, device: str = "auto", fp16: bool = True):
        self.device = pick_device(device)
        self.fp16 = bool(fp16) and self.device.type == "cuda"

    @classmethod
    @abstractmethod
    def from_config(cls, features_cfg: Any, root: Path | None = None) -> "FeatureExtractor":
        """Build from :class:`svc_model.config.FeaturesConfig`; relative paths resolve against ``root``."""

    @property
    @abstractmethod
    def backend(self) -> str:
        """e.g. ``crepe-full``, ``whisper-tiny.en``."""

    @property
    def pretrained(self) -> bool:
        return True

    @abstractmethod
    def extract_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        """16 kHz mono float32 segments -> one feature array per segment (time on axis 0)."""

    def extract(self, audio: np.ndarray) -> np.ndarray:
        return self.extract_batch([audio])[0]

    def describe(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "backend": self.backend,
            "pretrained": self.pretrained,
            "device": str(self.device),
            "fp16": self.fp16,
            "frame_rate_hz": self.frame_rate,
        }


def resolve(path: str, root: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or root is None else root / p
