"""Speaker embedding, 256-d, one per segment. Two encoders, whose embeddings are NOT interchangeable:

- ``resemblyzer``: resemblyzer's d-vector (its real weights ship in the package), unit norm.
- ``mozilla-lstm``: the Mozilla TTS / Coqui LSTM speaker encoder that whisper-vits-svc's pretrained model was
  trained on (``speaker_pretrain/best_model.pth.tar``), computed exactly as the anchor's
  ``prepare/preprocess_speaker.py``: the mean of 10 unit window embeddings, not renormalized (norm <= 1).

:func:`encoder_id` names the encoder (backend + a short sha256 of its weights) so that features, checkpoints and
conversion can refuse to mix embeddings from different encoders.
"""
from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from svc_model.features.base import FEATURE_SR, FeatureExtractor, MissingWeightsError, resolve


class ResemblyzerSpeaker(FeatureExtractor):
    """Each segment is cut into resemblyzer's 1.6 s partial windows; the partials of all segments share forward
    passes, then each segment's embedding is the normalized mean of its own partials (as ``embed_utterance``)."""

    feature = "speaker_embedding"
    frame_rate = 0
    dim = 256
    unit_norm = True  # every segment's embedding has L2 norm 1

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
    def from_config(cls, features_cfg, root: Path | None = None) -> ResemblyzerSpeaker:
        return cls(batch_partials=features_cfg.speaker.batch_partials, device=features_cfg.device,
                   fp16=features_cfg.fp16)

    @property
    def backend(self) -> str:
        return "resemblyzer"

    @property
    def encoder_id(self) -> str:
        return RESEMBLYZER_ID

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "encoder": self.encoder_id, "unit_norm": self.unit_norm}

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


def mean_embedding(embeddings: np.ndarray, normalize: bool = True) -> np.ndarray:
    """The singer's embedding: the mean of its segments' embeddings, renormalized to unit norm (resemblyzer).

    ``normalize=False`` keeps the plain mean, as whisper-vits-svc's ``prepare/preprocess_speaker_ave.py`` does for
    ``mozilla-lstm`` (pass the extractor's ``unit_norm``): the anchor's flow and decoder take the raw vector, and
    only its posterior encoder's conditioning normalizes it."""
    mean = np.asarray(embeddings, dtype=np.float64).mean(axis=0)
    return (mean / np.linalg.norm(mean) if normalize else mean).astype(np.float32)


def norm_error(norms: Sequence[float], unit: bool = True) -> float:
    """How far embedding norms are from what the encoder promises: 1 for unit-norm encoders (resemblyzer), within
    (0, 1] for ``mozilla-lstm`` (a mean of unit vectors). 0 when all are as promised; inf for NaN or inf."""
    worst = 0.0
    for n in norms:
        if not np.isfinite(n):
            return float("inf")
        worst = max(worst, abs(n - 1.0) if unit else (max(n - 1.0, 0.0) if n > 0 else 1.0))
    return float(worst)


# --- mozilla-lstm: the Mozilla TTS / Coqui LSTM speaker encoder (whisper-vits-svc's speaker_pretrain) ----------

RESEMBLYZER_ID = "resemblyzer"
LSTM_BACKEND = "mozilla-lstm"
LSTM_WEIGHTS_URL = "https://drive.google.com/drive/folders/15oeBYf6Qn1edONkVLXe82MzdIi3O_9m3"

# The audio section of whisper-vits-svc's speaker_pretrain/config.json (the encoder was trained on exactly this
# front end, so none of it is configurable), with AudioProcessor's defaults for what the file leaves out.
LSTM_SR = 16000
LSTM_N_FFT = 1024
LSTM_HOP = 256
LSTM_WIN = 1024
LSTM_N_MELS = 80
LSTM_FMIN, LSTM_FMAX = 0.0, 8000.0
LSTM_PREEMPHASIS = 0.98
LSTM_REF_LEVEL_DB = 20.0
LSTM_MIN_LEVEL_DB = -100.0
LSTM_MAX_NORM = 4.0  # symmetric normalization to [-4, 4], clipped
LSTM_SPEC_GAIN = 20.0  # dB = 20 * log10(max(1e-5, mel))
LSTM_TRIM_DB = 60.0
LSTM_TRIM_MARGIN = LSTM_SR // 100  # trim_silence first cuts 10 ms from both ends
LSTM_PEAK = 0.95  # sound_norm: peak-normalize to 0.95
# The network (config.json "model") and compute_embedding's defaults, which preprocess_speaker.py uses.
LSTM_HIDDEN, LSTM_PROJ, LSTM_LAYERS = 768, 256, 3
LSTM_WINDOW_FRAMES, LSTM_WINDOWS = 250, 10


