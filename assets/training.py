"""Cross-singer assets: the training set, and the trained checkpoint (one MLflow run, one registered version)."""
import os
from typing import Optional

import dagster as dg

from assets.resources import WorkspaceResource

PATH_COLUMNS = ("audio", "pitch", "ppg", "vec", "speaker")


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


@dg.asset(
    deps=[training_set],
    code_version="2",
    group_name="training",
    kinds={"pytorch", "mlflow"},
    description="Fine-tunes from production, else from base (an imported pretrained model), else trains from "
    "scratch, on the training set in one MLflow run; tags which (init_from) and registers the result as a new "
    "version of the registered model.",
)
def svc_checkpoint(context: dg.AssetExecutionContext, config: TrainingConfig,
                   workspace: WorkspaceResource) -> dg.MaterializeResult:
    import pandas as pd

    import mlflow
    from assets import tracking
    from assets.pretrained import resolve_start_point
    from svc_model.train import Trainer

    ws = workspace.get()
    cfg = ws.config()
    manifest = pd.read_parquet(ws.asset_dir("training_set") / "manifest.parquet")
    for column in PATH_COLUMNS:
        manifest[column] = [str(ws.resolve(p)) for p in manifest[column]]
    try:
        start = resolve_start_point(ws, config.start_from, config.fine_tune, log=context.log.info,
                                    warn=context.log.warning)
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc
    init_from, base_version = start.checkpoint, start.version
    singers = sorted(manifest["singer"].unique())
    tags = {"dagster_run_id": context.run_id, "git_commit": tracking.git_commit(ws), "init_from": start.label,
            "fine_tuned_from_version": str(base_version or ""), "singers": ",".join(singers),
            **{f"dvc_md5.{s}": ws.singer_data_version(s) or "" for s in singers}}
    mlflow.set_tracking_uri(ws.tracking_uri)
    # System metrics every 5 s, logged as they come (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides).
    mlflow.set_system_metrics_sampling_interval(float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 5)))
    mlflow.set_system_metrics_samples_before_logging(1)
    run_dir = ws.runs_dir / f"dagster-{context.run_id[:8]}"
    with mlflow.start_run(experiment_id=tracking.experiment_id(ws), run_name=f"train-{context.run_id[:8]}",
                          tags=tags, log_system_metrics=True) as run:
        run_id = run.info.run_id
        client = tracking.client(ws)
        tracking.log_params(client, run_id, cfg.to_flat_dict())
        url = tracking.run_url(ws, run_id)
        context.log.info(f"MLflow run {run_id}: {url}")
        callback = tracking.MlflowTrainingCallback(client, run_id, cfg.audio.sample_rate)
        trainer = Trainer(cfg, manifest, run_dir, device=config.device, init_from=init_from, resume=False,
                          callbacks=[callback], log=context.log.info)
        try:
            result = trainer.fit(config.steps)
        finally:
            trainer.close()
        mlflow.log_artifact(str(run_dir / "manifest.parquet") if (run_dir / "manifest.parquet").exists()
                            else str(ws.asset_dir("training_set") / "manifest.parquet"), "training_set")
        version_tags = {"dagster_run_id": context.run_id, "init_from": start.label}
        if base_version:
            version_tags["fine_tuned_from_version"] = str(base_version)
        version = tracking.register_checkpoint(ws, run_id, result.checkpoint, tags=version_tags)
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
        "seconds": round(result.seconds, 1),
        "checkpoint": dg.MetadataValue.path(str(result.checkpoint)),
    })
