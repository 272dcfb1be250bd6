"""The prior encoder (content + pitch -> prior distribution), the posterior encoder (spectrogram -> latent), and
the speaker classifier that, behind gradient reversal, strips timbre from the prior encoder's hidden states."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from svc_model.model.attention import AttentionEncoder
from svc_model.model.modules import WaveNet

PITCH_BINS = 256
PITCH_FMIN, PITCH_FMAX = 50.0, 1100.0


def coarse_pitch(f0: torch.Tensor) -> torch.Tensor:
    """f0 (Hz, 0 = unvoiced) -> bins ``1..255`` on the mel scale, as whisper-vits-svc's ``f0_to_coarse``:
    unvoiced frames (and anything below 50 Hz) fall into bin 1, so a pretrained pitch table reads them right."""
    mel = 1127.0 * torch.log1p(f0.float() / 700.0)
    lo, hi = 1127.0 * math.log1p(PITCH_FMIN / 700.0), 1127.0 * math.log1p(PITCH_FMAX / 700.0)
    scaled = torch.where(mel > 0, (mel - lo) * (PITCH_BINS - 2) / (hi - lo) + 1, mel)
    return torch.floor(scaled.clamp(1, PITCH_BINS - 1) + 0.5).long()


class PriorEncoder(nn.Module):
    """PPG (conv k5) + vec (conv k5) + pitch embedding -> relative-position transformer -> mean and log-std.

    ``vec_dim = 0`` builds a prior without the vec path (the CPU profile has no real HuBERT weights, and a random
    HuBERT would feed the source's timbre straight through).
    """

    def __init__(self, ppg_dim: int, vec_dim: int, hidden: int, filter_channels: int, n_heads: int, n_layers: int,
                 kernel_size: int, dropout: float, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.pre = nn.Conv1d(ppg_dim, hidden, 5, padding=2)
        self.hub = nn.Conv1d(vec_dim, hidden, 5, padding=2) if vec_dim else None
        self.pit = nn.Embedding(PITCH_BINS, hidden)
        self.enc = AttentionEncoder(hidden, filter_channels, n_heads, n_layers, kernel_size, dropout)
        self.proj = nn.Conv1d(hidden, 2 * out_channels, 1)

    def forward(self, ppg: torch.Tensor, vec: torch.Tensor | None, f0: torch.Tensor, mask: torch.Tensor):
        """-> ``(m, logs, hidden)``; ``hidden`` (B, hidden, T) is what the speaker classifier reads."""
        x = self.pre(ppg) * mask
        if self.hub is not None:
            x = x + self.hub(vec) * mask
        x = x + self.pit(coarse_pitch(f0)).transpose(1, 2)
        hidden = self.enc(x * mask, mask)
        m, logs = torch.split(self.proj(hidden) * mask, self.out_channels, dim=1)
        return m, logs, hidden


class PosteriorEncoder(nn.Module):
    """Linear spectrogram -> speaker-conditioned WaveNet -> latent ``z`` with its mean and log-std."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kernel_size: int, n_layers: int,
                 gin_channels: int, dilation_rate: int = 1):
        super().__init__()
        self.out_channels = out_channels
        self.pre = nn.Conv1d(in_channels, hidden, 1)
        self.enc = WaveNet(hidden, kernel_size, dilation_rate, n_layers, gin_channels)
        self.proj = nn.Conv1d(hidden, 2 * out_channels, 1)

    def forward(self, spec: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, noise=None):
        """``noise``: an :class:`svc_model.model.modules.ItemNoise` for the latent sample (else torch's RNG)."""
        x = self.pre(spec) * mask
        x = self.enc(x, mask, g)
        m, logs = torch.split(self.proj(x) * mask, self.out_channels, dim=1)
        eps = noise.randn_like(m) if noise is not None else torch.randn_like(m)
        z = (m + eps * torch.exp(logs)) * mask
        return z, m, logs


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


class GradientReversal(nn.Module):
    """Identity forward; multiplies the gradient by ``-scale`` backward (Ganin & Lempitsky, 2015)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReverseGradient.apply(x, self.scale)


class SpeakerClassifier(nn.Module):
    """Predicts the speaker embedding from the prior encoder's hidden states (three k5 convs, time-averaged).

    The classifier learns to predict the speaker; the reversed gradient teaches the prior encoder to make that
    impossible, so the content path carries no timbre and conversion takes the timbre from the flow and decoder.
    """

    def __init__(self, hidden: int, spk_dim: int):
        super().__init__()
        self.classifier = nn.Sequential(
            GradientReversal(1.0),
            weight_norm(nn.Conv1d(hidden, hidden, 5, padding=2)), nn.ReLU(),
            weight_norm(nn.Conv1d(hidden, hidden, 5, padding=2)), nn.ReLU(),
            weight_norm(nn.Conv1d(hidden, spk_dim, 5, padding=2)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, hidden, T)`` -> ``(B, spk_dim)``. The anchor averages over every frame, padding included; so do
        we, so that a pretrained classifier sees what it was trained on."""
        return self.classifier(hidden).mean(dim=-1)