def lstm_preprocess(audio: np.ndarray) -> np.ndarray:
    """16 kHz audio -> what the anchor's ``AudioProcessor.load_wav`` returns with ``do_trim_silence`` and
    ``do_sound_norm`` on: 10 ms cut from each end, leading/trailing silence below -60 dB (re. the peak frame)
    trimmed, then peak-normalized to 0.95. float32 in, float32 out."""
    import librosa

    x = np.asarray(audio, dtype=np.float32)
    try:
        x = librosa.effects.trim(x[LSTM_TRIM_MARGIN:-LSTM_TRIM_MARGIN], top_db=LSTM_TRIM_DB,
                                 frame_length=LSTM_WIN, hop_length=LSTM_HOP)[0]
    except ValueError:  # the anchor keeps the untrimmed audio when trimming fails
        pass
    if len(x) < LSTM_N_FFT:  # degenerate input (the anchor would fail): keep the raw audio, at least one window
        x = np.pad(np.asarray(audio, dtype=np.float32), (0, max(0, LSTM_N_FFT - len(audio))))
    peak = np.abs(x).max()
    return x / peak * LSTM_PEAK if peak > 0 else x  # all-zero audio stays zero instead of NaN


_MEL_BASIS: np.ndarray | None = None


def lstm_mel(wav: np.ndarray) -> np.ndarray:
    """Preprocessed audio -> ``(frames, 80)`` float32: pre-emphasis 0.98, |STFT| (1024/256/1024, Hann, centered,
    reflect padding), Slaney mel filters 0-8 kHz, 20 * log10 with a 1e-5 floor, minus the 20 dB reference level,
    then mapped from [-100, 0] dB to [-4, 4] and clipped (the AudioProcessor's symmetric normalization)."""
    global _MEL_BASIS
    import librosa

    if _MEL_BASIS is None:
        _MEL_BASIS = librosa.filters.mel(sr=LSTM_SR, n_fft=LSTM_N_FFT, n_mels=LSTM_N_MELS, fmin=LSTM_FMIN,
                                         fmax=LSTM_FMAX)
    x = np.asarray(wav, dtype=np.float64)
    emphasized = np.concatenate([x[:1], x[1:] - LSTM_PREEMPHASIS * x[:-1]])
    magnitude = np.abs(librosa.stft(emphasized, n_fft=LSTM_N_FFT, hop_length=LSTM_HOP, win_length=LSTM_WIN,
                                    window="hann", center=True, pad_mode="reflect"))
    db = LSTM_SPEC_GAIN * np.log10(np.maximum(1e-5, _MEL_BASIS @ magnitude)) - LSTM_REF_LEVEL_DB
    unit = (db - LSTM_MIN_LEVEL_DB) / -LSTM_MIN_LEVEL_DB
    return np.clip(2 * LSTM_MAX_NORM * unit - LSTM_MAX_NORM, -LSTM_MAX_NORM, LSTM_MAX_NORM).T.astype(np.float32)


def lstm_window_starts(n_frames: int) -> tuple[int, list[int]]:
    """``compute_embedding(num_frames=250, num_eval=10)``'s windows: their length (250, or the whole mel when it is
    shorter) and the 10 start frames, ``int()`` of evenly spaced offsets (repeats when the mel is short)."""
    length = min(LSTM_WINDOW_FRAMES, n_frames)
    return length, [int(o) for o in np.linspace(0, n_frames - length, num=LSTM_WINDOWS)]


def _build_lstm_encoder():
    import torch
    from torch import nn

    class ProjectedLSTM(nn.Module):
        """One LSTM layer whose full 768-d output sequence is projected (no bias) to 256-d for the next layer.

        Not ``nn.LSTM(proj_size=...)``: that feeds the *projected* state back into the recurrence, whereas here
        the recurrence runs on the full 768-d hidden state and only the output passed up is projected."""

        def __init__(self, n_in: int):
            super().__init__()
            self.lstm = nn.LSTM(n_in, LSTM_HIDDEN, batch_first=True)
            self.linear = nn.Linear(LSTM_HIDDEN, LSTM_PROJ, bias=False)

    class MozillaLSTMEncoder(nn.Module):
        """``(B, T, 80)`` normalized mel -> ``(B, 256)`` unit d-vectors: the projected output of the last layer
        at the last frame, L2-normalized. Parameter names are the published checkpoint's (``layers.N.lstm.*``,
        ``layers.N.linear.weight``)."""

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(
                [ProjectedLSTM(LSTM_N_MELS if i == 0 else LSTM_PROJ) for i in range(LSTM_LAYERS)])

        def forward(self, mel: torch.Tensor) -> torch.Tensor:
            x = mel
            for layer in self.layers[:-1]:
                x = layer.linear(layer.lstm(x)[0])
            last = self.layers[-1]
            out = last.linear(last.lstm(x)[0][:, -1])  # only the last frame of the last layer is used
            return torch.nn.functional.normalize(out, p=2, dim=1)

    return MozillaLSTMEncoder()


