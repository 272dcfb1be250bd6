"""The hubert-soft vec backend against whisper-vits-svc's own HuBERT-Soft code (tests/fixtures/anchor/hubert_soft).

The fixture holds the anchor's outputs for weights made by a numpy recipe that this file repeats (see the fixture's
README.md): the test rebuilds the same state dict, saves it in the published layout, loads it through our backend
and compares the units.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from svc_model.config import FeaturesConfig, VecConfig, load_config
from svc_model.features import MissingWeightsError, build_extractor
from svc_model.features.vec import (
    HUBERT_SOFT_URL,
    SOFT_PIECE,
    HubertSoftVec,
    hubert_soft_layout,
    load_hubert_soft_state,
)

FIXTURE = Path(__file__).parent / "fixtures" / "anchor" / "hubert_soft"
TOL = 1e-4  # max abs difference to the anchor's float32 units


def recipe(shapes: dict, seed0: int) -> dict[str, np.ndarray]:
    """The fixture script's weights: key i in sorted order from np.random.default_rng(seed0 + i), float32 standard
    normal; biases x0.02, norm weights and weight_g 1 + 0.1 z, matrices z / sqrt(fan_in) (x0.3 for the attention
    output and second feed-forward matrices), masked_spec_embed and label_embedding as drawn."""
    state = {}
    for i, key in enumerate(sorted(shapes)):
        shape = tuple(shapes[key])
        z = np.random.default_rng(seed0 + i).standard_normal(shape, dtype=np.float32)
        if key.endswith("bias"):
            z = 0.02 * z
        elif ("norm" in key and key.endswith("weight")) or key.endswith("weight_g"):
            z = 1.0 + 0.1 * z
        elif key not in ("masked_spec_embed", "label_embedding.weight"):
            gain = 0.3 if key.endswith(("out_proj.weight", "linear2.weight")) else 1.0
            z = z * np.float32(gain / np.sqrt(np.prod(shape[1:])))
        state[key] = z.astype(np.float32)
    return state


def long_clip(a: np.ndarray) -> np.ndarray:
    """10 copies of ``a`` (every other one reversed), gains 0.5..0.95, then its first 0.61 s: 20.61 s."""
    parts = [(a[::-1] if k % 2 else a) * np.float32(0.5 + 0.05 * k) for k in range(10)]
    return np.concatenate(parts + [a[: int(0.61 * 16000)]]).astype(np.float32)


def cheap_file(path: Path, shapes: dict, prefix: str = "module.") -> Path:
    """A state dict with the given names and shapes whose tensors are stride-0 views of one zero: a few KB on disk."""
    torch.save({prefix + k: torch.zeros(()).expand(*v) for k, v in shapes.items()}, path)
    return path


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((FIXTURE / "meta.json").read_text())


@pytest.fixture(scope="module")
def soft(meta, tmp_path_factory) -> HubertSoftVec:
    """Our backend, built through the config, on the recipe's weights saved as the published file would be."""
    state = recipe(meta["shapes"], meta["weight_seed0"])
    # Catches this file's recipe drifting from the fixture script's: then the comparisons below are meaningless.
    for key, (total, total_abs) in meta["checksums"].items():
        assert np.sum(state[key], dtype=np.float64) == pytest.approx(total, rel=1e-6, abs=1e-6), key
        assert np.sum(np.abs(state[key]), dtype=np.float64) == pytest.approx(total_abs, rel=1e-6), key
    path = tmp_path_factory.mktemp("hubert_soft") / "hubert-soft-0d54a1f4.pt"
    torch.save({meta["saved_prefix"] + k: torch.from_numpy(v) for k, v in state.items()}, path)
    del state
    cfg = FeaturesConfig(device="cpu", vec=VecConfig(backend="hubert-soft", soft_weights=str(path)))
    ex = build_extractor("vec", cfg)
    path.unlink()  # 360 MB
    return ex


def test_units_match_the_anchor(soft):
    # Catches any wrong entry of the key map (q/k/v order of in_proj, norm1/norm2, weight-norm g/v), a wrong
    # HubertConfig (activation, eps, layer-norm placement), and a missing or wrong 40-sample pad around the input.
    x = np.load(FIXTURE / "input_2s.npy")
    ref = np.load(FIXTURE / "units_2s.npy")
    units = soft.extract(x)
    assert isinstance(soft, HubertSoftVec) and soft.dim == 256 and soft.pretrained
    assert units.shape == ref.shape == (100, 256)
    diff = float(np.abs(units - ref).max())
    assert diff <= TOL, diff
    # The reference is not degenerate: frames differ from each other far more than the tolerance.
    assert ref.std(axis=0).mean() > 1000 * TOL


