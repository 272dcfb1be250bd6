"""The whisper PPG equals whisper-vits-svc's (the anchor's ``whisper/inference.py``) on the same checkpoint and audio.

The reference in ``fixtures/anchor/whisper_ppg`` was computed by the anchor's own ``load_model`` + ``pred_ppg``
(its mel noise disabled) on a small random Whisper saved in openai-whisper's ``.pt`` layout; see its README.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from svc_model.config import FeaturesConfig, PPGConfig
from svc_model.features import MissingWeightsError, build_extractor

FIXTURE = Path(__file__).parent / "fixtures" / "anchor" / "whisper_ppg"
VOICES = Path(__file__).parents[1] / "examples" / "voices"
ANCHOR = dict(drop_last_fraction=0.25, piece_s=15.0)  # configs/base.yaml's ppg settings
TOL = 1e-4


def anchor_input() -> np.ndarray:
    """The fixture's audio, rebuilt by the recipe of ``make.py``: two real clips (18.73 s: one 15 s piece and a
    3.73 s one whose mel has an odd frame count), 24 kHz -> 16 kHz with scipy's polyphase resampler (not ours, so
    that a change to svc_model.audio cannot move the input)."""
    import soundfile as sf
    from scipy.signal import resample_poly

    meta = json.loads((FIXTURE / "meta.json").read_text())
    parts = [sf.read(VOICES / rel, dtype="float32", always_2d=True)[0].mean(axis=1) for rel in meta["clips"]]
    audio = resample_poly(np.concatenate(parts), 2, 3).astype(np.float32)
    assert len(audio) == meta["samples"], "examples/voices changed: rebuild the fixture (see its README)"
    assert np.isclose(np.abs(audio).astype(np.float64).sum(), meta["audio_abs_sum"], rtol=1e-6), \
        "examples/voices changed: rebuild the fixture (see its README)"
    return audio


def fixture_ppg(**overrides):
    """Our ``whisper`` backend on the fixture checkpoint, through the config and whisper's .pt path route."""
    ppg = PPGConfig(backend="whisper", **{"model": str(FIXTURE / "tiny-random.pt"), **ANCHOR, **overrides})
    return build_extractor("ppg", FeaturesConfig(device="cpu", ppg=ppg))


@pytest.fixture(scope="module")
def audio():
    return anchor_input()


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURE / "reference.npy")


