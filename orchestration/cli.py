"""The ``svc`` command line. Every command takes ``-C/--workspace DIR``."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from pathlib import Path

import click

from assets.workspace import PROJECT_ROOT, Workspace, WorkspaceError, init_workspace


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


def with_workspace(fn):
    """Add ``-C/--workspace`` to a command and pass the resolved :class:`Workspace` as ``ws``."""

    @click.option("-C", "--workspace", "workspace_dir", type=click.Path(file_okay=False), default=None,
                  help="Workspace folder (default: $SVC_WORKSPACE, the enclosing workspace, or the project root).")
    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx: click.Context, workspace_dir: str | None, **kwargs):
        chosen = workspace_dir or (ctx.obj or {}).get("workspace_dir")
        try:
            ws = Workspace.discover(chosen)
            return fn(ws=ws, **kwargs)
        except (WorkspaceError, ValueError, FileNotFoundError, RuntimeError) as exc:
            _fail(str(exc))

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-C", "--workspace", "workspace_dir", type=click.Path(file_okay=False), default=None,
              help="Workspace folder for every subcommand.")
@click.pass_context
def main(ctx: click.Context, workspace_dir: str | None) -> None:
    """VoiceCraft SVC: singing-voice conversion with a versioned, incremental pipeline."""
    ctx.obj = {"workspace_dir": workspace_dir}


@main.command()
@click.argument("directory", type=click.Path(file_okay=False), required=False)
@click.option("--config", default="tiny", show_default=True, help="Config profile (configs/<name>.yaml) or YAML path.")
@click.option("--postgres", "postgres_url", default=None, metavar="URL",
              help="Shared Dagster storage: postgresql://USER@HOST:PORT/DB (written to svc.yaml; keep the password in "
                   "PGPASSWORD or ~/.pgpass). Default: SQLite in .dagster/.")
@click.option("--mlflow", "mlflow_uri", default=None, metavar="URL",
              help="Shared MLflow tracking server: http://HOST:PORT (written to svc.yaml). Default: "
                   "sqlite:///<workspace>/mlflow/mlflow.db.")
@click.pass_context
def init(ctx: click.Context, directory: str | None, config: str, postgres_url: str | None,
         mlflow_uri: str | None) -> None:
    """Create a workspace in DIRECTORY: folders, git + DVC with a local remote, MLflow store, Dagster home. With
    --postgres/--mlflow (also on an existing workspace), it uses a shared instance instead."""
    from assets.workspace import redact_url, url_has_password

    target = directory or (ctx.obj or {}).get("workspace_dir") or "."
    try:
        ws = init_workspace(target, config=config, postgres_url=postgres_url, mlflow_uri=mlflow_uri)
        if ws.dagster_postgres_url or ws.tracking_server:
            from orchestration.build import open_instance
            from orchestration.shared_instance import describe

            if ws.dagster_postgres_url:  # connect now: a wrong URL fails here, not halfway through a build
                open_instance(ws).dispose()
            for line in describe(ws):
                click.echo(line)
        if url_has_password(postgres_url):
            click.secho(f"warning: svc.yaml (versioned) now holds the password of {redact_url(postgres_url)}; "
                        "prefer PGPASSWORD or ~/.pgpass, or $SVC_DAGSTER_POSTGRES_URL", fg="yellow", err=True)
    except WorkspaceError as exc:
        _fail(str(exc))
    click.echo(f"workspace ready: {ws.root}")
    click.echo(f"  add a singer:  svc -C {ws.root} add-singer NAME FILES_OR_FOLDERS...")


@main.command("add-singer")
@click.argument("name")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--append", is_flag=True, help="Add recordings to an existing singer.")
@click.option("--no-push", is_flag=True, help="Skip `dvc push` to the workspace's default remote.")
@with_workspace
def add_singer_cmd(ws: Workspace, name: str, paths: tuple[str, ...], append: bool, no_push: bool) -> None:
    """Copy recordings (files or folders) into data/raw/NAME, version them with DVC, register the singer."""
    from orchestration.build import open_instance

    _add_singer(ws, name, list(paths), append=append, push=not no_push, instance=open_instance(ws))


def _add_singer(ws, name, paths, *, append, push, instance) -> None:
    from orchestration.service import add_singer_reported

    add_singer_reported(ws, name, paths, append=append, push=push, instance=instance, echo=click.echo)


@main.command()
@click.option("--asset", "assets", multiple=True, help="Asset to build (repeatable; default: every per-singer asset).")
@click.option("--singer", "singers", multiple=True, help="Singer to build (repeatable; default: all).")
@click.option("--train", "then_train", is_flag=True,
              help="Then, if the training set is stale, train (fine-tuning from production, else from base, else from "
                   "scratch), evaluate and register a 'candidate' version.")
@click.option("--from-scratch", is_flag=True, help="With --train: do not start from the production or base model.")
@click.option("--steps", type=int, default=None, help="With --train: steps (default: the config's train.steps).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Singers built at once, each in a worker process of its own; 1 = one after another in this "
                   "process. Steps in the 'gpu' concurrency pool still take turns. Pays off with a GPU or idle "
                   "cores; on a busy 2-core CPU it is slower (README, Parallel builds).")
@with_workspace
def build(ws: Workspace, assets: tuple[str, ...], singers: tuple[str, ...], then_train: bool, from_scratch: bool,
          steps: int | None, device: str, parallel: int) -> None:
    """Materialize what is stale or missing, like "Materialize unsynced" in the UI; with --train, retrain too."""
    from orchestration.build import asset_status, open_instance
    from orchestration.build import build as run_build
    from orchestration.definitions import build_definitions
    from orchestration.jobs import PER_SINGER_ASSETS

    unknown = sorted(set(assets) - set(PER_SINGER_ASSETS))
    if unknown:
        _fail(f"unknown asset(s) {unknown}; choose from {PER_SINGER_ASSETS}")
    started = time.perf_counter()
    instance = open_instance(ws)
    try:
        steps_done = run_build(ws, assets=assets or PER_SINGER_ASSETS, singers=singers or None, instance=instance,
                               log=click.echo, parallel=parallel)
        training_set = asset_status(build_definitions(ws), instance, "training_set")
    finally:
        instance.dispose()
    for step in steps_done:
        click.echo(f"  {step.singer}: {', '.join(step.assets)} in {step.seconds:.1f} s (run {step.run_id[:8]})")
    click.echo(f"built {sum(len(s.assets) for s in steps_done)} partition(s) in {time.perf_counter() - started:.1f} s; "
               f"training_set is {training_set}")
    if not then_train:
        return
    if training_set == "fresh":
        click.echo("the training set is up to date: nothing to train")
        return
    args = ["--device", device] + (["--from-scratch"] if from_scratch else []) + (["--steps", str(steps)] if steps else [])
    _train_in_subprocess(ws, args)


def _train_in_subprocess(ws: Workspace, args: list[str]) -> None:
    """`svc train ARGS` in a process of its own (see :func:`orchestration.service.run_training`)."""
    from orchestration.service import TrainingFailed, run_training

    try:
        run_training(ws, args)
    except TrainingFailed as exc:
        _fail(str(exc))


@main.command()
@with_workspace
def status(ws: Workspace) -> None:
    """Each singer's assets (fresh, stale, missing) with the DVC data version; the training assets; the registry."""
    from orchestration.jobs import PER_SINGER_ASSETS
    from orchestration.status import workspace_status

    st = workspace_status(ws)
    click.echo(f"workspace {ws.root}")
    header = f"{'singer':<16} {'dvc md5':<13} {'files':>5} {'segs':>5} {'min':>6}  "
    click.echo(header + " ".join(f"{a:<17}" for a in PER_SINGER_ASSETS))
    for row in st.singers:
        cells = " ".join(f"{row.assets[a]:<17}" for a in PER_SINGER_ASSETS)
        click.echo(f"{row.name:<16} {(row.dvc_md5 or '-')[:12]:<13} {row.files:>5} {row.segments:>5} "
                   f"{row.minutes:>6.2f}  {cells}")
    if not st.singers:
        click.echo("(no singers yet: svc add-singer NAME FILES...)")
    click.echo("training: " + ", ".join(f"{a} {s}" for a, s in st.training.items()))
    click.echo(f"registry {ws.settings.registered_model_name!r}: production "
               f"{'version ' + st.production if st.production else 'none'}, candidate "
               f"{'version ' + st.candidate if st.candidate else 'none'}")
    stale = [f"{a}[{r.name}]" for r in st.singers for a, s in r.assets.items() if s != "fresh"]
    if stale:
        click.echo(f"to rebuild ({len(stale)}): {', '.join(stale)}  ->  svc -C {ws.root} build")
    elif st.training["training_set"] != "fresh":
        click.echo(f"features are up to date; the training set is {st.training['training_set']}  ->  "
                   f"svc -C {ws.root} build --train")


