"""Audio I/O and conditioning: decode any supported format, validate, mono, resample, loudness, slicing.

Every problem with a recording raises :class:`AudioError`, whose message names the file and the problem,
so callers can skip the file and report it without losing anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from svc_model.config import AudioConfig

SUPPORTED_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")
# Sample rates outside telephony's 8 kHz .. the 768 kHz of the fastest converters are a corrupt header, not audio.
MIN_AUDIO_SAMPLE_RATE = 8000
MAX_AUDIO_SAMPLE_RATE = 768000
# Float samples can exceed full scale (1.0) a little after processing; +60 dBFS is a corrupt or byte-swapped file.
MAX_FLOAT_PEAK = 1000.0
# Decoding stops past this many seconds, whatever the header says: a header may declare hours (or 4 GiB) of
# samples that the file does not hold, and reading would allocate all of it first.
DEFAULT_MAX_DECODE_S = 3600.0
_BLOCK_SAMPLES = 1 << 22  # frames x channels per read: 16 MiB of float32 whatever the channel count


class AudioError(ValueError):
    """A recording that cannot be used. ``str()`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Recording:
    """A decoded, validated recording: mono float32 at its original rate."""

    path: Path
    audio: np.ndarray
    sample_rate: int
    channels: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


def is_audio_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


def _too_long(path: Path, seconds: float, max_s: float) -> AudioError:
    return AudioError(path, f"too long: more than {seconds / 60:.1f} min > {max_s / 60:.0f} min limit; split it first")


def _check_rate(path: Path, sr: int) -> None:
    if not MIN_AUDIO_SAMPLE_RATE <= sr <= MAX_AUDIO_SAMPLE_RATE:
        raise AudioError(path, f"sample rate {sr} Hz is not an audio rate ({MIN_AUDIO_SAMPLE_RATE}.."
                               f"{MAX_AUDIO_SAMPLE_RATE} Hz): a corrupt header?")


def _decode_soundfile(path: Path, max_s: float) -> tuple[np.ndarray, int]:
    import soundfile as sf

    # Block by block rather than sf.read: sf.read allocates the frame count the header declares before reading.
    with sf.SoundFile(str(path)) as fh:
        sr, channels = int(fh.samplerate), int(fh.channels)
        _check_rate(path, sr)
        limit = int(max_s * sr)
        step = max(1, _BLOCK_SAMPLES // max(1, channels))
        blocks, total = [], 0
        while True:
            block = fh.read(frames=step, dtype="float32", always_2d=True)
            if not len(block):
                break
            blocks.append(block)
            total += len(block)
            if total > limit:
                raise _too_long(path, total / sr, max_s)
    if not blocks:
        return np.zeros((max(channels, 1), 0), dtype=np.float32), sr
    return np.concatenate(blocks).T, sr


def _decode_av(path: Path, max_s: float) -> tuple[np.ndarray, int]:
    # libsndfile has no AAC (m4a); PyAV bundles FFmpeg's decoders.
    import av

    with av.open(str(path)) as container:
        streams = container.streams.audio
        if not streams:
            raise ValueError("no audio stream")
        stream = streams[0]
        chunks = []
        sr = stream.codec_context.sample_rate or stream.rate
        if sr:
            _check_rate(path, int(sr))
        total = 0
        for frame in container.decode(stream):
            total += frame.samples
            if sr and total > max_s * sr:
                raise _too_long(path, total / sr, max_s)
            arr = _full_scale(frame.to_ndarray())
            if frame.format.is_planar:
                chunks.append(arr)
            else:  # packed: one row of interleaved samples
                chunks.append(arr.reshape(-1, len(frame.layout.channels)).T)
    if not chunks:
        return np.zeros((1, 0), dtype=np.float32), int(sr or 0)
    return np.concatenate(chunks, axis=1), int(sr)


def _full_scale(arr: np.ndarray) -> np.ndarray:
    """FFmpeg's samples as float32 in [-1, 1]. Its FLAC and PCM decoders give integers (s16, s32, u8): cast
    unscaled, a WAV that only FFmpeg could read came out 90 dB too loud (found by tests/test_fuzz.py)."""
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        half = (int(np.iinfo(arr.dtype).max) + 1) / 2
        return ((arr.astype(np.float64) - half) / half).astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        return (arr.astype(np.float64) / -float(np.iinfo(arr.dtype).min)).astype(np.float32)
    return arr.astype(np.float32)


def _probe(path: Path) -> tuple[int, int] | None:
    """``(frames, sample rate)`` from a header libsndfile reads, without decoding; ``None`` if it cannot."""
    try:
        import soundfile as sf

        info = sf.info(str(path))
        return (int(info.frames), int(info.samplerate)) if info.samplerate else None
    except Exception:
        return None


def probe_duration(path: str | Path) -> float | None:
    """Duration from the header, without decoding; ``None`` when the header does not say."""
    path = Path(path)
    header = _probe(path)
    if header is not None:
        return header[0] / header[1]
    try:
        import av

        with av.open(str(path)) as container:
            if container.duration:
                return container.duration / 1_000_000
    except Exception:
        return None
    return None


def decode(path: str | Path, max_s: float = DEFAULT_MAX_DECODE_S) -> tuple[np.ndarray, int]:
    """Decode a file to ``(channels, samples)`` float32 and its sample rate. Raises :class:`AudioError`.

    Whatever the file holds, the result has samples, an audio sample rate (8..768 kHz), finite values within
    +60 dBFS, and at most ``max_s`` seconds (decoding stops there, so a lying header cannot exhaust memory).
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    if not is_audio_file(path):
        raise AudioError(path, f"unsupported extension {path.suffix!r}; use one of {', '.join(SUPPORTED_EXTENSIONS)}")
    errors = []
    decoders = (_decode_av,) if path.suffix.lower() == ".m4a" else (_decode_soundfile, _decode_av)
    for decoder in decoders:
        try:
            data, sr = decoder(path, max_s)
            break
        except AudioError:
            raise
        except Exception as exc:  # decoders raise many types (MemoryError included); the message is what matters
            errors.append(f"{type(exc).__name__}: {exc}")
    else:
        raise AudioError(path, f"cannot decode as audio (corrupt or not a {path.suffix} file): {errors[-1]}")
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0 or sr <= 0:
        raise AudioError(path, "no audio samples")
    _check_rate(path, sr)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(path, f"contains {bad} NaN or inf samples (or values beyond the float32 range)")
    peak = float(np.abs(data).max())
    if peak > MAX_FLOAT_PEAK:
        raise AudioError(path, f"samples reach {peak:.3g}, {20 * math.log10(peak):.0f} dB above full scale: a corrupt "
                               "float file (or the wrong byte order), not a recording")
    return data, sr


def to_mono(audio: np.ndarray) -> np.ndarray:
    """``(channels, n)`` or ``(n,)`` -> ``(n,)``, averaging channels."""
    audio = np.asarray(audio, dtype=np.float32)
    return audio.mean(axis=0) if audio.ndim == 2 else audio


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """High-quality resampling (soxr)."""
    if sr_in == sr_out:
        return np.asarray(audio, dtype=np.float32)
    import soxr

    return soxr.resample(np.asarray(audio, dtype=np.float32), sr_in, sr_out, quality="HQ").astype(np.float32)


def load_recording(path: str | Path, cfg: AudioConfig | None = None) -> Recording:
    """Decode and validate one recording; raises :class:`AudioError` naming the file and the problem.

    Checks, in order: exists, not empty, supported extension, an audio sample rate and not over ``max_file_s``
    (from the header, before decoding), decodes (see :func:`decode`: samples, finite, within +60 dBFS), sample rate
    at least ``min_input_sample_rate``, at least ``min_file_s`` long, not silent. Stereo is mixed to mono and noted.
    """
    cfg = cfg or AudioConfig()
    path = Path(path)
    if path.is_file() and path.stat().st_size > 0 and is_audio_file(path):
        header = _probe(path)
        if header is not None:
            _check_rate(path, header[1])  # a corrupt rate would otherwise read as hours ("too long")
            header_duration = header[0] / header[1]
            if header_duration > cfg.max_file_s:
                raise AudioError(path, f"too long: {header_duration / 60:.1f} min > {cfg.max_file_s / 60:.0f} min "
                                       "limit; split it first")
    data, sr = decode(path, max_s=cfg.max_file_s)  # also refuses empty, NaN/inf and non-audio rates
    channels, n = data.shape
    if sr < cfg.min_input_sample_rate:
        raise AudioError(
            path,
            f"sample rate {sr} Hz is below the {cfg.min_input_sample_rate} Hz minimum "
            f"(the model works at {cfg.sample_rate} Hz; re-record or export at a higher rate)",
        )
    duration = n / sr
    if duration > cfg.max_file_s:
        raise AudioError(path, f"too long: {duration / 60:.1f} min > {cfg.max_file_s / 60:.0f} min limit; split it first")
    if duration < cfg.min_file_s:
        raise AudioError(path, f"too short: {duration:.2f} s < {cfg.min_file_s:.1f} s minimum")
    mono = to_mono(data)
    peak = float(np.abs(mono).max())
    if peak == 0.0 or 20 * math.log10(peak) < cfg.silence_floor_dbfs:
        level = "-inf" if peak == 0.0 else f"{20 * math.log10(peak):.1f}"
        raise AudioError(path, f"silent: peak level {level} dBFS is below {cfg.silence_floor_dbfs:.0f} dBFS")
    notes = []
    if channels > 1:
        notes.append(f"mixed {channels} channels to mono")
    if sr < cfg.sample_rate:
        notes.append(f"upsampled from {sr} Hz; no content above {sr // 2} Hz")
    elif sr != cfg.sample_rate:
        notes.append(f"resampled from {sr} Hz")
    return Recording(path=path, audio=mono, sample_rate=sr, channels=channels, notes=tuple(notes))


def normalize_loudness(audio: np.ndarray, sr: int, target_lufs: float = -20.0, peak_dbfs: float = -1.0) -> np.ndarray:
    """Gain to ``target_lufs`` integrated loudness, then scale down if the peak exceeds ``peak_dbfs``."""
    import pyloudnorm

    audio = np.asarray(audio, dtype=np.float64)
    meter = pyloudnorm.Meter(sr, block_size=min(0.4, len(audio) / sr))
    loudness = meter.integrated_loudness(audio)
    out = audio
    if math.isfinite(loudness):
        out = audio * 10 ** ((target_lufs - loudness) / 20)
    ceiling = 10 ** (peak_dbfs / 20)
    peak = float(np.abs(out).max()) if len(out) else 0.0
    if peak > ceiling:
        out = out * (ceiling / peak)
    return out.astype(np.float32)


def frame_levels_db(audio: np.ndarray, sr: int, hop_s: float = 0.01, win_s: float = 0.02) -> np.ndarray:
    """RMS level in dBFS of frames centred every ``hop_s`` seconds."""
    hop = max(1, int(round(hop_s * sr)))
    win = max(hop, int(round(win_s * sr)))
    n_frames = max(1, 1 + len(audio) // hop)
    padded = np.pad(np.asarray(audio, dtype=np.float64), (win // 2, win))
    power = np.square(padded)
    csum = np.concatenate([[0.0], np.cumsum(power)])
    starts = np.arange(n_frames) * hop
    mean_power = (csum[starts + win] - csum[starts]) / win
    return 10 * np.log10(np.maximum(mean_power, 1e-12))


def find_segments(audio: np.ndarray, sr: int, cfg: AudioConfig | None = None) -> list[tuple[int, int]]:
    """Slice at silences into ``[start, end)`` sample ranges of ``min_segment_s``..``max_segment_s``.

    Phrases are found as runs of non-silent frames; pauses shorter than ``min_silence_s`` do not split. Phrases
    separated by less than ``max_merge_gap_s`` are merged while the result stays within ``max_segment_s``, so
    segments carry context rather than single words. A phrase longer than ``max_segment_s`` is cut at its
    quietest frame in the second half of the window. Segments shorter than ``min_segment_s`` are dropped.
    """
    cfg = cfg or AudioConfig()
    hop_s = 0.01
    hop = int(round(hop_s * sr))
    levels = frame_levels_db(audio, sr, hop_s=hop_s)
    threshold = max(levels.max() + cfg.silence_db, cfg.silence_floor_dbfs)
    loud = levels > threshold
    if not loud.any():
        return []
    # Runs of loud frames, as [start_frame, end_frame).
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(np.int8), [0]])))
    runs = [[int(s), int(e)] for s, e in zip(edges[::2], edges[1::2])]
    min_gap = int(round(cfg.min_silence_s / hop_s))
    phrases = [runs[0]]
    for start, end in runs[1:]:
        if start - phrases[-1][1] < min_gap:
            phrases[-1][1] = end
        else:
            phrases.append([start, end])

    max_frames = int(cfg.max_segment_s / hop_s)
    keep = int(round(cfg.keep_silence_s / hop_s))
    budget = max_frames - 2 * keep  # room for the silence kept on both sides
    pieces: list[list[int]] = []
    for start, end in phrases:
        while end - start > budget:
            lo, hi = start + budget // 2, start + budget
            cut = lo + int(np.argmin(levels[lo:hi]))
            pieces.append([start, cut])
            start = cut
        pieces.append([start, end])

    merge_gap = int(round(cfg.max_merge_gap_s / hop_s))
    merged = [pieces[0]]
    for start, end in pieces[1:]:
        last = merged[-1]
        if start - last[1] <= merge_gap and end - last[0] <= budget:
            last[1] = end
        else:
            merged.append([start, end])

    n = len(audio)
    out = []
    for i, (start, end) in enumerate(merged):
        # Pad with silence, but never past the midpoint of the pause to a neighbour.
        lo_limit = 0 if i == 0 else (merged[i - 1][1] + start) // 2
        hi_limit = len(levels) if i == len(merged) - 1 else (end + merged[i + 1][0]) // 2
        s = max(start - keep, lo_limit) * hop
        e = min(min(end + keep, hi_limit) * hop, n)
        if (e - s) / sr >= cfg.min_segment_s:
            out.append((int(s), int(e)))
    return out


WRITE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}


def write_audio(path: str | Path, audio: np.ndarray, sr: int) -> None:
    """Write mono audio, format from the suffix (16-bit WAV/FLAC, or Ogg Vorbis), atomically (temp + rename)."""

    import soundfile as sf

    path = Path(path)
    if path.suffix.lower() not in WRITE_FORMATS:
        raise ValueError(f"{path}: cannot write {path.suffix!r}; use one of {', '.join(WRITE_FORMATS)}")
    fmt, subtype = WRITE_FORMATS[path.suffix.lower()]
    from svc_model.storage import atomic_path

    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(audio, -1.0, 1.0), sr, format=fmt, subtype=subtype)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a file written by :func:`write_audio` as mono float32."""
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return data.mean(axis=1), int(sr)
