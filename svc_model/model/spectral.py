"""Spectrograms on the model's frame grid: ``N`` samples -> ``N // hop`` frames (no center padding)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearSpectrogram(nn.Module):
    """Magnitude STFT, ``(B, N)`` -> ``(B, n_fft//2+1, N//hop)``; the posterior encoder's input."""

    def __init__(self, n_fft: int = 1024, hop: int = 320, win: int = 1024):
        super().__init__()
        self.n_fft, self.hop, self.win = n_fft, hop, win
        self.register_buffer("window", torch.hann_window(win), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        pad = (self.n_fft - self.hop) // 2
        x = F.pad(audio.float().unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(x, self.n_fft, self.hop, self.win, self.window, center=False, return_complex=True)
        return torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-6)


class LogMelSpectrogram(nn.Module):
    """Log-mel, ``(B, N)`` -> ``(B, n_mels, N//hop)``; what the mel loss compares."""

    def __init__(self, sample_rate: int = 32000, n_fft: int = 1024, hop: int = 320, win: int = 1024,
                 n_mels: int = 100, fmin: float = 50.0, fmax: float = 16000.0):
        super().__init__()
        import librosa

        self.spec = LinearSpectrogram(n_fft, hop, win)
        basis = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        self.register_buffer("basis", torch.from_numpy(basis).float(), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.clamp(torch.matmul(self.basis, self.spec(audio)), min=1e-5))
