"""Cross-singer assets: the training set, and the trained checkpoint (one MLflow run, one registered version)."""
import os
from typing import Optional

import dagster as dg

from orchestration.resources import WorkspaceResource

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
    from orchestration.partitions import SINGERS
    from orchestration.training import training_manifest

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
    fine_tune: bool = False  # start from the production model's weights (the cheap path after adding a singer)
    device: str = "auto"


@dg.asset(
    deps=[training_set],
    code_version="1",
    group_name="training",
    kinds={"pytorch", "mlflow"},
    description="Trains (or fine-tunes from production) on the training set in one MLflow run and registers "
    "the result as a new version of the registered model.",
)
def svc_checkpoint(context: dg.AssetExecutionContext, config: TrainingConfig,
                   workspace: WorkspaceResource) -> dg.MaterializeResult:
    import mlflow
    import pandas as pd

    from orchestration import tracking
    from svc_model.train import Trainer

    ws = workspace.get()
    cfg = ws.config()
    manifest = pd.read_parquet(ws.asset_dir("training_set") / "manifest.parquet")
    for column in PATH_COLUMNS:
        manifest[column] = [str(ws.resolve(p)) for p in manifest[column]]
    init_from, base_version = None, None
    if config.fine_tune:
        production = tracking.alias_version(ws, tracking.PRODUCTION)
        if production is None:
            context.log.warning("fine_tune requested but no production model yet: training from scratch")
        else:
            init_from, base_version = tracking.download_checkpoint(ws, production), production.version
    singers = sorted(manifest["singer"].unique())
    tags = {"dagster_run_id": context.run_id, "git_commit": tracking.git_commit(ws),
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
        version = tracking.register_checkpoint(ws, run_id, result.checkpoint, tags={"dagster_run_id": context.run_id})
    last = result.history[-1] if result.history else {}
    return dg.MaterializeResult(metadata={
        "mlflow_run_url": dg.MetadataValue.url(url),
        "mlflow_run_id": run_id,
        "model_version": int(version.version),
        "registered_model": ws.settings.registered_model_name,
        "steps": result.step,
        "fine_tuned_from_version": str(base_version or "none"),
        "final_mel_loss": round(float(last.get("mel", float("nan"))), 4),
        "valid_mel": round(float(result.validation.get("valid_mel", float("nan"))), 4),
        "seconds": round(result.seconds, 1),
        "checkpoint": dg.MetadataValue.path(str(result.checkpoint)),
    })
