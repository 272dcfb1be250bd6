"""Conversion: a source recording re-sung with a target timbre.

``convert(source, target, pitch_shift=0 | "auto")`` where the target is a singer name, a reference recording
(embedded on the fly: "sound like me"), or a blend ``{singer: weight}``. Long input is cut at silences, each
piece is converted with a little context on both sides, and the pieces are crossfaded back. Output: 32 kHz.

The decoder's harmonic source is built once for the whole track and sliced per piece, so the sine phase runs on
across the cuts. ``deterministic=True`` (tests, A/B listening) uses the prior's mean, overtones at phase 0 and no
source noise; otherwise the source's noise and phases come from a generator seeded by ``seed``, so the same call
gives the same audio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Union

import numpy as np

from svc_model.audio import AudioError, decode, frame_levels_db, resample, to_mono
from svc_model.config import SVCConfig
from svc_model.features.base import fit_frames

Target = Union[str, Path, Mapping[str, float]]


@dataclass
class ResolvedTarget:
    name: str
    embedding: np.ndarray  # (256,) unit norm
    median_f0: float  # Hz, 0 if unknown


@dataclass
class ConversionResult:
    audio: np.ndarray  # float32 mono at ``sample_rate``
    sample_rate: int
    target: str
    pitch_shift: float  # semitones applied
    source_f0: np.ndarray  # (frames,) Hz, 0 = unvoiced, before the shift
    output_f0: np.ndarray  # (frames,) Hz fed to the decoder
    chunks: int
    seconds: float


# The one pitch-shift limit (semitones either way) for the converter, `svc convert` and the studio: two octaves
# cover moving any voice to any other (a bass's median f0 to a soprano's is about 24); beyond them most voices'
# shifted f0 leaves the pitch embedding's 50-1100 Hz (model/encoders.py).
MAX_PITCH_SHIFT = 24


def check_pitch_shift(value: float | str) -> float | str:
    """``"auto"``, or the shift as a float in ``-MAX_PITCH_SHIFT..MAX_PITCH_SHIFT``; raises ValueError saying why."""
    if value == "auto":
        return value
    try:
        shift = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"pitch_shift must be a number of semitones or 'auto', got {value!r}") from None
    if not math.isfinite(shift) or abs(shift) > MAX_PITCH_SHIFT:
        raise ValueError(f"pitch_shift {value!r} is out of range (-{MAX_PITCH_SHIFT}..{MAX_PITCH_SHIFT} semitones)")
    return shift


def auto_shift(source_median_f0: float, target_median_f0: float) -> int:
    """Semitones that move the source's median f0 to the target's, rounded to a whole semitone and held within
    ``MAX_PITCH_SHIFT``."""
    if source_median_f0 <= 0 or target_median_f0 <= 0:
        return 0
    shift = int(round(12 * math.log2(target_median_f0 / source_median_f0)))
    return max(-MAX_PITCH_SHIFT, min(MAX_PITCH_SHIFT, shift))


def chunk_at_silences(audio: np.ndarray, sr: int, max_s: float = 15.0, min_silence_s: float = 0.2,
                      silence_db: float = -40.0) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` pieces covering all of ``audio``, each at most ``max_s``, cut inside pauses
    where there are any (else at the quietest 10 ms frame of the piece's second half)."""
    n, max_len = len(audio), int(max_s * sr)
    if n <= max_len:
        return [(0, n)]
    hop = int(0.01 * sr)
    levels = frame_levels_db(audio, sr)
    quiet = levels < max(levels.max() + silence_db, -60.0)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
    cuts = [((s + e) // 2) * hop for s, e in zip(edges[::2], edges[1::2]) if (e - s) * 0.01 >= min_silence_s]
    pieces, start = [], 0
    while n - start > max_len:
        options = [c for c in cuts if start + max_len // 4 < c <= start + max_len]
        if options:
            cut = options[-1]
        else:
            lo, hi = (start + max_len // 2) // hop, (start + max_len) // hop
            cut = (lo + int(np.argmin(levels[lo:hi]))) * hop
        pieces.append((start, cut))
        start = cut
    pieces.append((start, n))
    return pieces


class Converter:
    """A trained model plus its feature extractors and singer table; load once, convert many times."""

    def __init__(self, model, cfg: SVCConfig, singers: Mapping[str, Mapping], device: str = "cpu",
                 extractors: Mapping | None = None, root: Path | None = None, speaker_encoder: str = ""):
        self.model, self.cfg, self.device = model, cfg, device
        self.speaker_encoder = speaker_encoder  # the encoder whose embeddings the model was trained on
        self.singers = {name: ResolvedTarget(name, np.asarray(info["embedding"], np.float32),
                                             float(info.get("median_f0", 0.0)))
                        for name, info in singers.items()}
        self._extractors = dict(extractors or {})
        self._root = Path(root) if root is not None else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", root: str | Path | None = None,
                        extractors: Mapping | None = None) -> "Converter":
        """``path``: a model folder (a registered version: ``generator.safetensors`` + JSON config and singer
        table), its ``.safetensors`` file, or a training checkpoint ``.pt``, all read without unpickling
        (:mod:`svc_model.weights`). ``extractors``: already-loaded feature extractors to reuse."""
        from svc_model.train import load_model

        model, cfg, ckpt = load_model(path, device)
        return cls(model, cfg, ckpt.get("singers") or {}, device=device, extractors=extractors, root=root,
                   speaker_encoder=ckpt.get("speaker_encoder") or "")

    def extractor(self, feature: str):
        if feature not in self._extractors:
            from svc_model.features import build_extractor

            self._extractors[feature] = build_extractor(feature, self.cfg.features, self._root)
        return self._extractors[feature]

    # ---- targets ---------------------------------------------------------------------------------------------
    def resolve_target(self, target: Target) -> ResolvedTarget:
        if isinstance(target, Mapping):
            return self._blend(target)
        text = str(target)
        if text in self.singers:
            return self.singers[text]
        if Path(text).is_file():
            return self._reference(Path(text))
        known = ", ".join(sorted(self.singers)) or "none"
        raise ValueError(f"unknown singer {text!r} (known: {known}); pass a singer name, a reference recording "
                         f"or a blend")

    def _blend(self, weights: Mapping[str, float]) -> ResolvedTarget:
        if not weights:
            raise ValueError("empty blend: give at least one singer=weight")
        for name, weight in weights.items():
            if name not in self.singers:
                raise ValueError(f"unknown singer {name!r} in blend (known: {', '.join(sorted(self.singers))})")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"blend weight for {name!r} must be a finite number >= 0, got {weight}")
        total = float(sum(weights.values()))
        if total <= 0:
            raise ValueError("blend weights sum to 0; give at least one positive weight")
        mixed = sum(w / total * self.singers[n].embedding for n, w in weights.items())
        f0s = [(w / total, self.singers[n].median_f0) for n, w in weights.items() if self.singers[n].median_f0 > 0]
        median = math.exp(sum(w * math.log(f) for w, f in f0s) / sum(w for w, _ in f0s)) if f0s else 0.0
        name = "+".join(f"{n}:{w / total:.2f}" for n, w in weights.items())
        from svc_model.features.speaker import unit_norm_encoder

        if unit_norm_encoder(self.speaker_encoder):  # unit-norm encoders; the anchor's (mozilla-lstm) stays a mean
            mixed = mixed / np.linalg.norm(mixed)
        return ResolvedTarget(name, mixed.astype(np.float32), median)

    def _reference(self, path: Path) -> ResolvedTarget:
        from svc_model.train import check_speaker_encoder

        encoder = self.extractor("speaker_embedding")
        check_speaker_encoder(self.speaker_encoder, getattr(encoder, "encoder_id", ""), "the model",
                              f"the reference {path.name} (embedded with features.speaker)")
        audio16 = self._load(path, 16000)
        embedding = encoder.extract(audio16)
        pitch = self.extractor("pitch").extract(audio16)
        voiced = pitch[pitch[:, 1] > 0, 0]
        return ResolvedTarget(path.name, embedding, float(np.median(voiced)) if len(voiced) else 0.0)

    # ---- audio -----------------------------------------------------------------------------------------------
    def _load(self, source, sr: int, source_sr: int | None = None) -> np.ndarray:
        if isinstance(source, (str, Path)):
            data, file_sr = decode(source)
            audio, source_sr, name = to_mono(data), file_sr, str(source)
        else:
            if source_sr is None:
                raise ValueError("an audio array needs its sample rate (source_sr=...)")
            audio, name = to_mono(np.asarray(source, dtype=np.float32)), "<array>"
        if audio.size == 0:
            raise AudioError(name, "empty audio: nothing to convert")
        if not np.isfinite(audio).all():
            raise AudioError(name, "contains NaN or inf samples")
        peak = float(np.abs(audio).max())
        if peak == 0 or 20 * math.log10(peak) < -60:
            raise AudioError(name, "silent: nothing to convert")
        if len(audio) / source_sr < 0.1:
            raise AudioError(name, f"too short: {len(audio) / source_sr:.3f} s; need at least 0.1 s")
        return resample(audio, source_sr, sr)

    def convert(self, source, target: Target, pitch_shift: float | str = 0, *, source_sr: int | None = None,
                noise_scale: float = 0.0, max_chunk_s: float = 15.0, deterministic: bool = False, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> ConversionResult:
        import time

        import torch

        started = time.perf_counter()
        resolved = self.resolve_target(target)  # fail on a bad target or shift before any audio work
        pitch_shift = check_pitch_shift(pitch_shift)
        sr = self.cfg.audio.sample_rate
        hop = self.cfg.spectrogram.hop
        audio = self._load(source, sr, source_sr)
        audio16 = resample(audio, sr, 16000)
        pitch_all = self.extractor("pitch").extract(audio16)
        if pitch_shift == "auto":
            voiced = pitch_all[pitch_all[:, 1] > 0, 0]
            shift = float(auto_shift(float(np.median(voiced)) if len(voiced) else 0.0, resolved.median_f0))
        else:
            shift = pitch_shift
        factor = 2.0 ** (shift / 12.0)

        pieces = chunk_at_silences(audio, sr, max_chunk_s)
        context = int(0.05 * sr) // hop * hop  # converted around each cut, then crossfaded
        out = np.zeros(len(audio), np.float64)
        weight = np.zeros(len(audio), np.float64)
        out_f0 = np.zeros(len(audio) // hop, np.float32)
        speaker = torch.from_numpy(resolved.embedding)[None].to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        frames_all = len(audio) // hop
        f0_all = np.pad(pitch_all[:frames_all, 0], (0, max(0, frames_all - len(pitch_all)))) * factor
        with torch.no_grad():  # one source for the whole track: no phase restart at the cuts
            source_all = self.model.decoder.source(torch.from_numpy(f0_all.astype(np.float32))[None].to(self.device),
                                                   deterministic=deterministic, generator=generator)
        use_vec = self.cfg.model.vec_dim > 0
        for i, (start, end) in enumerate(pieces):
            lo = max(0, start - context) if i > 0 else 0
            hi = min(len(audio), end + context) if i < len(pieces) - 1 else len(audio)
            lo, hi = lo // hop * hop, hi
            piece16 = audio16[lo // 2 : hi // 2]
            frames = len(piece16) // 160
            if frames < 2:
                continue
            f0 = f0_all[lo // hop : lo // hop + frames]
            f0 = np.pad(f0, (0, frames - len(f0)))
            # source_all starts source_context frames before the track: this slice carries the filters'
            # context on each side, so the piece's edges are filtered as inside the track
            n_source = (frames + 2 * self.model.decoder.source_context) * hop
            source = source_all[..., lo : lo + n_source]
            if source.shape[-1] < n_source:
                source = torch.nn.functional.pad(source, (0, n_source - source.shape[-1]))
            ppg = fit_frames(np.repeat(self.extractor("ppg").extract(piece16), 2, axis=0), frames)
            vec = None
            if use_vec:
                vec = fit_frames(np.repeat(self.extractor("vec").extract(piece16), 2, axis=0), frames)
                vec = torch.from_numpy(vec.T.copy())[None].float().to(self.device)
            with torch.no_grad():
                y = self.model.infer(
                    torch.from_numpy(ppg.T.copy())[None].float().to(self.device), vec,
                    torch.from_numpy(f0.astype(np.float32))[None].to(self.device),
                    speaker, noise_scale=0.0 if deterministic else noise_scale, source=source,
                    generator=generator)[0, 0].float().cpu().numpy()
            y = y[: hi - lo]
            w = np.ones(len(y))
            ramp = 2 * context
            if i > 0 and ramp:
                w[:ramp] = np.linspace(0, 1, ramp)
            if i < len(pieces) - 1 and ramp:
                w[-ramp:] = np.minimum(w[-ramp:], np.linspace(1, 0, ramp))
            out[lo : lo + len(y)] += y * w
            weight[lo : lo + len(y)] += w
            out_f0[lo // hop : lo // hop + frames] = f0[: len(out_f0) - lo // hop]
            if progress:
                progress(i + 1, len(pieces))
        result = np.where(weight > 1e-6, out / np.maximum(weight, 1e-6), 0.0).astype(np.float32)
        return ConversionResult(audio=result, sample_rate=sr, target=resolved.name, pitch_shift=shift,
                                source_f0=pitch_all[: len(out_f0), 0], output_f0=out_f0, chunks=len(pieces),
                                seconds=time.perf_counter() - started)


def convert(source, target: Target, pitch_shift: float | str = 0, *, checkpoint: str | Path,
            device: str = "cpu", **kwargs) -> ConversionResult:
    """One-shot conversion from a model folder or checkpoint file; use :class:`Converter` to convert many."""
    return Converter.from_checkpoint(checkpoint, device=device).convert(source, target, pitch_shift, **kwargs)