@main.command("remove-singer")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@with_workspace
def remove_singer_cmd(ws: Workspace, name: str, yes: bool) -> None:
    """Remove a singer: derived data, the Dagster partition and the .dvc file. DVC's cache and git history keep
    the recordings."""
    from orchestration.build import open_instance
    from orchestration.singers import remove_singer

    if not yes:
        click.confirm(f"Remove singer {name!r} from {ws.root} (its features and partition; recordings stay in DVC's "
                      "cache and git history)?", abort=True)
    instance = open_instance(ws)
    try:
        report = remove_singer(ws, name, instance, log=click.echo)
    finally:
        instance.dispose()
    click.echo(f"removed singer {name!r}: {len(report.derived_removed)} derived partition(s); training_set is now "
               f"stale (run `svc -C {ws.root} build --train` to retrain without {name!r})")


@main.command()
@click.option("--steps", type=int, default=None, help="Steps to train (default: the config's train.steps).")
@click.option("--start-from", type=click.Choice(["auto", "production", "base", "scratch"]), default="auto",
              show_default=True,
              help="auto: fine-tune from the 'production' version, else from 'base' (`svc pretrained import`), else "
                   "train from scratch. production/base: that alias (an error if it does not exist).")
@click.option("--fine-tune", is_flag=True, help="Older flag: start from production (falls back to base, then scratch).")
@click.option("--from-scratch", is_flag=True, help="Same as --start-from scratch.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--local", "local_name", default=None, metavar="NAME",
              help="Untracked run in runs/NAME (no Dagster, MLflow or registry; resumes if it exists).")
