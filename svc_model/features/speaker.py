"""Speaker embedding: resemblyzer's 256-d d-vector (its real weights ship in the package), unit norm."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from svc_model.features.base import FEATURE_SR, FeatureExtractor, MissingWeightsError


class ResemblyzerSpeaker(FeatureExtractor):
    """Each segment is cut into resemblyzer's 1.6 s partial windows; the partials of all segments share forward
    passes, then each segment's embedding is the normalized mean of its own partials (as ``embed_utterance``)."""

    feature = "speaker_embedding"
    frame_rate = 0
    dim = 256

    def __init__(self, batch_partials: int = 64, **kwargs):
        super().__init__(**kwargs)
        with warnings.catch_warnings():  # webrtcvad imports the deprecated pkg_resources
            warnings.simplefilter("ignore", UserWarning)
            import resemblyzer

        weights = Path(resemblyzer.__file__).parent / "pretrained.pt"
        if not weights.is_file():
            raise MissingWeightsError(f"{weights}: resemblyzer's bundled weights are missing; reinstall resemblyzer")
        self.encoder = resemblyzer.VoiceEncoder(device=self.device, verbose=False)
        self.batch_partials = batch_partials

    @classmethod
    def from_config(cls, features_cfg, root: Path | None = None) -> "ResemblyzerSpeaker":
        return cls(batch_partials=features_cfg.speaker.batch_partials, device=features_cfg.device,
                   fp16=features_cfg.fp16)

    @property
    def backend(self) -> str:
        return "resemblyzer"

    def _partials(self, audio: np.ndarray) -> np.ndarray:
        from resemblyzer import audio as ra
        from resemblyzer import preprocess_wav

        wav = preprocess_wav(np.asarray(audio, dtype=np.float32), source_sr=FEATURE_SR)
        if len(wav) < FEATURE_SR // 10:  # VAD removed (nearly) everything: fall back to the raw audio
            wav = np.asarray(audio, dtype=np.float32)
        wav_slices, mel_slices = self.encoder.compute_partial_slices(len(wav), rate=1.3, min_coverage=0.75)
        if wav_slices[-1].stop > len(wav):
            wav = np.pad(wav, (0, wav_slices[-1].stop - len(wav)))
        mel = ra.wav_to_mel_spectrogram(wav)
        return np.stack([mel[s] for s in mel_slices])

    def extract_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        partials = [self._partials(a) for a in audios]
        counts = [len(p) for p in partials]
        stacked = torch.from_numpy(np.concatenate(partials)).to(self.device)
        embeds = []
        with torch.no_grad():
            for chunk in stacked.split(self.batch_partials):
                embeds.append(self.encoder(chunk).float().cpu().numpy())
        out = []
        for group in np.split(np.concatenate(embeds), np.cumsum(counts)[:-1]):
            mean = group.mean(axis=0)
            out.append((mean / np.linalg.norm(mean)).astype(np.float32))
        return out


def mean_embedding(embeddings: np.ndarray) -> np.ndarray:
    """The singer's embedding: the normalized mean of its segments' unit embeddings."""
    mean = np.asarray(embeddings, dtype=np.float64).mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)
