"""Feature extractors: pitch accuracy, Whisper/HuBERT frame rates and batching, real speaker embeddings."""
from __future__ import annotations

import time

import numpy as np
import pytest

from svc_model.audio import decode, resample, to_mono
from svc_model.config import FeaturesConfig, PPGConfig, VecConfig
from svc_model.features import MissingWeightsError, build_extractor
from svc_model.features.base import frames_50hz, frames_100hz

SR = 16000


def harmonic(f0_hz: np.ndarray, amp: float = 0.3) -> np.ndarray:
    """A five-harmonic tone following the per-sample f0 contour ``f0_hz``."""
    phase = 2 * np.pi * np.cumsum(f0_hz) / SR
    return sum(amp / k * np.sin(k * phase) for k in range(1, 6)).astype(np.float32)


def cents_error(pitch: np.ndarray, ref_hz: np.ndarray) -> np.ndarray:
    voiced = pitch[:, 1] > 0
    return 1200 * np.abs(np.log2(pitch[voiced, 0] / ref_hz[voiced]))


@pytest.fixture(scope="module")
def extractors():
    cache = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            from svc_model.features.pitch import CrepePitch, FcpePitch

            cache[key] = {"fcpe": FcpePitch, "crepe": CrepePitch}[name](device="cpu", **kw)
        return cache[key]

    return get


@pytest.mark.parametrize("backend, kw, seconds", [("fcpe", {}, 2.0), ("crepe", {"model": "tiny"}, 2.0),
                                                   ("crepe", {"model": "full"}, 0.8)])
def test_pitch_is_accurate_on_tones_and_glides_and_silence_is_unvoiced(extractors, backend, kw, seconds):
    ex = extractors(backend, **kw)
    n = int(seconds * SR)
    steady = np.full(n, 196.0)
    glide = 180.0 * 2 ** (np.linspace(0, 1.5, n))  # 180 Hz -> 509 Hz, an octave and a half
    silence = np.zeros(SR // 2, np.float32)
    for contour in (steady, glide):
        audio = np.concatenate([silence, harmonic(contour), silence])
        (out,) = ex.extract_batch([audio])
        assert out.shape == (frames_100hz(len(audio)), 2)
        start, stop = len(silence) // 160, (len(silence) + n) // 160
        ref = np.interp(np.arange(len(out)) * 160, np.arange(n) + len(silence), contour)
        tone = out[start + 3 : stop - 3]
        assert tone[:, 1].mean() > 0.95, "the tone is voiced"
        assert np.median(cents_error(tone, ref[start + 3 : stop - 3])) < 20
        # Silence before and after (away from the edges) is unvoiced with f0 = 0.
        quiet = np.concatenate([out[: start - 3], out[stop + 3 :]])
        assert (quiet[:, 1] == 0).all() and (quiet[:, 0] == 0).all()


def test_crepe_batch_equals_one_by_one(extractors):
    ex = extractors("crepe", model="tiny")
    a = harmonic(np.full(SR, 220.0))
    b = harmonic(np.linspace(150, 300, int(1.5 * SR)))
    batch = ex.extract_batch([a, b])
    assert np.array_equal(batch[0], ex.extract(a)) and np.array_equal(batch[1], ex.extract(b))


def _noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def random_whisper():
    # piece_s 30: one pass up to Whisper's full context, so that a 30 s clip compares with Whisper's own forward
    # (the anchor's 15 s pieces are checked in test_ppg_anchor.py).
    cfg = FeaturesConfig(device="cpu", ppg=PPGConfig(backend="whisper", model="tiny", pretrained=False, piece_s=30.0))
    return build_extractor("ppg", cfg)


def test_whisper_ppg_shapes_rate_and_batching(random_whisper):
    ex = random_whisper
    assert ex.describe()["pretrained"] is False
    clips = [_noise(s, i) for i, s in enumerate((1.0, 2.345, 7.77, 0.51))]
    batch = ex.extract_batch(clips)
    for clip, feats in zip(clips, batch):
        assert feats.shape == (frames_50hz(len(clip)), 384)  # 50 Hz, tiny's width
        np.testing.assert_allclose(ex.extract(clip), feats, atol=1e-4)


def test_whisper_encodes_only_the_frames_it_needs(random_whisper):
    import torch

    ex = random_whisper
    seen = []
    handle = ex.encoder.conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    try:
        ex.extract(_noise(2.0, 0))
    finally:
        handle.remove()
    assert seen == [100], "a 2 s clip is 100 encoder frames, not Whisper's padded 1500"
    # Same output as Whisper's own forward where that forward applies (exactly 30 s).
    import whisper

    clip = _noise(30.0, 1)
    mel = whisper.log_mel_spectrogram(torch.from_numpy(clip))[:, :3000]
    with torch.no_grad():
        reference = ex.encoder(mel[None])[0].numpy()
    np.testing.assert_allclose(ex.extract(clip), reference, atol=1e-4)
    # And it costs accordingly: a 2 s clip takes far less than a 30 s one (a generous bound, not a benchmark).
    timings = {}
    for seconds in (2.0, 30.0):
        clip = _noise(seconds, 2)
        ex.extract(clip)
        started = time.perf_counter()
        for _ in range(3):
            ex.extract(clip)
        timings[seconds] = time.perf_counter() - started
    assert timings[2.0] < 0.5 * timings[30.0], timings


def test_whisper_loads_a_checkpoint_file_and_names_a_missing_one(tmp_path):
    """The real loading path (whisper.load_model on a checkpoint file), with a random tiny checkpoint."""
    import torch
    import whisper

    from svc_model.features.ppg import WHISPER_DIMS, WhisperPPG

    state, heads, layers = WHISPER_DIMS["tiny"]
    dims = whisper.model.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=state, n_audio_head=heads,
                                         n_audio_layer=layers, n_vocab=51864, n_text_ctx=448, n_text_state=state,
                                         n_text_head=heads, n_text_layer=1)
    torch.manual_seed(3)
    model = whisper.model.Whisper(dims)
    ckpt = tmp_path / "tiny-random.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, ckpt)
    loaded = WhisperPPG(model=str(ckpt), device="cpu", piece_s=30.0)  # one 30 s pass, as the reference
    assert loaded.pretrained and loaded.backend == "whisper-tiny-random"
    clip = _noise(30.0, 4)
    mel = whisper.log_mel_spectrogram(torch.from_numpy(clip))[:, :3000]
    with torch.no_grad():
        reference = model.encoder(mel[None])[0].numpy()
    np.testing.assert_allclose(loaded.extract(clip), reference, atol=1e-4)

    with pytest.raises(MissingWeightsError, match=r"nowhere/large-v2\.pt: Whisper checkpoint not found"):
        WhisperPPG(model=str(tmp_path / "nowhere" / "large-v2.pt"), device="cpu")
    with pytest.raises(ValueError, match="unknown Whisper model 'huge'"):
        WhisperPPG(model="huge", device="cpu", download_root=tmp_path)


