"""Training seconds per step and conversion real-time factor for the tiny and base profiles, plus peak RSS.

    .venv/bin/python benchmarks/model.py [--device cpu] [--steps 3] [--seconds 10]

Each row runs in its own process so its peak RSS is its own. Training steps use random tensors of the
profile's shapes (batch_size x max_frames, a decoder crop of segment_size samples) through the full step:
generator (with the speaker classifier), the three discriminator families, every loss term, both optimizers; on
CUDA also the peak GPU memory. Conversion runs on a real recording (examples/voices/speaker-d/57.flac, repeated to
--seconds); "features included" adds pitch, PPG and vec extraction with the profile's extractors (seeded random
weights where no weights exist here: hubert-soft and Whisper large-v2 for base; resemblyzer stands in for base's
mozilla-lstm).

    .venv/bin/python benchmarks/model.py --case convert-base-cpu [--repeat 3] [--ct2-threads 2]

The base profile's file conversion on the CPU with CPU backends, stage by stage: pitch FCPE (real weights, from
torchfcpe), PPG Whisper large-v2 through CTranslate2 int8 cut to its first 24 encoder blocks + ln_post as
whisper-vits-svc uses it (RANDOM weights: no large-v2 offline; built once by :func:`random_ct2_whisper` under
``$SVC_BENCH_CACHE``, default /tmp/svc-bench-cache, never in the repo), vec hubert-soft (full architecture, RANDOM
weights), the base generator (RANDOM weights); the target is a stored singer (its mean embedding), so no speaker
encoder runs. Source: a real recording, examples/voices/speaker-d/51.flac (28.25 s), converted whole by
``Converter.convert`` with each stage timed in place; the median of ``--repeat`` runs after one warm-up. Per stage:
wall seconds and RTF, process CPU seconds (user + sys, both threads: less sensitive than wall time to other
processes on a shared machine) and minor page faults; the 1-minute load average before and after is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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
    model.infer(**{k: v[..., :100] if k != "speaker" and v is not None else v for k, v in x.items()})
    started = time.perf_counter()
    model.infer(**x)
    if device == "cuda":
        torch.cuda.synchronize()
    model_only = time.perf_counter() - started
    return (f"| convert | {profile} | {seconds:.0f} s of audio | RTF {total / seconds:.3f} with features | "
            f"RTF {model_only / seconds:.3f} model only | {peak_rss_mb():.0f} |")


# ---- base profile, CPU backends, stage by stage ---------------------------------------------------------------
CT2_CACHE = Path(os.environ.get("SVC_BENCH_CACHE", "/tmp/svc-bench-cache"))
# openai/whisper-large-v2's transformers config (the fields that shape the model)
LARGE_V2 = dict(vocab_size=51865, num_mel_bins=80, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                encoder_ffn_dim=5120, decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120,
                max_source_positions=1500, max_target_positions=448, pad_token_id=50257, bos_token_id=50257,
                eos_token_id=50257, decoder_start_token_id=50258, begin_suppress_tokens=[220, 50257],
                suppress_tokens=[])
CPU_SOURCE = ROOT / "examples/voices/speaker-d/51.flac"


def random_ct2_whisper(out: Path | None = None, seed: int = 0, kept: int = 24, decoder_layers: int = 1) -> Path:
    """A CTranslate2 int8 folder of Whisper large-v2's architecture with **seeded random weights**, cut as
    whisper-vits-svc's PPG uses it: the first ``kept`` (24) of the 32 encoder blocks, then the encoder's final
    layer norm (Whisper's ``ln_post``). A transformers ``WhisperForConditionalGeneration`` with large-v2's config
    and ``encoder_layers=kept`` is converted by ``ctranslate2.converters.TransformersConverter`` (what
    ``ct2-transformers-converter`` runs), as ``ppg.py`` says a truncated real model would be. The decoder (which
    ``encode`` never runs) has ``decoder_layers`` layers to save memory; the vocabulary is a placeholder of
    large-v2's size with its special tokens. Built once, outside the repo; ``random_weights.json`` in the folder
    says what it is. Only the timings mean anything: the features are noise."""
    out = out or CT2_CACHE / f"whisper-large-v2-blocks{kept}of32-random-seed{seed}-ct2-int8"
    label = {"weights": "RANDOM (seeded; not OpenAI's)", "seed": seed, "architecture": "whisper large-v2",
             "encoder_blocks": f"first {kept} of 32, then the final layer norm (ln_post)",
             "decoder_layers": f"{decoder_layers} (of 32; unused by encode)", "quantization": "int8",
             "built_by": "benchmarks/model.py random_ct2_whisper"}
    marker = out / "random_weights.json"
    if (out / "model.bin").is_file() and marker.is_file() and json.loads(marker.read_text()) == label:
        return out
    import shutil
    import tempfile

    import ctranslate2
    import torch
    import transformers
    from whisper.tokenizer import LANGUAGES

    config = transformers.WhisperConfig(**{**LARGE_V2, "encoder_layers": kept, "decoder_layers": decoder_layers})
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(config).eval().half()  # about 1 GB in fp16
    model.generation_config.suppress_tokens = []
    model.generation_config.begin_suppress_tokens = [220, 50257]

    # large-v2's token ids: 50257 text tokens (placeholders here), then its special tokens; the converter adds the
    # 1501 timestamp tokens up to vocab_size
    languages = [f"<|{code}|>" for code in list(LANGUAGES)[:99]]
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + languages
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                   "<|notimestamps|>"])
    vocab = {**{f"<|placeholder{i}|>": i for i in range(50257)}, **{t: 50257 + i for i, t in enumerate(specials)}}

    class Tokenizer:
        additional_special_tokens = languages

        def get_vocab(self):
            return vocab

        def convert_tokens_to_ids(self, token):
            return vocab[token]

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            return model  # the in-memory random model; only its config is on disk

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return Tokenizer()

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
    try:
        config.save_pretrained(work / "hf")
        Converter(str(work / "hf")).convert(str(work / "ct2"), quantization="int8", force=True)
        (work / "ct2" / "random_weights.json").write_text(json.dumps(label, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        (work / "ct2").rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


class _Clock:
    """Seconds spent in each stage of one ``Converter.convert`` call, measured in place: extractors' ``extract``
    wrapped, forward hooks on the generator's parts, the NSF source (built once per track) wrapped."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # process CPU seconds (user + sys, all threads)
        self.faults: dict[str, int] = {}  # minor page faults (fresh memory touched: 4 KiB each)

    @staticmethod
    def now() -> tuple[float, float, int]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_minflt

    def add(self, stage: str, start: tuple[float, float, int]) -> None:
        end = self.now()
        self.spent[stage] = self.spent.get(stage, 0.0) + end[0] - start[0]
        self.cpu[stage] = self.cpu.get(stage, 0.0) + end[1] - start[1]
        self.faults[stage] = self.faults.get(stage, 0) + end[2] - start[2]

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, start)
        return timed

    def hook(self, stage: str, module) -> None:
        starts: list[tuple[float, float, int]] = []
        module.register_forward_pre_hook(lambda *_: starts.append(self.now()))
        module.register_forward_hook(lambda *_: self.add(stage, starts.pop()))