@click.option("--fine-tune-from", "init_from", type=click.Path(), default=None,
              help="With --local: start from this checkpoint file or model folder (read without unpickling).")
@click.option("--fresh", is_flag=True, help="With --local: ignore checkpoints already in runs/NAME.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine (torchrun + DistributedDataParallel): one per GPU, or gloo on the CPU. "
                   "Each takes train.batch_size items: the global batch is nproc times that.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", hidden=True,
              help="Extra Dagster run tag (repeatable); the studio finds the run it launched by one.")
@with_workspace
def train(ws: Workspace, steps, start_from, fine_tune, from_scratch, device, local_name, init_from, fresh,
          nproc, tags) -> None:
    """Train: training_set -> svc_checkpoint (one MLflow run, a new registered version) -> evaluation_report,
    as one Dagster run on the workspace's instance; the run and the version are tagged init_from (production:vN,
    base:vN or scratch). Re-run after a kill, the same command resumes from the last good checkpoint of the same
    training set, config and start point (runs/dagster-<key>). With --local, a plain run in runs/NAME."""
    if from_scratch:
        if fine_tune or start_from not in ("auto", "scratch"):
            _fail("--from-scratch contradicts --fine-tune / --start-from " + start_from)
        start_from = "scratch"
    if fine_tune and start_from != "auto":
        _fail(f"--fine-tune contradicts --start-from {start_from}")
    if local_name:
        if nproc > 1:
            _fail("--nproc needs a tracked run (the Dagster asset launches the processes); drop --local")
        from assets.training_set import train_workspace

        result, run_dir = train_workspace(ws, name=local_name, steps=steps, init_from=init_from, fresh=fresh,
                                          device=device, log=click.echo)
        click.echo(f"checkpoint: {result.checkpoint}")
        click.echo(f"TensorBoard: {Path(sys.executable).parent / 'tensorboard'} --logdir {run_dir / 'tensorboard'}")
        return
    from orchestration.build import materialize_training

    run_tags = dict(tag.partition("=")[::2] for tag in tags)
    out = materialize_training(ws, steps=steps, fine_tune=fine_tune, start_from=start_from, device=device,
                               tags=run_tags, nproc=nproc)
    ckpt, report = out["svc_checkpoint"], out["evaluation_report"]
    if ckpt.get("resumed_from_step"):
        click.echo(f"resumed an interrupted run at step {ckpt['resumed_from_step']} ({ckpt['run_folder']})")
    click.echo(f"started from {ckpt.get('init_from', '?')}; registered {ckpt['registered_model']} version "
               f"{ckpt['model_version']} "
               f"(steps {ckpt['steps']}, final mel {ckpt['final_mel_loss']}); MLflow run {ckpt['mlflow_run_url']}")
    verdict = "passed" if report["passed"] else "FAILED (promote needs --force --reason)"
    click.echo(f"evaluation {verdict}: f0 corr {report['f0_corr']:.3f}, f0 RMSE {report['f0_rmse_cents']:.0f} cents, "
               f"V/UV error {report['vuv_error']:.3f}, similarity target {report['target_similarity']:.3f} vs "
               f"source {report['source_similarity']:.3f}, reconstruction mel {report['reconstruction_mel']:.3f}")
    click.echo(f"version {ckpt['model_version']} is now 'candidate'; promote it with `svc -C {ws.root} promote`")


