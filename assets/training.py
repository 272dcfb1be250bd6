"""Cross-singer assets: the training set, and the trained checkpoint (one MLflow run, one registered version)."""
import os
from typing import Optional

import dagster as dg

from assets.resources import WorkspaceResource

PATH_COLUMNS = ("audio", "pitch", "ppg", "vec", "speaker")
# Dagster run tag naming who started a training (the studio's signed-in user); copied to the MLflow run and the
# registered version as ``launched_by``.
USER_TAG = "svc/user"


@dg.asset(
    deps=["singer_roster", "pitch", "ppg", "vec", "speaker_embedding"],
    code_version="1",
    group_name="training",
    kinds={"parquet"},
    description="Manifest of every singer's segments with their feature paths and a stable train/valid split "
    "(a hash of the segment id, so adding a singer reshuffles nothing).",
)
def training_set(context: dg.AssetExecutionContext, workspace: WorkspaceResource) -> dg.MaterializeResult:
    from assets.partitions import SINGERS
    from assets.training_set import training_manifest

    ws = workspace.get()
    singers = sorted(set(context.instance.get_dynamic_partitions(SINGERS)) & set(ws.singers()))
    manifest = training_manifest(ws, singers)
    for column in PATH_COLUMNS:  # workspace-relative, so the workspace can move
        manifest[column] = [ws.relative(p) for p in manifest[column]]
    with ws.write_asset("training_set") as out:
        manifest.to_parquet(out / "manifest.parquet", index=False)
    per_singer = manifest.groupby("singer").agg(segments=("segment_id", "size"), minutes=("duration_s", "sum"))
    per_singer["minutes"] = (per_singer["minutes"] / 60).round(2)
    split = manifest["split"].value_counts().to_dict()
    versions = {s: ws.singer_data_version(s) for s in singers}
    return dg.MaterializeResult(metadata={
        "singers": len(singers),
        "segments": len(manifest),
        "hours": round(float(manifest["duration_s"].sum()) / 3600, 4),
        "train_segments": int(split.get("train", 0)),
        "valid_segments": int(split.get("valid", 0)),
        "per_singer": dg.MetadataValue.md(per_singer.to_markdown()),
        "dvc_md5": dg.MetadataValue.json(versions),
        "manifest": dg.MetadataValue.path(str(ws.asset_dir("training_set") / "manifest.parquet")),
    })


class TrainingConfig(dg.Config):
    steps: Optional[int] = None  # default: the workspace config's train.steps
    # auto: fine-tune from the 'production' version if there is one, else from 'base' (an imported pretrained
    # model, `svc pretrained import`), else train from scratch. production | base: that alias (an error if it is
    # missing). scratch: random initialization.
    start_from: str = "auto"
    fine_tune: bool = False  # older flag: production, falling back as auto does (with a warning)
    device: str = "auto"
    # Processes on this node: above 1, training runs under torchrun with DistributedDataParallel (one per GPU on
    # CUDA, gloo on the CPU); each takes train.batch_size items, so the global batch is nproc times that.
    nproc: int = 1


