"""Multi-period (waveform) and multi-resolution (spectrogram) discriminators."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _conv_stack(convs: nn.ModuleList, post: nn.Module, x: torch.Tensor):
    """Leaky-ReLU convolutions, keeping every layer's output for feature matching; returns (scores, fmaps)."""
    fmaps = []
    for conv in convs:
        x = F.leaky_relu(conv(x), 0.2)
        fmaps.append(x)
    x = post(x)
    fmaps.append(x)
    return x.flatten(1), fmaps


class PeriodDiscriminator(nn.Module):
    """Folds the waveform by ``period`` and applies 2-D convolutions along time."""

    def __init__(self, period: int, channels: int = 32, kernel_size: int = 5, stride: int = 3):
        super().__init__()
        self.period = period
        widths = [1, channels, channels * 4, channels * 16, channels * 32, channels * 32]
        pad = (kernel_size - 1) // 2
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(widths[i], widths[i + 1], (kernel_size, 1), (stride if i < 4 else 1, 1), (pad, 0)))
            for i in range(5))
        self.post = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), 1, (1, 0)))

    def forward(self, x: torch.Tensor):
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), "reflect")
        return _conv_stack(self.convs, self.post, x.view(b, c, -1, self.period))


class ResolutionDiscriminator(nn.Module):
    """2-D convolutions over a magnitude spectrogram at one STFT resolution."""

    def __init__(self, n_fft: int, hop: int, win: int, channels: int = 32):
        super().__init__()
        self.n_fft, self.hop, self.win = n_fft, hop, win
        self.register_buffer("window", torch.hann_window(win), persistent=False)
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv2d(1, channels, (3, 9), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1))),
        ])
        self.post = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: torch.Tensor):
        spec = torch.stft(x.squeeze(1).float(), self.n_fft, self.hop, self.win, self.window, center=True,
                          return_complex=True).abs().unsqueeze(1)  # (B, 1, F, T)
        return _conv_stack(self.convs, self.post, spec)


class Discriminator(nn.Module):
    """All sub-discriminators; ``forward`` returns ``[(score, feature_maps), ...]`` for one input."""

    def __init__(self, periods: list[int], resolutions: list[list[int]], channels: int = 32):
        super().__init__()
        self.discriminators = nn.ModuleList(
            [PeriodDiscriminator(p, channels) for p in periods]
            + [ResolutionDiscriminator(*r, channels=channels) for r in resolutions])

    def forward(self, audio: torch.Tensor):
        return [d(audio) for d in self.discriminators]
