"""whisper-vits-svc checkpoints: the published base (``sovits5.0.pretrain.pth``: ``model_g`` + ``model_d``) and
singer models exported by its ``svc_export.py`` (``model_g`` with ``enc_p``, ``flow`` and ``dec`` only).

The key mapping from the anchor's names to ours is two rules:
1. four top-level prefixes are renamed (:data:`svc_model.model.synthesizer.ANCHOR_PREFIXES`, e.g.
   ``enc_p.`` -> ``prior_encoder.``, ``dec.`` -> ``decoder.``); discriminator keys keep their names;
2. the anchor's old-style weight norm stores ``<layer>.weight_g`` / ``<layer>.weight_v``; PyTorch's
   parametrized weight norm (ours) stores ``<layer>.parametrizations.weight.original0`` / ``original1``.
Every key and shape is then checked against the model that the file's own shapes describe; the first mismatch
is named with what was expected.

Loading a foreign file: ``torch.load(weights_only=True)`` (plain tensors and containers only, no code runs), and
only after that every key and shape is checked. :func:`to_project_checkpoint` then writes it once in the project's
own form, a model folder without pickles (:mod:`svc_model.weights`: ``generator.safetensors`` + JSON config and
singer table, the discriminator in ``training_state.pt``); the foreign file is not loaded again. :func:`download_published` fetches the files in :data:`PUBLISHED`.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from svc_model.config import ModelConfig, SVCConfig, load_config

PUBLISHED = {
    # name -> file, url, size in bytes, sha256; fetched by `svc pretrained download NAME`.
    # The url is the release asset behind the anchor README's link (github.com/PlayVoice/so-vits-svc-5.0/releases/
    # tag/5.0). size and sha256 are unknown here (written on a machine with no network): fill them in on a
    # connected machine; once they are set, a download that differs is refused.
    "sovits5.0": {
        "file": "sovits5.0.pretrain.pth",
        "url": "https://github.com/PlayVoice/so-vits-svc-5.0/releases/download/5.0/sovits5.0.pretrain.pth",
        "size": None, "sha256": None,
    },
}
# whisper-vits-svc's models were trained on the Mozilla TTS LSTM d-vectors (svc_model.features.speaker's
# "mozilla-lstm" backend). The weights' hash is unknown for an import, so the plain backend name is recorded.
ANCHOR_SPEAKER_ENCODER = "mozilla-lstm"
# ModelConfig fields that only act in training (no parameter's shape depends on them).
TRAINING_ONLY_FIELDS = ("dropout", "ppg_noise", "vec_noise")

WEIGHT_NORM = ((".weight_g", ".parametrizations.weight.original0"),
               (".weight_v", ".parametrizations.weight.original1"))
SINGER_MODEL_PARTS = ("enc_p.", "flow.", "dec.")


class PretrainedError(ValueError):
    """A file is not a whisper-vits-svc checkpoint, or its keys/shapes do not fit the model."""


@dataclass
class AnchorCheckpoint:
    path: Path
    kind: str  # "pretrain" (model_g + model_d) or "singer" (exported model_g)
    sha256: str
    model_cfg: ModelConfig
    generator: dict[str, torch.Tensor]  # our key names
    discriminator: dict[str, torch.Tensor] | None
    missing_parts: list[str] = field(default_factory=list)  # our modules left at their initialization


def anchor_to_ours(key: str) -> str:
    head, _, rest = key.partition(".")
    from svc_model.model.synthesizer import ANCHOR_PREFIXES

    if head in ANCHOR_PREFIXES:
        key = f"{ANCHOR_PREFIXES[head]}.{rest}"
    for old, new in WEIGHT_NORM:
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def ours_to_anchor(key: str) -> str:
    from svc_model.model.synthesizer import ANCHOR_PREFIXES

    for new, old in ((n, o) for o, n in WEIGHT_NORM):
        if key.endswith(new):
            key = key[: -len(new)] + old
            break
    head, _, rest = key.partition(".")
    for anchor, ours in ANCHOR_PREFIXES.items():
        if head == ours:
            return f"{anchor}.{rest}"
    return key


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shape(sd: dict, key: str, path: Path) -> tuple[int, ...]:
    if key not in sd:
        raise PretrainedError(f"{path}: not a whisper-vits-svc generator: key {key!r} is missing")
    return tuple(sd[key].shape)


def _count(sd: dict, prefix: str) -> int:
    """Number of consecutive ``prefix<i>.`` entries."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def infer_model_config(sd: dict[str, torch.Tensor], path: Path, base: ModelConfig | None = None) -> ModelConfig:
    """The :class:`ModelConfig` whose model has this (anchor-named) generator state dict's shapes. Widths and
    depths are read from the shapes; what shapes cannot tell (upsample strides, periods) comes from ``base``."""
    base = base or load_config("base").model
    hidden, ppg_dim, _ = _shape(sd, "enc_p.pre.weight", path)
    inter = _shape(sd, "enc_p.proj.weight", path)[0] // 2
    vec_dim = _shape(sd, "enc_p.hub.weight", path)[1] if "enc_p.hub.weight" in sd else 0
    filter_channels = _shape(sd, "enc_p.enc.ffn_layers.0.conv_1.weight", path)[0]
    k_channels = _shape(sd, "enc_p.enc.attn_layers.0.emb_rel_k", path)[2]
    spk_dim = _shape(sd, "dec.adapter.W_scale.weight", path)[1]
    gin = _shape(sd, "emb_g.weight", path)[0] if "emb_g.weight" in sd else base.gin_channels
    n_ups = _count(sd, "dec.ups.")
    kernels = [_shape(sd, f"dec.ups.{i}.weight_v", path)[2] if f"dec.ups.{i}.weight_v" in sd
               else _shape(sd, f"dec.ups.{i}.weight", path)[2] for i in range(n_ups)]
    if kernels != list(base.upsample_kernel_sizes):
        raise PretrainedError(f"{path}: decoder upsampling kernels {kernels} differ from the profile's "
                              f"{base.upsample_kernel_sizes}; the strides cannot be read from a state dict")
    n_res = _count(sd, "dec.resblocks.") // n_ups
    res_kernels = [_shape(sd, f"dec.resblocks.{j}.convs1.0.weight_v", path)[2] for j in range(n_res)]
    res_dilations = [list(base.resblock_dilation_sizes[0][: _count(sd, f"dec.resblocks.{j}.convs1.")])
                     for j in range(n_res)]
    flow_wavenet = [k for k in sd if k.startswith("flow.flows.0.enc.in_layers.")]
    values = base.model_dump()
    values.update(
        ppg_dim=ppg_dim, vec_dim=vec_dim, spk_dim=spk_dim, gin_channels=gin, hidden_channels=hidden,
        inter_channels=inter, filter_channels=filter_channels, n_heads=hidden // k_channels,
        prior_layers=_count(sd, "enc_p.enc.attn_layers."),
        posterior_layers=_count(sd, "enc_q.enc.in_layers.") or base.posterior_layers,
        flow_layers=len({k.split(".")[2] for k in sd if k.startswith("flow.flows.")}),
        flow_wavenet_layers=len({k.split(".")[5] for k in flow_wavenet}),
        upsample_initial_channel=_shape(sd, "dec.conv_pre.weight", path)[0],
        resblock_kernel_sizes=res_kernels, resblock_dilation_sizes=res_dilations)
    try:
        return ModelConfig.model_validate(values)
    except ValueError as exc:
        raise PretrainedError(f"{path}: its shapes describe no valid model: {exc}") from exc


