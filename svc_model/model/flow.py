"""Speaker-conditioned residual coupling flow between the posterior latent and the prior space."""
from __future__ import annotations

import torch
from torch import nn

from svc_model.model.modules import WaveNet


class ResidualCoupling(nn.Module):
    """Half the channels shift the other half (mean-only, volume preserving: log-determinant 0)."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, n_layers: int, gin_channels: int):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.wavenet = WaveNet(hidden, kernel_size, 1, n_layers, gin_channels)
        self.post = nn.Conv1d(hidden, channels - self.half, 1)
        # Start as the identity, so a fresh flow does not scramble the latent.
        self.post.weight.data.zero_()
        self.post.bias.data.zero_()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, reverse: bool = False):
        x0, x1 = x[:, : self.half], x[:, self.half :]
        shift = self.post(self.wavenet(self.pre(x0) * mask, mask, g)) * mask
        x1 = (x1 - shift if reverse else x1 + shift) * mask
        return torch.cat([x0, x1], dim=1), torch.zeros(x.shape[0], device=x.device)


class Flow(nn.Module):
    """``n_flows`` couplings, each followed by a channel flip."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, n_layers: int, n_flows: int, gin_channels: int):
        super().__init__()
        self.couplings = nn.ModuleList(ResidualCoupling(channels, hidden, kernel_size, n_layers, gin_channels)
                                       for _ in range(n_flows))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, reverse: bool = False):
        """Posterior -> prior space (``reverse=False``) or back. Returns ``x`` and the summed log-determinant."""
        logdet = torch.zeros(x.shape[0], device=x.device)
        if not reverse:
            for coupling in self.couplings:
                x, ld = coupling(x, mask, g)
                x = torch.flip(x, [1])
                logdet = logdet + ld
        else:
            for coupling in reversed(self.couplings):
                x = torch.flip(x, [1])
                x, ld = coupling(x, mask, g, reverse=True)
                logdet = logdet - ld
        return x, logdet
