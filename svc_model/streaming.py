"""Streaming conversion: blocks of input samples in, blocks of converted samples out.

The same :class:`~svc_model.infer.Converter` (checkpoint, singer table, extractors) as file conversion, driven block
by block as RVC's real-time path is:

- every block appends ``block_ms`` of input to a rolling window of ``context_s`` + block + crossfade + SOLA search;
- pitch is extracted only for the new block, and the previous block's crossfade and search frames (held back,
  not yet returned), with ``pitch_margin_ms`` before them, and kept in a rolling cache (the frames already
  returned are never recomputed, so the NSF phase built from them never changes);
- Whisper (and HuBERT) are not streaming models: they run on the whole sliding window every block, and that is
  most of the cost per block (see ``benchmarks/live.py``);
- the prior encoder and flow see the whole window; the decoder synthesizes only the returned block, the crossfade
  and the SOLA search, plus ``decoder_margin_frames`` of left context for its receptive field;
- the NSF source's phase is carried from block to block (:func:`~svc_model.model.generator.advance_phase`), so a
  sustained note does not click at the joins;
- each new block's head is aligned with the tail held back from the last one by a SOLA search (the offset within
  ``sola_search_ms`` that maximizes their normalized cross-correlation), then crossfaded over ``crossfade_ms``.

Algorithmic latency = block + crossfade + SOLA search (300 ms at the defaults): a sample waits for the end of its
block, and the crossfade and search window are held back for the next block's join.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from svc_model.audio import resample
from svc_model.features.base import fit_frames
from svc_model.infer import check_pitch_shift


@dataclass
class StreamConfig:
    block_ms: int = 250
    crossfade_ms: int = 40
    sola_search_ms: int = 10
    context_s: float = 2.0  # left context for Whisper/HuBERT and the prior encoder
    # Input before the frames being estimated, for the pitch extractor: FCPE on a 100 ms block with only 100 ms
    # before it disagrees with the whole file's voicing on 12% of frames; with 300 ms, 4% (benchmarks/live.py).
    pitch_margin_ms: int = 300
    decoder_margin_frames: int = 8  # left context for the decoder's receptive field (80 ms)
    gate_db: float | None = None  # blocks quieter than this (RMS dBFS) pass as silence without running the model

    def check(self) -> None:
        for name in ("block_ms", "crossfade_ms", "sola_search_ms", "pitch_margin_ms"):
            value = getattr(self, name)
            if value % 10:
                raise ValueError(f"{name} must be a multiple of 10 ms (the 10 ms frame), got {value}")
        if self.block_ms < 20:
            raise ValueError(f"block_ms must be at least 20 ms, got {self.block_ms}")
        if self.crossfade_ms < 0 or self.sola_search_ms < 0 or self.crossfade_ms > self.block_ms:
            raise ValueError(f"crossfade_ms ({self.crossfade_ms}) must be between 0 and block_ms ({self.block_ms}), "
                             f"sola_search_ms ({self.sola_search_ms}) at least 0")
        if not 0 <= self.context_s <= 30:
            raise ValueError(f"context_s must be between 0 and 30 s, got {self.context_s}")

    @property
    def latency_ms(self) -> int:
        """Algorithmic latency: the block, plus the crossfade and search window held back for the next join."""
        return self.block_ms + self.crossfade_ms + self.sola_search_ms


@dataclass
class BlockStats:
    index: int
    compute_s: float
    gated: bool
    sola_offset: int  # samples
    input_db: float


@dataclass
class StreamStats:
    blocks: list[BlockStats] = field(default_factory=list)

    def compute_ms(self, q: float) -> float:
        times = [b.compute_s for b in self.blocks if not b.gated]
        return float(np.percentile(times, q) * 1000) if times else 0.0


def rms_db(x: np.ndarray) -> float:
    """RMS level in dBFS (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def sola_offset(head: np.ndarray, tail: np.ndarray, search: int) -> int:
    """The offset in ``[0, search]`` at which ``head[offset:offset+len(tail)]`` best matches ``tail``
    (normalized cross-correlation)."""
    n = len(tail)
    if search <= 0 or n == 0 or not np.any(tail):
        return 0
    scores = []
    for offset in range(search + 1):
        seg = head[offset : offset + n]
        scores.append(float(np.dot(seg, tail)) / (float(np.linalg.norm(seg)) + 1e-8))
    return int(np.argmax(scores))


class BlockResampler:
    """A streaming polyphase resampler (``scipy.signal.resample_poly``'s filter, run over a sliding window) whose
    output count always matches its input count (``len * out_sr / in_sr``, accumulated): a real-time loop gets one
    full block out per block in, at a fixed delay of ``delay`` output samples (the filter's half length, about
    0.3 ms). soxr's streaming mode instead returns uneven chunks (up to 20 ms short), which would cost a whole
    block of latency."""

    def __init__(self, in_sr: int, out_sr: int):
        from scipy.signal import firwin

        g = math.gcd(int(in_sr), int(out_sr))
        self.in_sr, self.out_sr, self.up, self.down = in_sr, out_sr, out_sr // g, in_sr // g
        self.half_len = 10 * max(self.up, self.down)
        self.taps = firwin(2 * self.half_len + 1, 1.0 / max(self.up, self.down), window=("kaiser", 5.0))
        self.delay = self.half_len // self.down + 2  # output samples of lead: covers the filter's look-ahead
        self._buffer = np.zeros(0, np.float64)
        self._origin = 0  # absolute input index of _buffer[0]; always a multiple of ``down``
        self._fed = 0  # input samples so far
        self._next = 0  # next absolute output index to compute
        self._fifo = np.zeros(self.delay, np.float32)
        self._given = 0

    def _compute(self, upto: int) -> np.ndarray:
        """Outputs ``_next .. upto-1`` from the buffered input (zeros beyond what was fed)."""
        from scipy.signal import resample_poly

        if upto <= self._next:
            return np.zeros(0, np.float32)
        y = resample_poly(self._buffer, self.up, self.down, window=self.taps)
        first = self._origin * self.up // self.down
        out = y[self._next - first : upto - first]
        out = np.pad(out, (0, upto - self._next - len(out)))
        self._next = upto
        # keep the history the next outputs need (their filter reaches half_len/up input samples back)
        keep_from = max(0, (self._next * self.down - self.half_len) // self.up - 1)
        keep_from -= keep_from % self.down
        if keep_from > self._origin:
            self._buffer = self._buffer[keep_from - self._origin :]
            self._origin = keep_from
        return out.astype(np.float32)

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        x = np.asarray(x, np.float64).reshape(-1)
        self._buffer = np.concatenate([self._buffer, x])
        self._fed += len(x)
        if last:  # the tail: everything up to the end of the input, the look-ahead filled with zeros
            self._buffer = np.concatenate([self._buffer, np.zeros(self.half_len // self.up + 1)])
            ready = -(-self._fed * self.up // self.down)
        else:  # outputs whose filter window lies inside what was fed
            ready = max(self._next, (self._fed * self.up - self.half_len - 1) // self.down + 1)
        self._fifo = np.concatenate([self._fifo, self._compute(ready)])
        want = int(round(self._fed * self.out_sr / self.in_sr)) + (self.delay if last else 0) - self._given
        out, self._fifo = self._fifo[:want], self._fifo[want:]
        out = np.pad(out, (0, want - len(out)))
        self._given += len(out)
        return out


class StreamingConverter:
    """Feed blocks with :meth:`process`; each full block of input gives a block of output at the model's rate.

    ``input_sr``: the rate of the samples fed (resampled with a streaming resampler, no clicks between blocks).
    """

    def __init__(self, converter, target, pitch_shift: float = 0.0, config: StreamConfig | None = None,
                 input_sr: int | None = None, deterministic: bool = False, seed: int = 0):
        import torch

        self.converter, self.cfg = converter, config or StreamConfig()
        self.cfg.check()
        self.sr = converter.cfg.audio.sample_rate
        self.hop = converter.cfg.spectrogram.hop
        self.input_sr = int(input_sr or self.sr)
        if self.input_sr < 8000 or self.input_sr > 384000:
            raise ValueError(f"input sample rate {self.input_sr} Hz is outside 8000..384000")
        frame_ms = 1000 * self.hop / self.sr
        if abs(frame_ms - 10) > 1e-9:
            raise ValueError(f"streaming needs 10 ms frames; the model's hop is {frame_ms} ms")
        self.n_block = self.cfg.block_ms // 10
        self.n_fade = self.cfg.crossfade_ms // 10
        self.n_search = self.cfg.sola_search_ms // 10
        self.n_context = int(round(self.cfg.context_s * 100))
        self.n_window = self.n_context + self.n_block + self.n_fade + self.n_search
        self.n_decode = min(self.n_window, self.n_block + self.n_fade + self.n_search + self.cfg.decoder_margin_frames)
        self.deterministic = deterministic
        self.device = converter.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._audio = np.zeros(self.n_window * self.hop, np.float32)  # the input window at the model's rate
        self._f0 = np.zeros(self.n_window, np.float32)  # shifted f0 per frame of the window
        from svc_model.model.generator import N_HARMONICS

        start = torch.zeros(1, N_HARMONICS + 1, dtype=torch.float64)  # the fundamental and its overtones
        if not deterministic:  # random start phases for the overtones, as the file converter's source
            start[:, 1:] = torch.rand(1, N_HARMONICS, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(seed))
        # phase at the start of each frame of the window (only the decode region's first frame is read)
        self._phase = start.repeat(self.n_window, 1)
        self._tail = np.zeros(self.n_fade * self.hop, np.float32)
        self._pending = np.zeros(0, np.float32)
        self._resampler = BlockResampler(self.input_sr, self.sr) if self.input_sr != self.sr else None
        self.stats = StreamStats()
        self.set_target(target)
        self.set_pitch_shift(pitch_shift)

    def warm_up(self) -> None:
        """Load the extractors and run the model once on silence (state untouched), so that the first live block
        does not pay for loading."""
        saved = (self._audio.copy(), self._f0.copy(), self._phase.clone(), self._tail.copy(), self.generator.get_state())
        self._pitch(self._revised_frames)
        self._synthesize()
        self._audio, self._f0, self._phase, self._tail = saved[:4]
        self.generator.set_state(saved[4])

    # ---- controls (take effect at the next block) ------------------------------------------------------------
    def set_target(self, target) -> None:
        import torch

        self.target = self.converter.resolve_target(target)
        self._speaker = torch.from_numpy(self.target.embedding)[None].to(self.device)

    def set_pitch_shift(self, semitones: float) -> None:
        """Semitones (the file converter's limits; no "auto": a live source has no median f0 yet)."""
        if semitones == "auto":
            raise ValueError("pitch shift 'auto' needs the whole source; give semitones when streaming")
        self.pitch_shift = float(check_pitch_shift(semitones))

    @property
    def block_samples(self) -> int:
        """Input samples per block at ``input_sr``."""
        return int(round(self.cfg.block_ms * self.input_sr / 1000))

    @property
    def output_delay(self) -> int:
        """Output samples (model rate) before the first one that corresponds to input sample 0: the crossfade and
        search window held back, and the input resampler's start-up delay."""
        return (self.n_fade + self.n_search) * self.hop + (self._resampler.delay if self._resampler else 0)

    # ---- streaming ----------------------------------------------------------------------------------------------
    def process(self, samples: np.ndarray) -> np.ndarray:
        """Feed input samples (any count, mono float at ``input_sr``); returns the output blocks completed."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not np.isfinite(x).all():
            raise ValueError("input block contains NaN or inf samples")
        if self._resampler is not None:
            x = self._resampler(x)
        self._pending = np.concatenate([self._pending, x])
        block = self.n_block * self.hop
        out = []
        while len(self._pending) >= block:
            new, self._pending = self._pending[:block], self._pending[block:]
            out.append(self._step(new))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def flush(self) -> np.ndarray:
        """Push silence through until every input sample fed so far has come out (file conversion's end)."""
        if self._resampler is not None:
            self._pending = np.concatenate([self._pending, self._resampler(np.zeros(0, np.float32), last=True)])
        block = self.n_block * self.hop
        owed = len(self._pending) + self.output_delay
        pad = (-len(self._pending)) % block
        out = []
        self._pending = np.concatenate([self._pending, np.zeros(pad, np.float32)])
        produced = 0
        while produced < owed:
            if len(self._pending) < block:
                self._pending = np.concatenate([self._pending, np.zeros(block, np.float32)])
            new, self._pending = self._pending[:block], self._pending[block:]
            y = self._step(new)
            out.append(y)
            produced += len(y)
        return np.concatenate(out)[:owed] if out else np.zeros(0, np.float32)

    def _step(self, new: np.ndarray) -> np.ndarray:
        import torch

        started = time.perf_counter()
        hop, nb = self.hop, self.n_block
        self._audio = np.concatenate([self._audio[len(new):], new])
        self._f0 = np.concatenate([self._f0[nb:], np.zeros(nb, np.float32)])
        self._phase = torch.cat([self._phase[nb:], self._phase[-1:].repeat(nb, 1)])
        level = rms_db(new)
        gated = self.cfg.gate_db is not None and level < self.cfg.gate_db
        revise = self._revised_frames
        if not gated:
            self._f0[-revise:] = self._pitch(revise) * 2.0 ** (self.pitch_shift / 12.0)
        self._advance_phases(revise)
        index = len(self.stats.blocks)
        if gated:  # silence in, silence out; the join after it fades in from silence
            self._tail[:] = 0
            self.stats.blocks.append(BlockStats(index, time.perf_counter() - started, True, 0, level))
            return np.zeros(nb * hop, np.float32)
        y = self._synthesize()
        fade = len(self._tail)
        offset = sola_offset(y, self._tail, self.n_search * hop)
        out = y[offset : offset + nb * hop].copy()
        if fade:
            ramp = np.sin(0.5 * np.pi * (np.arange(fade) + 0.5) / fade) ** 2  # equal-power-ish, sums to 1
            out[:fade] = out[:fade] * ramp + self._tail * (1 - ramp)
            self._tail = y[offset + nb * hop : offset + nb * hop + fade].copy()
        self.stats.blocks.append(BlockStats(index, time.perf_counter() - started, False, offset, level))
        return out

    @property
    def _revised_frames(self) -> int:
        """Frames whose f0 each block (re)computes: the new block, and the crossfade and search frames held back
        at the last block. Those were estimated with no input after them (the pitch extractor is least sure at
        its right edge: at 100 ms blocks the last frame of each block was 88 cents off the whole file's f0 on
        average) and have not been played yet, so they are estimated again now that a block follows them."""
        return min(self.n_window - 1, self.n_block + self.n_fade + self.n_search)

    def _pitch(self, frames: int | None = None) -> np.ndarray:
        """f0 of the window's last ``frames`` frames (default: the new block), from them plus a margin of the
        input before them."""
        frames, margin = frames or self.n_block, self.cfg.pitch_margin_ms // 10
        span = min(len(self._audio), (frames + margin) * self.hop)
        margin = span // self.hop - frames
        audio16 = resample(self._audio[-span:], self.sr, 16000)
        pitch = self.converter.extractor("pitch").extract(audio16)
        f0 = pitch[:, 0] * (pitch[:, 1] > 0)
        f0 = np.pad(f0, (0, max(0, frames + margin - len(f0))))
        return f0[margin : margin + frames].astype(np.float32)

    def _advance_phases(self, frames: int) -> None:
        """Start phases of the window's last ``frames`` frames (those whose f0 changed), from the frame before."""
        import torch

        from svc_model.model.generator import advance_phase

        first = self.n_window - frames  # its start phase follows the frame before it
        f0 = torch.from_numpy(self._f0[first - 1 : self.n_window - 1].copy())[None]
        self._phase[first:] = advance_phase(self._phase[first - 1][None], f0, self.hop, self.sr)[0]

    def _synthesize(self) -> np.ndarray:
        """Output for the decode region: the last (block + crossfade + search) frames, margin dropped."""
        import torch

        conv, hop, device = self.converter, self.hop, self.device
        frames = self.n_window
        audio16 = resample(self._audio, self.sr, 16000)
        ppg = fit_frames(np.repeat(conv.extractor("ppg").extract(audio16), 2, axis=0), frames)
        vec = None
        if conv.cfg.model.vec_dim > 0:
            vec = fit_frames(np.repeat(conv.extractor("vec").extract(audio16), 2, axis=0), frames)
            vec = torch.from_numpy(vec.T.copy())[None].float().to(device)
        decode_from = frames - self.n_decode
        f0 = torch.from_numpy(self._f0.copy())[None].to(device)
        # The source filters' context: the window's real f0 before the decoded frames; after them the input has
        # not arrived yet, so the last note is held (the next block recomputes those frames with what came).
        c = conv.model.decoder.source_context
        first = decode_from - c if decode_from >= c else decode_from
        f0_source = f0[:, first:]
        if first != decode_from:
            f0_source = torch.nn.functional.pad(f0_source[:, None], (0, c), mode="replicate")[:, 0]
        with torch.no_grad():
            source = conv.model.decoder.source(f0_source, deterministic=self.deterministic,
                                               generator=self.generator,
                                               start_phase=self._phase[first][None].to(device),
                                               hold_edges=first == decode_from)
            y = conv.model.infer(torch.from_numpy(ppg.T.copy())[None].float().to(device), vec, f0, self._speaker,
                                 source=source, generator=self.generator, decode_from=decode_from)
        y = y[0, 0].float().cpu().numpy()
        margin = self.n_decode - (self.n_block + self.n_fade + self.n_search)
        return y[margin * hop :]


def stream_file(converter, source_audio: np.ndarray, source_sr: int, target, pitch_shift: float = 0.0,
                config: StreamConfig | None = None, deterministic: bool = False, seed: int = 0,
                progress=None) -> tuple[np.ndarray, StreamingConverter]:
    """Run a whole recording through the streaming path in blocks (``svc convert --stream``, tests, benchmarks).

    Returns the output at the model's rate, aligned with the input (the algorithmic delay removed) and of the
    input's duration, and the streamer (its ``stats`` hold the per-block timings)."""
    streamer = StreamingConverter(converter, target, pitch_shift, config, input_sr=source_sr,
                                  deterministic=deterministic, seed=seed)
    step = streamer.block_samples
    chunks = []
    total = math.ceil(len(source_audio) / step)
    for i in range(total):
        chunks.append(streamer.process(source_audio[i * step : (i + 1) * step]))
        if progress:
            progress(i + 1, total)
    chunks.append(streamer.flush())
    out = np.concatenate(chunks)
    n_out = int(round(len(source_audio) * streamer.sr / source_sr))
    out = out[streamer.output_delay : streamer.output_delay + n_out]
    return np.pad(out, (0, max(0, n_out - len(out)))), streamer
