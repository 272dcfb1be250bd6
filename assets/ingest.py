"""Ingest assets: the DVC-tracked recordings of each singer and their cleaned, sliced segments."""

import time

import dagster as dg

from assets.partitions import SINGERS, roster_version, singers_partitions
from assets.resources import WorkspaceResource

# Bump when clean_audio's code would change its output for the same input; the audio.* settings are hashed into
# the version per workspace (assets.versions).
CLEAN_AUDIO_VERSION = "1"
ALL_USABLE_CHECK = "all_recordings_usable"


@dg.observable_source_asset(
    partitions_def=singers_partitions,
    group_name="ingest",
    required_resource_keys={"workspace"},
    description="A singer's recordings in data/raw/<singer>/, never modified by the pipeline. "
    "Data version = the DVC md5 recorded in data/raw/<singer>.dvc.",
)
def raw_recordings(context) -> dg.DataVersionsByPartition:
    ws = context.resources.workspace.get()
    registered = set(context.instance.get_dynamic_partitions(SINGERS))
    versions = {}
    for singer in ws.singers():
        version = ws.singer_data_version(singer)
        if singer in registered and version:
            versions[singer] = dg.DataVersion(version)
    context.log.info(f"observed {len(versions)} singer(s): {sorted(versions)}")
    return dg.DataVersionsByPartition(versions)


@dg.observable_source_asset(
    group_name="ingest",
    description="Which singers are registered. Data version = a hash of the sorted names, so adding or removing "
    "a singer marks the training set as needing a rebuild before any feature is computed.",
)
def singer_roster(context) -> dg.DataVersion:

    return dg.DataVersion(roster_version(context.instance.get_dynamic_partitions(SINGERS)))


def _table_md(rows: list[tuple[str, str]], headers: tuple[str, str]) -> str:
    lines = [f"| {headers[0]} | {headers[1]} |", "| --- | --- |"]
    lines += [f"| `{a}` | {b.replace('|', '/')} |" for a, b in rows]
    return "\n".join(lines)


@dg.asset(
    partitions_def=singers_partitions,
    deps=[raw_recordings],
    code_version=CLEAN_AUDIO_VERSION,
    automation_condition=dg.AutomationCondition.eager(),
    group_name="ingest",
    kinds={"audio"},
    check_specs=[
        dg.AssetCheckSpec(
            ALL_USABLE_CHECK,
            asset="clean_audio",
            description="Every file in data/raw/<singer>/ decoded and passed validation (skipped files are listed).",
        )
    ],
    description="Decoded, mono, validated, loudness-normalized recordings sliced at silences into <= 15 s "
    "segments, at 32 kHz (model) and 16 kHz (features), plus manifest.parquet.",
)
def clean_audio(context: dg.AssetExecutionContext, workspace: WorkspaceResource) -> dg.MaterializeResult:
    from svc_model.preprocess import NoUsableAudioError, clean_singer, segment_stats

    ws = workspace.get()
    singer = context.partition_key
    cfg = ws.config().audio
    started = time.perf_counter()
    try:
        with ws.write_partition("clean_audio", singer) as out_dir:
            result = clean_singer(ws.singer_raw_dir(singer), out_dir, singer, cfg, log=context.log.info)
    except (NoUsableAudioError, FileNotFoundError) as exc:
        raise dg.Failure(description=str(exc)) from exc
    elapsed = time.perf_counter() - started
    stats = segment_stats(result.manifest["duration_s"].to_numpy())
    partition = ws.partition_dir("clean_audio", singer)
    skipped_md = _table_md(result.skipped, ("file", "problem")) if result.skipped else "none"
    return dg.MaterializeResult(
        metadata={
            "singer": singer,
            "files_used": result.files_used,
            "files_skipped": len(result.skipped),
            "skipped": dg.MetadataValue.md(skipped_md),
            "notes": dg.MetadataValue.md(_table_md(result.notes, ("file", "note")) if result.notes else "none"),
            "segments": stats["segments"],
            "hours": round(stats["hours"], 4),
            "segment_seconds_min_median_max": f"{stats['min_s']:.2f} / {stats['median_s']:.2f} / {stats['max_s']:.2f}",
            "source_seconds": round(result.source_seconds, 2),
            "sample_rates": f"{cfg.sample_rate} Hz (model), {cfg.feature_sample_rate} Hz (features)",
            "path": dg.MetadataValue.path(str(partition)),
            "manifest": dg.MetadataValue.path(str(partition / "manifest.parquet")),
            "seconds": round(elapsed, 2),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=ALL_USABLE_CHECK,
                passed=not result.skipped,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"skipped": len(result.skipped), "details": dg.MetadataValue.md(skipped_md)},
            )
        ],
    )
