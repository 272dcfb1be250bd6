"""Feature extractors, one small class per feature and backend, on a shared base (see ``base.py``)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

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


def output_settings(feature: str, features_cfg) -> dict[str, Any]:
    """The settings of ``features_cfg`` that change ``feature``'s output for the same audio: the backend and what
    that backend reads (model, layer, thresholds...). Pure config, no imports: the Dagster code versions are built
    from it when Definitions load.

    Left out on purpose: batch sizes (a batch gives exactly the one-by-one result), ``device`` and ``fp16`` (the
    same features at another precision), and where weights are cached (``download_root``, ``cache_dir``). Weights
    files are named by their path, not hashed: replacing a file under the same path is not seen here (the speaker
    encoder's weights hash is still checked at training and conversion, ``speaker.encoder_id``).
    """
    if feature == "pitch":
        p = features_cfg.pitch
        out = {"backend": p.backend, "fmin": p.fmin, "fmax": p.fmax, "median_filter": p.median_filter}
        if p.backend == "crepe":
            out.update(crepe_model=p.crepe_model, periodicity_threshold=p.periodicity_threshold)
        else:
            out.update(fcpe_threshold=p.fcpe_threshold)
        return out
    if feature == "ppg":
        p = features_cfg.ppg
        out = {"backend": p.backend, "model": p.model, "piece_s": p.piece_s, "mel_noise_std": p.mel_noise_std}
        if p.backend == "ctranslate2":
            out.update(compute_type=p.compute_type)
        else:
            out.update(pretrained=p.pretrained, drop_last_fraction=p.drop_last_fraction)
        return out
    if feature == "vec":
        v = features_cfg.vec
        if v.backend == "none":
            return {"backend": "none"}
        if v.backend == "hubert-soft":
            return {"backend": v.backend, "pretrained": v.pretrained,
                    **({"soft_weights": v.soft_weights} if v.pretrained else {"seed": v.seed})}
        out = {"backend": v.backend, "layer": v.layer, "pretrained": v.pretrained}
        if v.pretrained:
            out.update(model=v.model)
        else:
            out.update(random_hidden_size=v.random_hidden_size, random_layers=v.random_layers, seed=v.seed)
        return out
    if feature == "speaker_embedding":
        s = features_cfg.speaker
        return {"backend": s.backend, **({"lstm_weights": s.lstm_weights} if s.backend == "mozilla-lstm" else {})}
    raise ValueError(f"unknown feature {feature!r}; choose from {FEATURES}")


def settings_digest(settings: dict[str, Any]) -> str:
    """A short, stable hash of a settings dict (sorted JSON), for code versions."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


__all__ = ["FEATURES", "FeatureExtractor", "MissingWeightsError", "build_extractor", "output_settings",
           "settings_digest"]