def lstm_expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter of the published checkpoint's ``model`` state dict and its shape, in module order."""
    import torch

    with torch.device("meta"):  # shapes only, no memory
        return {k: tuple(v.shape) for k, v in _build_lstm_encoder().state_dict().items()}


class IncompatibleWeightsError(ValueError):
    """A weights file in the wrong format or for another architecture; the message names the file and the first
    mismatching key with its expected shape."""


def _missing_lstm_weights(path: Path) -> MissingWeightsError:
    return MissingWeightsError(
        f"{path}: the Mozilla TTS LSTM speaker encoder weights (features.speaker.backend: {LSTM_BACKEND}) are "
        f"missing. Download best_model.pth.tar (whisper-vits-svc's 'Speaker-Encoder by @mueller91', "
        f"{LSTM_WEIGHTS_URL}) on a connected machine and put it at {path} (features.speaker.lstm_weights, relative "
        f"to the workspace), or use features.speaker.backend: resemblyzer.")


def load_lstm_state(path: Path) -> tuple[dict[str, Any], str]:
    """The checked ``model`` state dict of a ``best_model.pth.tar`` and the file's full sha256.

    Loads with ``torch.load(weights_only=True)`` only (tensors and plain containers, no code). Every key and shape
    must match the architecture; the error names the file and the first mismatching key."""
    import pickle

    import torch

    if not path.is_file():
        raise _missing_lstm_weights(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:  # a corrupt file, or Python objects inside
        text = str(exc).strip()
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", text, flags=re.MULTILINE)
        reason = found.group(1).strip() if found else (text.splitlines()[0] if text else type(exc).__name__)
        raise IncompatibleWeightsError(
            f"{path}: cannot be loaded with torch.load(weights_only=True): {reason}. Only tensors and plain "
            f"containers are accepted (no code runs at load); if the file is a trusted but richer checkpoint, "
            f"re-save just its state dict: torch.save({{'model': ckpt['model']}}, path)") from exc
    state = ckpt.get("model") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        found = sorted(map(str, ckpt)) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise IncompatibleWeightsError(f"{path}: not a Mozilla TTS speaker encoder checkpoint: expected a dict "
                                       f"with a 'model' state dict, found {found}")
    what = (f"{path}: not the Mozilla TTS LSTM speaker encoder ({LSTM_N_MELS} mels, {LSTM_LAYERS} LSTM layers of "
            f"{LSTM_HIDDEN} with {LSTM_PROJ}-d projections)")
    expected = lstm_expected_shapes()
    for key, shape in expected.items():
        if key not in state:
            raise IncompatibleWeightsError(f"{what}: missing key '{key}' (expected shape {shape})")
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise IncompatibleWeightsError(
                f"{what}: key '{key}' is a {type(value).__name__}, expected a tensor of shape {shape}")
        if tuple(value.shape) != shape:
            raise IncompatibleWeightsError(
                f"{what}: key '{key}' has shape {tuple(value.shape)}, expected {shape}")
        if not value.is_floating_point():
            raise IncompatibleWeightsError(
                f"{what}: key '{key}' has dtype {value.dtype}, expected floating point")
    extra = sorted(set(map(str, state)) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if extra[1:] else ""
        raise IncompatibleWeightsError(f"{what}: unexpected key '{extra[0]}'{more}")
    _remember_digest(path, digest)
    return {k: state[k].float() for k in expected}, digest


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _remember_digest(path: Path, digest: str) -> None:
    _DIGESTS[_stat_key(path)] = digest


def _file_sha256(path: Path) -> str:
    if not path.is_file():
        raise _missing_lstm_weights(path)
    key = _stat_key(path)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _lstm_id(digest: str) -> str:
    return f"{LSTM_BACKEND}:{digest[:16]}"


def encoder_id(cfg, root: Path | None = None) -> str:
    """The identity of the configured speaker encoder: ``"resemblyzer"`` (the package's weights), or
    ``"mozilla-lstm:<first 16 hex of the weights file's sha256>"``. Embeddings are only comparable between equal
    ids: store it with features and checkpoints and refuse a mismatch.

    ``cfg`` is an :class:`~svc_model.config.SVCConfig`, a ``FeaturesConfig`` or a ``SpeakerConfig``; ``root`` (the
    workspace) resolves a relative ``lstm_weights``. Raises :class:`MissingWeightsError` if that file is missing.
    """
    speaker = getattr(cfg, "features", cfg)
    speaker = getattr(speaker, "speaker", speaker)
    if speaker.backend == "resemblyzer":
        return RESEMBLYZER_ID
    if speaker.backend == LSTM_BACKEND:
        return _lstm_id(_file_sha256(resolve(speaker.lstm_weights, root)))
    raise ValueError(f"unknown speaker backend {speaker.backend!r}")


class MozillaLSTMSpeaker(FeatureExtractor):
    """whisper-vits-svc's speaker embedding (``prepare/preprocess_speaker.py``): per segment, trim + peak-normalize,
    the encoder's mel (16 ms hops), 10 evenly spaced windows of 250 frames (4 s), each window's unit d-vector,
    and their mean (not renormalized, as the anchor stores it). Windows of all segments share forward passes,
    grouped by length (a segment under 4 s is one shorter window, repeated 10 times by the anchor)."""

    feature = "speaker_embedding"
    frame_rate = 0
    dim = LSTM_PROJ
    unit_norm = False  # the mean of 10 unit vectors: norm <= 1

    def __init__(self, weights: str | Path = "models/speaker/best_model.pth.tar", batch_windows: int = 64,
                 **kwargs):
        super().__init__(**kwargs)
        self.fp16 = False  # a small network; fp32 everywhere keeps the anchor's numbers
        self.weights = Path(weights)
        state, digest = load_lstm_state(self.weights)
        self.model = _build_lstm_encoder()
        self.model.load_state_dict(state, strict=True)
        self.model.to(self.device).eval().requires_grad_(False)
        self._encoder_id = _lstm_id(digest)
        self.batch_windows = batch_windows

    @classmethod
    def from_config(cls, features_cfg, root: Path | None = None) -> MozillaLSTMSpeaker:
        sp = features_cfg.speaker
        return cls(weights=resolve(sp.lstm_weights, root), batch_windows=sp.lstm_batch_windows,
                   device=features_cfg.device, fp16=features_cfg.fp16)

    @property
    def backend(self) -> str:
        return LSTM_BACKEND

    @property
    def encoder_id(self) -> str:
        """As :func:`encoder_id`, from the very bytes that were loaded."""
        return self._encoder_id

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "encoder": self.encoder_id, "unit_norm": self.unit_norm,
                "weights": str(self.weights)}

    def extract_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        mels = [lstm_mel(lstm_preprocess(a)) for a in audios]
        starts, groups = [], {}  # groups: window length -> distinct (segment, start) windows
        for i, mel in enumerate(mels):
            length, offsets = lstm_window_starts(len(mel))
            starts.append((length, offsets))
            for o in dict.fromkeys(offsets):
                groups.setdefault(length, []).append((i, o))
        unit: dict[tuple[int, int], np.ndarray] = {}
        cudnn = torch.backends.cudnn
        # Full fp32 in cuDNN's LSTM too (it allows TF32 by default), so that the GPU keeps the anchor's numbers.
        with torch.no_grad(), cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                                          deterministic=cudnn.deterministic, allow_tf32=False):
            for length, windows in groups.items():
                for c in range(0, len(windows), self.batch_windows):
                    chunk = windows[c : c + self.batch_windows]
                    x = torch.from_numpy(np.stack([mels[i][o : o + length] for i, o in chunk])).to(self.device)
                    for key, vec in zip(chunk, self.model(x).float().cpu().numpy()):
                        unit[key] = vec
        return [np.mean([unit[(i, o)] for o in offsets], axis=0, dtype=np.float64).astype(np.float32)
                for i, (_, offsets) in enumerate(starts)]


SPEAKER_BACKENDS = {"resemblyzer": ResemblyzerSpeaker, LSTM_BACKEND: MozillaLSTMSpeaker}


def unit_norm_encoder(encoder: str | None) -> bool:
    """Whether the encoder named by ``encoder`` (an :func:`encoder_id` or a backend name) gives unit vectors, so
    that means and blends of its embeddings are renormalized: resemblyzer yes; ``mozilla-lstm`` no (its embeddings
    are means of unit vectors, and the anchor keeps means plain). An unknown id ("" or None, from older
    checkpoints) counts as resemblyzer, the default encoder."""
    backend = (encoder or "").split(":")[0]
    return SPEAKER_BACKENDS.get(backend, ResemblyzerSpeaker).unit_norm