@dg.asset(
    deps=[training_set],
    code_version="3",
    group_name="training",
    kinds={"pytorch", "mlflow"},
    description="Fine-tunes from production, else from base (an imported pretrained model), else trains from "
    "scratch, on the training set in one MLflow run; tags which (init_from) and registers the result as a new "
    "version of the registered model. Re-run after a kill, it resumes from the last good checkpoint of the same "
    "training set, config and start point (runs/dagster-<key>, see the README's Training section).",
)
def svc_checkpoint(context: dg.AssetExecutionContext, config: TrainingConfig,
                   workspace: WorkspaceResource) -> dg.MaterializeResult:
    import pandas as pd
    from filelock import Timeout

    from assets import tracking
    from assets.pretrained import resolve_start_point
    from assets.training_set import prune_run_folders, run_folder_for, run_lock, training_definition
    from svc_model.storage import sweep_stale_temps

    ws = workspace.get()
    cfg = ws.config()
    manifest = pd.read_parquet(ws.asset_dir("training_set") / "manifest.parquet")
    try:
        start = resolve_start_point(ws, config.start_from, config.fine_tune, log=context.log.info,
                                    warn=context.log.warning)
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc
    target = config.steps or cfg.train.steps
    model_name = ws.settings.registered_model_name
    client = tracking.client(ws)

    def registered_version(record: dict) -> str | None:
        """The version registered from the record's last MLflow run, if a kill came after registering."""
        attempts = record.get("attempts") or []
        run = attempts[-1].get("mlflow_run_id") if attempts else None
        found = client.search_model_versions(f"run_id='{run}'") if run else []
        return str(found[0].version) if found else None

    # The run folder is keyed by what defines this training (training set, features, data versions, config, start
    # point, steps): re-running it after a kill finds the same folder and resumes from its last good checkpoint.
    for stale in sweep_stale_temps(ws.runs_dir):
        context.log.info(f"removed {stale.name}, left by a killed process")
    definition = training_definition(ws, manifest, cfg, start.label, target)
    folder = run_folder_for(ws, definition, model_name, registered_version)
    lock = run_lock(folder.path)
    try:
        lock.acquire()
    except Timeout:
        raise dg.Failure(f"{folder.path} is in use by another training run of the same training set, config and "
                         f"start point; wait for it to finish") from None
    try:
        return _train_in_folder(context, config, ws, cfg, manifest, start, target, folder, client)
    finally:
        lock.release()
        try:
            prune_run_folders(ws, cfg.train.keep_runs, model_name, log=context.log.info)
        except OSError as exc:  # housekeeping must not turn a trained model into a failed run
            context.log.warning(f"pruning {ws.runs_dir} failed: {exc}")