def check_against(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path: Path, what: str,
                  allow_missing_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Raise naming the first key that is missing, unexpected or of the wrong shape (in the anchor's names).
    Returns the keys that are missing but allowed (left at their initialization)."""
    for key, tensor in found.items():
        if key not in expected:
            raise PretrainedError(f"{path}: {what} has an unexpected key {ours_to_anchor(key)!r} "
                                  f"(shape {list(tensor.shape)})")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise PretrainedError(f"{path}: {what} key {ours_to_anchor(key)!r} has shape {list(tensor.shape)}, "
                                  f"expected {list(expected[key].shape)}")
    missing = [k for k in expected if k not in found]
    allowed = [k for k in missing if k.startswith(allow_missing_prefixes)]
    if len(allowed) != len(missing):
        first = next(k for k in missing if k not in allowed)
        raise PretrainedError(f"{path}: {what} lacks key {ours_to_anchor(first)!r} "
                              f"(expected shape {list(expected[first].shape)})")
    return allowed


def read_anchor_checkpoint(path: str | Path, base: SVCConfig | None = None) -> AnchorCheckpoint:
    """Read and check a whisper-vits-svc ``.pth``: every key and shape, in its own layout."""
    from svc_model.model import SVCModel
    from svc_model.model.discriminators import Discriminator

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, a truncated file, not a torch file at all
        raise PretrainedError(f"{path}: not a loadable torch checkpoint of plain tensors "
                              f"({_load_failure(exc)})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model_g"), dict):
        keys = sorted(raw)[:5] if isinstance(raw, dict) else type(raw).__name__
        raise PretrainedError(f"{path}: no 'model_g' state dict (found {keys}); expected a whisper-vits-svc "
                              f"pretrain or a model exported by its svc_export.py")
    anchor_g = {k: v for k, v in raw["model_g"].items() if isinstance(v, torch.Tensor)}
    kind = "pretrain" if isinstance(raw.get("model_d"), dict) else "singer"
    cfg = base or load_config("base")
    model_cfg = infer_model_config(anchor_g, path, cfg.model)
    model = SVCModel(model_cfg, cfg.spectrogram.n_fft // 2 + 1, cfg.audio.sample_rate)
    generator = {anchor_to_ours(k): v for k, v in anchor_g.items()}
    # An exported singer model carries only what conversion needs.
    optional = () if kind == "pretrain" else ("speaker_proj.", "posterior_encoder.", "speaker_classifier.")
    missing = check_against(model.state_dict(), generator, path, "model_g", optional)
    discriminator = None
    if kind == "pretrain":
        disc = Discriminator(model_cfg.mpd_periods, model_cfg.mrd_resolutions, model_cfg.mpd_channels,
                             model_cfg.mrd_channels, model_cfg.msd_channels)
        discriminator = {anchor_to_ours(k): v for k, v in raw["model_d"].items() if isinstance(v, torch.Tensor)}
        check_against(disc.state_dict(), discriminator, path, "model_d")
    parts = sorted({k.split(".")[0] for k in missing})
    return AnchorCheckpoint(path, kind, sha256_of(path), model_cfg, generator, discriminator, parts)


def _load_failure(exc: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` refused a file, without PyTorch's advice to retry with
    ``weights_only=False`` (which would run whatever code the file holds)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        detail = [line.replace("WeightsUnpickler error:", "").strip() for line in lines[1:]
                  if not line.startswith(("Check the documentation", "Please file an issue"))]
        detail = " ".join(d for d in detail if d)
        return f"refused by weights_only=True, nothing in it was run: {detail[:200] or 'not plain tensors'}"
    return f"{type(exc).__name__}: {(lines or [''])[0][:200]}"


def load_generator_weights(model, generator: dict[str, torch.Tensor]) -> None:
    """Strict load, except the modules an exported singer model does not carry (kept at initialization)."""
    state = model.state_dict()
    state.update(generator)
    model.load_state_dict(state, strict=True)


def load_speaker_file(path: str | Path, spk_dim: int = 256) -> np.ndarray:
    """A whisper-vits-svc singer embedding (``singerXXXX.npy``/``*.spk.npy``: a ``(spk_dim,)`` float array) as
    float32. Read with ``allow_pickle=False``; the error names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: speaker embedding file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # not .npy, or an object array (needs pickle)
        raise PretrainedError(f"{path}: not a .npy array of numbers ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu" or array.shape != (spk_dim,):
        raise PretrainedError(f"{path}: speaker embedding has shape {list(getattr(array, 'shape', []))} and dtype "
                              f"{getattr(array, 'dtype', type(array).__name__)}, expected a float array of shape "
                              f"[{spk_dim}]")
    if not np.isfinite(array).all():
        raise PretrainedError(f"{path}: speaker embedding contains NaN or inf")
    return array.astype(np.float32)


def to_project_checkpoint(anchor: AnchorCheckpoint, base_cfg: SVCConfig, singers: Mapping[str, np.ndarray],
                          out: str | Path) -> Path:
    """Write ``anchor`` as a model folder (:func:`svc_model.weights.write_model_folder`: the generator as
    safetensors, config and singer table as JSON, a pretrain's discriminator in ``training_state.pt``, at step 0)
    at ``out``, atomically. Returns ``out``.

    This is the one place where a foreign checkpoint is converted: the foreign file was read with
    ``torch.load(weights_only=True)`` (no code ran); the folder written here is ours, so
    :func:`svc_model.train.load_model` and fine-tuning read it as any registered version, and the original is not
    loaded again.

    - ``config``: ``base_cfg`` with its model section replaced by the anchor's (read from the shapes) and the
      speaker encoder set to ``mozilla-lstm``, the d-vectors the anchor's models were trained on (a reference
      recording as conversion target must be embedded by the same encoder).
    - ``generator``: a full state dict. An exported singer model lacks the posterior encoder, ``emb_g`` and the
      speaker classifier; those keep a fresh (seeded) initialization, so a strict load works.
    - ``discriminator``: only for a pretrain (``model_d``).
    - ``singers``: ``{name: (spk_dim,) embedding}`` (e.g. the anchor's ``singerXXXX.npy``), stored as given (the
      anchor's embeddings are not unit norm and its model reads them unnormalized); no median f0 is known.
    """
    from svc_model.model import SVCModel
    from svc_model.weights import write_model_folder

    out = Path(out)
    spk_dim = anchor.model_cfg.spk_dim
    table = {}
    for name, embedding in singers.items():
        vector = np.asarray(embedding, dtype=np.float32)
        if vector.shape != (spk_dim,) or not np.isfinite(vector).all():
            raise PretrainedError(f"singer {name!r}: embedding of shape {list(vector.shape)} (expected [{spk_dim}], "
                                  f"finite)")
        table[str(name)] = {"embedding": vector.tolist(), "median_f0": 0.0, "segments": 0}
    speaker = base_cfg.features.speaker.model_copy(update={"backend": ANCHOR_SPEAKER_ENCODER})
    cfg = base_cfg.model_copy(update={"model": anchor.model_cfg,
                                      "features": base_cfg.features.model_copy(update={"speaker": speaker})})
    cfg = SVCConfig.model_validate(cfg.model_dump(mode="json"))  # fail here, not at load, if inconsistent
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the parts an exported model lacks: the same initialization on every import
        model = SVCModel(cfg.model, cfg.spectrogram.n_fft // 2 + 1, cfg.audio.sample_rate)
    generator = model.state_dict()
    generator.update({k: v.detach().to(torch.float32).contiguous() for k, v in anchor.generator.items()})
    checkpoint = {
        "step": 0,
        "config": cfg.model_dump(mode="json"),
        "generator": generator,
        "singers": table,
        "init_from": None,
        "imported_from": {"file": anchor.path.name, "sha256": anchor.sha256, "kind": anchor.kind},
        "speaker_encoder": ANCHOR_SPEAKER_ENCODER,
    }
    if anchor.discriminator is not None:
        checkpoint["discriminator"] = {k: v.detach().to(torch.float32).contiguous()
                                       for k, v in anchor.discriminator.items()}
    return write_model_folder(checkpoint, out)


def model_differences(found: ModelConfig, expected: ModelConfig) -> list[tuple[str, object, object]]:
    """``[(field, found, expected)]`` for the fields that change a parameter's shape (not dropout or noise)."""
    a, b = found.model_dump(mode="json"), expected.model_dump(mode="json")
    return [(k, a[k], b[k]) for k in a if k not in TRAINING_ONLY_FIELDS and a[k] != b[k]]


class DownloadError(PretrainedError):
    """A published file could not be fetched; the message says where to get it and where to put it."""


def download_published(name: str, dest_dir: str | Path, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download ``PUBLISHED[name]`` to ``dest_dir/<file>`` (temp file, then rename), with a tqdm bar. Verifies the
    size and sha256 where :data:`PUBLISHED` knows them. An existing file is returned as it is (verified)."""
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    if name not in PUBLISHED:
        raise PretrainedError(f"unknown published model {name!r}; known: {', '.join(sorted(PUBLISHED))}")
    entry = PUBLISHED[name]
    dest = Path(dest_dir) / entry["file"]
    if dest.is_file():
        _verify(dest, entry)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    manual = (f"download {entry['url']} on a machine with network access, put it at {dest}, then run "
              f"`svc pretrained import {dest}`")
    try:
        with urllib.request.urlopen(entry["url"], timeout=timeout) as response, open(tmp, "wb") as fh:
            total = int(response.headers.get("Content-Length") or 0) or entry["size"]
            with tqdm(total=total, unit="B", unit_scale=True, desc=entry["file"],
                      disable=None if progress else True) as bar:  # None: off when not a terminal
                for block in iter(lambda: response.read(1 << 20), b""):
                    fh.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"cannot download {entry['file']} ({reason}): {manual}") from exc
    try:
        _verify(tmp, entry)
    except PretrainedError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return dest


def _verify(path: Path, entry: dict) -> None:
    if entry.get("size") is not None and path.stat().st_size != entry["size"]:
        raise PretrainedError(f"{path}: {path.stat().st_size} bytes, expected {entry['size']} ({entry['url']})")
    if entry.get("sha256") is not None and sha256_of(path) != entry["sha256"]:
        raise PretrainedError(f"{path}: sha256 differs from the published {entry['sha256']} ({entry['url']})")
