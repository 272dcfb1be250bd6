"""Dagster asset definitions: thin wrappers that read inputs, call svc_model, write files, return metadata."""
import warnings

import dagster as dg

# observable_source_asset (beta) is the documented way to version external files; partitioned asset checks
# (preview) are how a per-singer check runs with its partition.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
