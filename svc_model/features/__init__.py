"""Feature extractors, one small class per feature and backend, on a shared base (see ``base.py``)."""
from __future__ import annotations

from pathlib import Path

from svc_model.features.base import FeatureExtractor, MissingWeightsError

FEATURES = ("pitch", "ppg", "vec", "speaker_embedding")


def build_extractor(feature: str, features_cfg, root: Path | None = None) -> FeatureExtractor:
    """The configured extractor for ``feature``; heavy imports happen here, not at package import."""
    if feature == "pitch":
        from svc_model.features.pitch import PitchExtractor as cls
    elif feature == "ppg":
        from svc_model.features.ppg import PPGExtractor as cls
    elif feature == "vec":
        from svc_model.features.vec import VecExtractor as cls
    elif feature == "speaker_embedding":
        from svc_model.features.speaker import SPEAKER_BACKENDS

        cls = SPEAKER_BACKENDS[features_cfg.speaker.backend]
    else:
        raise ValueError(f"unknown feature {feature!r}; choose from {FEATURES}")
    return cls.from_config(features_cfg, root)


__all__ = ["FEATURES", "FeatureExtractor", "MissingWeightsError", "build_extractor"]
