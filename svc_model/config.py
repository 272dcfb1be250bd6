"""Typed configuration, loaded from ``configs/<profile>.yaml`` or any YAML path.

A bad config fails fast: every error names the file and the dotted field.
"""
from __future__ import annotations

from pathlib import Path

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


class SVCConfig(_Strict):
    """The whole configuration of one profile."""

    name: str = "custom"
    audio: AudioConfig = AudioConfig()

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
