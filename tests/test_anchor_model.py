"""Equivalence with whisper-vits-svc (the anchor): its state dicts load key for key, and our modules compute what
its modules compute on the same weights and inputs (fixtures made by its own code: tests/fixtures/anchor/)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from svc_model.config import load_config
from svc_model.model import SVCModel
from svc_model.model.discriminators import Discriminator
from svc_model.model.encoders import coarse_pitch
from svc_model.model.modules import sequence_mask
from svc_model.pretrained import anchor_to_ours, infer_model_config, ours_to_anchor

FIXTURES = Path(__file__).parent / "fixtures" / "anchor" / "synthesizer"
TOL = 1e-4


@pytest.fixture(scope="module")
def reduced():
    """The anchor's SynthesizerTrn at reduced widths (its layer counts are fixed in its code), in our model."""
    from safetensors.torch import load_file

    sd = load_file(FIXTURES / "model_g.safetensors")
    model = SVCModel(infer_model_config(sd, FIXTURES), 513).eval()
    model.load_state_dict({anchor_to_ours(k): v for k, v in sd.items()}, strict=True)
    ref = {k: torch.from_numpy(v) for k, v in np.load(FIXTURES / "reference.npz").items()}
    return model, ref


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) < TOL


def test_the_published_layout_maps_onto_our_base_model_key_for_key():
    # Fails if a module is missing, misnamed, or sized differently from the anchor's sovits5.0 pretrain.
    layout = json.loads((FIXTURES / "sovits5.0_layout.json").read_text())
    cfg = load_config("base")
    ours_g = SVCModel(cfg.model, cfg.spectrogram.n_fft // 2 + 1).state_dict()
    m = cfg.model
    ours_d = Discriminator(m.mpd_periods, m.mrd_resolutions, m.mpd_channels, m.mrd_channels,
                           m.msd_channels).state_dict()
    for anchor, ours in ((layout["model_g"], ours_g), (layout["model_d"], ours_d)):
        mapped = {anchor_to_ours(k): shape for k, shape in anchor.items()}
        assert set(mapped) == set(ours), (sorted(set(mapped) ^ set(ours)))[:5]
        for key, shape in mapped.items():
            assert list(ours[key].shape) == shape, key
        assert {ours_to_anchor(k) for k in ours} == set(anchor)


def test_pitch_bins_match_the_anchor(reduced):
    # Fails if unvoiced frames get a bin other than the anchor's 1, or the rounding differs.
    _, ref = reduced
    assert torch.equal(coarse_pitch(ref["f0"]), ref["coarse"])


def test_prior_and_speaker_classifier_match_the_anchor(reduced):
    # Fails on any difference in the relative-position attention, the k5 input convs or the pitch embedding.
    model, ref = reduced
    mask = sequence_mask(ref["lengths"], ref["f0"].shape[1])
    with torch.no_grad():
        m_p, logs_p, hidden = model.prior_encoder(ref["ppg"].transpose(1, 2), ref["vec"].transpose(1, 2),
                                                  ref["f0"], mask)
        _close(m_p, ref["m_p"])
        _close(logs_p, ref["logs_p"])
        _close(hidden, ref["hidden"])
        _close(model.speaker_classifier(hidden), ref["spk_pred"])


def test_posterior_encoder_and_flow_match_the_anchor(reduced):
    # Fails if the flow's speaker normalization (SNAC), its log-determinant or the WaveNet conditioning differ.
    model, ref = reduced
    mask = sequence_mask(ref["lengths"], ref["f0"].shape[1])
    with torch.no_grad():
        g = model.speaker_proj(F.normalize(ref["spk"], dim=-1)).unsqueeze(-1)
        _, m_q, logs_q = model.posterior_encoder(ref["spec"], mask, g)
        _close(m_q, ref["m_q"])
        _close(logs_q, ref["logs_q"])
        z = ref["z"] * mask
        forward, logdet_f = model.flow(z, mask, ref["spk"])
        inverse, logdet_r = model.flow(z, mask, ref["spk"], reverse=True)
    _close(forward, ref["flow_fwd"])
    _close(inverse, ref["flow_rev"])
    assert torch.allclose(logdet_f, ref["logdet_fwd"], atol=1e-3) and torch.allclose(logdet_r, ref["logdet_rev"],
                                                                                     atol=1e-3)


def test_decoder_and_harmonic_source_match_the_anchor(reduced):
    # Fails on any difference in the AMP blocks, anti-aliasing filters, adapter, source convs or NSF source.
    model, ref = reduced
    mask = sequence_mask(ref["lengths"], ref["f0"].shape[1])
    with torch.no_grad():
        _close(model.decoder.source(ref["f0"], deterministic=True), ref["source"])
        _close(model.decoder(ref["z"] * mask, ref["spk"], source=ref["source"]), ref["audio"])


def test_discriminator_at_the_published_size_matches_the_anchor():
    # Weights from the same deterministic recipe as make_fixtures.py; fails on any layer or activation difference.
    layout = json.loads((FIXTURES / "sovits5.0_layout.json").read_text())["model_d"]
    weights = {}
    for i, key in enumerate(sorted(layout)):
        shape = layout[key]
        if key.endswith("weight_g"):
            weights[key] = torch.ones(shape)
        elif key.endswith("bias"):
            weights[key] = torch.zeros(shape)
        else:
            weights[key] = torch.from_numpy(
                np.random.default_rng(i).standard_normal(shape).astype(np.float32) * 0.05)
    m = load_config("base").model
    disc = Discriminator(m.mpd_periods, m.mrd_resolutions, m.mpd_channels, m.mrd_channels, m.msd_channels).eval()
    disc.load_state_dict({anchor_to_ours(k): v for k, v in weights.items()}, strict=True)
    ref = np.load(FIXTURES / "discriminator_reference.npz")
    with torch.no_grad():
        outputs = disc(torch.from_numpy(ref["x"]))
    assert len(outputs) == 4 + 5 + 1
    for i, (fmaps, score) in enumerate(outputs):
        expected = ref[f"score_{i}"]
        assert np.abs(score.numpy() - expected).max() < TOL * max(1.0, np.abs(expected).max()), i
        fm = np.concatenate([fmaps[0].numpy().ravel()[:256], fmaps[-2].numpy().ravel()[:256]])
        assert np.abs(fm - ref[f"fmap_{i}"]).max() < TOL * max(1.0, np.abs(ref[f"fmap_{i}"]).max()), i
