"""Model modules and losses: shapes, lengths, and each loss on known inputs."""
from __future__ import annotations

import math

import pytest
import torch

from svc_model.config import load_config
from svc_model.model import SVCModel
from svc_model.model.discriminators import Discriminator
from svc_model.model.encoders import PosteriorEncoder, PriorEncoder, coarse_pitch
from svc_model.model.flow import Flow
from svc_model.model.generator import Generator, SineSource
from svc_model.model.losses import (
    MultiResolutionSTFTLoss,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    kl_forward,
    kl_loss,
    kl_reverse,
    mel_loss,
    speaker_loss,
)
from svc_model.model.modules import sequence_mask
from svc_model.model.spectral import LinearSpectrogram, LogMelSpectrogram

CFG = load_config("tiny")
M = CFG.model
B, T = 2, 37


def _inputs(t=T):
    torch.manual_seed(0)
    f0 = torch.full((B, t), 220.0)
    f0[:, :4] = 0
    return dict(ppg=torch.randn(B, M.ppg_dim, t), vec=torch.randn(B, M.vec_dim, t), f0=f0,
                spec=torch.rand(B, 513, t), speaker=torch.nn.functional.normalize(torch.randn(B, 256), dim=-1),
                lengths=torch.tensor([t, t - 9]))


def test_every_module_has_the_documented_shapes():
    x = _inputs()
    mask = sequence_mask(x["lengths"], T)
    assert mask.shape == (B, 1, T) and mask[1, 0, T - 9 :].sum() == 0
    g = torch.randn(B, M.gin_channels, 1)
    prior = PriorEncoder(M.ppg_dim, M.vec_dim, M.hidden_channels, M.filter_channels, M.n_heads, M.prior_layers,
                         3, 0.0, M.inter_channels)
    m_p, logs_p = prior(x["ppg"], x["vec"], x["f0"], mask)
    assert m_p.shape == logs_p.shape == (B, M.inter_channels, T)
    assert m_p[1, :, T - 9 :].abs().sum() == 0, "padding stays zero"
    post = PosteriorEncoder(513, M.inter_channels, M.hidden_channels, 5, M.posterior_layers, M.gin_channels)
    z, m_q, logs_q = post(x["spec"], mask, g)
    assert z.shape == m_q.shape == (B, M.inter_channels, T)
    flow = Flow(M.inter_channels, M.hidden_channels, 5, 2, M.flow_layers, M.gin_channels)
    for coupling in flow.couplings:  # make the flow non-trivial, then check it inverts exactly
        torch.nn.init.normal_(coupling.post.weight, std=0.1)
    z_p, logdet = flow(z, mask, g)
    back, _ = flow(z_p, mask, g, reverse=True)
    assert z_p.shape == z.shape and logdet.shape == (B,)
    torch.testing.assert_close(back, z * mask, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z_p, z * mask)
    dec = Generator(M.inter_channels, M.gin_channels, M.upsample_rates, M.upsample_kernel_sizes,
                    M.upsample_initial_channel, M.resblock_kernel_sizes, M.resblock_dilation_sizes, 32000)
    audio = dec(z, x["f0"], g)
    assert audio.shape == (B, 1, T * 320) and audio.abs().max() <= 1
    src = SineSource(32000, 320)(x["f0"])
    assert src.shape == (B, 1, T * 320)
    disc = Discriminator(M.mpd_periods, M.mrd_resolutions, M.disc_channels)
    outs = disc(audio)
    assert len(outs) == len(M.mpd_periods) + len(M.mrd_resolutions)
    assert all(score.shape[0] == B and len(fmaps) == 6 for score, fmaps in outs)


@pytest.mark.parametrize("profile", ["tiny", "base"])
def test_model_output_length_is_frames_times_hop(profile):
    cfg = load_config(profile)
    model = SVCModel(cfg.model, 513)
    f0 = torch.full((1, 23), 200.0)
    x = dict(ppg=torch.randn(1, cfg.model.ppg_dim, 23), vec=torch.randn(1, cfg.model.vec_dim, 23), f0=f0,
             speaker=torch.randn(1, 256))
    model.eval()
    assert model.infer(**x).shape == (1, 1, 23 * 320)
    model.train()
    out = model(spec=torch.rand(1, 513, 23), lengths=torch.tensor([23]), segment_frames=10, **x)
    assert out.audio.shape == (1, 1, 10 * 320)


def test_no_speaker_table_a_new_embedding_needs_no_parameters():
    model = SVCModel(M, 513).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not any("emb_g" in n or "speaker_table" in n for n in names)
    x = _inputs()
    a = model.infer(x["ppg"][:1], x["vec"][:1], x["f0"][:1], torch.randn(1, 256))
    b = model.infer(x["ppg"][:1], x["vec"][:1], x["f0"][:1], torch.randn(1, 256))
    assert not torch.allclose(a, b), "the speaker embedding changes the output"