def test_ctranslate2_bundled_whisper_is_real_and_50hz():
    ex = build_extractor("ppg", FeaturesConfig(device="cpu", ppg=PPGConfig(backend="ctranslate2", model="bundled")))
    assert ex.pretrained and "tiny.en" in ex.backend
    clips = [_noise(s, i) for i, s in enumerate((1.0, 3.21))]
    for clip, feats in zip(clips, ex.extract_batch(clips)):
        assert feats.shape == (frames_50hz(len(clip)), 384) and np.isfinite(feats).all()
    with pytest.raises(MissingWeightsError, match="model.bin missing"):
        build_extractor("ppg", FeaturesConfig(device="cpu", ppg=PPGConfig(backend="ctranslate2", model="/nope")))


def test_hubert_vec_shapes_batching_and_local_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = FeaturesConfig(device="cpu", vec=VecConfig(pretrained=False, layer=2, random_hidden_size=64))
    ex = build_extractor("vec", cfg)
    assert ex.pretrained is False and "random" in ex.backend
    clips = [_noise(s, i) for i, s in enumerate((1.0, 2.5, 4.321))]
    batch = ex.extract_batch(clips)
    for clip, feats in zip(clips, batch):
        assert feats.shape == (frames_50hz(len(clip)), 64)
        np.testing.assert_allclose(ex.extract(clip), feats, atol=1e-4)
    # The real loading path: from_pretrained on a local folder.
    ex.model.save_pretrained(tmp_path / "hubert-local")
    local = build_extractor("vec", FeaturesConfig(device="cpu", vec=VecConfig(
        model=str(tmp_path / "hubert-local"), layer=2, pretrained=True)))
    assert local.pretrained and local.backend == "hubert-hubert-local-layer2"
    np.testing.assert_allclose(local.extract(clips[1]), batch[1], atol=1e-5)
    with pytest.raises(MissingWeightsError, match="HuBERT weights not found"):
        build_extractor("vec", FeaturesConfig(device="cpu", vec=VecConfig(model="facebook/hubert-base-ls960",
                                                                          cache_dir=str(tmp_path / "hf"))))
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        build_extractor("vec", FeaturesConfig(device="cpu", vec=VecConfig(pretrained=False, layer=9)))


