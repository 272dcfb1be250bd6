"""whisper-vits-svc's discriminator (its ``model_d``): multi-resolution (spectrogram), multi-period (folded
waveform) and one scale discriminator (raw waveform, grouped convolutions).

Widths are configurable for the CPU profile; at ``mpd_channels=64, mrd_channels=32, msd_channels=16`` the layout
is the anchor's, key for key.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _conv_stack(convs: nn.ModuleList, post: nn.Module, x: torch.Tensor, slope: float):
    """Leaky-ReLU convolutions, keeping every layer's output for feature matching; returns (fmaps, scores)."""
    fmaps = []
    for conv in convs:
        x = F.leaky_relu(conv(x), slope)
        fmaps.append(x)
    x = post(x)
    fmaps.append(x)
    return fmaps, x.flatten(1)


class PeriodDiscriminator(nn.Module):
    """Folds the waveform by ``period`` and applies 2-D convolutions along time."""

    def __init__(self, period: int, channels: int = 64, kernel_size: int = 5, stride: int = 3):
        super().__init__()
        self.period = period
        widths = [1, channels, channels * 2, channels * 4, channels * 8, channels * 16]
        pad = kernel_size // 2
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(widths[i], widths[i + 1], (kernel_size, 1), (stride if i < 4 else 1, 1), (pad, 0)))
            for i in range(5))
        self.conv_post = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), 1, (1, 0)))

    def forward(self, x: torch.Tensor):
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), "reflect")
        return _conv_stack(self.convs, self.conv_post, x.view(b, c, -1, self.period), 0.2)


class ResolutionDiscriminator(nn.Module):
    """2-D convolutions over a magnitude spectrogram at one STFT resolution."""

    def __init__(self, n_fft: int, hop: int, win: int, channels: int = 32):
        super().__init__()
        self.n_fft, self.hop, self.win = n_fft, hop, win
        # A rectangular window: the anchor calls torch.stft without one, and its trained weights expect that.
        self.register_buffer("window", torch.ones(win), persistent=False)
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv2d(1, channels, (3, 9), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1))),
        ])
        self.conv_post = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: torch.Tensor):
        pad = (self.n_fft - self.hop) // 2
        x = F.pad(x.float(), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(x, self.n_fft, self.hop, self.win, self.window.to(x.device), center=False,
                          return_complex=True)
        # The anchor's torch.norm over (re, im): unlike sqrt(re^2 + im^2) its gradient at an all-zero bin is 0, not
        # NaN (a saturated, constant output frame has exactly-zero bins).
        mag = torch.linalg.vector_norm(torch.view_as_real(spec), dim=-1)
        return _conv_stack(self.convs, self.conv_post, mag.unsqueeze(1), 0.2)


class ScaleDiscriminator(nn.Module):
    """Strided, grouped 1-D convolutions over the raw waveform (MelGAN's scale discriminator)."""

    def __init__(self, channels: int = 16):
        super().__init__()
        c = channels
        widths = [1, c, 4 * c, 16 * c, 64 * c, 64 * c]
        layers = [nn.Conv1d(1, c, 15, 1, padding=7)]
        for i in range(1, 5):
            layers.append(nn.Conv1d(widths[i], widths[i + 1], 41, 4, groups=max(1, widths[i] // 4), padding=20))
        layers.append(nn.Conv1d(widths[5], widths[5], 5, 1, padding=2))
        self.convs = nn.ModuleList(weight_norm(layer) for layer in layers)
        self.conv_post = weight_norm(nn.Conv1d(widths[5], 1, 3, 1, padding=1))

    def forward(self, x: torch.Tensor):
        return _conv_stack(self.convs, self.conv_post, x, 0.1)


class _Group(nn.Module):
    def __init__(self, discriminators: list[nn.Module]):
        super().__init__()
        self.discriminators = nn.ModuleList(discriminators)


class Discriminator(nn.Module):
    """All sub-discriminators; ``forward`` returns ``[(feature_maps, score), ...]`` (MRD, then MPD, then MSD)."""

    def __init__(self, periods: list[int], resolutions: list[list[int]], mpd_channels: int = 64,
                 mrd_channels: int = 32, msd_channels: int = 16):
        super().__init__()
        self.MRD = _Group([ResolutionDiscriminator(*r, channels=mrd_channels) for r in resolutions])
        self.MPD = _Group([PeriodDiscriminator(p, mpd_channels) for p in periods])
        self.MSD = ScaleDiscriminator(msd_channels)

    def forward(self, x: torch.Tensor) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        out = [d(x) for d in self.MRD.discriminators] + [d(x) for d in self.MPD.discriminators]
        return out + [self.MSD(x)]
