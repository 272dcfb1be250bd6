"""Conversion quality of the tiny profile against its training budget.

    .venv/bin/python benchmarks/quality.py [--budgets 300 1000 3000] [--work /tmp/svc-quality]

Trains the CPU profile (configs/tiny.yaml: Whisper tiny.en PPG, FCPE pitch, resemblyzer speaker embedding, no vec)
on three bundled voices (speaker-a, speaker-b, speaker-d; every clip) for growing budgets, resuming from the last
budget's checkpoint, and after each budget converts the fourth voice (speaker-c, never trained on) into each of
the three singers with ``pitch_shift="auto"`` in deterministic mode. Per budget it prints, averaged over every
(clip, singer) pair:

- f0 correlation and RMSE in cents between the f0 fed to the decoder and the f0 of the output as FCPE hears it
  (the evaluation's metric), and the correlation as librosa's pYIN hears it (an independent estimator);
- V/UV error (frames whose voicing differs);
- resemblyzer cosine similarity of the output to the target singer's mean embedding and to the source voice's;
- content: the character error rate between Whisper tiny.en's transcripts of the source clip and of the output
  (``svc_model.evaluate.Transcriber``): a model that sings the pitch but drops the words scores near 1.

Figures land in ``<work>/quality.json``. Nothing here is a test: it measures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAIN_VOICES = ("speaker-a", "speaker-b", "speaker-d")
SOURCE_VOICE = "speaker-c"


def build_features(cfg, work: Path, log=print):
    """clean_audio + features for the three training voices and the source voice (tiny profile, no Dagster)."""
    import pandas as pd

    from svc_model.data import join_singer
    from svc_model.features import build_extractor
    from svc_model.features.store import extract_to_dir
    from svc_model.preprocess import clean_singer, load_manifest

    extractors = {f: build_extractor(f, cfg.features) for f in ("pitch", "ppg", "vec", "speaker_embedding")}
    frames = []
    for voice in (*TRAIN_VOICES, SOURCE_VOICE):
        dirs = {a: work / "features" / a / voice for a in ("clean_audio", *extractors)}
        if not (dirs["speaker_embedding"] / "manifest.parquet").is_file():
            for d in dirs.values():
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
            clean_singer(ROOT / "examples" / "voices" / voice, dirs["clean_audio"], voice, cfg.audio,
                         log=lambda _: None)
            segments = load_manifest(dirs["clean_audio"])
            for feature, extractor in extractors.items():
                extract_to_dir(extractor, segments, dirs[feature], log=lambda _: None)
        frames.append(join_singer(voice, dirs["clean_audio"], {f: dirs[f] for f in extractors}, 0.0))
        log(f"features: {voice}: {len(frames[-1])} segments, {frames[-1]['duration_s'].sum():.1f} s")
    manifest = pd.concat(frames, ignore_index=True)
    return manifest[manifest["singer"] != SOURCE_VOICE], manifest[manifest["singer"] == SOURCE_VOICE], extractors


def measure(converter, source_rows, extractors, max_clips: int, transcriber=None) -> dict[str, float]:
    from svc_model.audio import read_wav, resample
    from svc_model.evaluate import Transcriber, character_error_rate, f0_metrics, pitch_following
    from svc_model.features.speaker import mean_embedding

    sr = converter.cfg.audio.sample_rate
    source_mean = mean_embedding(np.stack([np.load(p) for p in source_rows["speaker"]]))
    transcriber = transcriber or Transcriber()
    records = []
    for row in source_rows.head(max_clips).itertuples():
        audio, _ = read_wav(row.audio)
        said = transcriber(resample(audio, sr, 16000))
        for target in sorted(converter.singers):
            result = converter.convert(audio, target, "auto", source_sr=sr, deterministic=True)
            out16 = resample(result.audio, sr, 16000)
            reference = np.stack([result.output_f0, (result.output_f0 > 0).astype(np.float32)], axis=1)
            record = f0_metrics(reference, extractors["pitch"].extract(out16))
            record["f0_corr_pyin"] = pitch_following(result.output_f0, result.audio, sr)
            embedding = extractors["speaker_embedding"].extract(out16)
            target_mean = converter.singers[target].embedding
            record["target_similarity"] = float(np.dot(embedding, target_mean))
            record["source_similarity"] = float(np.dot(embedding, source_mean))
            record["content_cer"] = character_error_rate(said, transcriber(out16))
            records.append(record)
    keys = ("f0_corr", "f0_corr_pyin", "f0_rmse_cents", "vuv_error", "target_similarity", "source_similarity",
            "content_cer")
    return {k: float(np.nanmean([r[k] for r in records])) for k in keys} | {"pairs": len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[300, 1000, 3000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/svc-quality"))
    parser.add_argument("--clips", type=int, default=4, help="source clips converted into each singer")
    parser.add_argument("--config", default="tiny")
    args = parser.parse_args()

    from svc_model.config import load_config
    from svc_model.infer import Converter
    from svc_model.train import Trainer

    cfg = load_config(args.config)
    args.work.mkdir(parents=True, exist_ok=True)
    train_rows, source_rows, extractors = build_features(cfg, args.work)
    trainer = Trainer(cfg, train_rows, args.work / "run", device="cpu", tensorboard=False,
                      log=lambda m: print(m, flush=True))
    results_path = args.work / "quality.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    started = time.perf_counter()
    for budget in sorted(args.budgets):
        if trainer.step < budget:
            trainer.fit(steps=budget - trainer.step)
        # The budget's own checkpoint: a run resumed past a budget must not measure a later step under its name.
        checkpoint = args.work / "run" / f"step-{budget:08d}.pt"
        if not checkpoint.is_file():
            if str(budget) in results:
                print(f"budget {budget}: kept from {results_path} (the run is past it)", flush=True)
                continue
            raise SystemExit(f"{checkpoint}: missing, and {results_path} has no figures for budget {budget}; "
                             f"the run in {args.work / 'run'} is at step {trainer.step}")
        converter = Converter.from_checkpoint(checkpoint, extractors=extractors)
        results[str(budget)] = measure(converter, source_rows, extractors, args.clips)
        results[str(budget)]["train_seconds_total"] = round(time.perf_counter() - started, 1)
        results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps({budget: results[str(budget)]}), flush=True)
    print("\n| steps | f0 corr (FCPE) | f0 corr (pYIN) | f0 RMSE (cents) | V/UV error | sim. to target | "
          "sim. to source | content CER | pairs |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for budget in sorted(args.budgets):
        r = results[str(budget)]
        print(f"| {budget} | {r['f0_corr']:.3f} | {r['f0_corr_pyin']:.3f} | {r['f0_rmse_cents']:.0f} | "
              f"{r['vuv_error']:.3f} | {r['target_similarity']:.3f} | {r['source_similarity']:.3f} | "
              f"{r.get('content_cer', float('nan')):.2f} | {r['pairs']} |")


if __name__ == "__main__":
    main()