@main.command()
@with_workspace
def models(ws: Workspace) -> None:
    """List registered model versions with their key metrics and aliases."""
    from assets import tracking

    versions = tracking.model_versions(ws)
    if not versions:
        click.echo(f"no registered versions of {ws.settings.registered_model_name!r} yet; run `svc train`")
        return
    metric = ws.config().evaluation.primary_metric
    click.echo(f"{'version':>7}  {'aliases':<22} {'eval':<7} {metric:>18} {'f0_corr':>8} {'sim_gap':>8}  run")
    for v in versions:
        tags = v.tags or {}
        aliases = ",".join(getattr(v, "aliases", []) or []) or "-"
        click.echo(f"{v.version:>7}  {aliases:<22} {tags.get('eval.passed', 'none'):<7} "
                   f"{tags.get('eval.' + metric, '-')[:10]:>18} {tags.get('eval.f0_corr', '-')[:8]:>8} "
                   f"{tags.get('eval.similarity_gap', '-')[:8]:>8}  {v.run_id}")


@main.group()
def pretrained() -> None:
    """whisper-vits-svc checkpoints: import one into the registry as the 'base' to fine-tune from, or download the
    published base model."""


def _parse_speakers(items: tuple[str, ...]) -> dict[str, str]:
    speakers = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name.strip() or not file.strip():
            raise click.BadParameter(f"{item!r}: use SINGER=FILE.npy, e.g. alto=singer0001.npy", param_hint="--speaker")
        if name.strip() in speakers:
            raise click.BadParameter(f"singer {name.strip()!r} given twice", param_hint="--speaker")
        speakers[name.strip()] = file.strip()
    return speakers


@pretrained.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--name", "alias", default="base", show_default=True,
              help="Registry alias for the imported version (training starts from 'base' when nothing is in "
                   "production).")
@click.option("--speaker", "speakers", multiple=True, metavar="SINGER=FILE",
              help="A singer's embedding for conversion targets: whisper-vits-svc's (256,) .npy, e.g. "
                   "configs/singers/singer0001.npy (repeatable).")
