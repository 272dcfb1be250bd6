"""The prior encoder's transformer: VITS self-attention with relative positions (window 4), conv feed-forward.

Relative position embeddings (``emb_rel_k``/``emb_rel_v``, shared by the heads) give every frame its neighbours'
offsets; without them self-attention is permutation-invariant and the prior cannot place content in time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from svc_model.model.modules import LayerNorm


class RelativeSelfAttention(nn.Module):
    def __init__(self, channels: int, n_heads: int, dropout: float = 0.0, window_size: int = 4):
        super().__init__()
        if channels % n_heads:
            raise ValueError(f"{channels} channels do not split into {n_heads} heads")
        self.n_heads, self.k_channels, self.window_size = n_heads, channels // n_heads, window_size
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        self.drop = nn.Dropout(dropout)
        std = self.k_channels ** -0.5
        self.emb_rel_k = nn.Parameter(torch.randn(1, 2 * window_size + 1, self.k_channels) * std)
        self.emb_rel_v = nn.Parameter(torch.randn(1, 2 * window_size + 1, self.k_channels) * std)
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            nn.init.xavier_uniform_(conv.weight)

    def _relative_embeddings(self, table: torch.Tensor, length: int) -> torch.Tensor:
        """The ``2 * length - 1`` offsets ``-(length-1) .. length-1``; offsets beyond the window are zero."""
        w = self.window_size
        pad = max(length - (w + 1), 0)
        start = max((w + 1) - length, 0)
        if pad:
            table = F.pad(table, (0, 0, pad, pad))
        return table[:, start : start + 2 * length - 1]

    @staticmethod
    def _relative_to_absolute(x: torch.Tensor) -> torch.Tensor:
        """``(b, h, l, 2l-1)`` logits by offset -> ``(b, h, l, l)`` by key position (the skewing trick)."""
        b, h, length, _ = x.shape
        x = F.pad(x, (0, 1)).reshape(b, h, 2 * length * length)
        x = F.pad(x, (0, length - 1)).reshape(b, h, length + 1, 2 * length - 1)
        return x[:, :, :length, length - 1 :]

    @staticmethod
    def _absolute_to_relative(x: torch.Tensor) -> torch.Tensor:
        """``(b, h, l, l)`` weights by key position -> ``(b, h, l, 2l-1)`` by offset."""
        b, h, length, _ = x.shape
        x = F.pad(x, (0, length - 1)).reshape(b, h, length * length + length * (length - 1))
        x = F.pad(x, (length, 0)).reshape(b, h, length, 2 * length)
        return x[:, :, :, 1:]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, d, t = x.shape
        q = self.conv_q(x).view(b, self.n_heads, self.k_channels, t).transpose(2, 3)
        k = self.conv_k(x).view(b, self.n_heads, self.k_channels, t).transpose(2, 3)
        v = self.conv_v(x).view(b, self.n_heads, self.k_channels, t).transpose(2, 3)
        q = q / math.sqrt(self.k_channels)
        scores = torch.matmul(q, k.transpose(-2, -1))
        rel_k = self._relative_embeddings(self.emb_rel_k, t)
        scores = scores + self._relative_to_absolute(torch.matmul(q, rel_k.unsqueeze(0).transpose(-2, -1)))
        scores = scores.masked_fill(attn_mask == 0, -1e4)
        weights = self.drop(F.softmax(scores, dim=-1))
        out = torch.matmul(weights, v)
        rel_v = self._relative_embeddings(self.emb_rel_v, t)
        out = out + torch.matmul(self._absolute_to_relative(weights), rel_v.unsqueeze(0))
        return self.conv_o(out.transpose(2, 3).reshape(b, d, t))


class FeedForward(nn.Module):
    """Two 'same'-padded convolutions with a ReLU, masked before each."""

    def __init__(self, channels: int, filter_channels: int, kernel_size: int, dropout: float = 0.0):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel_size)
        self.drop = nn.Dropout(dropout)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, ((self.kernel_size - 1) // 2, self.kernel_size // 2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.conv_1(self._pad(x * mask))))
        return self.conv_2(self._pad(x * mask)) * mask


class AttentionEncoder(nn.Module):
    """Post-norm transformer layers over ``(B, C, T)`` with a padding mask."""

    def __init__(self, hidden: int, filter_channels: int, n_heads: int, n_layers: int, kernel_size: int = 3,
                 dropout: float = 0.1, window_size: int = 4):
        super().__init__()
        self.attn_layers = nn.ModuleList(RelativeSelfAttention(hidden, n_heads, dropout, window_size)
                                         for _ in range(n_layers))
        self.norm_layers_1 = nn.ModuleList(LayerNorm(hidden) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(FeedForward(hidden, filter_channels, kernel_size, dropout)
                                        for _ in range(n_layers))
        self.norm_layers_2 = nn.ModuleList(LayerNorm(hidden) for _ in range(n_layers))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn_mask = mask.unsqueeze(2) * mask.unsqueeze(-1)
        x = x * mask
        for attn, norm1, ffn, norm2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2):
            x = norm1(x + self.drop(attn(x, attn_mask)))
            x = norm2(x + self.drop(ffn(x, mask)))
        return x * mask
