"""vec: content features at 50 frames/s, two backends (``features.vec.backend``):

- ``transformers``: a HuBERT hidden state (transformers ``HubertModel``), from a local folder or a hub id.
- ``hubert-soft``: whisper-vits-svc's vec, HuBERT-Soft's 256-d ``units()``, from the published state dict
  ``hubert-soft-0d54a1f4.pt`` loaded key for key into a transformers ``HubertModel`` plus a linear projection.

With ``pretrained: false`` the same architecture is built from a seed (small for ``transformers``, full size for
``hubert-soft``), for tests and the offline demo; its features carry ``pretrained: false`` everywhere they are
recorded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from svc_model.features.base import (
    HOP_50HZ,
    FeatureExtractor,
    MissingWeightsError,
    fit_frames,
    frames_50hz,
    length_batches,
    resolve,
)


class VecExtractor(FeatureExtractor):
    """The configured vec backend (``features.vec.backend``)."""

    feature = "vec"
    frame_rate = 50

    @classmethod
    def from_config(cls, features_cfg, root: Path | None = None) -> VecExtractor:
        if features_cfg.vec.backend == "hubert-soft":
            return HubertSoftVec.from_config(features_cfg, root)
        if features_cfg.vec.backend == "none":
            return NoVec(device=features_cfg.device)
        return HubertVec.from_config(features_cfg, root)

    vec_backend = "transformers"

    def describe(self) -> dict:
        """Adds ``vec_backend``: ``transformers`` (a HuBERT hidden state), ``hubert-soft`` (256-d units) or
        ``none`` (no vec: zero-width frames)."""
        return {**super().describe(), "vec_backend": self.vec_backend}


class NoVec(VecExtractor):
    """No vec at all: ``(frames, 0)`` arrays, for a model built with ``vec_dim: 0``.

    The CPU profile uses it: offline there are no real HuBERT weights, and a random HuBERT (a conv stack over the
    waveform) would carry the source's timbre straight into the prior. Zero-width files keep the asset graph and
    the frame bookkeeping unchanged while feeding the model nothing.
    """

    vec_backend = "none"

    def __init__(self, device: str = "cpu"):
        super().__init__(device="cpu", fp16=False)

    @classmethod
    def from_config(cls, features_cfg, root: Path | None = None) -> "NoVec":
        return cls()

    @property
    def backend(self) -> str:
        return "none"

    def extract_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [np.zeros((frames_50hz(len(a)), 0), np.float32) for a in audios]


class HubertVec(VecExtractor):
    """Batches run the convolutional feature encoder per segment (its group norm spans the whole input, so
    padding would change it), then one masked transformer pass per batch: a batch equals one-by-one."""

    def __init__(self, model: str = "facebook/hubert-base-ls960", layer: int = 9, pretrained: bool = True,
                 cache_dir: Path | None = None, random_hidden_size: int = 128, random_layers: int = 2,
                 seed: int = 0, batch_size: int = 8, **kwargs):
        super().__init__(**kwargs)
        import torch
        from transformers import HubertConfig, HubertModel

        self.model_name = model
        self._pretrained = pretrained
        self.batch_size = batch_size
        if pretrained:
            try:
                self.model = HubertModel.from_pretrained(model, cache_dir=str(cache_dir) if cache_dir else None)
            except OSError as exc:
                where = model if Path(model).exists() else f"{cache_dir} (hub id {model!r})"
                raise MissingWeightsError(
                    f"{where}: HuBERT weights not found and not downloadable ({str(exc).splitlines()[0]}). On a "
                    f"connected machine run `HubertModel.from_pretrained({model!r}).save_pretrained(DIR)` and set "
                    f"features.vec.model to DIR, or set features.vec.pretrained: false for random weights"
                ) from exc
        else:
            torch.manual_seed(seed)
            heads = max(1, random_hidden_size // 64)
            config = HubertConfig(
                hidden_size=random_hidden_size, num_hidden_layers=random_layers, num_attention_heads=heads,
                intermediate_size=4 * random_hidden_size, conv_dim=(64,) * 7,
                num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4)
            self.model = HubertModel(config)
        n_layers = self.model.config.num_hidden_layers
        if not 0 <= layer <= n_layers:
            raise ValueError(f"features.vec.layer {layer} is out of range: the model has {n_layers} layers")
        self.layer = layer
        self.model.to(self.device).eval()
        if self.fp16:
            self.model.half()
        self.dim = self.model.config.hidden_size

    @classmethod
    def from_config(cls, features_cfg, root: Path | None = None) -> "HubertVec":
        v = features_cfg.vec
        model = v.model
        if model and (model.startswith((".", "/", "~")) or (root is not None and (root / model).exists())):
            model = str(resolve(model, root))
        return cls(model=model, layer=v.layer, pretrained=v.pretrained, cache_dir=resolve(v.cache_dir, root),
                   random_hidden_size=v.random_hidden_size, random_layers=v.random_layers, seed=v.seed,
                   batch_size=v.batch_size, device=features_cfg.device, fp16=features_cfg.fp16)

    @property
    def backend(self) -> str:
        name = Path(self.model_name).name if self._pretrained else f"random-{self.dim}x{self.model.config.num_hidden_layers}"
        return f"hubert-{name}-layer{self.layer}"

    @property
    def pretrained(self) -> bool:
        return self._pretrained

    def _hidden_state(self, hidden, mask):
        """The encoder's hidden state number ``self.layer`` (0 = the input to the first transformer layer).

        transformers 5 only collects hidden states in the top-level forward, which would rerun the convolutional
        encoder on padded input; hooks on the encoder's layers read them from the masked encoder pass instead.
        """
        layers = self.model.encoder.layers
        captured = {}

        def keep(name):
            def hook(module, args, output):
                captured[name] = (args[0] if name == "input" else output)
                captured[name] = captured[name][0] if isinstance(captured[name], tuple) else captured[name]
            return hook

        target = layers[0] if self.layer == 0 else layers[self.layer - 1]
        handle = target.register_forward_hook(keep("output" if self.layer else "input"))
        try:
            self.model.encoder(hidden, attention_mask=mask)
        finally:
            handle.remove()
        return captured["output" if self.layer else "input"]

    def extract_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        out: list[np.ndarray | None] = [None] * len(audios)
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            for idx in length_batches([len(a) for a in audios], self.batch_size):
                projected = []
                for i in idx:
                    x = torch.from_numpy(np.ascontiguousarray(audios[i], dtype=np.float32))[None].to(self.device)
                    feats = self.model.feature_extractor(x.to(dtype)).transpose(1, 2)
                    projected.append(self.model.feature_projection(feats)[0])
                lengths = [len(p) for p in projected]
                hidden = torch.nn.utils.rnn.pad_sequence(projected, batch_first=True)
                mask = (torch.arange(hidden.shape[1], device=self.device)[None, :]
                        < torch.tensor(lengths, device=self.device)[:, None])
                chosen = self._hidden_state(hidden, mask)
                for j, i in enumerate(idx):
                    feats = chosen[j, : lengths[j]].float().cpu().numpy()
                    out[i] = fit_frames(feats, frames_50hz(len(audios[i])))
        return out


# --- hubert-soft ------------------------------------------------------------------------------------------------

HUBERT_SOFT_URL = "https://github.com/bshall/hubert/releases/download/v0.1/hubert-soft-0d54a1f4.pt"
SOFT_PIECE = 20 * 16000  # whisper-vits-svc encodes at most 20 s of 16 kHz audio at a time
SOFT_PAD = (400 - 320) // 2  # units() pads (receptive field - hop) / 2 on both sides: N samples -> N // 320 frames
SOFT_HIDDEN, SOFT_UNITS, SOFT_LAYERS = 768, 256, 12
SOFT_CONV_KERNELS = (10, 3, 3, 3, 3, 2, 2)
SOFT_CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)


def hubert_soft_layout() -> dict[str, tuple[int, ...]]:
    """Every name and shape in HuBERT-Soft's published state dict (after any ``module.`` prefix is removed).

    These are the names of bshall's ``HubertSoft`` module as whisper-vits-svc loads it: a ``feature_extractor``
    of seven bias-free convs (``conv0..6``, group norm ``norm0`` after the first), ``feature_projection``
    (``norm``, ``projection``), a weight-normed ``positional_embedding.conv`` (``weight_g``/``weight_v``), the
    encoder input ``norm``, twelve ``torch.nn.TransformerEncoderLayer`` (post-norm, packed q/k/v ``in_proj``),
    the 256-d ``proj``, and two training-only tensors (``masked_spec_embed``, ``label_embedding``).
    """
    h, ff = SOFT_HIDDEN, 4 * SOFT_HIDDEN
    shapes: dict[str, tuple[int, ...]] = {
        "masked_spec_embed": (h,),
        "label_embedding.weight": (100, SOFT_UNITS),
        "feature_extractor.norm0.weight": (512,),
        "feature_extractor.norm0.bias": (512,),
        "feature_projection.norm.weight": (512,),
        "feature_projection.norm.bias": (512,),
        "feature_projection.projection.weight": (h, 512),
        "feature_projection.projection.bias": (h,),
        "positional_embedding.conv.weight_g": (1, 1, 128),
        "positional_embedding.conv.weight_v": (h, h // 16, 128),
        "positional_embedding.conv.bias": (h,),
        "norm.weight": (h,),
        "norm.bias": (h,),
        "proj.weight": (SOFT_UNITS, h),
        "proj.bias": (SOFT_UNITS,),
    }
    for c, k in enumerate(SOFT_CONV_KERNELS):
        shapes[f"feature_extractor.conv{c}.weight"] = (512, 1 if c == 0 else 512, k)
    for i in range(SOFT_LAYERS):
        p = f"encoder.layers.{i}."
        shapes.update({
            p + "self_attn.in_proj_weight": (3 * h, h), p + "self_attn.in_proj_bias": (3 * h,),
            p + "self_attn.out_proj.weight": (h, h), p + "self_attn.out_proj.bias": (h,),
            p + "linear1.weight": (ff, h), p + "linear1.bias": (ff,),
            p + "linear2.weight": (h, ff), p + "linear2.bias": (h,),
            p + "norm1.weight": (h,), p + "norm1.bias": (h,),
            p + "norm2.weight": (h,), p + "norm2.bias": (h,),
        })
    return shapes


def hubert_soft_key_map(pos_conv_g: str, pos_conv_v: str) -> dict[str, list[tuple[str, slice | None]]]:
    """Anchor name -> ``[(name in HubertSoftModel, rows)]``; ``rows`` slices a packed tensor (None: all of it).

    The mapping, written out (``{i}`` a transformer layer, ``{c}`` a conv):

    ====================================================  ==========================================================
    published (bshall ``HubertSoft``)                      ours (``hubert.`` = transformers ``HubertModel``)
    ====================================================  ==========================================================
    ``feature_extractor.conv{c}.weight``                   ``hubert.feature_extractor.conv_layers.{c}.conv.weight``
    ``feature_extractor.norm0.{weight,bias}``              ``hubert.feature_extractor.conv_layers.0.layer_norm.*``
    ``feature_projection.norm.*``                          ``hubert.feature_projection.layer_norm.*``
    ``feature_projection.projection.*``                    ``hubert.feature_projection.projection.*``
    ``positional_embedding.conv.weight_g`` / ``_v``        ``hubert.encoder.pos_conv_embed.conv.`` + the installed
                                                           torch's weight-norm names (``parametrizations.weight.
                                                           original0`` / ``original1``, or ``weight_g``/``weight_v``)
    ``positional_embedding.conv.bias``                     ``hubert.encoder.pos_conv_embed.conv.bias``
    ``norm.*``                                             ``hubert.encoder.layer_norm.*``
    ``encoder.layers.{i}.self_attn.in_proj_{weight,bias}`` rows [0:768] -> ``attention.q_proj``, [768:1536] ->
                                                           ``k_proj``, [1536:2304] -> ``v_proj`` (PyTorch's packing)
    ``encoder.layers.{i}.self_attn.out_proj.*``            ``hubert.encoder.layers.{i}.attention.out_proj.*``
    ``encoder.layers.{i}.linear1.*`` / ``linear2.*``       ``...feed_forward.intermediate_dense.*`` / ``output_dense.*``
    ``encoder.layers.{i}.norm1.*`` / ``norm2.*``           ``...layer_norm.*`` / ``...final_layer_norm.*``
    ``masked_spec_embed``                                  ``hubert.masked_spec_embed`` (unused at inference)
    ``proj.*``                                             ``proj.*``
    ``label_embedding.weight``                             dropped: only the training logits read it
    ====================================================  ==========================================================
    """
    h = SOFT_HIDDEN
    fixed = {
        "masked_spec_embed": "hubert.masked_spec_embed",
        "label_embedding.weight": None,
        "feature_extractor.norm0.weight": "hubert.feature_extractor.conv_layers.0.layer_norm.weight",
        "feature_extractor.norm0.bias": "hubert.feature_extractor.conv_layers.0.layer_norm.bias",
        "feature_projection.norm.weight": "hubert.feature_projection.layer_norm.weight",
        "feature_projection.norm.bias": "hubert.feature_projection.layer_norm.bias",
        "feature_projection.projection.weight": "hubert.feature_projection.projection.weight",
        "feature_projection.projection.bias": "hubert.feature_projection.projection.bias",
        "positional_embedding.conv.weight_g": "hubert.encoder.pos_conv_embed.conv." + pos_conv_g,
        "positional_embedding.conv.weight_v": "hubert.encoder.pos_conv_embed.conv." + pos_conv_v,
        "positional_embedding.conv.bias": "hubert.encoder.pos_conv_embed.conv.bias",
        "norm.weight": "hubert.encoder.layer_norm.weight",
        "norm.bias": "hubert.encoder.layer_norm.bias",
        "proj.weight": "proj.weight",
        "proj.bias": "proj.bias",
    }
    mapping: dict[str, list[tuple[str, slice | None]]] = {k: ([] if v is None else [(v, None)]) for k, v in fixed.items()}
    for c in range(len(SOFT_CONV_KERNELS)):
        mapping[f"feature_extractor.conv{c}.weight"] = [(f"hubert.feature_extractor.conv_layers.{c}.conv.weight", None)]
    renames = {"self_attn.out_proj": "attention.out_proj", "linear1": "feed_forward.intermediate_dense",
               "linear2": "feed_forward.output_dense", "norm1": "layer_norm", "norm2": "final_layer_norm"}
    for i in range(SOFT_LAYERS):
        src, dst = f"encoder.layers.{i}.", f"hubert.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            mapping[f"{src}self_attn.in_proj_{kind}"] = [
                (f"{dst}attention.{name}_proj.{kind}", slice(j * h, (j + 1) * h)) for j, name in enumerate("qkv")]
            for old, new in renames.items():
                mapping[f"{src}{old}.{kind}"] = [(f"{dst}{new}.{kind}", None)]
    return mapping


def _hubert_soft_module(seed: int | None = None):
    """A transformers ``HubertModel`` configured as HuBERT-base (what HuBERT-Soft's body is) + the 256-d ``proj``."""
    import torch
    from torch import nn
    from transformers import HubertConfig, HubertModel

    config = HubertConfig(
        hidden_size=SOFT_HIDDEN, num_hidden_layers=SOFT_LAYERS, num_attention_heads=12,
        intermediate_size=4 * SOFT_HIDDEN, hidden_act="gelu", layer_norm_eps=1e-5,
        feat_extract_norm="group", feat_extract_activation="gelu", conv_bias=False, conv_dim=(512,) * 7,
        conv_kernel=SOFT_CONV_KERNELS, conv_stride=SOFT_CONV_STRIDES, feat_proj_layer_norm=True,
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, conv_pos_batch_norm=False,
        do_stable_layer_norm=False,
        # masked_spec_embed exists only when masking is configured; keep it (the file has it), never apply it.
        apply_spec_augment=False, mask_time_prob=0.05)
    if seed is not None:
        torch.manual_seed(seed)
    module = nn.Module()
    module.hubert = HubertModel(config)
    module.proj = nn.Linear(SOFT_HIDDEN, SOFT_UNITS)
    return module


def load_hubert_soft_state(path: Path) -> dict:
    """The published file's tensors, checked key for key and shape for shape against :func:`hubert_soft_layout`.

    Loads with ``torch.load(weights_only=True)`` (tensors only, never arbitrary objects) and strips a ``module.``
    prefix the way whisper-vits-svc's loader does (``consume_prefix_in_state_dict_if_present``).
    Raises :class:`MissingWeightsError` for a missing file and ``ValueError`` naming the first bad keys.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(
            f"{path}: hubert-soft weights not found. Download hubert-soft-0d54a1f4.pt from {HUBERT_SOFT_URL} on a "
            f"connected machine and put it at {path} (or set features.vec.soft_weights to where it is); "
            f"or set features.vec.pretrained: false for random weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, or one holding pickled objects that weights_only refuses
        raise ValueError(f"{path}: not a readable hubert-soft state dict ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a plain state dict of tensors (names -> tensors), as published")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    layout = hubert_soft_layout()
    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {layout[k]})" for k in layout
             if k in state and tuple(state[k].shape) != layout[k]]
    problems = ([f"missing keys: {', '.join(missing[:5])}"] if missing else []) + \
               ([f"unexpected keys: {', '.join(unexpected[:5])}"] if unexpected else []) + \
               ([f"wrong shapes: {', '.join(wrong[:5])}"] if wrong else [])
    if problems:
        raise ValueError(f"{path}: not HuBERT-Soft's published layout; " + "; ".join(problems))
    return state


def hubert_soft_from_state(state: dict):
    """HubertSoftModel (``.hubert``, ``.proj``) holding ``state`` (anchor names), loaded strictly."""
    import torch

    module = _hubert_soft_module()
    ours = module.state_dict()
    prefix = "hubert.encoder.pos_conv_embed.conv."
    if prefix + "parametrizations.weight.original0" in ours:
        g, v = "parametrizations.weight.original0", "parametrizations.weight.original1"
    else:
        g, v = "weight_g", "weight_v"
    converted = {}
    for name, targets in hubert_soft_key_map(g, v).items():
        for target, rows in targets:
            tensor = state[name] if rows is None else state[name][rows]
            converted[target] = tensor.to(torch.float32).contiguous()
    shapes = {k: tuple(t.shape) for k, t in converted.items()}
    bad = [k for k, t in ours.items() if shapes.get(k) != tuple(t.shape)]
    if bad or set(converted) != set(ours):
        raise RuntimeError(f"hubert-soft key map out of date for the installed transformers: {bad[:5]}, "
                           f"{sorted(set(converted) ^ set(ours))[:5]}")
    module.load_state_dict(converted, strict=True)
    return module.eval()


class HubertSoftVec(VecExtractor):
    """whisper-vits-svc's vec: HuBERT-Soft ``units()`` (the last HuBERT-base layer projected to 256-d) at 50 Hz.

    As the anchor does (``hubert/inference.py``): each segment goes in pieces of at most 20 s, each piece padded by
    40 samples on both sides and encoded on its own, and the pieces' frames are concatenated (N samples give
    N // 320 frames). Pieces shorter than one hop (which the anchor's convolutions cannot take) give no frames;
    the segment is then edge-padded to ``frames_50hz``. Batches run the convolutional encoder per piece, then one
    masked transformer pass: a batch equals one-by-one.
    """

    vec_backend = "hubert-soft"

    def __init__(self, weights: str | Path = "models/hubert/hubert-soft-0d54a1f4.pt", pretrained: bool = True,
                 seed: int = 0, batch_size: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.weights = Path(weights)
        self._pretrained = pretrained
        self.seed = seed
        self.batch_size = batch_size
        if pretrained:
            self.model = hubert_soft_from_state(load_hubert_soft_state(self.weights))
        else:
            self.model = _hubert_soft_module(seed).eval()
        self.model.to(self.device)
        if self.fp16:
            self.model.half()
        self.dim = SOFT_UNITS

    @classmethod
    def from_config(cls, features_cfg, root: Path | None = None) -> HubertSoftVec:
        v = features_cfg.vec
        return cls(weights=resolve(v.soft_weights, root), pretrained=v.pretrained, seed=v.seed,
                   batch_size=v.batch_size, device=features_cfg.device, fp16=features_cfg.fp16)

    @property
    def backend(self) -> str:
        return f"hubert-soft-units-{self.weights.stem if self._pretrained else f'random-seed{self.seed}'}"

    @property
    def pretrained(self) -> bool:
        return self._pretrained

    def extract_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        pieces: list[tuple[int, np.ndarray]] = []
        for i, audio in enumerate(audios):
            for start in range(0, len(audio), SOFT_PIECE):
                piece = audio[start : start + SOFT_PIECE]
                if len(piece) >= HOP_50HZ:
                    pieces.append((i, piece))
        units: list[np.ndarray | None] = [None] * len(pieces)
        hubert, dtype = self.model.hubert, next(self.model.parameters()).dtype
        with torch.no_grad():
            for idx in length_batches([len(p) for _, p in pieces], self.batch_size):
                projected = []
                for k in idx:
                    x = torch.from_numpy(np.ascontiguousarray(pieces[k][1], dtype=np.float32)).to(self.device)
                    x = F.pad(x[None], (SOFT_PAD, SOFT_PAD)).to(dtype)
                    feats = hubert.feature_extractor(x).transpose(1, 2)
                    projected.append(hubert.feature_projection(feats)[0])
                lengths = [len(p) for p in projected]
                hidden = torch.nn.utils.rnn.pad_sequence(projected, batch_first=True)
                mask = (torch.arange(hidden.shape[1], device=self.device)[None, :]
                        < torch.tensor(lengths, device=self.device)[:, None])
                last = hubert.encoder(hidden, attention_mask=mask).last_hidden_state
                out = self.model.proj(last).float().cpu().numpy()
                for j, k in enumerate(idx):
                    units[k] = out[j, : lengths[j]]
        results = []
        for i, audio in enumerate(audios):
            own = [u for (owner, _), u in zip(pieces, units) if owner == i]
            feats = np.concatenate(own) if own else np.zeros((0, SOFT_UNITS), np.float32)
            results.append(fit_frames(feats, frames_50hz(len(audio))))
        return results
