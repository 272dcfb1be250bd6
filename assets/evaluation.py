"""Evaluation of the newest registered version, and its promotion to production."""
import json
from pathlib import Path
from typing import Optional

import dagster as dg

from assets.resources import WorkspaceResource
from assets.training import svc_checkpoint
from svc_model.storage import atomic_write_text

CHECKS = {
    "f0_corr": "f0 correlation between shifted source and output at least evaluation.min_f0_corr",
    "f0_rmse": "f0 RMSE in cents at most evaluation.max_f0_rmse_cents",
    "vuv_error": "voiced/unvoiced disagreement at most evaluation.max_vuv_error",
    "timbre_transfer": "outputs closer to the target singer than to the source (if evaluation.require_timbre_transfer)",
    "reconstruction": "same-singer conversion's log-mel L1 at most evaluation.max_reconstruction_mel",
}


def _latest_version_meta(context) -> dict:
    record = context.instance.get_latest_materialization_event(svc_checkpoint.key)
    if record is None or record.asset_materialization is None:
        raise dg.Failure("svc_checkpoint has never been materialized: train first")
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


@dg.asset(
    deps=[svc_checkpoint],
    code_version="2",
    group_name="training",
    kinds={"mlflow"},
    check_specs=[dg.AssetCheckSpec(name, asset="evaluation_report", description=d) for name, d in CHECKS.items()],
    description="Converts held-out segments of every singer into every singer with the newest registered version; "
    "f0 correlation/RMSE, V/UV error, speaker similarity to target and source, reconstruction mel distance, RTF. "
    "Logged to the training's MLflow run, written as a DVC metrics file, recorded as model-version tags.",
)
def evaluation_report(context: dg.AssetExecutionContext, workspace: WorkspaceResource) -> dg.MaterializeResult:
    import pandas as pd

    from assets import tracking
    from assets.promotion import EVAL_FAILED_CHECKS, EVAL_PASSED
    from assets.training import PATH_COLUMNS
    from svc_model.evaluate import evaluate, gates, similarity_caveat, write_report
    from svc_model.infer import Converter

    ws = workspace.get()
    cfg = ws.config().evaluation
    meta = _latest_version_meta(context)
    name, version, run_id = ws.settings.registered_model_name, str(meta["model_version"]), meta["mlflow_run_id"]
    client = tracking.client(ws)
    checkpoint = tracking.resolve_model(ws, version).path  # the safetensors model folder
    converter = Converter.from_checkpoint(checkpoint, root=ws.root)
    manifest = pd.read_parquet(ws.asset_dir("training_set") / "manifest.parquet")
    for column in PATH_COLUMNS:
        manifest[column] = [str(ws.resolve(p)) for p in manifest[column]]
    result = evaluate(converter, manifest, cfg.max_segments_per_singer, log=context.log.info)
    o = result.overall
    outcomes = gates(o, cfg)
    passed = all(ok for ok, _ in outcomes.values())
    with ws.write_asset("evaluation_report") as out:
        caveat = similarity_caveat(converter.cfg)
        if caveat:
            context.log.warning(caveat)
        paths = write_report(result, out, title=f"{name} version {version}", note=caveat)
        (out / "metrics.json").write_text(json.dumps({"model_version": int(version), **o}, indent=2))
    report_dir = ws.asset_dir("evaluation_report")
    # DVC metrics (dvc.yaml declares metrics/evaluation.json); written atomically.
    metrics_file = ws.root / "metrics" / "evaluation.json"
    atomic_write_text(metrics_file, json.dumps({"model_version": int(version), "passed": passed,
                                                **{k: round(v, 6) for k, v in o.items()}}, indent=2))
    for key, value in o.items():
        client.log_metric(run_id, f"eval/{key}", float(value))
    client.log_artifacts(run_id, str(report_dir), artifact_path="evaluation")
    failed = [n for n, (ok, _) in outcomes.items() if not ok]
    for key, value in o.items():
        client.set_model_version_tag(name, version, f"eval.{key}", f"{value:.6f}")
    client.set_model_version_tag(name, version, EVAL_PASSED, "true" if passed else "false")
    client.set_model_version_tag(name, version, EVAL_FAILED_CHECKS, ",".join(failed) or "none")
    client.set_registered_model_alias(name, tracking.CANDIDATE, version)
    context.log.info(f"version {version}: {'passed' if passed else 'FAILED ' + ', '.join(failed)}; now 'candidate'")
    return dg.MaterializeResult(
        metadata={
            "model_version": int(version),
            "passed": passed,
            **{k: round(float(v), 4) for k, v in o.items()},
            "per_singer": dg.MetadataValue.md(result.per_singer.to_markdown(floatfmt=".3f")),
            "similarity": dg.MetadataValue.md(result.similarity.to_markdown(floatfmt=".3f")),
            "report": dg.MetadataValue.path(str(report_dir / Path(paths["markdown"]).name)),
            "mlflow_run_url": dg.MetadataValue.url(tracking.run_url(ws, run_id)),
        },
        check_results=[
            dg.AssetCheckResult(check_name=n, passed=bool(ok), metadata={"value": float(v)})
            for n, (ok, v) in outcomes.items()
        ],
    )


class PromotionConfig(dg.Config):
    version: Optional[str] = None  # default: the 'candidate' (newest evaluated) version
    force: bool = False
    reason: Optional[str] = None


@dg.asset(
    deps=[evaluation_report],
    group_name="training",
    kinds={"mlflow"},
    description="Promotion: points the registry alias 'production' at a version whose evaluation passed and that "
    "is not worse than the current production on the primary metric (or a forced one, with a reason).",
)
def production_model(context: dg.AssetExecutionContext, config: PromotionConfig,
                     workspace: WorkspaceResource) -> dg.MaterializeResult:
    from assets.promotion import PromotionError, promote

    ws = workspace.get()
    try:
        done = promote(ws, config.version, force=config.force, reason=config.reason)
    except PromotionError as exc:
        raise dg.Failure(description=str(exc)) from exc
    context.log.info(done.message)
    return dg.MaterializeResult(metadata={"version": int(done.version), "previous": str(done.previous or "none"),
                                          "forced": done.forced, "message": done.message})
