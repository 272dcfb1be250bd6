"""Per-singer feature assets: pitch, ppg, vec and speaker_embedding, each read from clean_audio's 16 kHz segments.

The four share one shape (``_feature_asset``): read the clean_audio manifest, run the extractor that the
``extractors`` resource loaded once for this process, write one file per segment plus a manifest atomically,
and report metadata and checks.
"""
import dagster as dg

from assets.partitions import singers_partitions
from assets.resources import FeatureExtractorsResource, WorkspaceResource

# Bump a version when that asset's output for the same input would change.
CODE_VERSIONS = {"pitch": "1", "ppg": "2", "vec": "2", "speaker_embedding": "1"}
VOICED_RANGE = (0.05, 0.98)  # a singer's segments outside this are likely noise, silence or a tone
UNIT_NORM_TOL = 1e-3

DESCRIPTIONS = {
    "pitch": "f0 (Hz, 0 when unvoiced) and voicing per 10 ms frame (100 Hz), from the 16 kHz segments.",
    "ppg": "Whisper encoder frames (PPG) at 50 Hz, encoding only each segment's own frames.",
    "vec": "Content 'vec' at 50 Hz: HuBERT hidden states or HuBERT-Soft 256-d units (features.vec.backend); "
           "metadata `vec_backend` names which.",
    "speaker_embedding": "256-d d-vector per segment (features.speaker.backend: resemblyzer or mozilla-lstm), plus "
                         "the singer's mean (mean.npy). Metadata `encoder` names the encoder and its weights.",
}


def _checks_for(feature: str) -> list[dg.AssetCheckSpec]:
    specs = [dg.AssetCheckSpec("finite", asset=feature, blocking=True,
                               description="No NaN or inf in any segment's features.")]
    if feature == "pitch":
        specs.append(dg.AssetCheckSpec("voiced_ratio_plausible", asset=feature,
                                       description=f"Voiced ratio within {VOICED_RANGE}."))
    if feature == "speaker_embedding":
        specs.append(dg.AssetCheckSpec("unit_norm", asset=feature, blocking=True,
                                       description="Every embedding and the mean have unit L2 norm (mozilla-lstm: "
                                       "in (0, 1], means of unit vectors, as the anchor stores them)."))
    return specs


def _feature_asset(feature: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=feature,
        partitions_def=singers_partitions,
        deps=["clean_audio"],
        code_version=CODE_VERSIONS[feature],
        automation_condition=dg.AutomationCondition.eager(),
        group_name="features",
        kinds={"pytorch"},
        check_specs=_checks_for(feature),
        description=DESCRIPTIONS[feature],
    )
    def _asset(context: dg.AssetExecutionContext, workspace: WorkspaceResource,
               extractors: FeatureExtractorsResource) -> dg.MaterializeResult:
        from svc_model.features.store import extract_to_dir
        from svc_model.preprocess import load_manifest

        ws = workspace.get()
        singer = context.partition_key
        segments = load_manifest(ws.partition_dir("clean_audio", singer))
        extractor = extractors.get(feature)
        info = extractor.describe()
        label = "pretrained weights" if info["pretrained"] else "RANDOM weights (pretrained: false), not for real use"
        if info.get("vec_backend") == "none":
            label = "no weights: vec disabled"
        context.log.info(f"[{singer}] {feature}: {info['backend']} on {info['device']} with {label}; "
                         f"{len(segments)} segments")
        with ws.write_partition(feature, singer) as out_dir:
            result = extract_to_dir(extractor, segments, out_dir, log=context.log.info)
        manifest = result.manifest
        bad = manifest.loc[~manifest["finite"], "segment_id"].tolist()
        checks = [dg.AssetCheckResult(check_name="finite", passed=not bad,
                                      metadata={"segments_with_nan_or_inf": len(bad), "first": ", ".join(bad[:5])})]
        metadata = {
            "singer": singer,
            "extractor": info["backend"],
            "pretrained": info["pretrained"],
            "device": info["device"],
            "segments": len(manifest),
            "frames": int(manifest["frames"].sum()),
            "dim": int(manifest["dim"].iloc[0]) if len(manifest) else 0,
            "audio_seconds": round(result.audio_seconds, 2),
            "seconds": round(result.seconds, 2),
            "rtf": round(result.rtf, 4),
            "path": dg.MetadataValue.path(str(ws.partition_dir(feature, singer))),
        }
        if feature == "pitch":
            ratio = result.extra["voiced_ratio"]
            metadata.update(voiced_ratio=round(ratio, 3), median_f0_hz=round(result.extra["median_f0_hz"], 1))
            checks.append(dg.AssetCheckResult(
                check_name="voiced_ratio_plausible", passed=VOICED_RANGE[0] <= ratio <= VOICED_RANGE[1],
                severity=dg.AssetCheckSeverity.WARN, metadata={"voiced_ratio": ratio}))
        if feature == "vec":
            metadata["vec_backend"] = info["vec_backend"]
            if info["vec_backend"] == "none":
                context.log.info(f"[{singer}] vec is disabled (features.vec.backend: none): zero-width features, "
                                 f"for a model without the vec path (model.vec_dim: 0)")
        if feature == "speaker_embedding":
            from svc_model.features.speaker import norm_error

            metadata["encoder"] = info.get("encoder", info["backend"])
            worst = norm_error(result.extra["norms"], unit=info.get("unit_norm", True))
            metadata["mean_embedding"] = dg.MetadataValue.path(str(ws.partition_dir(feature, singer) / "mean.npy"))
            checks.append(dg.AssetCheckResult(check_name="unit_norm", passed=worst <= UNIT_NORM_TOL,
                                              metadata={"max_norm_error": worst}))
        return dg.MaterializeResult(metadata=metadata, check_results=checks)

    return _asset


pitch = _feature_asset("pitch")
ppg = _feature_asset("ppg")
vec = _feature_asset("vec")
speaker_embedding = _feature_asset("speaker_embedding")


@dg.asset_check(
    asset=vec,
    additional_deps=[pitch, ppg],
    partitions_def=singers_partitions,
    blocking=True,
    description="For every segment, pitch frames (100 Hz) agree with ppg and vec frames (50 Hz) x2 within one frame.",
)
def frames_aligned(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
    import pandas as pd

    ws = workspace.get()
    singer = context.partition_key
    frames = {}
    for feature in ("pitch", "ppg", "vec"):
        manifest = pd.read_parquet(ws.partition_dir(feature, singer) / "manifest.parquet")
        frames[feature] = manifest.set_index("segment_id")["frames"]
    table = pd.DataFrame(frames).dropna()
    off = table[((table["ppg"] * 2 - table["pitch"]).abs() > 1) | ((table["vec"] * 2 - table["pitch"]).abs() > 1)]
    missing = sorted(set().union(*[set(f.index) for f in frames.values()]) - set(table.index))
    return dg.AssetCheckResult(
        passed=off.empty and not missing,
        metadata={"segments": len(table), "misaligned": len(off), "missing_in_some_feature": len(missing),
                  "examples": ", ".join(list(off.index[:5]) + missing[:5])},
    )