def test_speaker_embeddings_separate_the_real_voices(voices_dir):
    ex = build_extractor("speaker_embedding", FeaturesConfig(device="cpu"))
    speakers = ["speaker-a", "speaker-b", "speaker-c", "speaker-d"]
    clips, owner = [], []
    for s in speakers:
        for path in sorted((voices_dir / s).glob("*.flac"))[5:9]:
            audio, sr = decode(path)
            clips.append(resample(to_mono(audio), sr, SR))
            owner.append(s)
    emb = np.stack(ex.extract_batch(clips))
    assert emb.shape == (16, 256)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ex.extract(clips[3]), emb[3], atol=1e-5)
    sim = emb @ emb.T
    owner = np.array(owner)
    for i, a in enumerate(speakers):
        for b in speakers[i + 1 :]:
            ia, ib = np.flatnonzero(owner == a), np.flatnonzero(owner == b)
            same_a = sim[np.ix_(ia, ia)][np.triu_indices(len(ia), 1)].mean()
            same_b = sim[np.ix_(ib, ib)][np.triu_indices(len(ib), 1)].mean()
            across = sim[np.ix_(ia, ib)].mean()
            assert min(same_a, same_b) > across, (a, b, same_a, same_b, across)


def test_the_differentiable_speaker_front_end_matches_resemblyzer(voices_dir):
    # svc_model.model.speaker.SpeakerEmbedder (the optional output-similarity loss) re-implements resemblyzer's mel
    # front end in torch so that gradients reach the audio. Against the real package, on a real voice at 16 kHz:
    # measured 2.4e-7 relative on the mel and 1.2e-7 on the embedding. Fails on any change of window, hop,
    # centering, padding, mel filters or power-vs-magnitude (each moves the mel by far more than 1e-6).
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resemblyzer import VoiceEncoder
        from resemblyzer import audio as resemblyzer_audio

    from svc_model.model.speaker import SpeakerEmbedder

    audio, sr = decode(voices_dir / "speaker-a" / "00.flac")
    wav = resample(to_mono(audio), sr, SR).astype(np.float32)
    ours = SpeakerEmbedder(sample_rate=SR)
    x = torch.from_numpy(wav)[None]
    spec = torch.stft(x, 400, 160, 400, ours.window, center=True, pad_mode="constant", return_complex=True)
    mel = torch.matmul(ours.basis, spec.real ** 2 + spec.imag ** 2).transpose(1, 2)[0].numpy()
    reference = resemblyzer_audio.wav_to_mel_spectrogram(wav)
    assert mel.shape == reference.shape
    assert np.abs(mel - reference).max() / np.abs(reference).max() < 1e-6
    with torch.no_grad():
        expected = VoiceEncoder(device="cpu", verbose=False)(torch.from_numpy(reference)[None])[0].numpy()
        got = ours(x)[0].numpy()
    assert np.abs(got - expected).max() < 1e-6, np.abs(got - expected).max()


def test_one_rule_says_which_speaker_encoders_are_unit_norm(tmp_path):
    # Fails if the rule is inverted or if singer_table (training) stops using it: resemblyzer means are renormalized,
    # mozilla-lstm means stay plain (as the anchor stores them); an unknown id (older checkpoints) is resemblyzer.
    import pandas as pd

    from svc_model.features.speaker import unit_norm_encoder
    from svc_model.train import singer_table

    assert unit_norm_encoder("resemblyzer") and unit_norm_encoder("") and unit_norm_encoder(None)
    assert not unit_norm_encoder("mozilla-lstm") and not unit_norm_encoder("mozilla-lstm:0123456789abcdef")
    vectors = [np.array([0.6, 0.0] + [0.0] * 254, np.float32), np.array([0.0, 0.8] + [0.0] * 254, np.float32)]
    rows = []
    for i, v in enumerate(vectors):
        np.save(tmp_path / f"spk{i}.npy", v)
        np.save(tmp_path / f"pitch{i}.npy", np.array([[220.0, 1.0]], np.float32))
        rows.append({"singer": "alto", "speaker": str(tmp_path / f"spk{i}.npy"), "pitch": str(tmp_path / f"pitch{i}.npy")})
    manifest = pd.DataFrame(rows)
    plain = np.array(singer_table(manifest, "mozilla-lstm:0123456789abcdef")["alto"]["embedding"])
    renormalized = np.array(singer_table(manifest, "resemblyzer")["alto"]["embedding"])
    np.testing.assert_allclose(plain[:2], [0.3, 0.4], atol=1e-6)
    np.testing.assert_allclose(renormalized[:2], [0.6, 0.8], atol=1e-6)
