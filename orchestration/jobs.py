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

# On Kubernetes (deploy/helm/values.yaml), the K8sRunLauncher puts every run on the CPU node pool; this tag moves a
# `train` run to the GPU pool with one GPU. Same label key as the Helm values' default, so the tag's value replaces
# it. Other run launchers (local `svc ui`, the compose deployment) ignore the tag; `svc train` does not use it.
NODE_POOL_LABEL = "voicecraft.dev/node-pool"
TRAIN_K8S_CONFIG = {
    "container_config": {"resources": {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                                       "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}}},
    "pod_spec_config": {"node_selector": {NODE_POOL_LABEL: "gpu"},
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}

# Training runs in one process: one MLflow run, one writer to the SQLite store, no parallel GPU steps.
train_job = dg.define_asset_job(
    "train",
    selection=dg.AssetSelection.assets(*TRAINING_ASSETS),
    executor_def=dg.in_process_executor,
    description="Rebuild the training set, train (or fine-tune from production), register and evaluate a version.",
    run_tags={"dagster-k8s/config": TRAIN_K8S_CONFIG},
)

promote_job = dg.define_asset_job(
    "promote",
    selection=dg.AssetSelection.assets("production_model"),
    description="Point 'production' at the candidate (or a chosen version) if its evaluation allows it.",
)
