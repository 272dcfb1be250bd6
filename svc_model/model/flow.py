"""Speaker-normalized residual coupling flow (whisper-vits-svc's SNAC) between the posterior latent and the prior.

Each coupling first normalizes both halves by a per-speaker mean and log-scale (``snac``, a 1x1 conv on the raw
speaker embedding), shifts one half by a WaveNet of the other, and accounts for the speaker scale in the
log-determinant; so the prior space is speaker-free and the inverse flow puts the target's timbre back.
"""
from __future__ import annotations

import torch
from torch import nn

from svc_model.model.modules import WaveNet


class SpeakerCoupling(nn.Module):
    def __init__(self, channels: int, hidden: int, kernel_size: int, n_layers: int, spk_dim: int,
                 dilation_rate: int = 1):
        super().__init__()
        if channels % 2:
            raise ValueError("flow channels must be even")
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = WaveNet(hidden, kernel_size, dilation_rate, n_layers)
        self.post = nn.Conv1d(hidden, self.half, 1)  # mean only: volume-preserving apart from the speaker scale
        self.post.weight.data.zero_()  # start as the identity (up to the speaker normalization)
        self.post.bias.data.zero_()
        self.snac = nn.Conv1d(spk_dim, 2 * self.half, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, speaker: torch.Tensor, reverse: bool = False):
        """``speaker`` is the raw ``(B, spk_dim)`` embedding. Returns ``(x, logdet)`` with ``logdet`` ``(B,)``."""
        spk_m, spk_logs = self.snac(speaker.unsqueeze(-1)).chunk(2, dim=1)  # (B, half, 1) each
        x0, x1 = x[:, : self.half], x[:, self.half :]
        x0_norm = (x0 - spk_m) * torch.exp(-spk_logs) * mask
        shift = self.post(self.enc(self.pre(x0_norm) * mask, mask)) * mask
        speaker_logdet = torch.sum(spk_logs.expand(-1, -1, x.shape[-1]) * mask, [1, 2])
        if not reverse:
            x1 = (shift + (x1 - spk_m) * torch.exp(-spk_logs) * mask) * mask
            return torch.cat([x0, x1], 1), -speaker_logdet
        x1 = (spk_m + (x1 - shift) * torch.exp(spk_logs)) * mask
        return torch.cat([x0, x1], 1), speaker_logdet


class Flip(nn.Module):
    """Reverses the channel order so the next coupling transforms the other half."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return torch.flip(x, [1]), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


class Flow(nn.Module):
    """``n_flows`` couplings, each followed by a flip (``flows.0, flows.2, ...`` are the couplings)."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, n_layers: int, n_flows: int, spk_dim: int):
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(n_flows):
            self.flows.append(SpeakerCoupling(channels, hidden, kernel_size, n_layers, spk_dim))
            self.flows.append(Flip())

    @property
    def couplings(self) -> list[SpeakerCoupling]:
        return [f for f in self.flows if isinstance(f, SpeakerCoupling)]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, speaker: torch.Tensor, reverse: bool = False):
        """Posterior -> prior space (``reverse=False``) or back. Returns ``x`` and the summed log-determinant."""
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for flow in (reversed(self.flows) if reverse else self.flows):
            x, ld = flow(x, mask, speaker, reverse=reverse)
            logdet = logdet + ld
        return x, logdet