def _train_in_folder(context, config, ws, cfg, manifest, start, target, folder, client) -> dg.MaterializeResult:
    import mlflow
    from assets import tracking
    from svc_model.train import Trainer

    if config.nproc < 1:
        raise dg.Failure(f"nproc must be at least 1, got {config.nproc}")
    init_from, base_version = start.checkpoint, start.version
    for column in PATH_COLUMNS:
        manifest[column] = [str(ws.resolve(p)) for p in manifest[column]]
    run_dir = folder.path
    distributed = config.nproc > 1
    trainer, resumed_step = None, None
    if not distributed:  # under torchrun the ranks build their own trainers; rank 0 reports the resume
        trainer = Trainer(cfg, manifest, run_dir, device=config.device, init_from=init_from, resume=True,
                          log=context.log.info, warn=context.log.warning)
        resumed_step = trainer.step if trainer.resumed_from is not None else None
    singers = sorted(manifest["singer"].unique())
    tags = {"dagster_run_id": context.run_id, "git_commit": tracking.git_commit(ws), "init_from": start.label,
            "fine_tuned_from_version": str(base_version or ""), "singers": ",".join(singers),
            "training_key": folder.record["key"], "run_folder": ws.relative(run_dir),
            **{f"dvc_md5.{s}": ws.singer_data_version(s) or "" for s in singers}}
    launched_by = context.run.tags.get(USER_TAG)  # who started it, where the launcher says (the studio does)
    if launched_by:
        tags["launched_by"] = launched_by
    # Lineage across a kill: each attempt is its own MLflow run (its metrics start after the checkpoint it resumed,
    # so no step is logged twice), sharing the training_key tag; a resumed one names the attempt it continues.
    previous = folder.attempts[-1].get("mlflow_run_id") if folder.attempts else None
    if distributed:
        tags["nproc"] = str(config.nproc)
    if resumed_step is not None:
        tags.update(resumed_from_step=str(resumed_step), resumed_from_checkpoint=trainer.resumed_from.name)
        if previous:
            tags["resumed_from_run_id"] = previous
    if previous:
        try:
            if client.get_run(previous).info.status == "RUNNING":  # killed: it never ended
                client.set_terminated(previous, "KILLED")
        except Exception as exc:  # noqa: BLE001 - a run deleted from MLflow only loses its status update
            context.log.warning(f"MLflow run {previous} of the previous attempt: {exc}")
    mlflow.set_tracking_uri(ws.tracking_uri)
    # System metrics every 5 s, logged as they come (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides).
    mlflow.set_system_metrics_sampling_interval(float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 5)))
    mlflow.set_system_metrics_samples_before_logging(1)
    # Distributed: rank 0 samples the system metrics (one writer at a time to a SQLite store).
    with mlflow.start_run(experiment_id=tracking.experiment_id(ws), run_name=f"train-{context.run_id[:8]}",
                          tags=tags, log_system_metrics=not distributed) as run:
        run_id = run.info.run_id
        folder.add_attempt(dagster_run_id=context.run_id, mlflow_run_id=run_id,
                           resumed_from_step=resumed_step)
        tracking.log_params(client, run_id, cfg.to_flat_dict())
        url = tracking.run_url(ws, run_id)
        context.log.info(f"MLflow run {run_id}: {url}")
        if distributed:
            result, resumed_step = _train_distributed(context, config, ws, cfg, manifest, init_from, target,
                                                      run_dir, run_id, client, previous)
        else:
            trainer.callbacks.append(tracking.MlflowTrainingCallback(client, run_id, cfg.audio.sample_rate))
            try:
                result = trainer.fit(max(0, target - trainer.step))
            finally:
                trainer.close()
        mlflow.log_artifact(str(ws.asset_dir("training_set") / "manifest.parquet"), "training_set")
        version_tags = {"dagster_run_id": context.run_id, "init_from": start.label,
                        "training_key": folder.record["key"]}
        if launched_by:
            version_tags["launched_by"] = launched_by
        if base_version:
            version_tags["fine_tuned_from_version"] = str(base_version)
        version = tracking.register_checkpoint(ws, run_id, result.checkpoint, tags=version_tags)
        folder.mark_complete(version.version)
    last = result.history[-1] if result.history else {}
    return dg.MaterializeResult(metadata={
        "mlflow_run_url": dg.MetadataValue.url(url),
        "mlflow_run_id": run_id,
        "model_version": int(version.version),
        "registered_model": ws.settings.registered_model_name,
        "steps": result.step,
        "init_from": start.label,
        "fine_tuned_from_version": str(base_version or "none"),
        "final_mel_loss": round(float(last.get("mel", float("nan"))), 4),
        "valid_mel": round(float(result.validation.get("valid_mel", float("nan"))), 4),
        "valid_f0_corr": round(float(result.validation.get("valid_f0_corr", float("nan"))), 4),
        "seconds": round(result.seconds, 1),
        "checkpoint": dg.MetadataValue.path(str(result.checkpoint)),
        "run_folder": dg.MetadataValue.path(str(run_dir)),
        "resumed_from_step": resumed_step or 0,
    })


def _train_distributed(context, config, ws, cfg, manifest, init_from, target, run_dir, run_id, client, previous):
    """Train with ``config.nproc`` processes under torchrun (:mod:`assets.distributed`), rank 0 logging to the open
    MLflow run; tag the resume the ranks found. Returns a :class:`svc_model.train.TrainResult` and the resumed step."""
    from assets.distributed import DistributedTrainingFailed, launch
    from svc_model.train import TrainResult

    try:
        out = launch(nproc=config.nproc, cfg=cfg, manifest=manifest, run_dir=run_dir, device=config.device,
                     init_from=init_from, target_steps=target, tracking_uri=ws.tracking_uri, run_id=run_id,
                     log=context.log.info)
    except (DistributedTrainingFailed, ValueError) as exc:
        raise dg.Failure(str(exc)) from exc
    if out.resumed_step is not None:
        client.set_tag(run_id, "resumed_from_step", str(out.resumed_step))
        client.set_tag(run_id, "resumed_from_checkpoint", out.resumed_from.name)
        if previous:
            client.set_tag(run_id, "resumed_from_run_id", previous)
    result = TrainResult(step=out.step, checkpoint=out.checkpoint, history=[out.last_losses] if out.last_losses else [],
                         validation=out.validation, seconds=out.seconds)
    return result, out.resumed_step
