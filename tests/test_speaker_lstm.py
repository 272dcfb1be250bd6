"""The ``mozilla-lstm`` speaker encoder against whisper-vits-svc's own code (tests/fixtures/anchor/speaker_lstm):
front end, d-vector, strict loading, and the encoder identity that features and checkpoints record."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from svc_model.config import FeaturesConfig, SpeakerConfig, load_config
from svc_model.features import MissingWeightsError, build_extractor
from svc_model.features.speaker import (
    MozillaLSTMSpeaker,
    encoder_id,
    lstm_expected_shapes,
    lstm_mel,
    lstm_preprocess,
    lstm_window_starts,
    norm_error,
)

FIXTURES = Path(__file__).parent / "fixtures" / "anchor" / "speaker_lstm"
CLIPS = ["speaker-b_11", "speaker-b_15"]  # 2.3 s (one short window) and 5.6 s (10 sliding 250-frame windows)
WEIGHTS = "models/speaker/best_model.pth.tar"  # the config default, relative to the workspace


def seeded_state_dict(shapes: dict) -> dict:
    """The fixture's recipe (README.md): key i in sorted order is default_rng(i).standard_normal(shape) * 0.05."""
    return {k: torch.from_numpy((np.random.default_rng(i).standard_normal(shapes[k]) * 0.05).astype(np.float32))
            for i, k in enumerate(sorted(shapes))}