def test_base_profile_ppg_equals_the_anchors(audio, reference):
    # Catches any departure from the anchor's computation: the block cut ignored or miscounted, ln_post
    # skipped, no 15 s pieces or a wrong piece boundary, padding to 30 s, a mel trimmed to an even frame count
    # (0.1 off on the odd-length last piece), a wrong per-piece truncation. Each is far above 1e-4 here.
    ex = fixture_ppg()
    assert len(ex.encoder.blocks) == 3 and ex.backend == "whisper-tiny-random-blocks3of4"
    assert ex.pretrained
    ours = ex.extract(audio)
    assert ours.shape == reference.shape == (len(audio) // 320, 64)
    assert np.abs(ours - reference).max() < TOL
    # Batched with other segments (padding + masks, pieces from several segments in one batch): the same.
    other = audio[: 16000 * 4 + 123]
    batch = ex.extract_batch([other, audio, audio[:-7000]])
    assert np.abs(batch[1] - reference).max() < TOL
    np.testing.assert_allclose(batch[0], ex.extract(other), atol=TOL)
    np.testing.assert_allclose(batch[2], ex.extract(audio[:-7000]), atol=TOL)


@pytest.mark.parametrize("overrides, what", [
    ({"drop_last_fraction": 0.0}, "all 4 blocks kept"),
    ({"piece_s": 30.0}, "one pass instead of 15 s pieces"),
    ({"mel_noise_std": 0.1}, "the anchor's mel noise"),
])
def test_each_setting_is_honoured(audio, reference, overrides, what):
    # Catches a setting that the backend silently ignores: the reference test alone would still pass if, e.g.,
    # drop_last_fraction were hard-wired, or piece_s never reached the extractor.
    ours = fixture_ppg(**overrides).extract(audio)
    assert np.abs(ours - reference).max() > 100 * TOL, what


def test_mel_noise_is_deterministic(audio):
    # Catches noise drawn from the global RNG (the anchor's randn_like): the same audio must give the same PPG.
    ex = fixture_ppg(mel_noise_std=0.1)
    clip = audio[: 16000 * 3]
    assert np.array_equal(ex.extract(clip), ex.extract(clip))
    assert "melnoise0.1" in ex.backend


def test_the_cut_never_needs_the_dropped_blocks_and_is_strict_about_the_kept_ones(tmp_path, audio, reference):
    """The dropped block's weights are not loaded (a checkpoint without them works and gives the same PPG),
    while a kept weight that is missing is an error, unlike the anchor's load_state_dict(strict=False)."""
    import torch

    from svc_model.features.ppg import WhisperPPG

    ckpt = torch.load(FIXTURE / "tiny-random.pt", weights_only=True)
    state = ckpt["model_state_dict"]
    # Catches loading the full model then deleting blocks (whisper.load_model is strict: it needs block 3).
    without_dropped = tmp_path / "without-block-3.pt"
    torch.save({**ckpt, "model_state_dict": {k: v for k, v in state.items()
                                             if not k.startswith("encoder.blocks.3.")}}, without_dropped)
    ex = WhisperPPG(model=str(without_dropped), device="cpu", drop_last_fraction=0.25)
    clip = audio[: 16000 * 5]
    np.testing.assert_allclose(ex.extract(clip), fixture_ppg().extract(clip), atol=1e-6)
    # Catches strict=False: a kept block's weight missing must not leave a silently random layer.
    without_kept = tmp_path / "without-a-kept-weight.pt"
    torch.save({**ckpt, "model_state_dict": {k: v for k, v in state.items() if k != "encoder.blocks.1.mlp.0.weight"}},
               without_kept)
    with pytest.raises(RuntimeError, match=r"(?s)first 3 encoder blocks.*Missing key.*blocks\.1\.mlp\.0\.weight"):
        WhisperPPG(model=str(without_kept), device="cpu", drop_last_fraction=0.25)


def test_a_missing_named_model_with_the_cut_says_where_to_put_it(tmp_path, monkeypatch):
    # Catches the cut path bypassing whisper's resolution (download_root, file name) or its clear error.
    # urlopen fails as it does offline, so that a connected machine never starts a 3 GB download here.
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cfg = FeaturesConfig(device="cpu", ppg=PPGConfig(backend="whisper", model="large-v2", download_root=str(tmp_path),
                                                     **ANCHOR))
    with pytest.raises(MissingWeightsError, match=rf"{tmp_path}/large-v2\.pt: Whisper 'large-v2' weights are missing"):
        build_extractor("ppg", cfg)


def test_ctranslate2_refuses_a_cut_it_cannot_honour():
    # Catches the cut being silently ignored by the ctranslate2 backend (it always runs every layer).
    with pytest.raises(ValueError, match="drop_last_fraction needs backend: whisper"):
        build_extractor("ppg", FeaturesConfig(device="cpu", ppg=PPGConfig(backend="ctranslate2", model="bundled",
                                                                          drop_last_fraction=0.25)))


def test_base_profile_configures_the_anchors_ppg():
    # Catches the base profile drifting from the anchor's PPG settings.
    from svc_model.config import load_config

    ppg = load_config(Path(__file__).parents[1] / "configs" / "base.yaml").features.ppg
    assert (ppg.backend, ppg.model, ppg.drop_last_fraction, ppg.piece_s, ppg.mel_noise_std) == \
        ("whisper", "large-v2", 0.25, 15.0, 0.0)
