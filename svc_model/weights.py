"""Model files without pickles: what conversion loads, what fine-tuning adds, and the one safe way to read either.

A **model folder** is what a registered version holds and what conversion reads:

- ``generator.safetensors``: the generator's state dict (safetensors: raw tensors and a JSON header, no code can
  be in it); its metadata names the format, the training step and, for an import, the source file;
- ``config.json``: the full :class:`svc_model.config.SVCConfig` the model was trained with;
- ``singers.json``: ``{"speaker_encoder": ..., "singers": {name: {"embedding": [...], "median_f0": ..., ...}}}``.

It may also hold ``training_state.pt`` (discriminator, both optimizers, loss scaler, step): only fine-tuning reads
it. A training checkpoint (``runs/*/step-*.pt``, :meth:`svc_model.train.Trainer.state_dict`) is a ``torch.save``
of tensors and plain containers only, so it too loads with ``weights_only=True``.

Every torch file is read with :func:`load_torch_file` (``weights_only=True``): a file holding a pickled object,
ours or anyone's, is refused with an error naming it, and nothing in it runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GENERATOR_FILE = "generator.safetensors"
CONFIG_FILE = "config.json"
SINGERS_FILE = "singers.json"
TRAINING_STATE_FILE = "training_state.pt"
FORMAT = "voicecraft-svc-model/1"
# What a training checkpoint holds beyond the generator and the singer table: fine-tuning's part.
TRAINING_STATE_KEYS = ("step", "config", "discriminator", "optim_g", "optim_d", "scaler", "base_lr",
                       "speaker_encoder")


# Checkpoints written before the RNG state became tensors hold numpy's state as a plain ndarray. Rebuilding an
# ndarray of numbers runs no code (an object array would need further globals, which stay refused): allowing
# these keeps those runs resumable without ever calling weights_only=False.
_NUMPY_ARRAY_GLOBALS = [getattr(np, "_core", np.core).multiarray._reconstruct, np.ndarray, np.dtype,
                        type(np.dtype(np.uint32))]


class CheckpointError(ValueError):
    """A model file that cannot be read safely or is not a VoiceCraft SVC model; the message names the file."""


def load_torch_file(path: str | Path, device: str | torch.device = "cpu", what: str = "checkpoint",
                    mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only. A pickled object (code that
    would run on load), a truncated file or a foreign format raises :class:`CheckpointError` naming the file."""
    from svc_model.pretrained import _load_failure

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            data = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as exc:  # a pickle with code in it, a truncated file, not a torch file at all
        raise CheckpointError(f"{path}: not a loadable {what} of plain tensors ({_load_failure(exc)})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a VoiceCraft SVC {what} (a {type(data).__name__}, expected a dict)")
    return data


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / GENERATOR_FILE).is_file()


def write_model_folder(checkpoint: dict, out: str | Path, training_state: bool = True) -> Path:
    """Write a training checkpoint dict (or :func:`svc_model.pretrained.to_project_checkpoint`'s) as a model
    folder at ``out``, atomically (a failure leaves no half folder). ``training_state``: also write
    ``training_state.pt`` when the checkpoint has a discriminator."""
    from safetensors.torch import save_file

    from svc_model.storage import atomic_dir

    generator = {k: v.detach().to("cpu").contiguous().clone() for k, v in checkpoint["generator"].items()}
    metadata = {"format": FORMAT, "step": str(int(checkpoint.get("step", 0)))}
    if checkpoint.get("imported_from"):
        metadata["imported_from"] = json.dumps(checkpoint["imported_from"])
    if checkpoint.get("init_from"):
        metadata["init_from"] = str(checkpoint["init_from"])
    with atomic_dir(out) as tmp:
        save_file(generator, str(tmp / GENERATOR_FILE), metadata=metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(checkpoint["config"], indent=1))
        (tmp / SINGERS_FILE).write_text(json.dumps({"speaker_encoder": checkpoint.get("speaker_encoder") or "",
                                                    "singers": checkpoint.get("singers") or {}}))
        if training_state and "discriminator" in checkpoint:
            state = {k: checkpoint[k] for k in TRAINING_STATE_KEYS if k in checkpoint}
            torch.save(state, tmp / TRAINING_STATE_FILE)
    return Path(out)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what} of the model folder {path.parent})")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_model_folder(folder: str | Path, device: str | torch.device = "cpu",
                      training_state: bool = False) -> dict:
    """A model folder as a checkpoint dict (``config``, ``generator``, ``singers``, ``speaker_encoder``,
    ``step``, ``imported_from``); with ``training_state``, the discriminator and optimizer states of
    ``training_state.pt`` where the folder has one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    folder = Path(folder)
    weights = folder / GENERATOR_FILE
    try:
        generator = load_file(str(weights), device=str(device))
        with safe_open(str(weights), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{weights}: not a VoiceCraft SVC generator (format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r})")
    table = _read_json(folder / SINGERS_FILE, "the singer table")
    checkpoint = {
        "config": _read_json(folder / CONFIG_FILE, "the model's config"),
        "generator": generator,
        "singers": table.get("singers") or {},
        "speaker_encoder": table.get("speaker_encoder") or "",
        "step": int(metadata.get("step", 0)),
    }
    if "imported_from" in metadata:
        checkpoint["imported_from"] = json.loads(metadata["imported_from"])
    state_file = folder / TRAINING_STATE_FILE
    if training_state and state_file.is_file():
        state = load_torch_file(state_file, device, "training state")
        checkpoint.update({k: v for k, v in state.items() if k not in ("config", "speaker_encoder")})
    return checkpoint


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu", training_state: bool = False) -> dict:
    """Any model file the project reads, as a checkpoint dict: a model folder (or its ``generator.safetensors``)
    or a training checkpoint ``.pt`` (``weights_only=True``). ``training_state``: include the discriminator and
    optimizers (a ``.pt`` always has them)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if path.is_dir():
        if not is_model_folder(path):
            raise CheckpointError(f"{path}: a folder without {GENERATOR_FILE}; expected a model folder (a "
                                  f"registered version) or a training checkpoint file (runs/*/step-*.pt)")
        return read_model_folder(path, device, training_state)
    checkpoint = load_torch_file(path, device)
    missing = [k for k in ("config", "generator") if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a VoiceCraft SVC checkpoint (no {', '.join(missing)}; found "
                              f"{sorted(checkpoint)[:6]})")
    return checkpoint


def read_model_info(path: str | Path) -> tuple[dict, str]:
    """``(config, speaker_encoder)`` of a model folder (its JSON only) or a training checkpoint (memory-mapped,
    ``weights_only=True``): what deciding whether a model fits a workspace needs, without loading its weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if path.is_dir():
        if not is_model_folder(path):
            raise CheckpointError(f"{path}: a folder without {GENERATOR_FILE}; expected a model folder")
        table = _read_json(path / SINGERS_FILE, "the singer table")
        return _read_json(path / CONFIG_FILE, "the model's config"), table.get("speaker_encoder") or ""
    checkpoint = load_torch_file(path, mmap=True)
    if "config" not in checkpoint:
        raise CheckpointError(f"{path}: not a VoiceCraft SVC checkpoint (no config)")
    return checkpoint["config"], checkpoint.get("speaker_encoder") or ""
