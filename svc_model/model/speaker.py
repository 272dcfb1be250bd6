"""A differentiable speaker embedding for the optional output-similarity loss: resemblyzer's pretrained encoder, frozen, fed by a
torch mel front end that matches its own (16 kHz, 25 ms windows, 10 ms hop, 40 mel bands, power)."""
from __future__ import annotations

import warnings

import torch
from torch import nn


class SpeakerEmbedder(nn.Module):
    def __init__(self, sample_rate: int = 32000):
        super().__init__()
        import librosa
        with warnings.catch_warnings():  # webrtcvad imports the deprecated pkg_resources
            warnings.simplefilter("ignore", UserWarning)
            from resemblyzer import VoiceEncoder

        self.sample_rate = sample_rate
        encoder = VoiceEncoder(device="cpu", verbose=False)
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.lstm, self.linear = encoder.lstm, encoder.linear
        self.train()
        basis = librosa.filters.mel(sr=16000, n_fft=400, n_mels=40)
        self.register_buffer("basis", torch.from_numpy(basis).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(400), persistent=False)

    def train(self, mode: bool = True):
        """Frozen weights, but the LSTM stays in training mode: cuDNN refuses an RNN backward in eval mode, and
        resemblyzer's LSTM has no dropout, so both modes compute the same embedding."""
        super().train(False)
        self.lstm.train(True)
        return self

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` or ``(B, 1, N)`` at ``sample_rate`` -> ``(B, 256)`` unit vectors; gradients reach the audio."""
        import torchaudio.functional as AF

        x = audio.reshape(audio.shape[0], -1).float()
        if self.sample_rate != 16000:
            x = AF.resample(x, self.sample_rate, 16000)
        spec = torch.stft(x, 400, 160, 400, self.window, center=True, pad_mode="constant", return_complex=True)
        mel = torch.matmul(self.basis, spec.real ** 2 + spec.imag ** 2).transpose(1, 2)  # (B, T, 40)
        _, (hidden, _) = self.lstm(mel)
        embeds = torch.relu(self.linear(hidden[-1]))
        return embeds / torch.norm(embeds, dim=1, keepdim=True).clamp(min=1e-8)
