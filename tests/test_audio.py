"""svc_model.audio: decoding every format, each bad input, loudness, and the slicing boundaries."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from svc_model.audio import (
    AudioError,
    decode,
    find_segments,
    load_recording,
    normalize_loudness,
    resample,
)
from svc_model.config import AudioConfig
from tests.conftest import tone, write

CFG = AudioConfig()


def _encode_av(path, audio, sr, codec):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=sr)
        stream.layout = "mono"
        frame_size = 1024
        for i in range(0, len(audio), frame_size):
            chunk = audio[i : i + frame_size].astype(np.float32)[None, :]
            fmt = "fltp" if codec in ("aac", "libmp3lame", "mp3") else "flt"
            frame = av.AudioFrame.from_ndarray(chunk, format=fmt, layout="mono")
            frame.sample_rate = sr
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3", "m4a"])
def test_every_supported_format_decodes(tmp_path, fmt):
    sr = 32000 if fmt != "m4a" else 44100
    x = tone(2.0, sr)
    path = tmp_path / f"clip.{fmt}"
    if fmt in ("wav", "flac"):
        write(path, x, sr)
    elif fmt == "ogg":
        write(path, x, sr, format="OGG", subtype="VORBIS")
    elif fmt == "mp3":
        write(path, x, sr, format="MP3", subtype="MPEG_LAYER_III")
    else:
        _encode_av(path, x, sr, "aac")
    rec = load_recording(path, CFG)
    assert rec.sample_rate == sr
    assert abs(rec.duration_s - 2.0) < 0.1  # codecs add a little priming/padding
    # The decoded signal is the tone: its spectrum peaks at 220 Hz.
    spec = np.abs(np.fft.rfft(rec.audio))
    peak_hz = np.argmax(spec) * sr / len(rec.audio)
    assert abs(peak_hz - 220) < 5


def test_stereo_is_mixed_to_mono_and_noted(tmp_path):
    x = tone(2.0, 32000, channels=2)
    x[:, 1] *= 0.0
    rec = load_recording(write(tmp_path / "stereo.wav", x, 32000), CFG)
    assert rec.audio.ndim == 1 and rec.channels == 2
    assert np.allclose(rec.audio, x[:, 0] / 2, atol=1e-4)
    assert any("mixed 2 channels" in n for n in rec.notes)


def test_48k_is_accepted_and_noted_8k_is_rejected(tmp_path):
    rec = load_recording(write(tmp_path / "hi.wav", tone(2.0, 48000), 48000), CFG)
    assert rec.sample_rate == 48000 and any("resampled from 48000" in n for n in rec.notes)
    path = write(tmp_path / "lo.wav", tone(2.0, 8000), 8000)
    with pytest.raises(AudioError, match=r"lo\.wav: sample rate 8000 Hz is below the 16000 Hz minimum"):
        load_recording(path, CFG)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("empty.wav", lambda p: p.write_bytes(b""), r"empty\.wav: empty file \(0 bytes\)"),
        ("notes.wav", lambda p: p.write_text("these are my lyrics, not audio\n" * 20), r"notes\.wav: cannot decode"),
        ("truncated.flac", None, r"truncated\.flac: cannot decode"),
        ("silence.wav", lambda p: write(p, np.zeros(32000 * 2, np.float32), 32000), r"silence\.wav: silent"),
        ("short.wav", lambda p: write(p, tone(0.5, 32000), 32000), r"short\.wav: too short: 0\.50 s < 1\.0 s"),
        ("nan.wav", None, r"nan\.wav: contains \d+ NaN or inf samples"),
        ("inf.wav", None, r"inf\.wav: contains \d+ NaN or inf samples"),
        ("lyrics.txt", lambda p: p.write_text("la la la"), r"lyrics\.txt: unsupported extension '\.txt'"),
    ],
)
def test_bad_inputs_name_the_file_and_the_problem(tmp_path, name, make, message):
    path = tmp_path / name
    if name == "truncated.flac":
        write(tmp_path / "full.flac", tone(3.0, 32000), 32000)
        path.write_bytes((tmp_path / "full.flac").read_bytes()[:300])
    elif name in ("nan.wav", "inf.wav"):
        x = tone(2.0, 32000)
        x[1000:1010] = np.nan if name == "nan.wav" else np.inf
        write(path, x, 32000, subtype="FLOAT")
    else:
        make(path)
    before = path.read_bytes()
    with pytest.raises(AudioError, match=message):
        load_recording(path, CFG)
    assert path.read_bytes() == before, "a bad file must never be modified"


def test_file_over_one_hour_is_rejected_from_the_header(tmp_path):
    path = tmp_path / "concert.flac"
    sr = 16000
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=1, format="FLAC") as fh:
        block = np.zeros(sr * 60, dtype=np.float32)
        for _ in range(61):
            fh.write(block)
    with pytest.raises(AudioError, match=r"concert\.flac: too long: 61\.0 min > 60 min limit"):
        load_recording(path, CFG)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="file not found"):
        decode(tmp_path / "nope.wav")


def test_loudness_normalization_hits_target_and_respects_peak():
    import pyloudnorm

    sr = 32000
    quiet = tone(4.0, sr, amp=0.01)
    out = normalize_loudness(quiet, sr, target_lufs=-20.0, peak_dbfs=-1.0)
    assert abs(pyloudnorm.Meter(sr).integrated_loudness(out) + 20.0) < 0.5
    loud = tone(4.0, sr, amp=0.9)
    out = normalize_loudness(loud, sr, target_lufs=-3.0, peak_dbfs=-1.0)
    assert np.abs(out).max() <= 10 ** (-1 / 20) + 1e-6


def test_resample_changes_length_by_the_rate_ratio():
    x = tone(1.0, 48000)
    y = resample(x, 48000, 32000)
    assert len(y) == 32000 and y.dtype == np.float32


def _phrases(spec, sr=32000):
    """Build audio from ``[(seconds, loud?), ...]``; return the audio and the loud spans in seconds."""
    parts, spans, t = [], [], 0.0
    for seconds, loud in spec:
        parts.append(tone(seconds, sr) if loud else np.zeros(int(seconds * sr), np.float32))
        if loud:
            spans.append((t, t + seconds))
        t += seconds
    return np.concatenate(parts), spans


def test_slicing_cuts_at_long_silences_and_keeps_margins():
    sr = 32000
    cfg = AudioConfig(max_merge_gap_s=0.5)
    audio, spans = _phrases([(0.5, False), (3.0, True), (2.0, False), (4.0, True), (1.0, False)])
    segs = find_segments(audio, sr, cfg)
    assert len(segs) == 2
    for (start, end), (lo, hi) in zip(segs, spans):
        # Boundaries sit keep_silence_s (0.1 s) outside the phrase, within one 10 ms frame.
        assert abs(start / sr - (lo - 0.1)) <= 0.02
        assert abs(end / sr - (hi + 0.1)) <= 0.02


def test_slicing_merges_close_phrases_and_ignores_short_pauses():
    sr = 32000
    audio, _ = _phrases([(2.0, True), (0.2, False), (2.0, True), (0.6, False), (2.0, True)])
    segs = find_segments(audio, sr, AudioConfig())
    # 0.2 s < min_silence_s never splits; the 0.6 s pause is below max_merge_gap_s so it merges too.
    assert len(segs) == 1
    assert abs((segs[0][1] - segs[0][0]) / sr - 6.8) < 0.05


def test_slicing_never_exceeds_max_and_drops_short_bits():
    sr = 32000
    cfg = AudioConfig()
    audio, _ = _phrases([(40.0, True), (2.0, False), (0.5, True), (2.0, False)])
    segs = find_segments(audio, sr, cfg)
    lengths = [(e - s) / sr for s, e in segs]
    assert all(length <= cfg.max_segment_s + 1e-6 for length in lengths)
    assert all(length >= cfg.min_segment_s for length in lengths)
    # The 40 s phrase is covered without gaps; the 0.5 s blip (0.7 s with margins) is dropped.
    assert sum(lengths) == pytest.approx(40.1, abs=0.05)
    assert segs[-1][1] / sr < 40.2
    # Consecutive pieces of one long phrase touch but never overlap.
    assert all(a[1] <= b[0] for a, b in zip(segs, segs[1:]))


def test_slicing_silence_gives_nothing():
    assert find_segments(np.zeros(32000 * 3, np.float32), 32000, AudioConfig()) == []
