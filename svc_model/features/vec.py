"""vec: HuBERT hidden states at 50 frames/s (transformers ``HubertModel``), from a local folder or a hub id.

With ``pretrained: false`` a small HuBERT of the same architecture is built from a seed, for tests and the offline
demo; its features carry ``pretrained: false`` everywhere they are recorded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from svc_model.features.base import FeatureExtractor, MissingWeightsError, fit_frames, frames_50hz, length_batches, resolve


class HubertVec(FeatureExtractor):
    """Batches run the convolutional feature encoder per segment (its group norm spans the whole input, so
    padding would change it), then one masked transformer pass per batch: a batch equals one-by-one."""

    feature = "vec"
    frame_rate = 50

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
