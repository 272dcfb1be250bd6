"""Building blocks shared by the encoders, the flow and the decoder."""
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
    """Cut ``size`` steps from ``x`` (B, C, T) at per-item ``starts``."""
    return torch.stack([x[i, :, int(s) : int(s) + size] for i, s in enumerate(starts)])


def random_slice_starts(lengths: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random start per item such that ``start + size <= max(length, size)``."""
    high = (lengths - size).clamp(min=0) + 1
    rand = torch.rand(lengths.shape, generator=generator, device="cpu").to(lengths.device)
    return (rand * high).long()


def init_weights(module: nn.Module, std: float = 0.01) -> None:
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        module.weight.data.normal_(0.0, std)


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, T)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class TransformerStack(nn.Module):
    """Self-attention + convolutional feed-forward layers over ``(B, C, T)`` with a padding mask."""

    def __init__(self, hidden: int, filter_channels: int, n_heads: int, n_layers: int, kernel_size: int = 3,
                 dropout: float = 0.1):
        super().__init__()
        self.attn = nn.ModuleList(nn.MultiheadAttention(hidden, n_heads, dropout=dropout, batch_first=True)
                                  for _ in range(n_layers))
        self.norm1 = nn.ModuleList(ChannelNorm(hidden) for _ in range(n_layers))
        self.ffn = nn.ModuleList(
            nn.Sequential(nn.Conv1d(hidden, filter_channels, kernel_size, padding=kernel_size // 2), nn.ReLU(),
                          nn.Dropout(dropout), nn.Conv1d(filter_channels, hidden, kernel_size, padding=kernel_size // 2))
            for _ in range(n_layers))
        self.norm2 = nn.ModuleList(ChannelNorm(hidden) for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        padding = mask[:, 0] < 0.5  # (B, T), True where padded
        for attn, norm1, ffn, norm2 in zip(self.attn, self.norm1, self.ffn, self.norm2):
            h = x.transpose(1, 2)
            y, _ = attn(h, h, h, key_padding_mask=padding, need_weights=False)
            x = norm1(x + self.dropout(y.transpose(1, 2)))
            x = norm2(x + self.dropout(ffn(x * mask))) * mask
        return x * mask


class WaveNet(nn.Module):
    """Non-causal WaveNet with gated activations, optionally conditioned on a global (speaker) vector."""

    def __init__(self, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int, gin_channels: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        self.hidden, self.n_layers = hidden, n_layers
        self.in_layers = nn.ModuleList()
        self.res_skip = nn.ModuleList()
        for i in range(n_layers):
            dilation = dilation_rate ** i
            self.in_layers.append(weight_norm(nn.Conv1d(hidden, 2 * hidden, kernel_size, dilation=dilation,
                                                        padding=(kernel_size * dilation - dilation) // 2)))
            out = 2 * hidden if i < n_layers - 1 else hidden
            self.res_skip.append(weight_norm(nn.Conv1d(hidden, out, 1)))
        self.cond = weight_norm(nn.Conv1d(gin_channels, 2 * hidden * n_layers, 1)) if gin_channels else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        output = torch.zeros_like(x)
        cond = self.cond(g) if (g is not None and self.cond is not None) else None
        for i, (layer, res_skip) in enumerate(zip(self.in_layers, self.res_skip)):
            h = layer(x)
            if cond is not None:
                h = h + cond[:, i * 2 * self.hidden : (i + 1) * 2 * self.hidden]
            a, b = h.chunk(2, dim=1)
            acts = self.dropout(torch.tanh(a) * torch.sigmoid(b))
            rs = res_skip(acts)
            if i < self.n_layers - 1:
                x = (x + rs[:, : self.hidden]) * mask
                output = output + rs[:, self.hidden :]
            else:
                output = output + rs
        return output * mask


class ResBlock(nn.Module):
    """HiFi-GAN ResBlock1: dilated convolutions with leaky ReLU and residuals."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2))
            for d in dilations)
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)) for _ in dilations)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
        return x
