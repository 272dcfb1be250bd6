"""The decoder: an NSF (neural source-filter) HiFi-GAN generator, speaker-conditioned.

A harmonic sine excitation built from f0 is injected at every upsampling stage, so the output pitch follows
the f0 it is given: a +12 semitone shift doubles the f0 here and the sung pitch with it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from svc_model.model.modules import ResBlock, init_weights


class SineSource(nn.Module):
    """f0 (B, T frames, Hz) -> excitation (B, 1, T*hop): harmonics where voiced, noise where not, merged."""

    def __init__(self, sample_rate: int, hop: int, n_harmonics: int = 8, sine_amp: float = 0.1,
                 noise_std: float = 0.003):
        super().__init__()
        self.sample_rate, self.hop, self.n_harmonics = sample_rate, hop, n_harmonics
        self.sine_amp, self.noise_std = sine_amp, noise_std
        self.merge = nn.Linear(n_harmonics + 1, 1)

    def forward(self, f0: torch.Tensor) -> torch.Tensor:
        f0 = torch.repeat_interleave(f0, self.hop, dim=1)  # (B, N)
        harmonics = f0[:, :, None] * torch.arange(1, self.n_harmonics + 2, device=f0.device)[None, None, :]
        # Phase in float64: a float32 cumulative sum drifts audibly over a 15 s segment.
        steps = (harmonics.double() / self.sample_rate) % 1.0
        if self.training:  # random start phase for the overtones, as the recordings have
            offset = torch.rand(f0.shape[0], 1, harmonics.shape[2], device=f0.device, dtype=torch.float64)
            offset[:, :, 0] = 0
            steps[:, :1] = steps[:, :1] + offset
        phase = 2 * math.pi * (torch.cumsum(steps, dim=1) % 1.0)
        sines = self.sine_amp * torch.sin(phase).to(f0.dtype)
        voiced = (f0 > 0).to(f0.dtype)[:, :, None]
        noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        excitation = sines * voiced + noise_amp * torch.randn_like(sines)
        return torch.tanh(self.merge(excitation)).transpose(1, 2)


class Generator(nn.Module):
    def __init__(self, in_channels: int, gin_channels: int, upsample_rates: list[int],
                 upsample_kernel_sizes: list[int], upsample_initial_channel: int, resblock_kernel_sizes: list[int],
                 resblock_dilation_sizes: list[list[int]], sample_rate: int, n_harmonics: int = 8):
        super().__init__()
        self.hop = math.prod(upsample_rates)
        self.source = SineSource(sample_rate, self.hop, n_harmonics)
        ch = upsample_initial_channel
        self.conv_pre = weight_norm(nn.Conv1d(in_channels, ch, 7, padding=3))
        self.cond = nn.Conv1d(gin_channels, ch, 1)
        self.ups, self.source_convs, self.resblocks = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.n_kernels = len(resblock_kernel_sizes)
        for i, (rate, kernel) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            c_in, c_out = ch // 2 ** i, ch // 2 ** (i + 1)
            self.ups.append(weight_norm(nn.ConvTranspose1d(c_in, c_out, kernel, rate, padding=(kernel - rate) // 2)))
            stride = math.prod(upsample_rates[i + 1 :])
            if stride > 1:  # bring the sample-rate excitation down to this stage's rate
                self.source_convs.append(nn.Conv1d(1, c_out, 2 * stride, stride=stride, padding=stride // 2))
            else:
                self.source_convs.append(nn.Conv1d(1, c_out, 1))
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock(c_out, k, tuple(d)))
        self.conv_post = weight_norm(nn.Conv1d(c_out, 1, 7, padding=3))
        self.ups.apply(init_weights)

    def forward(self, z: torch.Tensor, f0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``z`` (B, C, T), ``f0`` (B, T) Hz, ``g`` (B, gin, 1) -> audio (B, 1, T*hop) in [-1, 1]."""
        source = self.source(f0)
        x = self.conv_pre(z) + self.cond(g)
        for i, (up, source_conv) in enumerate(zip(self.ups, self.source_convs)):
            x = up(F.leaky_relu(x, 0.1))
            x = x + source_conv(source)[..., : x.shape[-1]]
            blocks = self.resblocks[i * self.n_kernels : (i + 1) * self.n_kernels]
            x = sum(block(x) for block in blocks) / self.n_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))
