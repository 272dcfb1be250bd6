"""Building blocks shared by the encoders, the flow and the decoder.

Parameter names follow whisper-vits-svc's ``SynthesizerTrn`` (``in_layers``, ``res_skip_layers``, ``cond_layer``,
``gamma``/``beta``) so that its published state dicts load key for key (see :mod:`svc_model.pretrained`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def sequence_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """``(B,)`` lengths -> ``(B, 1, T)`` float mask."""
    max_len = int(max_len if max_len is not None else lengths.max())
    return (torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]).unsqueeze(1).float()


def slice_segments(x: torch.Tensor, starts: torch.Tensor, size: int) -> torch.Tensor:
    """Cut ``size`` steps from ``x`` (B, C, T) at per-item ``starts``, by a gather: no host sync on the GPU."""
    index = (starts.to(x.device).long()[:, None] + torch.arange(size, device=x.device)[None, :])
    index = index.clamp(max=x.shape[-1] - 1)[:, None, :].expand(-1, x.shape[1], -1)
    return torch.gather(x, 2, index)


class ItemNoise:
    """A training step's random draws, made item by item from one seeded stream per item.

    Each item's noise then depends only on the item (its seed from :class:`svc_model.data.StepBatches`), not on
    which other items share its batch or its process: a step split across DDP ranks draws what one process with
    the whole global batch draws, as long as the batches pad to the same length (they do when every segment is
    at least ``train.max_frames`` long: all crops are then that long).
    """

    def __init__(self, seeds, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, x.dtype)

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        """Standard normal noise of ``shape`` ``(B, ...)``, item ``i`` from stream ``i``."""
        return self._draw(torch.randn, shape, dtype)

    def rand(self, shape, dtype=torch.float32) -> torch.Tensor:
        """Uniform ``[0, 1)`` noise of ``shape`` ``(B, ...)``, item ``i`` from stream ``i``."""
        return self._draw(torch.rand, shape, dtype)

    def _draw(self, fn, shape, dtype) -> torch.Tensor:
        shape = tuple(shape)
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} items from {len(self.generators)} item streams")
        return torch.stack([fn(shape[1:], generator=g, device=self.device, dtype=dtype) for g in self.generators])


def random_slice_starts(lengths: torch.Tensor, size: int, generator: torch.Generator | None = None,
                        noise: ItemNoise | None = None) -> torch.Tensor:
    """Random start per item such that ``start + size <= max(length, size)``."""
    high = (lengths - size).clamp(min=0) + 1
    if noise is not None:
        rand = noise.rand((len(lengths),)).to(lengths.device)
    else:
        rand = torch.rand(lengths.shape, generator=generator, device="cpu").to(lengths.device)
    return (rand * high).long()


def init_weights(module: nn.Module, std: float = 0.01) -> None:
    """HiFi-GAN's N(0, std) start. On a weight-normed layer (every layer it is applied to here, as in the anchor)
    it writes to a computed weight and changes nothing: those layers keep PyTorch's default start, as the
    anchor's do (its old-style weight norm recomputes the weight before each forward)."""
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        module.weight.data.normal_(0.0, std)


def padding_for(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, T)`` (parameters ``gamma``/``beta``, as VITS names them)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.transpose(1, -1), (self.channels,), self.gamma, self.beta, self.eps)
        return x.transpose(1, -1)


class WaveNet(nn.Module):
    """Non-causal WaveNet with gated activations, optionally conditioned on a global (speaker) vector."""

    def __init__(self, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int, gin_channels: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        self.hidden, self.n_layers = hidden, n_layers
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        for i in range(n_layers):
            dilation = dilation_rate ** i
            self.in_layers.append(weight_norm(nn.Conv1d(hidden, 2 * hidden, kernel_size, dilation=dilation,
                                                        padding=padding_for(kernel_size, dilation))))
            out = 2 * hidden if i < n_layers - 1 else hidden  # the last layer has no residual half
            self.res_skip_layers.append(weight_norm(nn.Conv1d(hidden, out, 1)))
        if gin_channels:
            self.cond_layer = weight_norm(nn.Conv1d(gin_channels, 2 * hidden * n_layers, 1))
        else:
            self.cond_layer = None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        output = torch.zeros_like(x)
        cond = self.cond_layer(g) if (g is not None and self.cond_layer is not None) else None
        for i, (layer, res_skip) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            h = layer(x)
            if cond is not None:
                h = h + cond[:, i * 2 * self.hidden : (i + 1) * 2 * self.hidden]
            acts = self.dropout(torch.tanh(h[:, : self.hidden]) * torch.sigmoid(h[:, self.hidden :]))
            rs = res_skip(acts)
            if i < self.n_layers - 1:
                x = (x + rs[:, : self.hidden]) * mask
                output = output + rs[:, self.hidden :]
            else:
                output = output + rs
        return output * mask
