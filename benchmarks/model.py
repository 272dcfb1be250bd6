"""Training seconds per step and conversion real-time factor for the tiny and base profiles, plus peak RSS.

    .venv/bin/python benchmarks/model.py [--device cpu] [--steps 3] [--seconds 10]

Each row runs in its own process so its peak RSS is its own. Training steps use random tensors of the
profile's shapes (batch_size x max_frames, a decoder crop of segment_size samples) through the full step:
generator (with the speaker classifier), the three discriminator families, every loss term, both optimizers; on
CUDA also the peak GPU memory. Conversion runs on a real recording (examples/voices/speaker-d/57.flac, repeated to
--seconds); "features included" adds pitch, PPG and vec extraction with the profile's extractors (seeded random
weights where no weights exist here: hubert-soft and Whisper large-v2 for base; resemblyzer stands in for base's
mozilla-lstm).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [("train", "tiny"), ("train", "base"), ("convert", "tiny"), ("convert", "base")]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _random_batch(cfg, torch):
    t, m = cfg.train, cfg.model
    frames = t.max_frames
    f0 = torch.full((t.batch_size, frames), 180.0)
    f0[:, :10] = 0
    return {"audio": 0.1 * torch.randn(t.batch_size, frames * cfg.spectrogram.hop), "f0": f0,
            "ppg": torch.randn(t.batch_size, m.ppg_dim, frames),
            "vec": torch.randn(t.batch_size, m.vec_dim, frames) if m.vec_dim else None,
            "speaker": torch.nn.functional.normalize(torch.randn(t.batch_size, m.spk_dim), dim=-1),
            "lengths": torch.full((t.batch_size,), frames, dtype=torch.long)}


def bench_train(profile: str, device: str, steps: int) -> str:
    import numpy as np
    import pandas as pd
    import torch

    from svc_model.config import load_config
    from svc_model.model import count_parameters
    from svc_model.train import Trainer

    cfg = load_config(profile)
    # A one-row manifest whose feature files have the profile's widths: the trainer checks them at start.
    tmp = Path(__import__("tempfile").mkdtemp())
    np.save(tmp / "ppg.npy", np.zeros((2, cfg.model.ppg_dim), np.float32))
    np.save(tmp / "vec.npy", np.zeros((2, cfg.model.vec_dim), np.float32))
    manifest = pd.DataFrame([{"segment_id": "x/0", "singer": "x", "split": "train", "audio": "", "pitch": "",
                              "ppg": str(tmp / "ppg.npy"), "vec": str(tmp / "vec.npy"), "speaker": "",
                              "duration_s": 1.0}])
    import svc_model.train as train_mod

    train_mod.singer_table = lambda *args: {}
    trainer = Trainer(cfg, manifest, tmp / "run", device=device, tensorboard=False, log=lambda _: None)
    batch = _random_batch(cfg, torch)
    trainer.train_step(batch)  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - started) / steps
    t = cfg.train
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
    return (f"| train | {profile} | {count_parameters(trainer.generator) / 1e6:.1f}M G + "
            f"{count_parameters(trainer.discriminator) / 1e6:.1f}M D | batch {t.batch_size} x {t.max_frames} frames, "
            f"crop {t.segment_size} | {per_step:.2f} s/step{gpu} | {peak_rss_mb():.0f} |")


def bench_convert(profile: str, device: str, seconds: float) -> str:
    import numpy as np
    import torch

    from svc_model.audio import decode, resample, to_mono
    from svc_model.config import load_config
    from svc_model.infer import Converter
    from svc_model.model import SVCModel

    cfg = load_config(profile)
    features = cfg.features.model_copy(update={
        "device": device,
        # base: hubert-soft's full architecture with seeded random weights (the real file is not here offline)
        "vec": cfg.features.vec.model_copy(update={"pretrained": False}) if profile == "base" else cfg.features.vec,
        "ppg": cfg.features.ppg.model_copy(update={"pretrained": False}) if profile == "base" else cfg.features.ppg,
        # base's mozilla-lstm needs best_model.pth.tar, which is not here offline: time resemblyzer instead
        "speaker": cfg.features.speaker.model_copy(update={"backend": "resemblyzer"})})
    cfg = cfg.model_copy(update={"features": features})
    model = SVCModel(cfg.model, cfg.spectrogram.n_fft // 2 + 1).to(device).eval()
    singers = {"target": {"embedding": np.ones(256, np.float32) / 16, "median_f0": 150.0}}
    converter = Converter(model, cfg, singers, device=device)
    data, sr = decode(ROOT / "examples/voices/speaker-d/57.flac")
    audio = resample(to_mono(data), sr, 32000)
    audio = np.tile(audio, int(np.ceil(seconds * 32000 / len(audio))))[: int(seconds * 32000)]
    converter.convert(audio[:32000], "target", 0, source_sr=32000)  # load extractors, warm up
    started = time.perf_counter()
    converter.convert(audio, "target", 0, source_sr=32000)
    total = time.perf_counter() - started
    frames = len(audio) // 320
    x = dict(ppg=torch.randn(1, cfg.model.ppg_dim, frames, device=device),
             vec=torch.randn(1, cfg.model.vec_dim, frames, device=device) if cfg.model.vec_dim else None,
             f0=torch.full((1, frames), 150.0, device=device), speaker=torch.randn(1, 256, device=device))
    model.infer(**{k: v[..., :100] if k != "speaker" else v for k, v in x.items()})
    started = time.perf_counter()
    model.infer(**x)
    if device == "cuda":
        torch.cuda.synchronize()
    model_only = time.perf_counter() - started
    return (f"| convert | {profile} | {seconds:.0f} s of audio | RTF {total / seconds:.3f} with features | "
            f"RTF {model_only / seconds:.3f} model only | {peak_rss_mb():.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only is not None:
        kind, profile = CASES[args.only]
        print(bench_train(profile, args.device, args.steps) if kind == "train"
              else bench_convert(profile, args.device, args.seconds), flush=True)
        return
    import torch

    print(f"device {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| what | profile | size | workload | speed | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | ---: |", flush=True)
    for i, (kind, profile) in enumerate(CASES):
        cmd = [sys.executable, __file__, "--only", str(i), "--device", args.device, "--steps", str(args.steps),
               "--seconds", str(args.seconds)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        rows = [line for line in out.stdout.splitlines() if line.startswith("|")]
        print(rows[-1] if rows else f"| {kind} | {profile} | failed | {out.stderr.strip()[-400:]} |", flush=True)


if __name__ == "__main__":
    main()