def test_coarse_pitch_bins():
    f0 = torch.tensor([0.0, 50.0, 220.0, 1100.0, 5000.0])
    bins = coarse_pitch(f0)
    assert bins.tolist()[0] == 0 and bins[1] == 1 and bins[3] == 255 and bins[4] == 255
    assert 1 < bins[2] < 255


def test_spectrogram_frames():
    audio = torch.randn(2, 320 * 50 + 17)
    assert LinearSpectrogram()(audio).shape == (2, 513, 50)
    assert LogMelSpectrogram()(audio).shape == (2, 100, 50)


def _tone(f=440.0, n=16000):
    t = torch.arange(n) / 32000
    return 0.5 * torch.sin(2 * math.pi * f * t)[None]


def test_mel_and_stft_losses_are_zero_on_identity_and_shrink_as_inputs_approach():
    mel_fn, stft = LogMelSpectrogram(), MultiResolutionSTFTLoss()
    y = _tone()
    noise = torch.randn_like(y)
    assert mel_loss(mel_fn(y), mel_fn(y)) == 0
    sc, mag = stft(y, y)
    assert sc == 0 and mag == 0
    previous = (float("inf"), float("inf"))
    for scale in (1.0, 0.3, 0.1, 0.03):
        y_hat = y + scale * noise
        current = (float(mel_loss(mel_fn(y_hat), mel_fn(y))), float(sum(stft(y_hat, y))))
        assert all(c > 0 for c in current) and all(c < p for c, p in zip(current, previous))
        previous = current


def test_adversarial_losses_on_known_scores():
    ones, zeros = [torch.ones(3, 5)], [torch.zeros(3, 5)]
    assert generator_adversarial_loss(ones) == 0 and generator_adversarial_loss(zeros) == 1
    assert discriminator_loss(ones, zeros) == 0 and discriminator_loss(zeros, ones) == 2
    assert generator_adversarial_loss([torch.full((2,), 0.5)]) == 0.25
    assert float(generator_adversarial_loss([torch.full((2,), 0.9)])) < float(generator_adversarial_loss([torch.full((2,), 0.5)]))


def test_feature_matching_is_zero_on_identity_and_grows_with_distance():
    real = [[torch.randn(2, 4, 8), torch.randn(2, 3)]]
    assert feature_matching_loss(real, real) == 0
    near = [[f + 0.1 for f in real[0]]]
    far = [[f + 1.0 for f in real[0]]]
    assert 0 < float(feature_matching_loss(real, near)) < float(feature_matching_loss(real, far))
    assert float(feature_matching_loss(real, far)) == pytest.approx(2.0, rel=1e-5)  # 1.0 per map


def test_kl_losses_match_the_closed_form_and_vanish_for_equal_distributions():
    torch.manual_seed(0)
    mask = torch.ones(1, 1, 20000)
    m_q, logs_q = torch.full((1, 1, 20000), 0.3), torch.full((1, 1, 20000), -0.2)
    m_p, logs_p = torch.zeros(1, 1, 20000), torch.zeros(1, 1, 20000)
    z_q = m_q + torch.randn_like(m_q) * torch.exp(logs_q)
    # Monte-Carlo estimate of KL(q||p) against the Gaussian closed form.
    exact = float(logs_p[0, 0, 0] - logs_q[0, 0, 0]
                  + (torch.exp(2 * logs_q[0, 0, 0]) + (m_q[0, 0, 0] - m_p[0, 0, 0]) ** 2) / (2 * torch.exp(2 * logs_p[0, 0, 0])) - 0.5)
    assert float(kl_forward(z_q, logs_q, m_p, logs_p, mask)) == pytest.approx(exact, abs=0.01)
    z_p = m_p + torch.randn_like(m_p) * torch.exp(logs_p)
    exact_r = float(logs_q[0, 0, 0] - logs_p[0, 0, 0]
                    + (1.0 + (m_p[0, 0, 0] - m_q[0, 0, 0]) ** 2) / (2 * torch.exp(2 * logs_q[0, 0, 0])) - 0.5)
    assert float(kl_reverse(z_p, logs_p, m_q, logs_q, mask)) == pytest.approx(exact_r, abs=0.02)
    # Same distribution: the estimate is ~0; it grows as the means move apart.
    z = torch.randn(1, 1, 20000)
    assert abs(float(kl_loss(z, logs_p, m_p, logs_p, mask))) < 0.02
    values = [float(kl_loss(z + d, logs_p, m_p, logs_p, mask)) for d in (2.0, 1.0, 0.5)]
    assert values[0] > values[1] > values[2] > 0


def test_speaker_loss():
    a = torch.nn.functional.normalize(torch.randn(4, 256), dim=-1)
    assert float(speaker_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(speaker_loss(a, -a)) == pytest.approx(2.0, abs=1e-6)
    b = torch.nn.functional.normalize(torch.randn(4, 256), dim=-1)
    closer = torch.nn.functional.normalize(a + 0.1 * b, dim=-1)
    farther = torch.nn.functional.normalize(a + 1.0 * b, dim=-1)
    assert 0 < float(speaker_loss(closer, a)) < float(speaker_loss(farther, a))