def save_checkpoint(path: Path, state: dict, **extra) -> Path:
    """The published file's layout: the state dict under 'model', next to training bookkeeping."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "optimizer": None, "step": 0, "loss": 0.0, "date": "fixture", **extra}, path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ws")
    save_checkpoint(root / WEIGHTS, seeded_state_dict(lstm_expected_shapes()))
    return root


@pytest.fixture(scope="module")
def lstm_cfg() -> FeaturesConfig:
    return FeaturesConfig(device="cpu", speaker=SpeakerConfig(backend="mozilla-lstm"))


@pytest.fixture(scope="module")
def extractor(workspace, lstm_cfg) -> MozillaLSTMSpeaker:
    return build_extractor("speaker_embedding", lstm_cfg, root=workspace)


def clip(name: str) -> np.ndarray:
    audio, sr = sf.read(str(FIXTURES / f"{name}.wav"), dtype="float32")
    assert sr == 16000
    return audio


@pytest.mark.parametrize("name", CLIPS)
def test_front_end_matches_the_anchors_audio_processor(name):
    # Catches any drift in trimming (10 ms margin, top_db 60 with 1024/256 frames), peak normalization, pre-emphasis,
    # STFT framing, mel filters, dB scaling, reference level or the [-4, 4] normalization: each moves values by far
    # more than 1e-4, and trimming changes the frame count.
    ours = lstm_mel(lstm_preprocess(clip(name)))
    ref = np.load(FIXTURES / f"{name}.mel.npy")
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_fixture_covers_both_window_paths():
    # Keeps the fixture honest: one clip shorter than a 250-frame window (the anchor repeats one window 10 times),
    # one longer (10 distinct windows at int() of linspace offsets). A fixture with only one path would let a
    # bug in the other through.
    short, long = (len(np.load(FIXTURES / f"{n}.mel.npy")) for n in CLIPS)
    assert lstm_window_starts(short) == (short, [0] * 10) and short < 250
    length, starts = lstm_window_starts(long)
    assert length == 250 and starts[0] == 0 and starts[-1] == long - 250 and len(set(starts)) == 10
    assert starts == [int(o) for o in np.linspace(0, long - 250, 10)]


@pytest.mark.parametrize("name", CLIPS)
def test_d_vector_matches_the_anchor(extractor, name):
    # Catches: nn.LSTM(proj_size=...) instead of projecting only the output passed up, a missing/extra layer
    # normalization, other window offsets or counts, using all frames instead of the last, renormalizing the mean
    # (the long clip's anchor vector has norm 0.916, not 1), or loading weights into the wrong layers.
    ref = np.load(FIXTURES / f"{name}.spk.npy")
    ours = extractor.extract(clip(name))
    assert ours.shape == (256,) and ours.dtype == np.float32
    diff = float(np.abs(ours - ref).max())
    assert diff < 1e-4, f"max abs difference to the anchor's d-vector: {diff}"
    np.testing.assert_allclose(np.linalg.norm(ours), np.linalg.norm(ref), atol=1e-5)


def test_batch_equals_one_by_one(extractor):
    # Catches windows of different segments (or of different lengths) mixed up when they share forward passes:
    # in one batch, each segment still gets the anchor's own d-vector (the one-by-one result, tested above).
    short = clip(CLIPS[1])[: 16000 * 3]
    batch = extractor.extract_batch([clip(CLIPS[1]), short, clip(CLIPS[0])])
    for name, emb in zip([CLIPS[1], CLIPS[0]], [batch[0], batch[2]]):
        assert np.abs(emb - np.load(FIXTURES / f"{name}.spk.npy")).max() < 1e-4, name
    np.testing.assert_allclose(batch[1], extractor.extract(short), atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-3)


def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path, lstm_cfg):
    # Catches a bare FileNotFoundError/torch error, or a message without the path, the source or the destination.
    expected = tmp_path / WEIGHTS
    with pytest.raises(MissingWeightsError) as err:
        build_extractor("speaker_embedding", lstm_cfg, root=tmp_path)
    message = str(err.value)
    assert str(expected) in message and "drive.google.com" in message and f"put it at {expected}" in message
    with pytest.raises(MissingWeightsError, match="best_model.pth.tar"):
        encoder_id(lstm_cfg, root=tmp_path)


@pytest.mark.parametrize("key, shape, message", [
    ("layers.1.lstm.weight_ih_l0", (3072, 80),
     r"key 'layers.1.lstm.weight_ih_l0' has shape \(3072, 80\), expected \(3072, 256\)"),
    ("layers.2.linear.weight", None, r"missing key 'layers.2.linear.weight' \(expected shape \(256, 768\)\)"),
    ("layers.3.linear.weight", (256, 768), r"unexpected key 'layers.3.linear.weight'"),
])
def test_wrong_checkpoint_names_the_file_and_the_key(tmp_path, key, shape, message):
    # Catches loading with strict=False or without shape checks (a wrong or truncated file would then give silent
    # garbage embeddings), and errors that do not say which file or which key.
    state = seeded_state_dict(lstm_expected_shapes())
    if shape is None:
        del state[key]
    else:
        state[key] = torch.zeros(shape)
    path = save_checkpoint(tmp_path / "bad.pth.tar", state)
    with pytest.raises(ValueError, match=message) as err:
        MozillaLSTMSpeaker(weights=path, device="cpu")
    assert str(path) in str(err.value)


def test_only_weights_only_pickles_are_loaded(tmp_path):
    # Catches torch.load(weights_only=False): a checkpoint that carries an arbitrary Python object (here a harmless
    # argparse.Namespace; in an attack, code) must be refused, naming the file, not unpickled.
    path = save_checkpoint(tmp_path / "pickled.pth.tar", seeded_state_dict(lstm_expected_shapes()),
                           config=argparse.Namespace(lr=1e-4))
    with pytest.raises(ValueError, match=r"weights_only=True\): Unsupported global: GLOBAL argparse\.Namespace") as err:
        MozillaLSTMSpeaker(weights=path, device="cpu")
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="expected a dict with a 'model' state dict"):
        torch.save(seeded_state_dict(lstm_expected_shapes()), tmp_path / "bare.pth.tar")
        MozillaLSTMSpeaker(weights=tmp_path / "bare.pth.tar", device="cpu")


def test_encoder_id_names_the_backend_and_the_weights(workspace, extractor, lstm_cfg, tmp_path):
    # Catches an id that ignores the weights (two different encoders would then look compatible), one that differs
    # between the trainer's call (config) and the extractor's (loaded bytes), or a config form it cannot read.
    digest = hashlib.sha256((workspace / WEIGHTS).read_bytes()).hexdigest()
    expected = f"mozilla-lstm:{digest[:16]}"
    assert encoder_id(lstm_cfg, root=workspace) == expected
    assert encoder_id(lstm_cfg.speaker, root=workspace) == expected
    assert extractor.encoder_id == expected and extractor.describe()["encoder"] == expected
    other = save_checkpoint(tmp_path / "other.pth.tar", {k: v + 1 for k, v in
                                                         seeded_state_dict(lstm_expected_shapes()).items()})
    assert encoder_id(SpeakerConfig(backend="mozilla-lstm", lstm_weights=str(other))) != expected
    assert encoder_id(FeaturesConfig()) == "resemblyzer"
    assert encoder_id(load_config("tiny")) == "resemblyzer"


def test_feature_manifest_records_the_encoder(extractor, tmp_path):
    # Catches a manifest written without the encoder, so that features from two encoders could be joined silently.
    from svc_model.audio import write_audio
    from svc_model.features.store import extract_to_dir

    paths = []
    for i, audio in enumerate([clip(CLIPS[0]), clip(CLIPS[1])[: 16000 * 3]]):  # short: one window each
        paths.append(tmp_path / f"seg{i}.wav")
        write_audio(paths[-1], audio, 16000)
    segments = pd.DataFrame({"segment_id": [f"s/seg{i}" for i in range(2)], "path_16k": [str(p) for p in paths]})
    out = tmp_path / "out"
    out.mkdir()
    result = extract_to_dir(extractor, segments, out, log=lambda _: None)
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert set(manifest["encoder"]) == {extractor.encoder_id} and set(manifest["backend"]) == {"mozilla-lstm"}
    assert norm_error(result.extra["norms"], unit=False) == 0.0
    # Catches a renormalized singer mean: the anchor's preprocess_speaker_ave.py stores the plain mean.
    stored = np.stack([np.load(out / name) for name in manifest["path"]])
    np.testing.assert_allclose(np.load(out / "mean.npy"), stored.mean(axis=0), atol=1e-6)


def test_norm_check_accepts_the_anchors_means_and_flags_broken_ones():
    # Catches the blocking embeddings_valid check failing every mozilla-lstm partition (the anchor's mean of 10 unit
    # windows has norm < 1), or passing zero, NaN or un-normalized (norm > 1) embeddings.
    norms = [float(np.linalg.norm(np.load(FIXTURES / f"{n}.spk.npy"))) for n in CLIPS]
    assert norms[1] < 0.95 and norm_error(norms, unit=False) == 0.0
    assert norm_error(norms, unit=True) > 0.05
    assert norm_error([0.9, 1.5], unit=False) == pytest.approx(0.5) and norm_error([0.0], unit=False) == 1.0
    assert norm_error([float("nan")], unit=False) == float("inf")


def test_profiles_choose_the_encoder():
    # Catches the base profile losing the anchor's encoder, or the CPU profile (offline: no LSTM weights) getting it.
    assert load_config("base").features.speaker.backend == "mozilla-lstm"
    assert load_config("base").features.speaker.lstm_weights == WEIGHTS
    assert load_config("tiny").features.speaker.backend == "resemblyzer"
    assert SpeakerConfig().backend == "resemblyzer"
