"""The SVC model: prior encoder, posterior encoder, flow and NSF decoder, conditioned on a speaker embedding.

Training reconstructs a random crop of the target audio from its posterior latent (VAE) while the flow ties
the posterior to the prior that the content (PPG + vec) and pitch predict. Conversion samples the prior from
the *source's* content and pitch, maps it through the inverse flow under the *target's* speaker embedding, and
decodes. There is no speaker-ID table: a new singer is only a new embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from svc_model.config import ModelConfig
from svc_model.model.encoders import PosteriorEncoder, PriorEncoder
from svc_model.model.flow import Flow
from svc_model.model.generator import Generator
from svc_model.model.modules import random_slice_starts, sequence_mask, slice_segments


@dataclass
class TrainOutput:
    audio: torch.Tensor  # (B, 1, segment_frames * hop), generated
    slice_starts: torch.Tensor  # (B,) frame index of each crop
    mask: torch.Tensor  # (B, 1, T)
    z_p: torch.Tensor  # posterior sample in prior space (flow forward)
    m_p: torch.Tensor
    logs_p: torch.Tensor
    z_q: torch.Tensor  # prior sample in posterior space (flow reverse)
    m_q: torch.Tensor
    logs_q: torch.Tensor
    logdet_forward: torch.Tensor
    logdet_reverse: torch.Tensor


class SVCModel(nn.Module):
    def __init__(self, cfg: ModelConfig, spec_channels: int, sample_rate: int = 32000):
        super().__init__()
        self.cfg = cfg
        self.speaker_proj = nn.Linear(cfg.spk_dim, cfg.gin_channels)
        self.prior_encoder = PriorEncoder(cfg.ppg_dim, cfg.vec_dim, cfg.hidden_channels, cfg.filter_channels,
                                          cfg.n_heads, cfg.prior_layers, cfg.prior_kernel_size, cfg.dropout,
                                          cfg.inter_channels, cfg.pitch_bins)
        self.posterior_encoder = PosteriorEncoder(spec_channels, cfg.inter_channels, cfg.hidden_channels,
                                                  cfg.posterior_kernel_size, cfg.posterior_layers, cfg.gin_channels)
        self.flow = Flow(cfg.inter_channels, cfg.hidden_channels, 5, cfg.flow_wavenet_layers, cfg.flow_layers,
                         cfg.gin_channels)
        self.decoder = Generator(cfg.inter_channels, cfg.gin_channels, cfg.upsample_rates, cfg.upsample_kernel_sizes,
                                 cfg.upsample_initial_channel, cfg.resblock_kernel_sizes,
                                 cfg.resblock_dilation_sizes, sample_rate, cfg.n_harmonics)
        self.hop = self.decoder.hop

    def speaker_condition(self, speaker: torch.Tensor) -> torch.Tensor:
        """``(B, spk_dim)`` embedding -> ``(B, gin, 1)``; the embedding is re-normalized first."""
        return self.speaker_proj(F.normalize(speaker, dim=-1)).unsqueeze(-1)

    def forward(self, ppg, vec, f0, spec, speaker, lengths, segment_frames: int,
                generator: torch.Generator | None = None) -> TrainOutput:
        """Training pass. Frame-level inputs are ``(B, C, T)`` (``f0``: ``(B, T)``), all at 100 frames/s."""
        mask = sequence_mask(lengths, ppg.shape[2]).to(ppg.dtype)
        g = self.speaker_condition(speaker)
        m_p, logs_p = self.prior_encoder(ppg, vec, f0, mask)
        z, m_q, logs_q = self.posterior_encoder(spec, mask, g)
        z_p, logdet_f = self.flow(z, mask, g)
        prior_sample = (m_p + torch.randn_like(m_p) * torch.exp(logs_p)) * mask
        z_q, logdet_r = self.flow(prior_sample, mask, g, reverse=True)
        starts = random_slice_starts(lengths, segment_frames, generator)
        z_slice = slice_segments(z, starts, segment_frames)
        f0_slice = slice_segments(f0.unsqueeze(1), starts, segment_frames).squeeze(1)
        audio = self.decoder(z_slice, f0_slice, g)
        return TrainOutput(audio, starts, mask, z_p, m_p, logs_p, z_q, m_q, logs_q, logdet_f, logdet_r)

    @torch.no_grad()
    def infer(self, ppg, vec, f0, speaker, noise_scale: float = 0.0, lengths: torch.Tensor | None = None):
        """Convert: content and pitch of the source, timbre of ``speaker`` -> audio ``(B, 1, T * hop)``.

        ``noise_scale`` scales the prior's standard deviation (0 = its mean, deterministic).
        """
        if lengths is None:
            lengths = torch.full((ppg.shape[0],), ppg.shape[2], device=ppg.device, dtype=torch.long)
        mask = sequence_mask(lengths, ppg.shape[2]).to(ppg.dtype)
        g = self.speaker_condition(speaker)
        m_p, logs_p = self.prior_encoder(ppg, vec, f0, mask)
        z_p = (m_p + torch.randn_like(m_p) * torch.exp(logs_p) * noise_scale) * mask
        z, _ = self.flow(z_p, mask, g, reverse=True)
        return self.decoder(z * mask, f0, g)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