class _TimedExtractor:
    def __init__(self, inner, clock: _Clock, stage: str):
        self.inner, self.extract = inner, clock.wrap(stage, inner.extract)

    def __getattr__(self, name):
        return getattr(self.inner, name)


CPU_STAGES = [  # (key, stage, what runs, weights)
    ("pitch", "pitch", "FCPE (torchfcpe)", "real"),
    ("ppg", "PPG", ("Whisper large-v2, first 24 of 32 encoder blocks + ln_post, CTranslate2 {compute_type}, 15 s "
                    "pieces"), "random"),
    ("vec", "vec", "hubert-soft (HuBERT-base + 256-d proj), fp32, 20 s pieces", "random"),
    ("prior", "generator: prior encoder", "PPG + vec + pitch -> VITS transformer, 6 layers", "random"),
    ("flow", "generator: flow", "4 couplings, reverse", "random"),
    ("source", "generator: NSF source", "harmonic source, whole track once", "none (fixed)"),
    ("decoder", "generator: decoder", "BigVGAN-style, anti-aliased Snake, 32 kHz", "random"),
]


DECODER_CONTEXT = 32  # frames each side: the base decoder's receptive field is +-23.4 frames (7,500 samples)


def decode_in_pieces(decoder, piece_frames: int, context: int = DECODER_CONTEXT):
    """Makes ``decoder`` synthesize a long latent in pieces of ``piece_frames`` frames, each with ``context``
    frames of the latent and source on both sides, cut off afterwards. The decoder's receptive field is +-23.4
    frames (measured: one latent frame or one source sample changes nothing further away), so with 32 frames of
    context the result is the whole-piece decoding's. Smaller tensors (under glibc's 32 MiB mmap threshold)
    avoid the page faults of fresh multi-hundred-MB buffers. A benchmark option, not the converter's behaviour."""
    import torch

    whole, hop = decoder.forward, decoder.hop
    c = decoder.source_context  # the source carries c frames before frame 0 and after the last

    def forward(z, speaker, f0=None, source=None, noise=None):
        frames = z.shape[-1]
        if source is None or decoder.training or frames <= piece_frames + 2 * context:
            return whole(z, speaker, f0=f0, source=source, noise=noise)
        out = []
        for start in range(0, frames, piece_frames):
            end = min(frames, start + piece_frames)
            lo, hi = max(0, start - context), min(frames, end + context)
            y = whole(z[..., lo:hi], speaker, source=source[..., lo * hop : (hi + 2 * c) * hop])
            out.append(y[..., (start - lo) * hop : (end - lo) * hop])
        return torch.cat(out, dim=-1)

    decoder.forward = forward


