"""Dagster asset definitions: thin wrappers that read inputs, call svc_model, write files, return metadata."""
import warnings

import dagster as dg

# observable_source_asset is marked beta; it is the documented way to version external files.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
