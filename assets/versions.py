"""Code versions that follow the configuration.

An asset's output changes when its code changes (the hand-bumped ``code_version`` on its decorator) or when a
setting that it reads changes (a pitch backend, a Whisper model, a loudness target...). Dagster fixes code
versions when Definitions load, so :func:`bind_code_versions` appends a short hash of each asset's own
output-changing settings, read from the workspace's config, to that hand-bumped version
(``build_definitions(ws)`` calls it). Changing ``features.pitch.backend`` then marks exactly the pitch partitions
stale for every singer.

Only an asset's *own* settings go into its version. What is downstream follows through Dagster's data versions:
with a code version set, an asset's data version is a hash of its code version and its inputs' data versions, so
a rebuilt pitch partition has a new data version and the training set that read the old one becomes stale
(and ``orchestration.build.status_resolver`` calls it stale already while pitch waits to be rebuilt). Putting the
feature settings into the training set's version as well would be redundant.

Cheap on purpose (pydantic config only, no torch): the UI loads the code location on every reload.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from svc_model.features import FEATURES, output_settings, settings_digest

# train.* settings that change how often a run logs, validates or saves, not the weights it ends with; and the
# valid split, which is the training set's (the checkpoint sees it through the training set's data version).
_TRAIN_SETTINGS_WITHOUT_EFFECT = ("log_every", "checkpoint_every", "validate_every", "keep_checkpoints", "keep_runs",
                                  "valid_fraction")


def asset_settings(asset: str, cfg) -> dict[str, Any] | None:
    """The settings of ``cfg`` (an :class:`~svc_model.config.SVCConfig`) that change ``asset``'s output for the
    same inputs, or None for an asset whose output no setting changes (sources, promotion)."""
    if asset == "clean_audio":
        return cfg.audio.model_dump(mode="json")  # every audio.* field changes what is kept, cut or normalized
    if asset in FEATURES:
        return output_settings(asset, cfg.features)
    if asset == "training_set":
        return {"valid_fraction": cfg.train.valid_fraction}
    if asset == "svc_checkpoint":
        train = cfg.train.model_dump(mode="json")
        for key in _TRAIN_SETTINGS_WITHOUT_EFFECT:
            train.pop(key, None)
        return {"model": cfg.model.model_dump(mode="json"), "spectrogram": cfg.spectrogram.model_dump(mode="json"),
                "train": train}
    if asset == "evaluation_report":
        return cfg.evaluation.model_dump(mode="json")
    return None


def versioned(code_version: str, settings: dict[str, Any]) -> str:
    """``"<hand-bumped version>+cfg.<10 hex>"``: the code and the settings it was run with."""
    return f"{code_version}+cfg.{settings_digest(settings)}"


def bind_code_versions(assets: Iterable, cfg) -> list:
    """``assets`` with each code version extended by a hash of that asset's settings in ``cfg``."""
    bound = []
    for asset in assets:
        if hasattr(asset, "map_asset_specs"):  # AssetsDefinition; source assets have no code version

            def bind(spec):
                settings = asset_settings(spec.key.to_user_string(), cfg)
                if settings is None or spec.code_version is None:
                    return spec
                return spec.replace_attributes(code_version=versioned(spec.code_version, settings))

            asset = asset.map_asset_specs(bind)
        bound.append(asset)
    return bound