@with_workspace
def pretrained_import(ws: Workspace, file: str, alias: str, speakers: tuple[str, ...]) -> None:
    """Check FILE (a whisper-vits-svc sovits5.0.pretrain.pth, or a singer model from its svc_export.py) key by key,
    convert it once to this project's checkpoint format, and register it as a new model version with an alias."""
    from assets.pretrained import import_pretrained

    click.echo(f"reading {file} (torch.load weights_only=True: tensors only, no code runs; keys and shapes are "
               f"checked before anything is written)")
    report = import_pretrained(ws, file, alias, _parse_speakers(speakers))
    m = report.model_cfg
    click.echo(f"converted {report.source.name} once into {report.converted} (generator.safetensors + JSON config "
               f"and singer table, no pickle); the original is not loaded again")
    what = ("a pretrain (generator + discriminator)" if report.kind == "pretrain" else
            "an exported singer model (generator only: " + ", ".join(report.missing_parts) + " left at a fresh "
            "initialization)")
    click.echo(f"kind: {report.kind}, {what}")
    click.echo(f"widths: ppg_dim {m.ppg_dim}, vec_dim {m.vec_dim}, spk_dim {m.spk_dim}, hidden {m.hidden_channels}, "
               f"inter {m.inter_channels}, filter {m.filter_channels}, prior layers {m.prior_layers}, "
               f"decoder {m.upsample_initial_channel}")
    click.echo(f"singers: {', '.join(report.singers) or 'none (add --speaker SINGER=FILE.npy to convert with it)'}")
    click.echo(f"sha256 {report.sha256}")
    click.echo(f"registered {ws.settings.registered_model_name} version {report.version} with alias "
               f"'{report.alias}' (speaker encoder: mozilla-lstm)")
    if report.workspace_mismatch:
        click.secho(f"warning: this workspace's config ({ws.settings.config}) does not fit the imported model; to "
                    "train from it, or convert with it on this workspace's features, the config needs:", fg="yellow",
                    err=True)
        for line in report.workspace_mismatch:
            click.secho(f"  {line}", fg="yellow", err=True)


@pretrained.command("download")
@click.argument("name")
@with_workspace
def pretrained_download(ws: Workspace, name: str) -> None:
    """Download a published whisper-vits-svc model (NAME: sovits5.0) into models/pretrained/, then import it with
    `svc pretrained import`."""
    from assets.pretrained import models_dir
    from svc_model.pretrained import download_published

    path = download_published(name, models_dir(ws))
    click.echo(f"downloaded {path}; import it with `svc -C {ws.root} pretrained import {path}`")


@main.command()
@click.argument("version", required=False)
@click.option("--force", is_flag=True, help="Promote despite a missing or failing evaluation, or a worse metric.")
@click.option("--reason", default=None, help="Why (required with --force; recorded on the version).")
@click.option("--rollback", is_flag=True, help="Move production back to the version it replaced.")
@with_workspace
def promote(ws: Workspace, version, force, reason, rollback) -> None:
    """Point the registry alias 'production' at VERSION (default: the 'candidate'). The version records who
    promoted it (``promotion.by``: the operating-system user, as the studio records its signed-in user)."""
    import getpass

    from assets.promotion import PromotionError
    from assets.promotion import rollback as do_rollback
    from orchestration.service import promote as promote_as

    try:
        done = do_rollback(ws) if rollback else promote_as(ws, version, force=force, reason=reason,
                                                           user=getpass.getuser())
    except PromotionError as exc:
        _fail(str(exc))
    click.echo(done.message)


def _parse_blend(text: str) -> dict[str, float]:
    blend = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        if not sep:
            raise click.BadParameter(f"{part!r}: use NAME=WEIGHT, e.g. alice=0.7,bob=0.3", param_hint="--blend")
        try:
            blend[name.strip()] = float(weight)
        except ValueError:
            raise click.BadParameter(f"{part!r}: weight {weight!r} is not a number", param_hint="--blend") from None
    return blend


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Output file (.wav/.flac/.ogg).")
@click.option("--singer", default=None, help="Target singer name.")
@click.option("--reference", type=click.Path(dir_okay=False), default=None, help="Target: a reference recording.")
@click.option("--blend", default=None, help="Target: a weighted blend, e.g. alice=0.7,bob=0.3.")
@click.option("--pitch-shift", default="0", show_default=True, help="Semitones, or 'auto'.")
@click.option("--model", "model_uri", default=None,
              help="Registry model URI, e.g. models:/svc/3 or models:/svc@candidate (default: models:/svc@production).")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="A local model instead: a model folder (generator.safetensors + JSON) or a training checkpoint "
                   "runs/NAME/step-N.pt; read without unpickling (a file holding pickled objects is refused).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--deterministic", is_flag=True,
              help="No random numbers: the prior's mean, overtones at phase 0, no source noise (A/B listening).")
