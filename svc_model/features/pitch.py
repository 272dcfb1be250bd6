"""Pitch: f0 in Hz and a voicing mask at 100 frames/s. Backends: CREPE (torchcrepe) and FCPE (torchfcpe)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.signal import medfilt

from svc_model.features.base import FEATURE_SR, HOP_100HZ, FeatureExtractor, fit_frames, frames_100hz

SILENCE_DBFS = -60.0


def _postprocess(f0: np.ndarray, voiced: np.ndarray, audio: np.ndarray, median: int) -> np.ndarray:
    """Median-filter f0 over voiced frames, zero the unvoiced ones (and any silent frame); ``(T, 2)``."""
    n = len(f0)
    # Frame energy on the same grid: silence is never voiced, whatever the model says.
    padded = np.pad(audio, (HOP_100HZ, HOP_100HZ))
    idx = np.arange(n)[:, None] * HOP_100HZ + np.arange(2 * HOP_100HZ)[None, :]
    rms = np.sqrt(np.mean(np.square(padded[np.minimum(idx, len(padded) - 1)]), axis=1) + 1e-12)
    voiced = voiced & (20 * np.log10(rms) > SILENCE_DBFS) & np.isfinite(f0) & (f0 > 0)
    f0 = np.where(voiced, f0, 0.0)
    if median > 1 and voiced.any():
        # Fill gaps with neighbours before filtering so unvoiced zeros do not drag voiced frames down.
        filled = np.interp(np.arange(n), np.flatnonzero(voiced), f0[voiced])
        f0 = np.where(voiced, medfilt(filled, median), 0.0)
    return np.stack([f0, voiced.astype(np.float64)], axis=1).astype(np.float32)


class PitchExtractor(FeatureExtractor):
    """Output per segment: ``(frames_100hz, 2)`` float32, columns ``f0_hz`` (0 when unvoiced) and ``voiced``."""

    feature = "pitch"
    frame_rate = 100

    def __init__(self, fmin: float = 50.0, fmax: float = 1100.0, median_filter: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.fmin, self.fmax, self.median_filter = fmin, fmax, median_filter

    @classmethod
    def from_config(cls, features_cfg, root: Path | None = None) -> "PitchExtractor":
        p = features_cfg.pitch
        common = dict(fmin=p.fmin, fmax=p.fmax, median_filter=p.median_filter, device=features_cfg.device,
                      fp16=features_cfg.fp16)
        if p.backend == "crepe":
            return CrepePitch(model=p.crepe_model, periodicity_threshold=p.periodicity_threshold,
                              batch_frames=p.batch_frames, **common)
        return FcpePitch(threshold=p.fcpe_threshold, **common)


def _viterbi_weighted(probabilities, window: int = 4) -> np.ndarray:
    """Viterbi path over CREPE's 360 bins, refined by a probability-weighted mean of the +-4 bins around it.

    torchcrepe's own decoders either dither the result with random noise (viterbi) or jump between octaves
    (weighted argmax); this one is smooth and deterministic. ``probabilities``: ``(1, 360, T)``, the network's
    sigmoid outputs with out-of-range bins at -inf. Returns f0 in Hz and the periodicity (the probability of
    the chosen bin), both ``(T,)``.
    """
    import torchcrepe

    bins, _ = torchcrepe.decode.viterbi(probabilities)  # only the path; its frequencies are dithered
    bins = bins[0].cpu().numpy()
    probs = np.nan_to_num(probabilities[0].cpu().numpy(), neginf=0.0)  # (360, T)
    cents_per_bin = torchcrepe.CENTS_PER_BIN * np.arange(torchcrepe.PITCH_BINS) + 1997.3794084376191
    offsets = np.arange(-window, window + 1)
    idx = np.clip(bins[None, :] + offsets[:, None], 0, torchcrepe.PITCH_BINS - 1)  # (9, T)
    weights = np.take_along_axis(probs, idx, axis=0)
    cents = (weights * cents_per_bin[idx]).sum(0) / np.maximum(weights.sum(0), 1e-9)
    periodicity = probs[bins, np.arange(len(bins))]
    return 10 * 2 ** (cents / 1200), periodicity


class CrepePitch(PitchExtractor):
    """torchcrepe (weights ship in the package). Frames of every segment share forward passes; Viterbi
    decoding then runs per segment, so batching gives exactly the one-by-one result."""

    def __init__(self, model: str = "full", periodicity_threshold: float = 0.21, batch_frames: int = 1024, **kwargs):
        super().__init__(**kwargs)
        import torchcrepe

        self.model = model
        self.periodicity_threshold = periodicity_threshold
        self.batch_frames = batch_frames
        weights = Path(torchcrepe.__file__).parent / "assets" / f"{model}.pth"
        if not weights.is_file():
            from svc_model.features.base import MissingWeightsError

            raise MissingWeightsError(f"{weights}: torchcrepe '{model}' weights missing; reinstall torchcrepe")
        torchcrepe.load.model(self.device, model)  # once per process; infer() reuses it

    @property
    def backend(self) -> str:
        return f"crepe-{self.model}"

    def extract_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch
        import torchcrepe

        frames, counts = [], []
        for audio in audios:
            x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
            chunk = torch.cat(list(torchcrepe.preprocess(x, FEATURE_SR, HOP_100HZ, None, self.device, pad=True)))
            frames.append(chunk)
            counts.append(len(chunk))
        probs = []
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.fp16):
            for chunk in torch.cat(frames).split(self.batch_frames):
                probs.append(torchcrepe.infer(chunk, self.model, self.device).float())
        out = []
        for audio, p in zip(audios, torch.cat(probs).split(counts)):
            p = p.reshape(1, -1, torchcrepe.PITCH_BINS).transpose(1, 2)
            # Bins outside [fmin, fmax] cannot win, as in torchcrepe.postprocess.
            lo = torchcrepe.convert.frequency_to_bins(torch.tensor(self.fmin))
            hi = torchcrepe.convert.frequency_to_bins(torch.tensor(self.fmax), torch.ceil)
            p[:, :lo] = -float("inf")
            p[:, hi:] = -float("inf")
            f0, periodicity = _viterbi_weighted(p)
            if self.median_filter > 1:
                periodicity = medfilt(periodicity, self.median_filter)
            n = frames_100hz(len(audio))
            f0 = fit_frames(f0.astype(np.float64), n)
            voiced = fit_frames(periodicity, n) >= self.periodicity_threshold
            out.append(_postprocess(f0, voiced, audio, self.median_filter))
        return out


class FcpePitch(PitchExtractor):
    """torchfcpe with its bundled weights; much faster than CREPE on the CPU. FCPE's conformer attends over
    the whole segment with no padding mask, so segments run one at a time (padding would change f0)."""

    def __init__(self, threshold: float = 0.006, **kwargs):
        super().__init__(**kwargs)
        import contextlib
        import io

        import torchfcpe

        self.threshold = threshold
        with contextlib.redirect_stdout(io.StringIO()):  # torchfcpe prints its config on load
            self.model = torchfcpe.spawn_bundled_infer_model(device=str(self.device))

    @property
    def backend(self) -> str:
        return "fcpe"

    def extract_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        out = []
        for audio in audios:
            x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None, :, None].to(self.device)
            with torch.no_grad():
                f0 = self.model.infer(x, sr=FEATURE_SR, decoder_mode="local_argmax", threshold=self.threshold,
                                      f0_min=self.fmin, f0_max=self.fmax, interp_uv=False)
            n = frames_100hz(len(audio))
            f0 = fit_frames(f0[0, :, 0].float().cpu().numpy().astype(np.float64), n)
            out.append(_postprocess(f0, f0 >= self.fmin, audio, self.median_filter))
        return out
