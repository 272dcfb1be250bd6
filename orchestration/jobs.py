"""Jobs: what a sensor or a person launches as one run."""
import dagster as dg

from assets.partitions import singers_partitions

# Every asset partitioned by singer, in graph order. A new singer needs exactly these runs.
PER_SINGER_ASSETS = ["clean_audio", "pitch", "ppg", "vec", "speaker_embedding"]

# What one training run materializes, in graph order.
TRAINING_ASSETS = ["training_set", "svc_checkpoint", "evaluation_report"]

build_singer_job = dg.define_asset_job(
    "build_singer",
    selection=dg.AssetSelection.assets(*PER_SINGER_ASSETS),
    partitions_def=singers_partitions,
    description="Build every per-singer asset for one singer partition.",
)

# Training runs in one process: one MLflow run, one writer to the SQLite store, no parallel GPU steps.
train_job = dg.define_asset_job(
    "train",
    selection=dg.AssetSelection.assets(*TRAINING_ASSETS),
    executor_def=dg.in_process_executor,
    description="Rebuild the training set, train (or fine-tune from production), register and evaluate a version.",
)

promote_job = dg.define_asset_job(
    "promote",
    selection=dg.AssetSelection.assets("production_model"),
    description="Point 'production' at the candidate (or a chosen version) if its evaluation allows it.",
)
