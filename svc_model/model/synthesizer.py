"""The SVC model: whisper-vits-svc's ``SynthesizerTrn``, module for module, sized by :class:`ModelConfig`.

Training reconstructs a random crop of the target audio from its posterior latent (VAE) while the flow ties the
posterior to the prior that the content (PPG + vec) and pitch predict; a speaker classifier behind gradient
reversal keeps timbre out of the prior. Conversion takes the prior from the *source's* content and pitch, maps it
through the inverse flow under the *target's* speaker embedding, and decodes with the target's adapter. There is
no speaker-ID table: a new singer is only a new embedding.

Submodules carry domain names; their insides carry the anchor's names, so its checkpoints load after renaming
four prefixes (:data:`ANCHOR_PREFIXES`, used by :mod:`svc_model.pretrained`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from svc_model.config import ModelConfig
from svc_model.model.encoders import PosteriorEncoder, PriorEncoder, SpeakerClassifier
from svc_model.model.flow import Flow
from svc_model.model.generator import Generator
from svc_model.model.modules import ItemNoise, random_slice_starts, sequence_mask, slice_segments

# whisper-vits-svc's top-level names -> ours (``flow`` and ``speaker_classifier`` keep theirs).
ANCHOR_PREFIXES = {"emb_g": "speaker_proj", "enc_p": "prior_encoder", "enc_q": "posterior_encoder", "dec": "decoder"}


@dataclass
class TrainOutput:
    audio: torch.Tensor  # (B, 1, segment_frames * hop), generated
    slice_starts: torch.Tensor  # (B,) frame index of each crop
    mask: torch.Tensor  # (B, 1, T)
    z_p: torch.Tensor  # posterior sample pushed into prior space (flow forward)
    m_p: torch.Tensor
    logs_p: torch.Tensor
    z_q: torch.Tensor  # prior sample pulled back into posterior space (flow reverse)
    m_q: torch.Tensor
    logs_q: torch.Tensor
    logdet_forward: torch.Tensor
    logdet_reverse: torch.Tensor
    speaker_pred: torch.Tensor  # (B, spk_dim): the speaker classifier's guess from the prior's hidden states


class SVCModel(nn.Module):
    def __init__(self, cfg: ModelConfig, spec_channels: int, sample_rate: int = 32000):
        super().__init__()
        self.cfg = cfg
        self.speaker_proj = nn.Linear(cfg.spk_dim, cfg.gin_channels)
        self.prior_encoder = PriorEncoder(cfg.ppg_dim, cfg.vec_dim, cfg.hidden_channels, cfg.filter_channels,
                                          cfg.n_heads, cfg.prior_layers, cfg.prior_kernel_size, cfg.dropout,
                                          cfg.inter_channels)
        self.speaker_classifier = SpeakerClassifier(cfg.hidden_channels, cfg.spk_dim)
        self.posterior_encoder = PosteriorEncoder(spec_channels, cfg.inter_channels, cfg.hidden_channels,
                                                  cfg.posterior_kernel_size, cfg.posterior_layers, cfg.gin_channels)
        self.flow = Flow(cfg.inter_channels, cfg.hidden_channels, 5, cfg.flow_wavenet_layers, cfg.flow_layers,
                         cfg.spk_dim)
        self.decoder = Generator(cfg.inter_channels, cfg.spk_dim, cfg.upsample_rates, cfg.upsample_kernel_sizes,
                                 cfg.upsample_initial_channel, cfg.resblock_kernel_sizes,
                                 cfg.resblock_dilation_sizes, sample_rate, cfg.source_init_gain,
                                 cfg.latent_noise, cfg.phase_balanced_upsampling,
                                 cfg.anti_aliased_source, cfg.frame_rate_null)
        self.hop = self.decoder.hop

    def forward(self, ppg, vec, f0, spec, speaker, lengths, segment_frames: int,
                generator: torch.Generator | None = None, noise: ItemNoise | None = None) -> TrainOutput:
        """Training pass. Frame-level inputs are ``(B, C, T)`` (``f0``: ``(B, T)``), all at 100 frames/s.

        PPG and vec get Gaussian noise first (``ppg_noise``/``vec_noise``, the anchor's 1 and 2): the prior must
        not rely on fine detail that differs between singers' renderings of the same content.

        ``noise``: every random draw of the pass (perturbations, latent samples, crop starts, the source's phases
        and noise) comes from these per-item streams, so the pass does not depend on how a global batch is split
        (the trainer always passes one); without it the draws come from torch's global RNG.
        """
        randn_like = noise.randn_like if noise is not None else torch.randn_like
        mask = sequence_mask(lengths, ppg.shape[2]).to(ppg.dtype)
        if self.cfg.ppg_noise:
            ppg = ppg + randn_like(ppg) * self.cfg.ppg_noise
        if vec is not None and self.cfg.vec_noise:
            vec = vec + randn_like(vec) * self.cfg.vec_noise
        g = self.speaker_proj(F.normalize(speaker, dim=-1)).unsqueeze(-1)
        m_p, logs_p, hidden = self.prior_encoder(ppg, vec, f0, mask)
        prior_sample = (m_p + randn_like(m_p) * torch.exp(logs_p)) * mask
        z, m_q, logs_q = self.posterior_encoder(spec, mask, g, noise)
        starts = random_slice_starts(lengths, segment_frames, generator, noise)
        z_slice = slice_segments(z, starts, segment_frames)
        # f0 for the crop and the source filters' context around it (0 frames in the anchor's layout)
        c = self.decoder.source_context
        f0_slice = slice_segments(F.pad(f0.unsqueeze(1), (c, c), mode="replicate"), starts,
                                  segment_frames + 2 * c).squeeze(1)
        audio = self.decoder(z_slice, speaker, f0_slice, noise=noise)
        # The flow is conditioned on the raw embedding, as the anchor's is.
        z_p, logdet_f = self.flow(z, mask, speaker)
        z_q, logdet_r = self.flow(prior_sample, mask, speaker, reverse=True)
        speaker_pred = self.speaker_classifier(hidden)
        return TrainOutput(audio, starts, mask, z_p, m_p, logs_p, z_q, m_q, logs_q, logdet_f, logdet_r,
                           speaker_pred)

    @torch.no_grad()
    def infer(self, ppg, vec, f0, speaker, noise_scale: float = 0.0, lengths: torch.Tensor | None = None,
              source: torch.Tensor | None = None, generator: torch.Generator | None = None, decode_from: int = 0):
        """Convert: content and pitch of the source, timbre of ``speaker`` -> audio ``(B, 1, T * hop)``.

        ``noise_scale`` scales the prior's standard deviation (0 = its mean). ``source`` is a prebuilt harmonic
        excitation (see :meth:`Generator.source`); without one a deterministic source is built from ``f0``.
        With ``noise_scale=0`` and no random source the output is a pure function of the inputs.
        ``decode_from``: decode only frames ``decode_from:`` (streaming: the prior and flow see the whole window
        for context, the decoder only what is returned); ``source`` then covers those frames only.
        """
        if lengths is None:
            lengths = torch.full((ppg.shape[0],), ppg.shape[2], device=ppg.device, dtype=torch.long)
        mask = sequence_mask(lengths, ppg.shape[2]).to(ppg.dtype)
        m_p, logs_p, _ = self.prior_encoder(ppg, vec, f0, mask)
        noise = torch.randn(m_p.shape, generator=generator, device=m_p.device, dtype=m_p.dtype) if noise_scale else 0
        z_p = (m_p + noise * torch.exp(logs_p) * noise_scale) * mask
        z, _ = self.flow(z_p, mask, speaker, reverse=True)
        z, f0 = (z * mask)[..., decode_from:], f0[..., decode_from:]
        if source is None:
            source = self.decoder.source(f0, deterministic=True)
        return self.decoder(z, speaker, source=source)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