@click.option("--seed", default=0, show_default=True, help="Seed of the source's noise and phases (ignored with "
              "--deterministic): the same seed gives the same audio.")
@click.option("--stream", is_flag=True,
              help="Convert through the live (streaming) path, block by block, and write a per-block timing log "
                   "beside the output (OUTPUT.blocks.csv).")
@click.option("--block-ms", default=250, show_default=True, type=int, help="With --stream: the block length.")
@with_workspace
def convert(ws: Workspace, source, output, singer, reference, blend, pitch_shift, model_uri, checkpoint, device,
            deterministic, seed, stream, block_ms) -> None:
    """Re-sing SOURCE with a target timbre using the production model; writes 32 kHz audio to OUTPUT."""
    from svc_model.audio import AudioError
    from svc_model.infer import Converter

    target = _target_option(singer, reference, blend)
    ckpt, label = _model_option(ws, model_uri, checkpoint)
    out = Path(output)
    if out.suffix.lower() not in (".wav", ".flac", ".ogg"):
        _fail(f"{out}: output must end in .wav, .flac or .ogg")
    if stream:
        return _convert_streaming(ws, source, out, target, pitch_shift, ckpt, label, device, deterministic, seed,
                                  block_ms)

    try:
        converter = Converter.from_checkpoint(ckpt, device=device, root=ws.root)
        with _progress_bar("converting", "piece") as progress:
            result = converter.convert(source, target, pitch_shift, deterministic=deterministic, seed=seed,
                                       progress=progress)
    except (AudioError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    from svc_model.audio import write_audio

    write_audio(out, result.audio, result.sample_rate)
    click.echo(f"wrote {out}: {len(result.audio) / result.sample_rate:.2f} s at {result.sample_rate} Hz; target "
               f"{result.target}, pitch shift {result.pitch_shift:+.0f} semitones, {result.chunks} piece(s), "
               f"{result.seconds:.1f} s (model {label})")


@contextlib.contextmanager
def _progress_bar(desc: str, unit: str):
    """A ``progress(done, total)`` callback drawing a tqdm bar (off when not a terminal)."""
    from tqdm import tqdm

    with tqdm(total=None, desc=desc, unit=unit, disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield progress


def _target_option(singer, reference, blend):
    chosen = [t for t in (singer, reference, blend) if t]
    if len(chosen) != 1:
        _fail("give exactly one target: --singer NAME, --reference FILE or --blend a=0.7,b=0.3")
    return _parse_blend(blend) if blend else (reference or singer)


def _model_option(ws: Workspace, model_uri: str | None, checkpoint: str | None) -> tuple[Path, str]:
    if checkpoint:
        return Path(checkpoint), checkpoint
    from assets import tracking

    found = tracking.resolve_model(ws, model_uri)  # default: production; a clear error when missing
    return found.path, found.label


def _convert_streaming(ws, source, out: Path, target, pitch_shift, ckpt, label, device, deterministic, seed,
                       block_ms) -> None:
    import csv
    import io

    from svc_model.audio import AudioError, decode, to_mono, write_audio
    from svc_model.infer import Converter
    from svc_model.storage import atomic_write_text
    from svc_model.streaming import StreamConfig, stream_file

    try:
        if str(pitch_shift) == "auto":
            raise ValueError("--pitch-shift auto needs the whole source; with --stream give semitones")
        cfg = StreamConfig(block_ms=block_ms)
        cfg.check()
        data, sr = decode(source)
        converter = Converter.from_checkpoint(ckpt, device=device, root=ws.root)
        with _progress_bar("streaming", "block") as progress:
            audio, streamer = stream_file(converter, to_mono(data), sr, target, float(pitch_shift), cfg,
                                          deterministic=deterministic, seed=seed, progress=progress)
    except (AudioError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    write_audio(out, audio, streamer.sr)
    log = out.with_name(out.name + ".blocks.csv")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["block", "compute_ms", "block_ms", "rtf", "gated", "sola_offset_samples", "input_db"])
    for b in streamer.stats.blocks:
        writer.writerow([b.index, f"{b.compute_s * 1000:.2f}", cfg.block_ms, f"{b.compute_s * 1000 / cfg.block_ms:.3f}",
                         int(b.gated), b.sola_offset, f"{b.input_db:.1f}"])
    atomic_write_text(log, text.getvalue())
    stats = streamer.stats
    click.echo(f"wrote {out}: {len(audio) / streamer.sr:.2f} s at {streamer.sr} Hz through the streaming path; "
               f"{len(stats.blocks)} blocks of {cfg.block_ms} ms, compute p50 {stats.compute_ms(50):.0f} ms / "
               f"p95 {stats.compute_ms(95):.0f} ms, algorithmic latency {cfg.latency_ms} ms; per-block log {log} "
               f"(model {label})")


@main.command()
@click.option("--singer", default=None, help="Target singer name.")
@click.option("--reference", type=click.Path(dir_okay=False), default=None, help="Target: a reference recording.")
@click.option("--blend", default=None, help="Target: a weighted blend, e.g. alice=0.7,bob=0.3.")
@click.option("--pitch-shift", default=0.0, show_default=True, type=float, help="Semitones.")
@click.option("--model", "model_uri", default=None, help="Registry model URI (default: models:/svc@production).")
@click.option("--checkpoint", type=click.Path(), default=None, help="A local model folder or training checkpoint.")
@click.option("--input-device", default=None, help="Input device: index or part of its name (default: the system's).")
@click.option("--output-device", default=None, help="Output device: index or part of its name.")
@click.option("--samplerate", type=int, default=None, help="Device sample rate (default: the input device's).")
@click.option("--block-ms", default=250, show_default=True, type=int, help="Block length (multiple of 10 ms).")
@click.option("--gate-db", type=float, default=None, help="Blocks quieter than this (dBFS) pass as silence.")
@click.option("--seconds", type=float, default=None, help="Stop after this much input (default: until Ctrl-C).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--list-devices", is_flag=True, help="List the audio devices and exit.")
@click.pass_context
def live(ctx: click.Context, singer, reference, blend, pitch_shift, model_uri, checkpoint, input_device,
         output_device, samplerate, block_ms, gate_db, seconds, device, list_devices) -> None:
    """Sing into a microphone and hear the target singer: live conversion between local audio devices."""
    from orchestration.live import LiveError, run_live
    from orchestration.live import list_devices as device_list

    try:
        if list_devices:
            click.echo(device_list())
            return
        target = _target_option(singer, reference, blend)
        ws = Workspace.discover((ctx.obj or {}).get("workspace_dir"))
        ckpt, label = _model_option(ws, model_uri, checkpoint)
        from svc_model.infer import Converter
        from svc_model.streaming import StreamConfig, StreamingConverter

        cfg = StreamConfig(block_ms=block_ms, gate_db=gate_db)
        cfg.check()
        click.echo(f"loading {label} ...", err=True)
        converter = Converter.from_checkpoint(ckpt, device=device, root=ws.root)
        StreamingConverter(converter, target, pitch_shift, cfg)  # a bad target or shift fails before the devices
        click.echo(f"live: block {cfg.block_ms} ms, algorithmic latency {cfg.latency_ms} ms; Ctrl-C stops", err=True)
        summary = run_live(lambda rate: StreamingConverter(converter, target, pitch_shift, cfg, input_sr=rate),
                           input_device=input_device, output_device=output_device, samplerate=samplerate,
                           seconds=seconds)
    except (LiveError, WorkspaceError, ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))
    click.echo(f"\n{summary.blocks} blocks ({summary.gated} gated); compute p50 {summary.compute_p50_ms:.0f} ms, "
               f"p95 {summary.compute_p95_ms:.0f} ms per {block_ms} ms block; algorithmic latency "
               f"{summary.latency_ms} ms; input overflows {summary.overflows}, output underflows {summary.underflows}",
               err=True)


@main.command()
@click.option("--port", default=3000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@with_workspace
def ui(ws: Workspace, port: int, host: str) -> None:
    """Run `dagster dev` (webserver + daemon) on this workspace."""
    ws.ensure_runtime_dirs()
    dagster = Path(sys.executable).parent / "dagster"
    cmd = [str(dagster if dagster.exists() else "dagster"), "dev", "-m", "orchestration.definitions",
           "-h", host, "-p", str(port)]
    click.echo(f"DAGSTER_HOME={ws.dagster_home} SVC_WORKSPACE={ws.root} {' '.join(cmd)}")
    os.chdir(ws.root)
    # exec, not a child process: stopping `svc ui` must stop the webserver and the daemon with it.
    os.execve(cmd[0], cmd, ws.env())


@main.command()
@click.option("--port", default=7860, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--dagster-url", default="http://127.0.0.1:3000", show_default=True,
              help="Where `svc ui` serves the Dagster UI (the Train tab links its runs there).")
@click.option("--tensorboard-url", default="http://127.0.0.1:6006", show_default=True,
              help="Where `svc tensorboard` serves TensorBoard (the Train tab links to it).")
@click.option("--max-upload-minutes", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Longest recording the studio accepts, read from the file's header before it is decoded; add "
                   "longer ones with `svc add-singer`.")
@click.option("--max-upload-mb", default=100, show_default=True, type=click.IntRange(min=1),
              help="Largest file the studio accepts; a bigger upload is cut off as it arrives (HTTP 413) and not kept.")
@click.option("--auth", "auth_text", envvar="SVC_STUDIO_AUTH", default=None, metavar="USER:PASS",
              help="Require this login (needed for any --host but loopback). SVC_STUDIO_AUTH=USER:PASS does the "
                   "same and keeps the password out of the process list.")
@with_workspace
def studio(ws: Workspace, port: int, host: str, dagster_url: str, tensorboard_url: str,
           max_upload_minutes: float, max_upload_mb: int, auth_text: str | None) -> None:
    """Open the studio in the browser: convert (upload or record), add singers, train and promote."""
    from orchestration.studio import Studio
    from orchestration.studio.app import StudioAuthError, parse_auth, serve

    try:
        auth = parse_auth(auth_text, host)
    except StudioAuthError as exc:
        _fail(str(exc))
    click.echo(f"studio on workspace {ws.root}: http://{host}:{port}"
               + (f" (login required: user {auth[0]!r})" if auth else " (no login: this machine only)"))
    serve(Studio(ws, dagster_url=dagster_url, tensorboard_url=tensorboard_url, max_upload_s=max_upload_minutes * 60),
          host=host, port=port, auth=auth, max_file_size=max_upload_mb * 1024 * 1024)


@main.command()
@click.option("--port", default=6006, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@with_workspace
def tensorboard(ws: Workspace, port: int, host: str) -> None:
    """Run TensorBoard on the workspace's training logs (runs/)."""
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(ws.runs_dir), "--host", host,
           "--port", str(port)]
    click.echo(" ".join(cmd))
    os.execve(cmd[0], cmd, ws.env())  # exec, as `svc ui`: stopping `svc tensorboard` stops TensorBoard


@main.command()
@click.option("-C", "--workspace", "workspace_dir", type=click.Path(file_okay=False), default=None,
              help="Demo workspace (default: demo/ under the project; a rerun reuses it).")
@click.option("--steps", "train_steps", type=int, default=None,
              help="Training steps (default: the config's train.steps, 300).")
@click.option("--fine-tune-steps", type=int, default=100, show_default=True,  # demo.DEMO_FINE_TUNE_STEPS, not
              # imported here: every `svc` command would pay for loading the demo's dependencies
              help="Steps of the fine-tune after the fourth singer is added.")
@click.pass_context
def demo(ctx: click.Context, workspace_dir: str | None, train_steps: int | None, fine_tune_steps: int) -> None:
    """Offline CPU demo: three bundled voices through Dagster (clean audio, features), a tiny model trained on the
    CPU, a held-back voice converted into each singer; then the fourth voice is added, only its partitions are
    built, and the model is fine-tuned into a 'candidate' version."""
    from orchestration.demo import run_demo

    root = Path(workspace_dir or (ctx.obj or {}).get("workspace_dir") or PROJECT_ROOT / "demo")
    try:
        run_demo(root, train_steps=train_steps, fine_tune_steps=fine_tune_steps)
    except (WorkspaceError, ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))


if __name__ == "__main__":  # pragma: no cover
    main()
