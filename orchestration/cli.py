"""The ``svc`` command line. Every command takes ``-C/--workspace DIR``."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from assets.workspace import PROJECT_ROOT, Workspace, WorkspaceError, init_workspace
from svc_model.storage import atomic_write_text

DEMO_VOICES_DIR = PROJECT_ROOT / "examples" / "voices"
DEMO_SINGERS = ["speaker-a", "speaker-b", "speaker-c"]  # speaker-d is kept back for the incremental rebuild


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
@click.pass_context
def init(ctx: click.Context, directory: str | None, config: str) -> None:
    """Create a workspace in DIRECTORY: folders, git + DVC with a local remote, MLflow store, Dagster home."""
    target = directory or (ctx.obj or {}).get("workspace_dir") or "."
    try:
        ws = init_workspace(target, config=config)
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
    from orchestration.singers import add_singer

    click.echo(f"{'appending to' if append else 'adding'} singer {name!r} in {ws.root}")
    report = add_singer(ws, name, paths, append=append, instance=instance, push=push, log=click.echo)
    click.echo(
        f"added {len(report.added)} file(s), {report.seconds:.1f} s of audio; skipped {len(report.skipped)}"
    )
    for source, reason in report.skipped:
        click.echo(f"  skipped {source}: {reason}")
    click.echo(f"DVC: data/raw/{name}.dvc md5 {report.data_version}"
               + (f" (was {report.previous_version})" if report.previous_version else "")
               + (", pushed to the workspace remote" if report.pushed else ", not pushed"))
    click.echo(f"Dagster: partition {name!r} registered in 'singers'")
    from orchestration.jobs import PER_SINGER_ASSETS

    click.echo(f"will rebuild: {', '.join(f'{a}[{name}]' for a in PER_SINGER_ASSETS)}; "
               f"run `svc -C {ws.root} build`, or let `svc ui` (daemon) pick it up")


@main.command()
@click.option("--asset", "assets", multiple=True, help="Asset to build (repeatable; default: every per-singer asset).")
@click.option("--singer", "singers", multiple=True, help="Singer to build (repeatable; default: all).")
@click.option("--train", "then_train", is_flag=True,
              help="Then, if the training set is stale, train (fine-tuning from production, else from base, else from "
                   "scratch), evaluate and register a 'candidate' version.")
@click.option("--from-scratch", is_flag=True, help="With --train: do not start from the production or base model.")
@click.option("--steps", type=int, default=None, help="With --train: steps (default: the config's train.steps).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@with_workspace
def build(ws: Workspace, assets: tuple[str, ...], singers: tuple[str, ...], then_train: bool, from_scratch: bool,
          steps: int | None, device: str) -> None:
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
                               log=click.echo)
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
    """`svc train` in a process of its own, as a run launched from the Dagster UI would be: the feature extractors'
    thread pools (CTranslate2 brings its own OpenMP) would otherwise compete with training for the cores."""
    code = subprocess.call([str(Path(sys.executable).parent / "svc"), "-C", str(ws.root), "train", *args])
    if code != 0:
        _fail(f"training failed (exit {code})")


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
@click.option("--fine-tune-from", "init_from", type=click.Path(dir_okay=False), default=None,
              help="With --local: start from this checkpoint file.")
@click.option("--fresh", is_flag=True, help="With --local: ignore checkpoints already in runs/NAME.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", hidden=True,
              help="Extra Dagster run tag (repeatable); the studio finds the run it launched by one.")
@with_workspace
def train(ws: Workspace, steps, start_from, fine_tune, from_scratch, device, local_name, init_from, fresh,
          tags) -> None:
    """Train: training_set -> svc_checkpoint (one MLflow run, a new registered version) -> evaluation_report,
    as one Dagster run on the workspace's instance; the run and the version are tagged init_from (production:vN,
    base:vN or scratch). With --local, a plain run in runs/NAME."""
    if from_scratch:
        if fine_tune or start_from not in ("auto", "scratch"):
            _fail("--from-scratch contradicts --fine-tune / --start-from " + start_from)
        start_from = "scratch"
    if fine_tune and start_from != "auto":
        _fail(f"--fine-tune contradicts --start-from {start_from}")
    if local_name:
        from assets.training_set import train_workspace

        result, run_dir = train_workspace(ws, name=local_name, steps=steps, init_from=init_from, fresh=fresh,
                                          device=device, log=click.echo)
        click.echo(f"checkpoint: {result.checkpoint}")
        click.echo(f"TensorBoard: {Path(sys.executable).parent / 'tensorboard'} --logdir {run_dir / 'tensorboard'}")
        return
    from orchestration.build import materialize_training

    run_tags = dict(tag.partition("=")[::2] for tag in tags)
    out = materialize_training(ws, steps=steps, fine_tune=fine_tune, start_from=start_from, device=device,
                               tags=run_tags)
    ckpt, report = out["svc_checkpoint"], out["evaluation_report"]
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

    click.echo(f"reading {file} (torch.load weights_only=True: tensors only, no code runs)")
    report = import_pretrained(ws, file, alias, _parse_speakers(speakers))
    m = report.model_cfg
    click.echo(f"converted {report.source.name} once into {report.converted}; the original is not loaded again")
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
    """Point the registry alias 'production' at VERSION (default: the 'candidate')."""
    from assets.promotion import PromotionError
    from assets.promotion import promote as do_promote
    from assets.promotion import rollback as do_rollback

    try:
        done = do_rollback(ws) if rollback else do_promote(ws, version, force=force, reason=reason)
    except PromotionError as exc:
        _fail(str(exc))
    click.echo(done.message)


def _registry_checkpoint(ws: Workspace, model_uri: str | None) -> tuple[Path, str]:
    """The checkpoint behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (default: production)."""
    from assets import tracking

    name = ws.settings.registered_model_name
    uri = model_uri or f"models:/{name}@{tracking.PRODUCTION}"
    body = uri.removeprefix("models:/")
    model, alias, version = body, None, None
    if "@" in body:
        model, alias = body.split("@", 1)
    elif "/" in body:
        model, version = body.split("/", 1)
    if model != name or not (alias or version):
        _fail(f"{uri}: expected models:/{name}@ALIAS or models:/{name}/VERSION")
    if alias:
        mv = tracking.alias_version(ws, alias)
        if mv is None:
            hint = ("nothing has been promoted yet: train (`svc train`), then `svc promote`; or pass --model "
                    "models:/%s/VERSION or --checkpoint FILE" % name) if alias == tracking.PRODUCTION else ""
            _fail(f"no version of {name!r} has the alias {alias!r}. {hint}".strip())
    else:
        try:
            mv = tracking.client(ws).get_model_version(name, version)
        except Exception:
            _fail(f"{uri}: no such model version")
    return tracking.download_checkpoint(ws, mv), f"{uri} (version {mv.version})"


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
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="A local checkpoint file instead.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--deterministic", is_flag=True,
              help="No random numbers: the prior's mean, overtones at phase 0, no source noise (A/B listening).")
@click.option("--seed", default=0, show_default=True, help="Seed of the source's noise and phases (ignored with "
              "--deterministic): the same seed gives the same audio.")
@with_workspace
def convert(ws: Workspace, source, output, singer, reference, blend, pitch_shift, model_uri, checkpoint, device,
            deterministic, seed) -> None:
    """Re-sing SOURCE with a target timbre using the production model; writes 32 kHz audio to OUTPUT."""
    from svc_model.audio import AudioError
    from svc_model.infer import Converter

    chosen = [t for t in (singer, reference, blend) if t]
    if len(chosen) != 1:
        _fail("give exactly one target: --singer NAME, --reference FILE or --blend a=0.7,b=0.3")
    target = _parse_blend(blend) if blend else (reference or singer)
    ckpt, label = (Path(checkpoint), checkpoint) if checkpoint else _registry_checkpoint(ws, model_uri)
    out = Path(output)
    if out.suffix.lower() not in (".wav", ".flac", ".ogg"):
        _fail(f"{out}: output must end in .wav, .flac or .ogg")
    from tqdm import tqdm

    try:
        converter = Converter.from_checkpoint(ckpt, device=device, root=ws.root)
        with tqdm(total=None, desc="converting", unit="piece", disable=None) as bar:
            def progress(done, total):
                bar.total = total
                bar.update(done - bar.n)

            result = converter.convert(source, target, pitch_shift, deterministic=deterministic, seed=seed,
                                       progress=progress)
    except (AudioError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    from svc_model.audio import write_audio

    write_audio(out, result.audio, result.sample_rate)
    click.echo(f"wrote {out}: {len(result.audio) / result.sample_rate:.2f} s at {result.sample_rate} Hz; target "
               f"{result.target}, pitch shift {result.pitch_shift:+.0f} semitones, {result.chunks} piece(s), "
               f"{result.seconds:.1f} s (model {label})")


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
              help="Longest recording the studio accepts; add longer ones with `svc add-singer`.")
@with_workspace
def studio(ws: Workspace, port: int, host: str, dagster_url: str, tensorboard_url: str,
           max_upload_minutes: float) -> None:
    """Open the studio in the browser: convert (upload or record), add singers, train and promote."""
    from orchestration.studio import Studio, serve

    click.echo(f"studio on workspace {ws.root}: http://{host}:{port}")
    serve(Studio(ws, dagster_url=dagster_url, tensorboard_url=tensorboard_url, max_upload_s=max_upload_minutes * 60),
          host=host, port=port)


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


DEMO_SOURCE = DEMO_VOICES_DIR / "speaker-d" / "57.flac"  # the held-back voice, used as the song to convert
DEMO_NEW_SINGER = "speaker-d"  # added in the demo's last act
DEMO_FINE_TUNE_STEPS = 100


DEMO_FORCE_REASON = ("offline CPU demo: the tiny profile trains for minutes on two cores with a random HuBERT and "
                     "does not reach the evaluation thresholds; promoted so that conversion can be shown")


def _demo_promote(ws: Workspace) -> str:
    """Promote the candidate; where the rules refuse it, show why and force it with a recorded reason."""
    from assets import tracking
    from assets.promotion import PromotionError, promote

    production = tracking.alias_version(ws, tracking.PRODUCTION)
    if production is not None:  # a person promotes later candidates (the last act leaves one)
        click.echo(f"version {production.version} is already in production (reusing)")
        return "already in production"
    try:
        done = promote(ws)
    except PromotionError as exc:
        click.secho(f"promotion refused: {exc}", fg="yellow")
        click.echo(f"forcing it for the demo, with the reason recorded on the version: {DEMO_FORCE_REASON}")
        done = promote(ws, force=True, reason=DEMO_FORCE_REASON)
    click.echo(done.message)
    return "forced, reason recorded" if done.forced else "passed its checks"


def _demo_conversions(ws: Workspace, checkpoint: Path) -> list[str]:
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


def print_next_steps(ws: Workspace) -> None:
    venv_bin = Path(sys.executable).parent
    click.echo("\nWhere to look next:")
    click.echo(f"  Dagster UI:  {venv_bin / 'svc'} -C {ws.root} ui        # then http://127.0.0.1:3000")
    click.echo(f"  MLflow UI:   {venv_bin / 'mlflow'} ui --backend-store-uri {ws.tracking_uri} "
               f"--default-artifact-root {ws.artifact_root} --port 5000")
    click.echo(f"  TensorBoard: {venv_bin / 'svc'} -C {ws.root} tensorboard   # then http://127.0.0.1:6006")
    click.echo(f"  Studio:      {venv_bin / 'svc'} -C {ws.root} studio        # then http://127.0.0.1:7860")
    click.echo(f"  Status:      {venv_bin / 'svc'} -C {ws.root} status; {venv_bin / 'svc'} -C {ws.root} models")


@main.command()
@click.option("-C", "--workspace", "workspace_dir", type=click.Path(file_okay=False), default=None,
              help="Demo workspace (default: demo/ under the project; a rerun reuses it).")
@click.option("--steps", "train_steps", type=int, default=None,
              help="Training steps (default: the config's train.steps, 300).")
@click.option("--fine-tune-steps", type=int, default=DEMO_FINE_TUNE_STEPS, show_default=True,
              help="Steps of the fine-tune after the fourth singer is added.")
@click.pass_context
def demo(ctx: click.Context, workspace_dir: str | None, train_steps: int | None, fine_tune_steps: int) -> None:
    """Offline CPU demo: three bundled voices through Dagster (clean audio, features), a tiny model trained on the
    CPU, a held-back voice converted into each singer; then the fourth voice is added, only its partitions are
    built, and the model is fine-tuned into a 'candidate' version."""
    from assets import tracking
    from orchestration.build import asset_status, open_instance
    from orchestration.build import build as run_build
    from orchestration.definitions import build_definitions

    started = time.perf_counter()
    root = Path(workspace_dir or (ctx.obj or {}).get("workspace_dir") or PROJECT_ROOT / "demo")
    click.secho(f"== VoiceCraft SVC demo in {root}", bold=True)
    try:
        ws = init_workspace(root)
        instance = open_instance(ws)
        for singer in DEMO_SINGERS:
            if singer in ws.singers():
                click.echo(f"singer {singer!r} already added (reusing)")
                continue
            _add_singer(ws, singer, [str(DEMO_VOICES_DIR / singer)], append=False, push=True, instance=instance)
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
            _train_in_subprocess(ws, ["--device", "cpu"] + (["--steps", str(train_steps)] if train_steps else []))
        train_s = time.perf_counter() - t_train
        click.secho("== promoting the candidate to production", bold=True)
        promotion = _demo_promote(ws)
        production = tracking.alias_version(ws, tracking.PRODUCTION)
        click.secho("== converting a held-back voice into each singer with the production model", bold=True)
        conversions = _demo_conversions(ws, tracking.download_checkpoint(ws, production))
    except (WorkspaceError, ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))
    click.secho("\n== summary", bold=True)
    _print_singer_table(ws, DEMO_SINGERS)
    tags = production.tags or {}
    client = tracking.client(ws)
    mel = [m.value for m in sorted(client.get_metric_history(production.run_id, "train/mel"), key=lambda m: m.step)]
    if mel:
        click.echo(f"training: {len(mel)} steps, mel loss (mean of 10 steps) {sum(mel[:10]) / len(mel[:10]):.3f} -> "
                   f"{sum(mel[-10:]) / len(mel[-10:]):.3f}; this invocation {train_s:.0f} s")
    click.echo(f"model: {ws.settings.registered_model_name} version {production.version} in production "
               f"({promotion}); MLflow run {tracking.run_url(ws, production.run_id)}")
    click.echo("evaluation (held-out segments into every singer): " + ", ".join(
        f"{k} {float(tags[f'eval.{k}']):.3f}" for k in ("f0_corr", "f0_rmse_cents", "vuv_error", "target_similarity",
                                                       "source_similarity", "reconstruction_mel", "rtf")
        if f"eval.{k}" in tags) + f"; checks {'passed' if tags.get('eval.passed') == 'true' else 'FAILED: ' + tags.get('eval.failed_checks', '?')}")
    for line in conversions:
        click.echo(f"  {line}")
    click.echo(f"materialized {len(steps)} partition run(s) in {build_s:.1f} s")
    _demo_add_singer(ws, instance, full_build_s=build_s if steps else None, fine_tune_steps=fine_tune_steps)
    click.echo(f"demo total {time.perf_counter() - started:.1f} s")
    print_next_steps(ws)


def _demo_add_singer(ws: Workspace, instance, *, full_build_s: float | None, fine_tune_steps: int) -> None:
    """The incremental path: add the fourth voice, build only its partitions, fine-tune into a 'candidate'."""
    import json

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
        _add_singer(ws, DEMO_NEW_SINGER, [str(DEMO_VOICES_DIR / DEMO_NEW_SINGER)], append=False, push=True,
                    instance=instance)
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
        _train_in_subprocess(ws, ["--device", "cpu", "--fine-tune", "--steps", str(fine_tune_steps)])
    candidate = tracking.alias_version(ws, tracking.CANDIDATE)
    production = tracking.alias_version(ws, tracking.PRODUCTION)
    base = tracking.client(ws).get_run(candidate.run_id).data.tags.get("fine_tuned_from_version") or "-"
    click.echo(f"version {candidate.version} (fine-tuned from version {base}) is 'candidate'; production stays "
               f"version {production.version}. Compare with `svc -C {ws.root} models`, promote with "
               f"`svc -C {ws.root} promote`")


if __name__ == "__main__":  # pragma: no cover
    main()
