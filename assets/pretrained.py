"""Importing whisper-vits-svc checkpoints into a workspace's registry (`svc pretrained import/download`), and the
training start point (`production`, else `base`, else scratch) that the svc_checkpoint asset uses."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from assets.workspace import Workspace

BASE = "base"
RESERVED_ALIASES = ("production", "candidate", "latest")  # production/candidate move by promotion and evaluation
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
START_POINTS = ("auto", "production", "base", "scratch")

# Which features give a model's input widths (what the workspace config must say to train or convert with it).
PPG_FEATURES = {
    384: "Whisper tiny/tiny.en (features.ppg.model: tiny.en; the tiny profile's ctranslate2 'bundled')",
    512: "Whisper base (features.ppg.model: base)",
    768: "Whisper small (features.ppg.model: small)",
    1024: "Whisper medium (features.ppg.model: medium)",
    1280: "whisper-vits-svc's PPG: features.ppg.backend: whisper, model: large-v2, drop_last_fraction: 0.25 "
          "(configs/base.yaml)",
}
VEC_FEATURES = {
    256: "whisper-vits-svc's vec: features.vec.backend: hubert-soft (configs/base.yaml)",
    768: "a HuBERT-base hidden state (features.vec.backend: transformers, model: facebook/hubert-base-ls960)",
}


def models_dir(ws: Workspace) -> Path:
    """Imported and downloaded pretrained files (git-ignored: the registry holds the converted checkpoints)."""
    return ws.root / "models" / "pretrained"


@dataclass
class ImportReport:
    kind: str
    sha256: str
    source: Path
    converted: Path
    version: str
    alias: str
    model_cfg: object
    singers: list[str]
    missing_parts: list[str] = field(default_factory=list)
    workspace_mismatch: list[str] = field(default_factory=list)  # settings the workspace needs for this model


def check_alias(alias: str) -> str:
    if not ALIAS_RE.fullmatch(alias or "") or alias.lower() in RESERVED_ALIASES:
        raise ValueError(f"invalid alias {alias!r}: use letters, digits, '-' or '_' starting with a letter; "
                         f"{', '.join(RESERVED_ALIASES)} are set by promotion and evaluation, not by an import")
    return alias


def workspace_mismatch(ws_cfg, model_cfg) -> list[str]:
    """What the workspace config must change to train from (or convert with) a model of ``model_cfg``: one line
    per setting, with the features that give the widths."""
    from svc_model.pretrained import ANCHOR_SPEAKER_ENCODER, model_differences

    lines = []
    found = {k: v for k, v, _ in model_differences(model_cfg, ws_cfg.model)}
    have = ws_cfg.model.model_dump(mode="json")
    if "ppg_dim" in found:
        lines.append(f"model.ppg_dim: {found['ppg_dim']} (workspace: {have['ppg_dim']}), with PPG features of that "
                     f"width: {PPG_FEATURES.get(found['ppg_dim'], 'a Whisper encoder of that width')}")
    if "vec_dim" in found:
        random = (f"a vec extractor of that width (a random HuBERT: features.vec.backend: transformers, "
                  f"random_hidden_size: {found['vec_dim']})")
        lines.append(f"model.vec_dim: {found['vec_dim']} (workspace: {have['vec_dim']}), with vec features of that "
                     f"width: {VEC_FEATURES.get(found['vec_dim'], random)}")
    if "spk_dim" in found:
        lines.append(f"model.spk_dim: {found['spk_dim']} (workspace: {have['spk_dim']})")
    rest = [f"{k}: {v}" for k, v in found.items() if k not in ("ppg_dim", "vec_dim", "spk_dim")]
    if rest:
        lines.append("to fine-tune from it, the rest of the model section too: " + ", ".join(
            f"model.{item}" for item in rest))
    if ws_cfg.features.speaker.backend != ANCHOR_SPEAKER_ENCODER:
        lines.append(f"features.speaker.backend: {ANCHOR_SPEAKER_ENCODER} (workspace: "
                     f"{ws_cfg.features.speaker.backend}): the model was trained on the Mozilla LSTM d-vectors")
    return lines


def import_pretrained(ws: Workspace, path: str | Path, alias: str = BASE,
                      speakers: dict[str, str | Path] | None = None) -> ImportReport:
    """Read and check a whisper-vits-svc file, convert it once into ``models/pretrained/``, register it as a new
    version of the workspace's model with ``alias`` and tags source_file, sha256, kind, speaker_encoder.

    Nothing is written or registered unless every check passes."""
    import mlflow
    from assets import tracking
    from assets.workspace import validate_singer_name
    from svc_model.pretrained import (
        ANCHOR_SPEAKER_ENCODER,
        load_speaker_file,
        read_anchor_checkpoint,
        to_project_checkpoint,
    )

    check_alias(alias)
    cfg = ws.config()
    anchor = read_anchor_checkpoint(path, cfg)
    embeddings = {validate_singer_name(name): load_speaker_file(file, anchor.model_cfg.spk_dim)
                  for name, file in (speakers or {}).items()}
    source = Path(path)
    converted = to_project_checkpoint(anchor, cfg, embeddings,
                                      models_dir(ws) / f"{source.stem}-{anchor.sha256[:12]}")
    tags = {"source_file": source.name, "sha256": anchor.sha256, "kind": anchor.kind,
            "speaker_encoder": ANCHOR_SPEAKER_ENCODER, "imported": "true"}
    if embeddings:
        tags["singers"] = ",".join(sorted(embeddings))
    mlflow.set_tracking_uri(ws.tracking_uri)
    with mlflow.start_run(experiment_id=tracking.experiment_id(ws), run_name=f"import-{anchor.sha256[:8]}",
                          tags={**tags, "git_commit": tracking.git_commit(ws)}) as run:
        tracking.log_params(tracking.client(ws), run.info.run_id,
                            {f"model.{k}": v for k, v in anchor.model_cfg.model_dump(mode="json").items()})
        version = tracking.register_checkpoint(ws, run.info.run_id, converted, tags=tags)
    client = tracking.client(ws)
    client.set_registered_model_alias(ws.settings.registered_model_name, alias, version.version)
    return ImportReport(anchor.kind, anchor.sha256, source, converted, str(version.version), alias,
                        anchor.model_cfg, sorted(embeddings), anchor.missing_parts,
                        workspace_mismatch(cfg, anchor.model_cfg))


@dataclass
class StartPoint:
    label: str  # "production:v3", "base:v1" or "scratch": the init_from tag
    checkpoint: Path | None
    version: str | None


def resolve_start_point(ws: Workspace, start_from: str = "auto", fine_tune: bool = False,
                        log=print, warn=print) -> StartPoint:
    """auto: ``production`` if that alias exists, else ``base``, else scratch. ``fine_tune`` (the old flag) asks
    for production and falls back as auto does, with a warning. An explicit production/base that does not
    exist is an error. The starting model's shape-determining settings must equal the workspace config's."""
    from assets import tracking

    if start_from not in START_POINTS:
        raise ValueError(f"start_from must be one of {', '.join(START_POINTS)}, got {start_from!r}")
    if fine_tune and start_from == "scratch":
        raise ValueError("fine_tune and start_from='scratch' contradict each other")
    order = {"auto": (tracking.PRODUCTION, BASE), "production": (tracking.PRODUCTION,), "base": (BASE,),
             "scratch": ()}[start_from]
    if fine_tune and start_from == "auto":
        order = (tracking.PRODUCTION, BASE)
        if tracking.alias_version(ws, tracking.PRODUCTION) is None:
            warn("fine_tune requested but no production model yet: starting from "
                 + ("'base'" if tracking.alias_version(ws, BASE) is not None else "scratch"))
    for alias in order:
        if tracking.alias_version(ws, alias) is None:
            continue
        found = tracking.resolve_model(ws, alias)
        version = found.version
        # The generator (safetensors) with the version's training state (discriminator) where it was logged.
        checkpoint = found.fine_tuning_path()
        label = f"{alias}:v{version.version}"
        check_start_point(ws, checkpoint, label)
        log(f"starting from {label} ({checkpoint})")
        return StartPoint(label, checkpoint, str(version.version))
    if start_from in ("production", "base"):
        raise ValueError(f"start_from={start_from!r}, but no version of {ws.settings.registered_model_name!r} has "
                         f"the alias {start_from!r}" + (" (import one: `svc pretrained import FILE`)"
                                                        if start_from == BASE else " (promote one: `svc promote`)"))
    log("starting from scratch" + (" (no production or base model in the registry)" if start_from == "auto" else ""))
    return StartPoint("scratch", None, None)


def check_start_point(ws: Workspace, checkpoint: Path, label: str) -> None:
    """Refuse a starting model whose shapes differ from the workspace config's model, naming both."""
    from svc_model.config import SVCConfig
    from svc_model.pretrained import model_differences
    from svc_model.train import same_speaker_encoder
    from svc_model.weights import read_model_info

    cfg = ws.config()
    # A model folder's config.json (a .pt: memory-mapped with weights_only=True); the weights are not read here.
    config, encoder = read_model_info(checkpoint)
    theirs = SVCConfig.model_validate(config)
    diffs = model_differences(theirs.model, cfg.model)
    if theirs.spectrogram.n_fft != cfg.spectrogram.n_fft:
        diffs.append(("spectrogram.n_fft", theirs.spectrogram.n_fft, cfg.spectrogram.n_fft))
    # Embeddings of another encoder live in another space (the trainer refuses them too, but only inside the run).
    if not same_speaker_encoder(encoder, cfg.features.speaker.backend):
        diffs.append(("features.speaker.backend", encoder.split(":")[0], cfg.features.speaker.backend))
    if diffs:
        listed = "; ".join(f"{k if '.' in k else 'model.' + k}: {a} vs {b}" for k, a, b in diffs)
        raise ValueError(f"cannot start from {label}: it differs from the workspace config {ws.settings.config!r} "
                         f"(starting model vs workspace): {listed}. Make the workspace config match it, or train "
                         f"from scratch (svc train --from-scratch)")
