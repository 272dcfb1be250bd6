"""Training data: the manifest of segments with their feature files, a stable split, aligned crops, collate.

A training manifest has one row per segment with columns ``segment_id``, ``singer``, ``split`` and absolute (or
``root``-relative) paths ``audio`` (model-rate wav), ``pitch``, ``ppg``, ``vec`` and ``speaker`` (``.npy``).
Batches are a pure function of ``(seed, step)``, so a resumed run sees exactly the batches a straight run would.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from svc_model.audio import read_wav
from svc_model.features.base import fit_frames

MANIFEST_COLUMNS = ["segment_id", "singer", "split", "audio", "pitch", "ppg", "vec", "speaker", "duration_s",
                    "speaker_encoder"]


def split_for(segment_id: str, valid_fraction: float) -> str:
    """``"valid"`` for a stable ``valid_fraction`` of ids (by hash), else ``"train"``; adding data reshuffles nothing."""
    bucket = int(hashlib.sha1(segment_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "valid" if bucket < valid_fraction else "train"


def join_singer(singer: str, clean_dir: Path, feature_dirs: dict[str, Path], valid_fraction: float) -> pd.DataFrame:
    """One singer's training rows from its ``clean_audio`` and feature partitions (absolute paths)."""
    clean = pd.read_parquet(clean_dir / "manifest.parquet")
    rows = pd.DataFrame({
        "segment_id": clean["segment_id"], "singer": singer,
        "audio": [str(clean_dir / p) for p in clean["path"]], "duration_s": clean["duration_s"],
    })
    for feature, column in (("pitch", "pitch"), ("ppg", "ppg"), ("vec", "vec"), ("speaker_embedding", "speaker")):
        manifest = pd.read_parquet(feature_dirs[feature] / "manifest.parquet").set_index("segment_id")
        missing = sorted(set(rows["segment_id"]) - set(manifest.index))
        if missing:
            raise ValueError(f"{feature_dirs[feature]}: {feature} is missing segments {missing[:3]}; rebuild it")
        rows[column] = [str(feature_dirs[feature] / manifest.loc[s, "path"]) for s in rows["segment_id"]]
        if feature == "speaker_embedding":  # which encoder's space the embeddings live in (older stores: unknown)
            encoders = manifest["encoder"] if "encoder" in manifest else pd.Series("", index=manifest.index)
            rows["speaker_encoder"] = [str(encoders.loc[s]) for s in rows["segment_id"]]
    rows["split"] = [split_for(s, valid_fraction) for s in rows["segment_id"]]
    return rows[MANIFEST_COLUMNS]


@dataclass
class Item:
    audio: np.ndarray  # (frames * hop,)
    f0: np.ndarray  # (frames,)
    ppg: np.ndarray  # (frames, ppg_dim)  (50 Hz repeated x2)
    vec: np.ndarray | None  # (frames, vec_dim); None for a model without the vec path
    speaker: np.ndarray  # (spk_dim,)
    seed: int = 0  # the item's own seed (StepBatches): its crop, and its noise streams in training (ItemNoise)


class SegmentDataset(torch.utils.data.Dataset):
    """Loads a segment and crops a random window of at most ``max_frames``, aligned across every stream.
    ``use_vec=False`` (a model without the vec path) never reads the vec files."""

    def __init__(self, manifest: pd.DataFrame, hop: int, max_frames: int, root: Path | None = None,
                 use_vec: bool = True):
        self.rows = manifest.reset_index(drop=True)
        self.hop, self.max_frames, self.root, self.use_vec = hop, max_frames, root, use_vec

    def __len__(self) -> int:
        return len(self.rows)

    def _path(self, value: str) -> str:
        return str(self.root / value) if self.root is not None and not Path(value).is_absolute() else value

    def load(self, index: int, crop_seed: int | None = None) -> Item:
        row = self.rows.iloc[index]
        audio, _ = read_wav(self._path(row["audio"]))
        frames = len(audio) // self.hop
        pitch = fit_frames(np.load(self._path(row["pitch"])), frames)
        ppg = fit_frames(np.repeat(np.load(self._path(row["ppg"])), 2, axis=0), frames)
        vec = fit_frames(np.repeat(np.load(self._path(row["vec"])), 2, axis=0), frames) if self.use_vec else None
        start = 0
        if crop_seed is not None and frames > self.max_frames:
            start = int(np.random.default_rng(crop_seed).integers(0, frames - self.max_frames + 1))
        stop = min(frames, start + self.max_frames)
        return Item(audio=audio[start * self.hop : stop * self.hop].astype(np.float32),
                    f0=pitch[start:stop, 0].astype(np.float32), ppg=ppg[start:stop].astype(np.float32),
                    vec=vec[start:stop].astype(np.float32) if vec is not None else None,
                    speaker=np.load(self._path(row["speaker"])).astype(np.float32),
                    seed=int(crop_seed) if crop_seed is not None else int(index))

    def __getitem__(self, key):
        index, crop_seed = key if isinstance(key, tuple) else (key, None)
        return self.load(index, crop_seed)


def collate(items: list[Item], min_frames: int = 1) -> dict[str, torch.Tensor]:
    """Zero-pad to the longest item (and to at least ``min_frames``); ``lengths`` keeps the real frame counts."""
    hop = len(items[0].audio) // max(1, len(items[0].f0))
    lengths = [len(it.f0) for it in items]
    frames = max(max(lengths), min_frames)
    batch = {
        "audio": torch.zeros(len(items), frames * hop),
        "f0": torch.zeros(len(items), frames),
        "ppg": torch.zeros(len(items), items[0].ppg.shape[1], frames),
        "vec": torch.zeros(len(items), items[0].vec.shape[1], frames) if items[0].vec is not None else None,
        "speaker": torch.from_numpy(np.stack([it.speaker for it in items])),
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "seeds": torch.tensor([it.seed for it in items], dtype=torch.long),
    }
    for i, it in enumerate(items):
        n = lengths[i]
        batch["audio"][i, : n * hop] = torch.from_numpy(it.audio[: n * hop])
        batch["f0"][i, :n] = torch.from_numpy(it.f0)
        batch["ppg"][i, :, :n] = torch.from_numpy(it.ppg.T)
        if it.vec is not None:
            batch["vec"][i, :, :n] = torch.from_numpy(it.vec.T)
    return batch


class StepBatches(torch.utils.data.Sampler):
    """Batch ``s`` of a run is a pure function of ``(seed, s)``: epochs are seeded permutations and each item's
    crop has its own seed. Under DDP, rank ``r`` of ``w`` takes every ``w``-th item of each batch."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, steps: int | None = None,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.steps, self.rank, self.world_size = start_step, steps, rank, world_size

    def batch(self, step: int) -> list[tuple[int, int]]:
        out = []
        for j in range(self.batch_size * self.world_size):
            flat = step * self.batch_size * self.world_size + j
            epoch, pos = divmod(flat, self.n)
            perm = np.random.default_rng((self.seed, epoch)).permutation(self.n)
            out.append((int(perm[pos]), int(np.random.default_rng((self.seed, step, j)).integers(2**31))))
        return out[self.rank :: self.world_size]

    def __iter__(self):
        step = self.start_step
        while self.steps is None or step < self.start_step + self.steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        return self.steps if self.steps is not None else 2**31
