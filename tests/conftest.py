"""Shared fixtures: real workspaces (git + DVC + Dagster instance + MLflow store) in temp folders."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from assets.workspace import PROJECT_ROOT, Workspace, init_workspace
from svc_model.evaluate import heard_f0 as measured_f0  # noqa: F401  (the tests import it from here)

VOICES = PROJECT_ROOT / "examples" / "voices"


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch, tmp_path):
    # Never let a test touch the developer's own workspace or Dagster home.
    monkeypatch.delenv("SVC_WORKSPACE", raising=False)
    # nor a shared instance named by the environment (they override every workspace's svc.yaml)
    monkeypatch.delenv("SVC_DAGSTER_POSTGRES_URL", raising=False)
    monkeypatch.delenv("SVC_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "_unused_dagster_home"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def voices_dir() -> Path:
    assert (VOICES / "speaker-a").is_dir(), f"bundled voices missing in {VOICES}"
    return VOICES


@pytest.fixture(scope="session")
def _workspace_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template") / "ws"
    init_workspace(root)
    return root


@pytest.fixture
def workspace(_workspace_template, tmp_path) -> Workspace:
    """A fresh, empty workspace (a copy of one made by ``init_workspace``)."""
    root = tmp_path / "ws"
    shutil.copytree(_workspace_template, root, symlinks=True)
    return Workspace(root)


@pytest.fixture
def instance(workspace):
    from orchestration.build import open_instance

    inst = open_instance(workspace)
    yield inst
    inst.dispose()


def tone(seconds: float, sr: int, f0: float = 220.0, amp: float = 0.3, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = amp * np.sin(2 * np.pi * f0 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
    x = x.astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write(path: Path, audio: np.ndarray, sr: int, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, sr, **kwargs)
    return path


def clip(voices_dir: Path, speaker: str, n: int) -> list[Path]:
    return sorted((voices_dir / speaker).glob("*.flac"))[:n]


@pytest.fixture
def env_has_no_workspace(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config):
    os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory, voices_dir):
    """Real segments of two voices with tiny-profile features (FCPE, Whisper tiny.en via CTranslate2, random
    HuBERT, resemblyzer), as a training manifest. Built once per session without Dagster."""
    import pandas as pd

    from svc_model.config import load_config
    from svc_model.data import join_singer
    from svc_model.features import build_extractor
    from svc_model.features.store import extract_to_dir
    from svc_model.preprocess import clean_singer, load_manifest

    cfg = load_config("tiny")
    root = tmp_path_factory.mktemp("features")
    frames = []
    for singer, speaker in (("alto", "speaker-a"), ("bass", "speaker-d")):
        raw = root / "raw" / singer
        raw.mkdir(parents=True)
        for src in sorted((voices_dir / speaker).glob("*.flac"))[2:5]:
            shutil.copy(src, raw / src.name)
        dirs = {a: root / a / singer for a in ("clean_audio", "pitch", "ppg", "vec", "speaker_embedding")}
        for d in dirs.values():
            d.mkdir(parents=True)
        clean_singer(raw, dirs["clean_audio"], singer, cfg.audio, log=lambda _: None)
        segments = load_manifest(dirs["clean_audio"])
        for feature in ("pitch", "ppg", "vec", "speaker_embedding"):
            extract_to_dir(build_extractor(feature, cfg.features), segments, dirs[feature], log=lambda _: None)
        frames.append(join_singer(singer, dirs["clean_audio"], {f: dirs[f] for f in dirs if f != "clean_audio"}, 0.25))
    manifest = pd.concat(frames, ignore_index=True)
    assert set(manifest["split"]) == {"train", "valid"}
    return manifest


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright cannot download its own browser here


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser for UI tests: skipped where it is not installed, a failure where CI requires it."""
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing: install Debian's `chromium` package (`.ci/run` does)"
        if os.environ.get("SVC_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return str(CHROMIUM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tiny profile as it is (its real evaluation gates), with one held-out segment per singer to evaluate: fewer
# conversions, the same thresholds.
ONE_EVAL_SEGMENT = """extends: tiny
evaluation:
  max_segments_per_singer: 1
"""

# Thresholds that pass anything. Only for tests that need a run to get through evaluation and are not about it;
# tests of evaluation and promotion use the real gates (ONE_EVAL_SEGMENT).
LENIENT = """extends: tiny
evaluation:
  max_segments_per_singer: 1
  min_f0_corr: -1.0
  max_f0_rmse_cents: 100000
  max_vuv_error: 1.0
  require_timbre_transfer: false
  max_reconstruction_mel: 100.0
"""


def use_config(root: Path, text: str = LENIENT, name: str = "lenient.yaml") -> None:
    """Point the workspace at ``root`` to a config file of its own (``svc.yaml: config``)."""
    from assets.workspace import with_config_deps

    (root / name).write_text(text)
    (root / "svc.yaml").write_text((root / "svc.yaml").read_text().replace("config: tiny", f"config: {name}"))
    dvc_yaml = root / "dvc.yaml"
    if dvc_yaml.is_file():  # the stages' config deps follow, as a re-run of `svc init` makes them
        dvc_yaml.write_text(with_config_deps(Workspace(root), dvc_yaml.read_text()))


def random_tiny_converter(names=("alto", "bass"), speaker_sensitive: bool = False):
    """A converter over the tiny profile's model with RANDOM weights (seed 0) and random unit embeddings: for tests
    of the transport around the model (streaming, live). At initialization the output pitch follows the NSF
    source, so pitch agreement is measurable without training: the source convolutions start 10x louder
    (``source_init_gain``; the tiny profile trains from 1), so that a sustained note comes out as a steady periodic
    tone whose block joins can be inspected. ``speaker_sensitive``: give the decoder's speaker adapter (the
    identity at initialization) random weights, so that the embedding changes the output (its scale as well as
    its shift: with phase-balanced upsampling a constant shift alone barely reaches the audio)."""
    import torch

    from svc_model.config import load_config
    from svc_model.infer import Converter
    from svc_model.model.synthesizer import SVCModel

    torch.manual_seed(0)
    cfg = load_config("tiny")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source_init_gain": 10.0})})
    model = SVCModel(cfg.model, cfg.spectrogram.n_fft // 2 + 1, cfg.audio.sample_rate).eval()
    rng = np.random.RandomState(0)
    singers = {}
    for name in names:
        e = rng.randn(256).astype(np.float32)
        singers[name] = {"embedding": e / np.linalg.norm(e), "median_f0": 200.0}
    if speaker_sensitive:
        with torch.no_grad():
            model.decoder.adapter.W_bias.weight.normal_(0, 0.5)
            model.decoder.adapter.W_scale.weight.normal_(0, 0.5)
    return Converter(model, cfg, singers)


def random_model_folder(path: Path, **kwargs) -> Path:
    """:func:`random_tiny_converter`'s model and singers as a model folder (what a registered version holds)."""
    from svc_model.weights import write_model_folder

    conv = random_tiny_converter(**kwargs)
    singers = {n: {"embedding": t.embedding.tolist(), "median_f0": t.median_f0} for n, t in conv.singers.items()}
    return write_model_folder({"config": conv.cfg.model_dump(mode="json"), "step": 0,
                               "generator": conv.model.state_dict(), "singers": singers}, path)