def bench_convert_cpu(threads: int, ct2_threads: int, repeat: int, chunk_s: float, source: Path,
                      inference_mode: bool, decoder_piece_s: float = 0.0, cache_weights: bool = False,
                      ct2_compute_type: str = "int8") -> list[str]:
    """The base profile's file conversion with CPU backends, stage by stage (see the module docstring)."""
    import contextlib

    import numpy as np
    import torch
    from torch.nn.utils import parametrize

    from svc_model.audio import decode, resample, to_mono
    from svc_model.config import load_config
    from svc_model.features.pitch import FcpePitch
    from svc_model.features.ppg import CTranslate2PPG
    from svc_model.features.vec import HubertSoftVec
    from svc_model.infer import Converter
    from svc_model.model import SVCModel, count_parameters

    torch.set_num_threads(threads)
    cfg = load_config("base")
    ct2 = random_ct2_whisper()
    pitch_cfg = cfg.features.pitch
    clock = _Clock()
    extractors = {
        "pitch": FcpePitch(threshold=pitch_cfg.fcpe_threshold, fmin=pitch_cfg.fmin, fmax=pitch_cfg.fmax,
                           median_filter=pitch_cfg.median_filter, device="cpu"),
        # the cut (24 of 32 blocks + ln_post) is in the converted model, so no drop_last_fraction here
        "ppg": CTranslate2PPG(model=str(ct2), compute_type=ct2_compute_type, intra_threads=ct2_threads, device="cpu",
                              piece_s=cfg.features.ppg.piece_s),
        "vec": HubertSoftVec(pretrained=False, seed=0, device="cpu"),
    }
    extractors = {k: _TimedExtractor(v, clock, k) for k, v in extractors.items()}
    torch.manual_seed(0)
    model = SVCModel(cfg.model, cfg.spectrogram.n_fft // 2 + 1).eval()
    for key, module in (("prior", model.prior_encoder), ("flow", model.flow), ("decoder", model.decoder)):
        clock.hook(key, module)
    model.decoder.source = clock.wrap("source", model.decoder.source)
    # a stored singer: conversion uses its mean embedding, no speaker encoder runs per call
    singers = {"target": {"embedding": np.ones(256, np.float32) / 16, "median_f0": 150.0}}
    converter = Converter(model, cfg, singers, device="cpu", extractors=extractors)
    data, sr = decode(source)
    audio = resample(to_mono(data), sr, 32000)
    seconds = len(audio) / 32000

    def once():
        clock.spent.clear()
        clock.faults.clear()
        clock.cpu.clear()
        start = clock.now()
        with (torch.inference_mode() if inference_mode else torch.no_grad(),
              parametrize.cached() if cache_weights else contextlib.nullcontext()):
            result = converter.convert(audio, "target", 0, source_sr=32000, max_chunk_s=chunk_s)
        clock.add("total", start)
        return {**clock.spent, "chunks": result.chunks, "faults": dict(clock.faults), "cpu": dict(clock.cpu)}

    load_before = os.getloadavg()
    check = ""
    if decoder_piece_s:
        with torch.no_grad():
            reference = converter.convert(audio, "target", 0, source_sr=32000, max_chunk_s=chunk_s).audio
        decode_in_pieces(model.decoder, round(decoder_piece_s * 100))
        with torch.no_grad():
            pieces = converter.convert(audio, "target", 0, source_sr=32000, max_chunk_s=chunk_s).audio
        check = (f"; decoder in {decoder_piece_s:g} s pieces (+-{DECODER_CONTEXT} frames of context): output max abs "
                 f"difference vs whole pieces {float(np.abs(pieces - reference).max()):.1e} "
                 f"(output peak {float(np.abs(reference).max()):.2f})")
    once()  # warm-up: first calls allocate, pick kernels
    runs = [once() for _ in range(repeat)]
    load_after = os.getloadavg()
    med = {key: statistics.median(r.get(key, 0.0) for r in runs) for key in runs[0] if key not in ("faults", "cpu")}
    generator = statistics.median(sum(r.get(k, 0.0) for k in ("prior", "flow", "source", "decoder")) for r in runs)
    other = statistics.median(r["total"] - sum(r.get(k, 0.0) for k, *_ in CPU_STAGES) for r in runs)
    label = (f"{threads} torch threads, CTranslate2 intra_threads {ct2_threads or 'default'}, compute type "
             f"{ct2_compute_type}")
    lines = [(f"source {source.relative_to(ROOT) if source.is_relative_to(ROOT) else source}: {seconds:.2f} s, "
              f"{runs[0]['chunks']} piece(s) of at most {chunk_s:g} s; {label}"
              f"{'; inference_mode' if inference_mode else ''}"
              f"{'; weight-norm weights computed once per call (parametrize.cached)' if cache_weights else ''}"
              f"{check}; median of {repeat} after one warm-up; "
              f"generator {count_parameters(model) / 1e6:.1f}M parameters; PPG model {ct2}"),
             f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; {os.cpu_count()} CPUs",
             "| stage | what runs | weights | seconds | RTF | CPU s | page faults |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]

    def faults(key):  # CPU seconds (user + sys, both threads) and minor page faults, medians
        return (f"{statistics.median(r['cpu'].get(key, 0.0) for r in runs):.2f} | "
                f"{statistics.median(r['faults'].get(key, 0) for r in runs) / 1e3:.0f}k")

    for key, stage, what, weights in CPU_STAGES:
        what = what.format(compute_type=ct2_compute_type)
        lines.append(f"| {stage} | {what} | {weights} | {med.get(key, 0.0):.2f} | {med.get(key, 0.0) / seconds:.3f} "
                     f"| {faults(key)} |")
        if key == "decoder":
            lines.append(f"| generator (the four above) | base SVCModel | random | {generator:.2f} | "
                         f"{generator / seconds:.3f} | | |")
    lines.append(f"| other | resampling, chunking, crossfades | - | {other:.2f} | {other / seconds:.3f} | | |")
    lines.append(f"| **end to end** | `Converter.convert` | | {med['total']:.2f} | **{med['total'] / seconds:.3f}** "
                 f"| {faults('total')} |")
    lines.append(f"peak RSS {peak_rss_mb():.0f} MB; end-to-end runs: "
                 + ", ".join(f"{r['total'] / seconds:.3f}" for r in runs))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=["profiles", "convert-base-cpu"], default="profiles",
                        help="profiles: training and conversion, tiny and base (default); convert-base-cpu: the "
                        "base profile's file conversion on the CPU with CPU backends, stage by stage (random-weight "
                        "PPG/vec/generator)")
    parser.add_argument("--threads", type=int, default=2, help="convert-base-cpu: torch threads")
    parser.add_argument("--ct2-threads", type=int, default=2,
                        help="convert-base-cpu: CTranslate2 intra_threads (0: its default)")
    parser.add_argument("--ct2-compute-type", default="int8", choices=["int8", "int8_float32", "float32"],
                        help="convert-base-cpu: CTranslate2's compute type for the PPG model (the int8 folder is "
                        "dequantized at load for float32)")
    parser.add_argument("--repeat", type=int, default=3, help="convert-base-cpu: timed runs (the median is shown)")
    parser.add_argument("--chunk-s", type=float, default=15.0,
                        help="convert-base-cpu: Converter.convert's max_chunk_s (default 15, the converter's; another "
                        "value changes the output: PPG and vec see other pieces)")
    parser.add_argument("--inference-mode", action="store_true",
                        help="convert-base-cpu: run the conversion under torch.inference_mode()")
    parser.add_argument("--source", type=Path, default=CPU_SOURCE, help="convert-base-cpu: the recording")
    parser.add_argument("--cache-weights", action="store_true",
                        help="convert-base-cpu: compute weight-normed weights once per call "
                        "(torch.nn.utils.parametrize.cached(); same output)")
    parser.add_argument("--decoder-piece-s", type=float, default=0.0,
                        help="convert-base-cpu: run the decoder in pieces of this many seconds with 0.32 s of "
                        "context (same output; checked against whole pieces and printed); 0: off")
    parser.add_argument("--build-ct2", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_ct2:
        print(random_ct2_whisper())
        return
    if args.case == "convert-base-cpu":
        # the random CTranslate2 model is built in its own process, so that its memory is not this run's peak RSS
        subprocess.run([sys.executable, __file__, "--build-ct2"], check=True, stdout=subprocess.DEVNULL)
        print("\n".join(bench_convert_cpu(args.threads, args.ct2_threads, args.repeat, args.chunk_s,
                                           args.source.resolve(), args.inference_mode, args.decoder_piece_s,
                                           args.cache_weights, args.ct2_compute_type)),
              flush=True)
        return
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
