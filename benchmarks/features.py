"""Real-time factor of every feature extractor and backend on the same audio, plus peak RSS.

    .venv/bin/python benchmarks/features.py [--seconds 30] [--device cpu]

RTF = compute seconds / audio seconds (below 1 is faster than real time). Each extractor is loaded and warmed
up on one clip first; the timed pass then runs over the whole set as one partition would (``extract_batch``).
Whisper (openai-whisper) and HuBERT run with seeded random weights of the real architectures (no weights can
be downloaded here); their speed is the architecture's, their outputs are meaningless.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from svc_model.audio import decode, resample, to_mono  # noqa: E402

VOICES = Path(__file__).resolve().parent.parent / "examples" / "voices"


def load_audio(seconds: float) -> list[np.ndarray]:
    clips, total = [], 0.0
    for path in sorted(VOICES.glob("speaker-*/*.flac")):
        audio, sr = decode(path)
        clip = resample(to_mono(audio), sr, 16000)
        if len(clip) < 16000:
            continue
        clips.append(clip)
        total += len(clip) / 16000
        if total >= seconds:
            break
    return clips


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per extractor (real voices)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--whisper-size", default="tiny", help="openai-whisper architecture (random weights)")
    parser.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)  # one row, in a subprocess
    args = parser.parse_args()

    import torch

    from svc_model.features.pitch import CrepePitch, FcpePitch
    from svc_model.features.ppg import CTranslate2PPG, WhisperPPG
    from svc_model.features.speaker import ResemblyzerSpeaker
    from svc_model.features.vec import HubertVec

    dev = dict(device=args.device)
    candidates = [
        ("pitch", "crepe full", lambda: CrepePitch(model="full", **dev)),
        ("pitch", "crepe tiny", lambda: CrepePitch(model="tiny", **dev)),
        ("pitch", "fcpe", lambda: FcpePitch(**dev)),
        ("ppg", f"openai-whisper {args.whisper_size} (random weights)",
         lambda: WhisperPPG(model=args.whisper_size, pretrained=False, **dev)),
        ("ppg", "ctranslate2 tiny.en int8 (real weights)", lambda: CTranslate2PPG(model="bundled", **dev)),
        ("vec", "hubert base arch (random weights)",
         lambda: HubertVec(pretrained=False, random_hidden_size=768, random_layers=12, layer=9, **dev)),
        ("vec", "hubert tiny profile (random 128x2)", lambda: HubertVec(pretrained=False, layer=2, **dev)),
        ("speaker", "resemblyzer", lambda: ResemblyzerSpeaker(**dev)),
    ]
    if args.only is None:
        # Each extractor runs in its own process, so that its peak RSS is its own.
        clips = load_audio(args.seconds)
        print(f"audio: {len(clips)} clips, {sum(len(c) for c in clips) / 16000:.1f} s of real speech at 16 kHz; "
              f"device {args.device}; torch threads {torch.get_num_threads()}")
        print("| feature | backend | load s | RTF | x real time | peak RSS MB |")
        print("| --- | --- | ---: | ---: | ---: | ---: |", flush=True)
        for i in range(len(candidates)):
            cmd = [sys.executable, __file__, "--only", str(i), "--seconds", str(args.seconds),
                   "--device", args.device, "--whisper-size", args.whisper_size]
            out = subprocess.run(cmd, capture_output=True, text=True)
            rows = [line for line in out.stdout.splitlines() if line.startswith("|")]
            print(rows[-1] if rows else f"| {candidates[i][0]} | {candidates[i][1]} | failed: {out.stderr[-300:]} |",
                  flush=True)
        return
    clips = load_audio(args.seconds)
    seconds = sum(len(c) for c in clips) / 16000
    for feature, name, make in candidates[args.only : args.only + 1]:
        started = time.perf_counter()
        extractor = make()
        extractor.extract(clips[0][:16000])
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        extractor.extract_batch(clips)
        elapsed = time.perf_counter() - started
        rtf = elapsed / seconds
        print(f"| {feature} | {name} | {load_s:.1f} | {rtf:.3f} | {1 / rtf:.1f} | {peak_rss_mb():.0f} |", flush=True)
        del extractor


if __name__ == "__main__":
    main()
