"""The decoder: an NSF (neural source-filter) BigVGAN-style generator with a speaker adapter.

A harmonic excitation built from f0 is injected at every upsampling stage, so the output pitch follows the f0 it
is given. The residual blocks are BigVGAN's AMP blocks: Snake-beta periodic activations run at twice the rate
between anti-aliasing (Kaiser-windowed sinc) filters, which keeps the periodic nonlinearity from aliasing.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from svc_model.model.modules import init_weights, padding_for

# whisper-vits-svc merges the fundamental and 10 overtones with these fixed weights (buffers of its checkpoints).
N_HARMONICS = 10
SOURCE_MERGE_WEIGHT = [0.2942, -0.2243, 0.0033, -0.0056, -0.0020, -0.0046, 0.0221, -0.0083, -0.0241, -0.0036,
                       -0.0581]
SOURCE_MERGE_BIAS = [0.0008]


# ---- anti-aliased periodic activation ------------------------------------------------------------------------
def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """A ``(1, 1, kernel_size)`` low-pass FIR: windowed sinc, Kaiser window designed for ``half_width``,
    normalized to unit DC gain."""
    half = kernel_size // 2
    delta_f = 4 * half_width
    attenuation = 2.285 * (half - 1) * math.pi * delta_f + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False)
    t = torch.arange(-half, half) + 0.5 if kernel_size % 2 == 0 else torch.arange(kernel_size) - half
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return (taps / taps.sum()).view(1, 1, kernel_size)


class Upsample2x(nn.Module):
    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.ratio, self.kernel_size = ratio, kernel_size
        self.pad = kernel_size // ratio - 1
        self.crop_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.crop_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        # The gain of `ratio` goes on the 12 taps rather than on the upsampled signal: one pass less over the
        # largest tensors of the decoder, and (ratio 2, a power of two) bitwise the same result.
        x = F.conv_transpose1d(x, (self.ratio * self.filter).expand(c, -1, -1), stride=self.ratio, groups=c)
        return x[..., self.crop_left : -self.crop_right]


class LowPass(nn.Module):
    def __init__(self, cutoff: float, half_width: float, stride: int, kernel_size: int, persistent: bool = True):
        super().__init__()
        self.stride = stride
        self.pad_left = kernel_size // 2 - int(kernel_size % 2 == 0)
        self.pad_right = kernel_size // 2
        self.register_buffer("filter", kaiser_sinc_filter(cutoff, half_width, kernel_size), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.expand(c, -1, -1), stride=self.stride, groups=c)


class Downsample2x(nn.Module):
    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.lowpass = LowPass(0.5 / ratio, 0.6 / ratio, ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class SnakeBeta(nn.Module):
    """``x + 1/beta * sin^2(alpha * x)`` per channel, with ``alpha``/``beta`` stored as logs (start at 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.exp(self.alpha)[None, :, None]
        beta = torch.exp(self.beta)[None, :, None]
        if not torch.is_grad_enabled():
            # Conversion: the same arithmetic in one buffer instead of four (no intermediates to keep for
            # backward), bitwise the same output (tests/test_model.py). With the folded gain above, about 8% off
            # the base decoder's CPU time (5 s, one thread: RTF 1.02-1.07 -> 0.93-0.99).
            y = x * alpha
            y.sin_()
            y.mul_(y)
            y.mul_(1.0 / (beta + 1e-9))
            return y.add_(x)
        return x + 1.0 / (beta + 1e-9) * torch.sin(x * alpha) ** 2


class AntiAliasedSnake(nn.Module):
    """Upsample x2, Snake-beta, low-pass and downsample x2."""

    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBeta(channels)
        self.upsample = Upsample2x()
        self.downsample = Downsample2x()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


class AMPBlock(nn.Module):
    """BigVGAN's anti-aliased multi-periodicity block: (act, dilated conv, act, conv) + residual, per dilation."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=padding_for(kernel_size, d)))
            for d in dilations)
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=padding_for(kernel_size)))
            for _ in dilations)
        self.convs1.apply(init_weights)
        self.convs2.apply(init_weights)
        self.activations = nn.ModuleList(AntiAliasedSnake(channels) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts1, acts2 = self.activations[::2], self.activations[1::2]
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, acts1, acts2):
            x = x + c2(a2(c1(a1(x))))
        return x


class PhaseBalance(nn.Module):
    """A parametrization of a transposed convolution's weight ``(in, out, kernel)`` with stride ``stride``: each
    output phase (the taps ``t`` with the same ``t % stride``) gets the same sum of taps, by moving each phase's
    sum to the mean over phases. A transposed convolution whose phases sum differently turns a constant input
    into a pattern that repeats every ``stride`` samples (the "tonal artifact" of Pons et al., 2021); through the
    whole stack that is a tone at the frame rate (100 Hz at hop 320), which a decoder trained on little data
    learns to use as its voice instead of the harmonic source. Balanced, a constant latent gives a constant
    output at every stage, so periodicity can only come from the source. The DC gain is unchanged."""

    def __init__(self, stride: int, kernel_size: int):
        super().__init__()
        phase = torch.arange(kernel_size) % stride
        self.register_buffer("phase", phase, persistent=False)
        self.register_buffer("taps", torch.bincount(phase, minlength=stride).float(), persistent=False)
        self.stride = stride

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(*weight.shape[:2], self.stride, dtype=weight.dtype, device=weight.device)
        sums = sums.index_add(2, self.phase, weight)
        excess = sums - sums.mean(dim=2, keepdim=True)
        return weight - (excess / self.taps.to(weight.dtype))[..., self.phase]


def frame_average(x: torch.Tensor, width: int) -> torch.Tensor:
    """Moving average of ``(B, C, N)`` over ``width`` samples (edges replicated): applied after the first
    upsampler with ``width`` = its stride, one frame, its response is zero at every multiple of the frame rate.

    Why: the first upsampler interpolates the latent, one value per frame, and no learned kernel interpolates
    exactly, so it adds the latent's images around 100, 200... Hz (at hop 320 and 32 kHz). Phase balancing removes
    them for a constant latent only; a latent that moves, even slowly, still leaves a pattern that repeats every
    frame. The tiny profile learned to make that pattern loud: after 3,000 steps, frames asked for a note above
    about 300 Hz were heard at 100 Hz (FCPE; a third of the voiced frames of a training clip at +7 semitones). A
    pattern that repeats every frame averages to a constant over one frame, whatever the weights; the notes
    arrive through the source after this point, so they are not touched."""
    return F.avg_pool1d(F.pad(x, ((width - 1) // 2, width // 2), mode="replicate"), width, stride=1)


# ---- the harmonic source -----------------------------------------------------------------------------------
class HarmonicSource(nn.Module):
    """f0 at the sample rate ``(B, N)`` -> excitation ``(B, 1, N)``: the fundamental and its overtones where
    voiced, noise where not, merged by fixed weights and a tanh (whisper-vits-svc's ``SourceModuleHnNSF``)."""

    def __init__(self, sample_rate: int, sine_amp: float = 0.1, noise_std: float = 0.003):
        super().__init__()
        self.sample_rate, self.sine_amp, self.noise_std = sample_rate, sine_amp, noise_std
        self.register_buffer("merge_w", torch.tensor([SOURCE_MERGE_WEIGHT]))
        self.register_buffer("merge_b", torch.tensor(SOURCE_MERGE_BIAS))

    def forward(self, f0: torch.Tensor, deterministic: bool = False,
                generator: torch.Generator | None = None, start_phase: torch.Tensor | None = None,
                noise=None) -> torch.Tensor:
        """``deterministic``: overtones start at phase 0 and no noise is added (tests, A/B listening).
        Otherwise each overtone gets a random start phase and Gaussian noise is added, as in training.
        ``start_phase`` ``(B, harmonics)`` in cycles (float64) continues a source built earlier (streaming: see
        :func:`advance_phase`); it replaces the start phases. ``noise`` (an
        :class:`svc_model.model.modules.ItemNoise`, training) supplies the random draws instead of ``generator``."""
        with torch.no_grad():
            harmonics = f0[:, :, None] * torch.arange(1, N_HARMONICS + 2, device=f0.device, dtype=f0.dtype)
            # Phase in float64: a float32 running sum drifts audibly over a whole track.
            steps = (harmonics.double() / self.sample_rate) % 1.0
            if start_phase is not None:
                steps[:, 0, :] = steps[:, 0, :] + start_phase.to(steps)
            elif not deterministic:
                if noise is not None:
                    offset = noise.rand((f0.shape[0], N_HARMONICS + 1), dtype=torch.float64).to(f0.device)
                else:
                    offset = torch.rand(f0.shape[0], N_HARMONICS + 1, device=f0.device, dtype=torch.float64,
                                        generator=generator)
                offset[:, 0] = 0
                steps[:, 0, :] = steps[:, 0, :] + offset
            phase = torch.cumsum(steps, dim=1) % 1.0
            sines = (torch.sin(2 * math.pi * phase) * self.sine_amp).to(f0.dtype)
            voiced = (f0 > 0).to(f0.dtype)[:, :, None]
            sines = sines * voiced
            if not deterministic:
                noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
                if noise is not None:
                    eps = noise.randn(sines.shape, f0.dtype).to(f0.device)
                else:
                    eps = torch.randn(sines.shape, device=f0.device, dtype=f0.dtype, generator=generator)
                sines = sines + noise_amp * eps
        merged = torch.tanh(F.linear(sines, self.merge_w.to(sines.dtype), self.merge_b.to(sines.dtype)))
        return merged.transpose(1, 2)


def advance_phase(start_phase: torch.Tensor, f0_frames: torch.Tensor, hop: int, sample_rate: int) -> torch.Tensor:
    """Start phases ``(B, T, harmonics)`` of the frames after each of ``f0_frames`` (``(B, T)`` Hz, each held for
    ``hop`` samples), for a source that began at ``start_phase`` ``(B, harmonics)``: what
    :meth:`HarmonicSource.forward` accumulates, in closed form. The last row starts the next frame."""
    k = torch.arange(1, N_HARMONICS + 2, device=f0_frames.device, dtype=torch.float64)
    per_frame = (f0_frames.double()[:, :, None] * k / sample_rate) % 1.0 * hop
    return (start_phase.double()[:, None, :] + torch.cumsum(per_frame, dim=1)) % 1.0


class SpeakerAdapter(nn.Module):
    """Normalizes each frame over channels, then scales and shifts it by linear maps of the speaker embedding
    (starting as the identity)."""

    def __init__(self, spk_dim: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.W_scale = nn.Linear(spk_dim, channels)
        self.W_bias = nn.Linear(spk_dim, channels)
        for layer, bias in ((self.W_scale, 1.0), (self.W_bias, 0.0)):
            nn.init.zeros_(layer.weight)
            nn.init.constant_(layer.bias, bias)

    def forward(self, x: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, -1)
        mean = x.mean(dim=-1, keepdim=True)
        std = (((x - mean) ** 2).mean(dim=-1, keepdim=True) + self.eps).sqrt()
        y = (x - mean) / std * self.W_scale(speaker).unsqueeze(1) + self.W_bias(speaker).unsqueeze(1)
        return y.transpose(1, -1)


class Generator(nn.Module):
    def __init__(self, in_channels: int, spk_dim: int, upsample_rates: list[int], upsample_kernel_sizes: list[int],
                 upsample_initial_channel: int, resblock_kernel_sizes: list[int],
                 resblock_dilation_sizes: list[list[int]], sample_rate: int, source_init_gain: float = 1.0,
                 latent_noise: float = 1.0, phase_balanced_upsampling: bool = False,
                 anti_aliased_source: bool = False, frame_rate_null: bool = False):
        super().__init__()
        self.latent_noise = latent_noise
        # One frame of the first stage (upsample_rates[0] samples), averaged: see frame_average.
        self.null_width = upsample_rates[0] if frame_rate_null else 0  # 0: no null
        self.hop = math.prod(upsample_rates)
        self.n_kernels = len(resblock_kernel_sizes)
        self.adapter = SpeakerAdapter(spk_dim, in_channels)
        self.conv_pre = nn.Conv1d(in_channels, upsample_initial_channel, 7, padding=3)
        self.m_source = HarmonicSource(sample_rate)
        self.noise_convs, self.ups, self.resblocks = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.source_filters = nn.ModuleList()
        self.source_strides: list[int] = []  # samples of the excitation per sample of each stage
        for i, (rate, kernel) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            c_in, c_out = upsample_initial_channel // 2 ** i, upsample_initial_channel // 2 ** (i + 1)
            self.ups.append(weight_norm(nn.ConvTranspose1d(c_in, c_out, kernel, rate, padding=(kernel - rate) // 2)))
            if phase_balanced_upsampling:  # after weight norm: it constrains the weight norm computes
                torch.nn.utils.parametrize.register_parametrization(self.ups[-1], "weight",
                                                                    PhaseBalance(rate, kernel))
            stride = math.prod(upsample_rates[i + 1 :])
            self.source_strides.append(stride)
            if stride > 1:  # bring the sample-rate excitation down to this stage's rate
                self.noise_convs.append(nn.Conv1d(1, c_out, 2 * stride, stride=stride, padding=stride // 2))
            else:
                self.noise_convs.append(nn.Conv1d(1, c_out, 1))
            # A learned kernel of 2 x stride cannot low-pass: harmonics above a stage's Nyquist fold down, and
            # the stage's next upsampler mirrors what is near its Nyquist (a 200 Hz note at the first stage's
            # 500 Hz rate comes back as 300 Hz, and the output then repeats at 100 Hz). Anti-aliased, each stage
            # gets only the part of the excitation below half its Nyquist (the first stage: 125 Hz).
            self.source_filters.append(
                LowPass(0.25 / stride, 0.15 / stride, 1, 16 * stride, persistent=False) if anti_aliased_source and stride > 1
                else nn.Identity())
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(AMPBlock(c_out, k, tuple(d)))
        self.activation_post = AntiAliasedSnake(c_out)
        self.conv_post = nn.Conv1d(c_out, 1, 7, padding=3, bias=False)
        # Frames of excitation the source filters need beyond the decoded frames on each side: with them, a slice
        # (a file-conversion piece, a streaming block, a training crop) is filtered at its edges as it would be
        # inside a whole track, not against a replicate-padded sample (a step that the filter turns into a thump
        # and a pitch error at every join). The anchor's layout has no filters: 0, and nothing changes.
        reach = max((f.pad_right for f in self.source_filters if isinstance(f, LowPass)), default=0)
        self.source_context = math.ceil(reach / self.hop)
        self.ups.apply(init_weights)
        # From scratch, a larger start for the source convolutions makes the harmonic source outweigh the
        # frame-rate latent; with PyTorch's default a short training finds a 100 Hz (frame-rate) buzz first and
        # ignores the source. Loaded weights (a pretrain, a checkpoint) replace this.
        with torch.no_grad():
            for conv in self.noise_convs:
                conv.weight.mul_(source_init_gain)

    def source(self, f0: torch.Tensor, deterministic: bool = False,
               generator: torch.Generator | None = None, start_phase: torch.Tensor | None = None,
               noise=None, hold_edges: bool = True) -> torch.Tensor:
        """Frame-rate f0 ``(B, T)`` -> the excitation ``(B, 1, (T + 2 * source_context) * hop)``: what
        :meth:`forward` takes for ``T`` frames. Conversion builds it once per track and slices it per piece, so
        the sine phase runs on across the cuts; streaming passes the phase carried from the previous block as
        ``start_phase`` (at ``f0``'s first frame).

        ``hold_edges``: the first and last frames' notes are held for ``source_context`` frames beyond the ends
        (a track's edges). Give False when ``f0`` already has those frames on each side (a slice of a longer f0):
        the result is then ``T * hop`` long."""
        c = self.source_context if hold_edges else 0
        if c:
            if start_phase is not None:  # the phases given are at f0's first frame; the held note starts earlier
                held = advance_phase(torch.zeros_like(start_phase, dtype=torch.float64), f0[:, :1].expand(-1, c),
                                     self.hop, self.m_source.sample_rate)[:, -1]
                start_phase = (start_phase.double() - held) % 1.0
            f0 = F.pad(f0[:, None], (c, c), mode="replicate")[:, 0]
        return self.m_source(torch.repeat_interleave(f0, self.hop, dim=1), deterministic, generator, start_phase,
                             noise)

    def excitations(self, source: torch.Tensor, frames: int) -> Iterator[torch.Tensor]:
        """What each upsampling stage adds for ``frames`` decoded frames, stage by stage (lazily: one stage's
        tensor at a time): the source (with its context, see :meth:`source`) filtered for the stage's rate and
        brought to it by the stage's convolution, context dropped."""
        c = self.source_context
        for stride, noise_conv, source_filter in zip(self.source_strides, self.noise_convs, self.source_filters):
            excitation = noise_conv(source_filter(source))
            if c:  # the context was there for the filter; the stage gets the decoded frames only
                skip = c * self.hop // stride
                excitation = excitation[..., skip : skip + frames * self.hop // stride]
            yield excitation

    def forward(self, z: torch.Tensor, speaker: torch.Tensor, f0: torch.Tensor | None = None,
                source: torch.Tensor | None = None, noise=None) -> torch.Tensor:
        """``z`` (B, C, T), raw ``speaker`` (B, spk_dim), and ``f0`` Hz or a prebuilt ``source`` -> audio
        (B, 1, T*hop) in [-1, 1]. ``f0`` is (B, T), or (B, T + 2 * source_context) with the frames around the
        decoded ones; ``source`` is (B, 1, (T + 2 * source_context) * hop) (:meth:`source`). With
        ``latent_noise``, training adds that much unit noise to ``z`` (the anchor's perturbation: 1)."""
        c, frames = self.source_context, z.shape[-1]
        if source is None:
            with_context = f0.shape[-1] == frames + 2 * c and c > 0
            source = self.source(f0, deterministic=not self.training, noise=noise, hold_edges=not with_context)
        if source.shape[-1] != (frames + 2 * c) * self.hop:
            raise ValueError(f"the source has {source.shape[-1]} samples; {frames} frames need "
                             f"{(frames + 2 * c) * self.hop} ({c} frames of context on each side, hop {self.hop})")
        if self.training and self.latent_noise:
            z = z + (noise.randn_like(z) if noise is not None else torch.randn_like(z)) * self.latent_noise
        x = self.conv_pre(self.adapter(z, speaker))
        x = x * torch.tanh(F.softplus(x))  # mish
        for i, (up, excitation) in enumerate(zip(self.ups, self.excitations(source, frames))):
            x = up(x)
            if i == 0 and self.null_width:
                x = frame_average(x, self.null_width)
            x = x + excitation
            blocks = self.resblocks[i * self.n_kernels : (i + 1) * self.n_kernels]
            x = sum(block(x) for block in blocks) / self.n_kernels
        return torch.tanh(self.conv_post(self.activation_post(x)))
