"""Live (streaming) conversion: per-block compute, real-time factor and latency for several block sizes, and how
the streamed output compares with file conversion of the same input.

    .venv/bin/python benchmarks/live.py [--checkpoint runs/x/step-00001000.pt] [--blocks 100,150,250]
                                        [--source examples/voices/speaker-c/<file>.flac] [--device cpu]

Without ``--checkpoint`` the tiny profile's model has random weights (labelled so in the output): the timings are
the real architecture's, the comparison figures are not a quality measure. Pitch (FCPE) and Whisper (tiny.en via
CTranslate2) are the profile's real extractors and run on every block, as they do live.

Per block: compute p50/p95/max in ms, RTF = compute / block length (p95), algorithmic latency = block + crossfade
+ SOLA window. Against file conversion (both deterministic): f0 correlation (librosa pYIN on both outputs), mean
log-mel L1 distance (dB), and the largest sample-to-sample step at block joins vs inside blocks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pyin(audio: np.ndarray, sr: int) -> np.ndarray:
    import librosa
    import scipy.signal

    b, a = scipy.signal.butter(4, [60, 1500], btype="band", fs=sr)
    x = scipy.signal.filtfilt(b, a, np.asarray(audio, np.float64))
    f0, voiced, _ = librosa.pyin(x / max(1e-9, np.abs(x).max()), fmin=50, fmax=1000, sr=sr, frame_length=2048,
                                 hop_length=320)
    return np.where(voiced, np.nan_to_num(f0), 0.0)


def mel_db_distance(a: np.ndarray, b: np.ndarray) -> float:
    import torch

    from svc_model.model.spectral import LogMelSpectrogram

    mel = LogMelSpectrogram()
    ma, mb = (mel(torch.from_numpy(x.astype(np.float32))[None])[0] for x in (a, b))
    return float(torch.mean(torch.abs(ma - mb))) * 20 / np.log(10)


def load_converter(checkpoint: str | None, device: str):
    import torch

    from svc_model.config import load_config
    from svc_model.infer import Converter
    from svc_model.model.synthesizer import SVCModel

    if checkpoint:
        conv = Converter.from_checkpoint(checkpoint, device=device)
        return conv, sorted(conv.singers)[0], "trained: " + checkpoint
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = SVCModel(cfg.model, cfg.spectrogram.n_fft // 2 + 1, cfg.audio.sample_rate).eval().to(device)
    e = np.random.RandomState(0).randn(256).astype(np.float32)
    return (Converter(model, cfg, {"random": {"embedding": e / np.linalg.norm(e), "median_f0": 200.0}},
                      device=device), "random", "RANDOM WEIGHTS (tiny profile): timings only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--blocks", default="100,150,250", help="block sizes in ms")
    parser.add_argument("--source", default=str(ROOT / "examples" / "voices" / "speaker-c"))
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    from svc_model.audio import decode, resample, to_mono
    from svc_model.streaming import StreamConfig, stream_file

    source = Path(args.source)
    files = sorted(source.glob("*.flac")) if source.is_dir() else [source]
    pieces, sr_in = [], 32000
    for f in files:
        data, sr = decode(f)
        pieces.append(resample(to_mono(data), sr, sr_in))
        if sum(map(len, pieces)) >= args.seconds * sr_in:
            break
    audio = np.concatenate(pieces)[: int(args.seconds * sr_in)]
    conv, target, label = load_converter(args.checkpoint, args.device)
    print(f"model: {label}; source: {len(audio) / sr_in:.1f} s from {source}; device {args.device}")
    conv.convert(audio[:sr_in], target, source_sr=sr_in, deterministic=True)  # load the extractors once
    whole = conv.convert(audio, target, source_sr=sr_in, deterministic=True)
    f_whole = pyin(whole.audio, 32000)
    rows = []
    for block_ms in (int(b) for b in args.blocks.split(",")):
        cfg = StreamConfig(block_ms=block_ms)
        out, streamer = stream_file(conv, audio, sr_in, target, config=cfg, deterministic=True)
        times = np.array([b.compute_s for b in streamer.stats.blocks]) * 1000
        f_stream = pyin(out, 32000)
        both = (f_stream > 0) & (f_whole > 0)
        corr = float(np.corrcoef(f_stream[both], f_whole[both])[0, 1]) if both.sum() > 2 else float("nan")
        block = streamer.n_block * streamer.hop
        d = np.abs(np.diff(out))
        joins = list(range(block - streamer.output_delay, len(out) - block, block))[1:]
        fade = len(streamer._tail)
        at_joins = max(float(d[j - 64 : j + fade + 64].max()) for j in joins)
        inside = max(float(d[j + fade + 64 : j + block - 64].max()) for j in joins)
        row = {"block_ms": block_ms, "latency_ms": cfg.latency_ms, "compute_p50_ms": float(np.percentile(times, 50)),
               "compute_p95_ms": float(np.percentile(times, 95)), "compute_max_ms": float(times.max()),
               "rtf_p95": float(np.percentile(times, 95)) / block_ms, "f0_corr_vs_file": corr,
               "mel_l1_db_vs_file": mel_db_distance(out, whole.audio), "max_step_at_joins": at_joins,
               "max_step_inside_blocks": inside, "blocks": len(times)}
        rows.append(row)
        print(f"block {block_ms:4d} ms  latency {cfg.latency_ms} ms  compute p50 {row['compute_p50_ms']:.0f} / "
              f"p95 {row['compute_p95_ms']:.0f} / max {row['compute_max_ms']:.0f} ms  RTF(p95) {row['rtf_p95']:.2f}  "
              f"f0 corr vs file {corr:.3f}  mel L1 vs file {row['mel_l1_db_vs_file']:.2f} dB  "
              f"step at joins {at_joins:.3f} vs inside {inside:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": label, "device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
