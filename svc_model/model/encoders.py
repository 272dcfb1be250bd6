"""The prior encoder (content + pitch -> prior distribution) and the posterior encoder (spectrogram -> latent)."""
from __future__ import annotations

import math

import torch
from torch import nn

from svc_model.model.modules import TransformerStack, WaveNet


def coarse_pitch(f0: torch.Tensor, bins: int = 256, fmin: float = 50.0, fmax: float = 1100.0) -> torch.Tensor:
    """Quantize f0 (Hz, 0 = unvoiced) on the mel scale into ``1..bins-1``; unvoiced frames get bin 0."""
    mel = 1127.0 * torch.log1p(f0 / 700.0)
    lo, hi = 1127.0 * math.log1p(fmin / 700.0), 1127.0 * math.log1p(fmax / 700.0)
    scaled = (mel - lo) * (bins - 2) / (hi - lo) + 1
    coarse = scaled.round().clamp(1, bins - 1).long()
    return torch.where(f0 > 0, coarse, torch.zeros_like(coarse))


class PriorEncoder(nn.Module):
    """PPG + vec + pitch embedding -> transformer -> prior mean and log-std, ``(B, inter, T)`` each."""

    def __init__(self, ppg_dim: int, vec_dim: int, hidden: int, filter_channels: int, n_heads: int, n_layers: int,
                 kernel_size: int, dropout: float, out_channels: int, pitch_bins: int = 256):
        super().__init__()
        self.pitch_bins = pitch_bins
        self.ppg_proj = nn.Conv1d(ppg_dim, hidden, 1)
        self.vec_proj = nn.Conv1d(vec_dim, hidden, 1)
        self.pitch_emb = nn.Embedding(pitch_bins, hidden)
        self.encoder = TransformerStack(hidden, filter_channels, n_heads, n_layers, kernel_size, dropout)
        self.proj = nn.Conv1d(hidden, 2 * out_channels, 1)

    def forward(self, ppg: torch.Tensor, vec: torch.Tensor, f0: torch.Tensor, mask: torch.Tensor):
        pitch = self.pitch_emb(coarse_pitch(f0, self.pitch_bins)).transpose(1, 2)
        x = (self.ppg_proj(ppg) + self.vec_proj(vec) + pitch) * mask
        x = self.encoder(x, mask)
        m, logs = (self.proj(x) * mask).chunk(2, dim=1)
        return m, logs


class PosteriorEncoder(nn.Module):
    """Linear spectrogram -> speaker-conditioned WaveNet -> latent ``z`` with its mean and log-std."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kernel_size: int, n_layers: int,
                 gin_channels: int, dilation_rate: int = 1):
        super().__init__()
        self.pre = nn.Conv1d(in_channels, hidden, 1)
        self.wavenet = WaveNet(hidden, kernel_size, dilation_rate, n_layers, gin_channels)
        self.proj = nn.Conv1d(hidden, 2 * out_channels, 1)

    def forward(self, spec: torch.Tensor, mask: torch.Tensor, g: torch.Tensor):
        x = self.pre(spec) * mask
        x = self.wavenet(x, mask, g)
        m, logs = (self.proj(x) * mask).chunk(2, dim=1)
        z = (m + torch.randn_like(m) * torch.exp(logs)) * mask
        return z, m, logs
