"""Per-singer feature assets: pitch, ppg, vec and speaker_embedding, each read from clean_audio's 16 kHz segments.

The four share one shape (``_feature_asset``): read the clean_audio manifest, run the extractor that the
``extractors`` resource loaded once for this process, write one file per segment plus a manifest atomically,
and report metadata and checks.
"""
import dagster as dg

from assets.partitions import singers_partitions
from assets.resources import FeatureExtractorsResource, WorkspaceResource

# Bump a version when that asset's code would change its output for the same input and settings. The settings
# that change an output (backend, model, thresholds...) are hashed into the version per workspace when the
# Definitions are built (assets.versions), so a config change needs no bump here.
CODE_VERSIONS = {"pitch": "1", "ppg": "2", "vec": "2", "speaker_embedding": "1"}
VOICED_RANGE = (0.05, 0.98)  # a singer's segments outside this are likely noise, silence or a tone
FRAME_RATES = {"pitch": 100, "ppg": 50, "vec": 50}  # frames per second of audio, as stored

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
            metadata["encoder"] = info.get("encoder", info["backend"])
            metadata["mean_embedding"] = dg.MetadataValue.path(str(ws.partition_dir(feature, singer) / "mean.npy"))
        return dg.MaterializeResult(metadata=metadata, check_results=checks)

    return _asset


pitch = _feature_asset("pitch")
ppg = _feature_asset("ppg")
vec = _feature_asset("vec")
speaker_embedding = _feature_asset("speaker_embedding")


def _frames_match_audio(feature: str) -> dg.AssetChecksDefinition:
    from svc_model.features.store import FRAME_TOLERANCE

    rate = FRAME_RATES[feature]

    @dg.asset_check(
        name="frames_match_audio",
        asset=feature,
        additional_deps=["clean_audio"],
        partitions_def=singers_partitions,
        blocking=True,
        description=f"Every segment's stored {feature} file has duration x {rate} frames (within {FRAME_TOLERANCE} "
        f"frame) of its clean audio, read from the file itself: catches a file cut short or written at the wrong "
        f"rate, and features left from before the audio was re-sliced.",
    )
    def _check(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
        from svc_model.features.store import check_frames
        from svc_model.preprocess import load_manifest

        ws = workspace.get()
        singer = context.partition_key
        result = check_frames(load_manifest(ws.partition_dir("clean_audio", singer)),
                              ws.partition_dir(feature, singer), rate)
        return dg.AssetCheckResult(
            passed=result.passed,
            metadata={"segments": result.segments, "mismatched": len(result.mismatched),
                      "missing": len(result.missing), "worst_offset_frames": result.worst_offset,
                      "tolerance_frames": FRAME_TOLERANCE,
                      "examples": "; ".join(result.mismatched[:5] + result.missing[:5])},
        )

    return _check


pitch_frames_match_audio = _frames_match_audio("pitch")
ppg_frames_match_audio = _frames_match_audio("ppg")
vec_frames_match_audio = _frames_match_audio("vec")


@dg.asset_check(
    asset=speaker_embedding,
    additional_deps=["clean_audio"],
    partitions_def=singers_partitions,
    blocking=True,
    description="One finite vector per segment of the encoder's dimension, norm within [0.1, 1] (1 for unit-norm "
    "encoders), not the same vector for every segment, and mean.npy the mean of the segments' vectors.",
)
def embeddings_valid(context: dg.AssetCheckExecutionContext, workspace: WorkspaceResource) -> dg.AssetCheckResult:
    from svc_model.features.speaker import SPEAKER_BACKENDS
    from svc_model.features.store import check_embeddings
    from svc_model.preprocess import load_manifest

    ws = workspace.get()
    singer = context.partition_key
    encoder = SPEAKER_BACKENDS[ws.config().features.speaker.backend]
    result = check_embeddings(load_manifest(ws.partition_dir("clean_audio", singer)),
                              ws.partition_dir("speaker_embedding", singer), encoder.dim, encoder.unit_norm)
    return dg.AssetCheckResult(
        passed=result.passed,
        metadata={"segments": result.segments, "problems": len(result.problems), "dim": encoder.dim,
                  "examples": "; ".join(result.problems[:5])},
    )


FEATURE_CHECKS = [pitch_frames_match_audio, ppg_frames_match_audio, vec_frames_match_audio, embeddings_valid]