def test_long_audio_goes_in_20s_pieces_as_the_anchor(soft, meta):
    # Catches a piece length other than 20 s, or encoding the whole 20.61 s at once (the frames after the
    # boundary would see the first piece), or dropping or misplacing the 0.61 s tail piece.
    x = long_clip(np.load(FIXTURE / "input_2s.npy"))
    assert hashlib.sha256(x.tobytes()).hexdigest() == meta["long_sha256"]
    units = soft.extract(x)
    assert len(x) > SOFT_PIECE and units.shape == (meta["long_frames"], 256) == (len(x) // 320, 256)
    assert np.abs(units[990:1010] - np.load(FIXTURE / "long_boundary_990_1010.npy")).max() <= TOL
    assert np.abs(units[-5:] - np.load(FIXTURE / "long_last_5.npy")).max() <= TOL
    probe = np.random.default_rng(meta["probe_seed"]).standard_normal((256, 8)).astype(np.float32)
    projected = units.astype(np.float64) @ probe.astype(np.float64)
    # Every frame, through 8 directions: a sum over 256 channels, so 10x the per-value tolerance.
    assert np.abs(projected - np.load(FIXTURE / "long_probe.npy")).max() <= 10 * TOL


def test_batch_equals_one_by_one(soft):
    # Catches padding leaking into real frames in the batched transformer pass, and pieces of one segment landing
    # in another's output; a segment shorter than one hop still gets its frames_50hz (here 0) rows.
    x = np.load(FIXTURE / "input_2s.npy")
    clips = [x[:12345], long_clip(x)[: SOFT_PIECE + 7000], x[:100], x]
    batch = soft.extract_batch(clips)
    assert [b.shape for b in batch] == [(38, 256), (1021, 256), (0, 256), (100, 256)]
    for clip, feats in zip(clips, batch):
        np.testing.assert_allclose(soft.extract(clip), feats, atol=TOL)


def test_manifest_records_the_backend(soft, tmp_path):
    # Catches hubert-soft features stored without saying which backend made them (or labelled as a HuBERT layer).
    import soundfile as sf

    from svc_model.features.store import extract_to_dir

    x = np.load(FIXTURE / "input_2s.npy")
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    segments = pd.DataFrame({"segment_id": ["alto/a"], "path_16k": [str(tmp_path / "a.wav")]})
    result = extract_to_dir(soft, segments, tmp_path, log=lambda _: None)
    stored = pd.read_parquet(tmp_path / "manifest.parquet")
    assert stored["backend"].tolist() == ["hubert-soft-units-hubert-soft-0d54a1f4"]
    assert stored["vec_backend"].tolist() == ["hubert-soft"]
    assert stored["pretrained"].tolist() == [True] and stored["dim"].tolist() == [256]
    assert result.manifest["backend"].iloc[0] == soft.describe()["backend"]
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(FIXTURE / "units_2s.npy"), atol=TOL)


def test_missing_file_says_what_and_where(tmp_path):
    # Catches a bare FileNotFoundError (or a download attempt) instead of the project's error with the file, the
    # download address and the place to put it; and soft_weights not resolved against the workspace root.
    cfg = load_config("base").features.model_copy(update={"device": "cpu"})
    assert cfg.vec.backend == "hubert-soft"
    with pytest.raises(MissingWeightsError) as err:
        build_extractor("vec", cfg, root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "models" / "hubert" / "hubert-soft-0d54a1f4.pt") in message
    assert HUBERT_SOFT_URL in message and "put it at" in message


def test_strict_loading_names_the_bad_key(tmp_path):
    # Catches a lenient loader (strict=False, or no shape check) that would run on a wrong or partial file.
    layout = hubert_soft_layout()
    assert len(layout) == 15 + 7 + 12 * 12
    # Both layouts load: with the "module." prefix of the published file and without it.
    for prefix in ("module.", ""):
        state = load_hubert_soft_state(cheap_file(tmp_path / f"ok{prefix}.pt", layout, prefix))
        assert {k: tuple(v.shape) for k, v in state.items()} == layout
    key = "encoder.layers.7.self_attn.in_proj_weight"
    cases = {
        "missing keys: " + key: {k: v for k, v in layout.items() if k != key},
        f"wrong shapes: {key} (2304, 512) (expected (2304, 768))": {**layout, key: (2304, 512)},
        "unexpected keys: encoder.layers.12.linear1.weight": {**layout, "encoder.layers.12.linear1.weight": (3072, 768)},
    }
    for i, (expected, shapes) in enumerate(cases.items()):
        path = cheap_file(tmp_path / f"bad{i}.pt", shapes)
        with pytest.raises(ValueError, match="not HuBERT-Soft's published layout") as err:
            load_hubert_soft_state(path)
        assert expected in str(err.value) and str(path) in str(err.value)


UNPICKLED: list[str] = []


def _ran_on_load(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Payload:
    """Unpickling this calls a function (``_ran_on_load``): what weights_only=True must refuse."""

    def __reduce__(self):
        return (_ran_on_load, ("payload",))


def test_loading_never_unpickles_objects(tmp_path):
    # Catches torch.load without weights_only=True: the payload's function would run on load.
    path = tmp_path / "evil.pt"
    torch.save({"proj.weight": torch.zeros(256, 768), "x": _Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(ValueError, match="not a readable hubert-soft state dict"):
        load_hubert_soft_state(path)
    assert UNPICKLED == []


def test_config_backend_and_random_weights():
    # Catches an unknown backend accepted silently, and random hubert-soft weights passed off as pretrained.
    with pytest.raises(ValueError, match="backend"):
        VecConfig(backend="hubert_soft")
    base = load_config("base")
    assert base.features.vec.backend == "hubert-soft" and base.model.vec_dim == 256
    ex = build_extractor("vec", FeaturesConfig(device="cpu", vec=VecConfig(backend="hubert-soft", pretrained=False)))
    assert ex.pretrained is False and ex.backend == "hubert-soft-units-random-seed0"
    assert ex.describe()["pretrained"] is False
    feats = ex.extract(np.load(FIXTURE / "input_2s.npy")[:8000])
    assert feats.shape == (25, 256) and np.isfinite(feats).all()
