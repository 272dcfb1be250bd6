"""``svc live``: the streaming converter between local audio devices (PortAudio through ``sounddevice``).

One blocking loop: read a block from the input device, convert it, write the converted block to the output device,
print a meter line (input level, compute per block, latency). The devices run at one sample rate (the input
device's default unless given); the converter resamples in and out with streaming resamplers.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PORTAUDIO_HELP = ("PortAudio is not installed: `svc live` needs the PortAudio library for its audio devices "
                  "(Debian/Ubuntu: `apt install libportaudio2`; macOS and Windows: it ships with `sounddevice`)")


class LiveError(RuntimeError):
    pass


def _sounddevice():
    try:
        import sounddevice
    except OSError as exc:  # the Python package is there, the PortAudio library is not
        raise LiveError(f"{PORTAUDIO_HELP} ({exc})") from None
    except ImportError as exc:
        raise LiveError(f"the `sounddevice` package is missing: pip install sounddevice ({exc})") from None
    return sounddevice


def list_devices() -> str:
    sd = _sounddevice()
    devices = sd.query_devices()
    if not len(devices):
        return "no audio devices found (PortAudio sees none)"
    lines = []
    for i, dev in enumerate(devices):
        kinds = [k for k, n in (("in", dev["max_input_channels"]), ("out", dev["max_output_channels"])) if n]
        lines.append(f"{i:3d}  {dev['name']}  ({'/'.join(kinds)}, {dev['default_samplerate']:.0f} Hz)")
    return "\n".join(lines)


def _device_index(sd, spec: str | None, kind: str) -> int | None:
    if spec is None:
        return None
    if spec.isdigit():
        index = int(spec)
        if index >= len(sd.query_devices()):
            raise LiveError(f"no {kind} device {index}; `svc live --list-devices` shows them")
        return index
    matches = [i for i, d in enumerate(sd.query_devices())
               if spec.lower() in d["name"].lower() and d[f"max_{kind}_channels"] > 0]
    if not matches:
        raise LiveError(f"no {kind} device matches {spec!r}; `svc live --list-devices` shows them")
    exact = [i for i in matches if sd.query_devices(i)["name"].lower() == spec.lower()]
    return (exact or matches)[0]


@dataclass
class LiveSummary:
    blocks: int  # device blocks read and written
    gated: int
    compute_p50_ms: float
    compute_p95_ms: float
    latency_ms: int
    overflows: int
    underflows: int
    delay_samples: int  # device-rate samples from an input sample to its converted output, besides the block


def run_live(streamer_factory: Callable[[int], object], *, input_device: str | None = None,
             output_device: str | None = None, samplerate: int | None = None, seconds: float | None = None,
             meter: Callable[[str], None] | None = None) -> LiveSummary:
    """Convert from ``input_device`` to ``output_device`` until Ctrl-C (or ``seconds`` of input).

    ``streamer_factory(device_rate)`` builds the :class:`~svc_model.streaming.StreamingConverter` for the devices'
    rate (its output, at the model's rate, is resampled to the device rate here)."""
    from svc_model.streaming import BlockResampler, rms_db

    sd = _sounddevice()
    in_index = _device_index(sd, input_device, "input")
    out_index = _device_index(sd, output_device, "output")
    try:
        info = sd.query_devices(in_index, "input")
    except (ValueError, sd.PortAudioError) as exc:
        raise LiveError(f"no usable input device ({exc}); `svc live --list-devices` shows them") from None
    rate = int(samplerate or info["default_samplerate"])
    streamer = streamer_factory(rate)
    streamer.warm_up()  # load the extractors before the devices start, or the first blocks overflow
    block = streamer.block_samples
    to_device = BlockResampler(streamer.sr, rate) if streamer.sr != rate else None
    meter = meter or (lambda line: print(f"\r{line}", end="", file=sys.stderr, flush=True))
    overflows = underflows = 0
    computes: list[float] = []
    backlog = np.zeros(0, np.float32)
    try:
        with sd.Stream(device=(in_index, out_index), samplerate=rate, blocksize=block, channels=1,
                       dtype="float32") as stream:
            while seconds is None or len(computes) * streamer.cfg.block_ms < seconds * 1000:
                x, overflow = stream.read(block)
                overflows += bool(overflow)
                t0 = time.perf_counter()
                y = streamer.process(x[:, 0])
                if to_device is not None:
                    y = to_device(y)
                computes.append(time.perf_counter() - t0)
                # The device gets exactly one block per block read; resampling leftovers wait for the next.
                backlog = np.concatenate([backlog, y])
                out, backlog = backlog[:block], backlog[block:]
                out = np.pad(out, (0, block - len(out)))
                underflows += bool(stream.write(out[:, None]))
                level = max(rms_db(x[:, 0]), -200.0)
                p95 = float(np.percentile(computes[-50:], 95))
                gated = bool(streamer.stats.blocks) and streamer.stats.blocks[-1].gated
                meter(f"in {level:6.1f} dBFS  compute {computes[-1] * 1000:5.0f} ms (p95 {p95 * 1000:4.0f})  "
                      f"block {streamer.cfg.block_ms} ms  latency {streamer.cfg.latency_ms} ms + compute"
                      f"{'  GATED' if gated else ''}")
    except KeyboardInterrupt:
        pass
    except sd.PortAudioError as exc:
        raise LiveError(f"audio device error: {exc}") from None
    stats = streamer.stats
    return LiveSummary(blocks=len(computes), gated=sum(b.gated for b in stats.blocks),
                       compute_p50_ms=stats.compute_ms(50), compute_p95_ms=stats.compute_ms(95),
                       latency_ms=streamer.cfg.latency_ms, overflows=overflows, underflows=underflows,
                       delay_samples=int(round(streamer.output_delay * rate / streamer.sr))
                       + (to_device.delay if to_device else 0))
