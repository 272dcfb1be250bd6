"""``svc demo``: the offline CPU demo, end to end on a workspace of its own (``demo/`` by default).

Three bundled voices through Dagster (clean audio, features), a tiny model trained on the CPU, promoted (forced,
with the reason recorded, where the evaluation refuses it), a held-back voice converted into each singer; then the
fourth voice is added, only its partitions are built, and the model is fine-tuned into a 'candidate' version.
Every step reuses what a previous run left, so a rerun does nothing.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from assets.workspace import PROJECT_ROOT, Workspace, init_workspace
from orchestration import service
from svc_model.storage import atomic_write_text

DEMO_VOICES_DIR = PROJECT_ROOT / "examples" / "voices"
DEMO_SINGERS = ["speaker-a", "speaker-b", "speaker-c"]  # speaker-d is kept back for the incremental rebuild
DEMO_SOURCE = DEMO_VOICES_DIR / "speaker-d" / "57.flac"  # the held-back voice, used as the song to convert
DEMO_NEW_SINGER = "speaker-d"  # added in the demo's last act
DEMO_FINE_TUNE_STEPS = 100
DEMO_USER = "svc demo"  # who promotes, on the version's promotion.by tag
DEMO_FORCE_REASON = ("offline CPU demo: the tiny profile trains for minutes on two cores with a random HuBERT and "
                     "does not reach the evaluation thresholds; promoted so that conversion can be shown")


def run_demo(root: Path, *, train_steps: int | None, fine_tune_steps: int) -> None:
    """The whole demo in ``root``; raises WorkspaceError, ValueError, FileNotFoundError or RuntimeError."""
    from assets import tracking
    from orchestration.build import asset_status, open_instance
    from orchestration.build import build as run_build
    from orchestration.definitions import build_definitions

    started = time.perf_counter()
    click.secho(f"== VoiceCraft SVC demo in {root}", bold=True)
    ws = init_workspace(root)
    instance = open_instance(ws)
    try:
        for singer in DEMO_SINGERS:
            if singer in ws.singers():
                click.echo(f"singer {singer!r} already added (reusing)")
                continue
            service.add_singer_reported(ws, singer, [str(DEMO_VOICES_DIR / singer)], append=False, push=True,
                                        instance=instance, echo=click.echo)
        t_build = time.perf_counter()
        click.secho("== building clean_audio and the features (only stale or missing partitions)", bold=True)
        steps = run_build(ws, instance=instance, log=click.echo)
        build_s = time.perf_counter() - t_build
        t_train = time.perf_counter()
        defs = build_definitions(ws)
        if all(asset_status(defs, instance, a) == "fresh" for a in ("svc_checkpoint", "evaluation_report")):
            click.echo("the model is already trained and evaluated on the current training set (reusing)")
        else:
            click.secho(f"== training the {ws.settings.config} model on the CPU through Dagster: training_set -> "
                        "svc_checkpoint (MLflow run, registered version) -> evaluation_report", bold=True)
            service.run_training(ws, ["--device", "cpu"] + (["--steps", str(train_steps)] if train_steps else []))
        train_s = time.perf_counter() - t_train
        click.secho("== promoting the candidate to production", bold=True)
        promotion = _promote(ws)
        production = tracking.alias_version(ws, tracking.PRODUCTION)
        click.secho("== converting a held-back voice into each singer with the production model", bold=True)
        conversions = _conversions(ws, tracking.resolve_model(ws, tracking.PRODUCTION).path)
        click.secho("\n== summary", bold=True)
        _print_summary(ws, production, promotion, train_s, conversions)
        click.echo(f"materialized {len(steps)} partition run(s) in {build_s:.1f} s")
        _add_fourth_singer(ws, instance, full_build_s=build_s if steps else None, fine_tune_steps=fine_tune_steps)
    finally:
        instance.dispose()
    click.echo(f"demo total {time.perf_counter() - started:.1f} s")
    print_next_steps(ws)


def _promote(ws: Workspace) -> str:
    """Promote the candidate; where the rules refuse it, show why and force it with a recorded reason."""
    from assets import tracking
    from assets.promotion import PromotionError

    production = tracking.alias_version(ws, tracking.PRODUCTION)
    if production is not None:  # a person promotes later candidates (the last act leaves one)
        click.echo(f"version {production.version} is already in production (reusing)")
        return "already in production"
    try:
        done = service.promote(ws, user=DEMO_USER)
    except PromotionError as exc:
        click.secho(f"promotion refused: {exc}", fg="yellow")
        click.echo(f"forcing it for the demo, with the reason recorded on the version: {DEMO_FORCE_REASON}")
        done = service.promote(ws, force=True, reason=DEMO_FORCE_REASON, user=DEMO_USER)
    click.echo(done.message)
    return "forced, reason recorded" if done.forced else "passed its checks"


def _conversions(ws: Workspace, checkpoint: Path) -> list[str]:
    from svc_model.audio import write_audio
    from svc_model.infer import Converter

    converter = Converter.from_checkpoint(checkpoint, root=ws.root)
    lines = []
    for singer in DEMO_SINGERS:
        out = ws.outputs_dir / "demo" / f"{DEMO_SOURCE.stem}-to-{singer}.wav"
        result = converter.convert(str(DEMO_SOURCE), singer, "auto")
        write_audio(out, result.audio, result.sample_rate)
        lines.append(f"{out.relative_to(ws.root)}: {len(result.audio) / result.sample_rate:.1f} s, shift "
                     f"{result.pitch_shift:+.0f} st, {result.seconds:.1f} s to convert")
        click.echo(f"  wrote {lines[-1]}")
    return lines


def _print_summary(ws: Workspace, production, promotion: str, train_s: float, conversions: list[str]) -> None:
    from assets import tracking

    _print_singer_table(ws, DEMO_SINGERS)
    tags = production.tags or {}
    mel = [m.value for m in sorted(tracking.client(ws).get_metric_history(production.run_id, "train/mel"),
                                   key=lambda m: m.step)]
    if mel:
        click.echo(f"training: {len(mel)} steps, mel loss (mean of 10 steps) {sum(mel[:10]) / len(mel[:10]):.3f} -> "
                   f"{sum(mel[-10:]) / len(mel[-10:]):.3f}; this invocation {train_s:.0f} s")
    click.echo(f"model: {ws.settings.registered_model_name} version {production.version} in production "
               f"({promotion}); MLflow run {tracking.run_url(ws, production.run_id)}")
    figures = ", ".join(f"{k} {float(tags[f'eval.{k}']):.3f}" for k in (
        "f0_corr", "f0_rmse_cents", "vuv_error", "target_similarity", "source_similarity", "reconstruction_mel", "rtf")
        if f"eval.{k}" in tags)
    verdict = "passed" if tags.get("eval.passed") == "true" else "FAILED: " + tags.get("eval.failed_checks", "?")
    click.echo(f"evaluation (held-out segments into every singer): {figures}; checks {verdict}")
    for line in conversions:
        click.echo(f"  {line}")


def _print_singer_table(ws: Workspace, singers: list[str]) -> None:
    """Segments, minutes and pitch statistics per singer, and which extractors made the features."""
    import pandas as pd

    from svc_model.preprocess import load_manifest

    click.echo(f"{'singer':<12} {'files':>5} {'segments':>8} {'minutes':>8} {'voiced':>7} {'median f0':>10}")
    backends = {}
    for singer in singers:
        manifest = load_manifest(ws.partition_dir("clean_audio", singer))
        pitch_dir = ws.partition_dir("pitch", singer)
        voiced, f0 = "-", "-"
        if (pitch_dir / "manifest.parquet").exists():
            pitch = pd.read_parquet(pitch_dir / "manifest.parquet")
            weights = pitch["frames"] / pitch["frames"].sum()
            voiced = f"{(pitch['voiced_ratio'] * weights).sum():.2f}"
            f0 = f"{pitch['median_f0_hz'].median():.0f} Hz"
        for feature in ("pitch", "ppg", "vec", "speaker_embedding"):
            path = ws.partition_dir(feature, singer) / "manifest.parquet"
            if path.exists():
                row = pd.read_parquet(path, columns=["backend", "pretrained"]).iloc[0]
                backends[feature] = f"{row['backend']} ({'pretrained' if row['pretrained'] else 'RANDOM weights'})"
        click.echo(f"{singer:<12} {manifest['source_file'].nunique():>5} {len(manifest):>8} "
                   f"{manifest['duration_s'].sum() / 60:>8.2f} {voiced:>7} {f0:>10}")
    for feature, backend in backends.items():
        click.echo(f"  {feature:<18} {backend}")


def _add_fourth_singer(ws: Workspace, instance, *, full_build_s: float | None, fine_tune_steps: int) -> None:
    """The incremental path: add the fourth voice, build only its partitions, fine-tune into a 'candidate'."""
    from assets import tracking
    from orchestration.build import asset_status
    from orchestration.build import build as run_build
    from orchestration.definitions import build_definitions

    click.secho(f"\n== adding a fourth singer, {DEMO_NEW_SINGER}: only its partitions are built", bold=True)
    timings = ws.outputs_dir / "demo" / "timings.json"
    recorded = json.loads(timings.read_text()) if timings.is_file() else {}
    if full_build_s is not None and DEMO_NEW_SINGER not in ws.singers():
        recorded["full_build_s"] = round(full_build_s, 1)  # the first build, of the three first singers
        atomic_write_text(timings, json.dumps(recorded))
    if DEMO_NEW_SINGER in ws.singers():
        click.echo(f"singer {DEMO_NEW_SINGER!r} already added (reusing)")
    else:
        service.add_singer_reported(ws, DEMO_NEW_SINGER, [str(DEMO_VOICES_DIR / DEMO_NEW_SINGER)], append=False,
                                    push=True, instance=instance, echo=click.echo)
    t_build = time.perf_counter()
    steps = run_build(ws, instance=instance, log=click.echo)
    build_s = time.perf_counter() - t_build
    built = [f"{a}[{step.singer}]" for step in steps for a in step.assets]
    first = recorded.get("full_build_s")
    click.echo(f"materialized {len(built)} partition(s): {', '.join(built) or 'none (up to date)'} in {build_s:.1f} s"
               + (f"; the first full build of {len(DEMO_SINGERS)} singers took {first:.1f} s" if first else ""))
    if asset_status(build_definitions(ws), instance, "training_set") == "fresh":
        click.echo("the training set already includes every singer (reusing the fine-tuned version)")
    else:
        click.secho(f"== fine-tuning the production model on {len(ws.singers())} singers for {fine_tune_steps} steps "
                    "-> evaluation -> a 'candidate' version", bold=True)
        service.run_training(ws, ["--device", "cpu", "--fine-tune", "--steps", str(fine_tune_steps)])
    candidate = tracking.alias_version(ws, tracking.CANDIDATE)
    production = tracking.alias_version(ws, tracking.PRODUCTION)
    base = tracking.client(ws).get_run(candidate.run_id).data.tags.get("fine_tuned_from_version") or "-"
    click.echo(f"version {candidate.version} (fine-tuned from version {base}) is 'candidate'; production stays "
               f"version {production.version}. Compare with `svc -C {ws.root} models`, promote with "
               f"`svc -C {ws.root} promote`")


def print_next_steps(ws: Workspace) -> None:
    venv_bin = Path(sys.executable).parent
    click.echo("\nWhere to look next:")
    click.echo(f"  Dagster UI:  {venv_bin / 'svc'} -C {ws.root} ui        # then http://127.0.0.1:3000")
    click.echo(f"  MLflow UI:   {venv_bin / 'mlflow'} ui --backend-store-uri {ws.tracking_uri} "
               f"--default-artifact-root {ws.artifact_root} --port 5000")
    click.echo(f"  TensorBoard: {venv_bin / 'svc'} -C {ws.root} tensorboard   # then http://127.0.0.1:6006")
    click.echo(f"  Studio:      {venv_bin / 'svc'} -C {ws.root} studio        # then http://127.0.0.1:7860")
    click.echo(f"  Status:      {venv_bin / 'svc'} -C {ws.root} status; {venv_bin / 'svc'} -C {ws.root} models")
