"""Weights without pickles: a registered version holds safetensors + JSON, the training state beside it, every load
of a file the project did not just write refuses pickled objects, one resolver from "which model" to files, and a
pyfunc that takes and returns audio as data and reads server paths only under its root."""
from __future__ import annotations

import base64
import io
import os
import zipfile
from importlib.metadata import version as installed_version
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from assets import tracking
from orchestration.cli import main
from tests.conftest import clip

# tiny, evaluating one segment per singer: the fixture needs a registered version, not a good one.
QUICK = "extends: tiny\nevaluation:\n  max_segments_per_singer: 1\n"


def svc(*args: str):
    return CliRunner().invoke(main, list(args))


def is_pickle(path: Path) -> bool:
    """A file Python's pickle (or torch.save's zip of one) could run code from."""
    head = path.read_bytes()[:4]
    if head[:1] == b"\x80":  # pickle protocol 2+
        return True
    if head == b"PK\x03\x04":
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(".pkl") for n in z.namelist())
    return False


class Payload:
    """Unpickling this runs ``touch <marker>``: what every load must refuse without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like our training checkpoint, with one pickled object that would run code on load."""
    from svc_model.config import load_config

    torch.save({"step": 1, "config": load_config("tiny").model_dump(mode="json"),
                "generator": {"prior_encoder.pre.weight": Payload(marker)}, "singers": {}}, path)
    return path


def refused_line(result, path: Path) -> str:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert str(path) in errors[0] and "refused by weights_only=True" in errors[0], errors[0]
    return errors[0]


# ---- fast: loads that must refuse a pickle ----------------------------------------------------------------------
def test_a_pickled_checkpoint_is_refused_by_convert_and_the_import_and_nothing_runs(workspace, tmp_path, voices_dir):
    # Catches torch.load(weights_only=False) behind `svc convert --checkpoint`, the library loaders (load_model,
    # Converter.from_checkpoint, the start-point check) or `svc pretrained import`: the payload would create the
    # marker file. Also catches an error that does not name the file.
    from assets.pretrained import check_start_point
    from svc_model.infer import Converter
    from svc_model.weights import CheckpointError

    marker = tmp_path / "payload-ran"
    evil = evil_checkpoint(tmp_path / "step-00000001.pt", marker)
    source = str(clip(voices_dir, "speaker-a", 1)[0])
    out = tmp_path / "out.wav"
    refused_line(svc("convert", "-C", str(workspace.root), source, "-o", str(out), "--singer", "alto",
                     "--checkpoint", str(evil)), evil)
    assert not out.exists()
    for load in (Converter.from_checkpoint, lambda p: check_start_point(workspace, p, "test")):
        with pytest.raises(CheckpointError, match="refused by weights_only=True") as err:
            load(evil)
        assert str(evil) in str(err.value)
    # A model folder whose training state is the pickle: conversion never reads it, fine-tuning refuses it.
    folder = tmp_path / "model"
    _write_tiny_model_folder(folder)
    evil_checkpoint(folder / "training_state.pt", marker)
    Converter.from_checkpoint(folder)
    from svc_model.weights import read_checkpoint

    with pytest.raises(CheckpointError, match=r"training_state\.pt: not a loadable training state"):
        read_checkpoint(folder, training_state=True)
    # The import of a foreign file: the same refusal, before any key is checked.
    foreign = tmp_path / "evil.pth"
    torch.save({"model_g": {"enc_p.pre.weight": Payload(marker)}}, foreign)
    refused_line(svc("pretrained", "import", "-C", str(workspace.root), str(foreign)), foreign)
    assert not marker.exists()


def _write_tiny_model_folder(folder: Path, seed: int = 0) -> dict:
    from svc_model.config import load_config
    from svc_model.model import SVCModel
    from svc_model.weights import write_model_folder

    cfg = load_config("tiny")
    torch.manual_seed(seed)
    model = SVCModel(cfg.model, cfg.spectrogram.n_fft // 2 + 1, cfg.audio.sample_rate)
    checkpoint = {"step": 7, "config": cfg.model_dump(mode="json"), "generator": model.state_dict(),
                  "singers": {"alto": {"embedding": [0.0625] * 256, "median_f0": 220.0, "segments": 1}},
                  "speaker_encoder": "resemblyzer"}
    write_model_folder(checkpoint, folder)
    return checkpoint


def test_a_model_folder_round_trips_exactly_and_its_damage_is_named(tmp_path):
    # Catches an export that drops, renames or rounds a generator tensor, loses the singer table or the speaker
    # encoder, or a damaged folder that loads anyway or fails without naming the file.
    from svc_model.train import load_model
    from svc_model.weights import CheckpointError

    folder = tmp_path / "model"
    written = _write_tiny_model_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generator.safetensors", "singers.json"]
    assert not any(is_pickle(p) for p in folder.iterdir())
    model, cfg, extras = load_model(folder)
    loaded = model.state_dict()
    assert set(loaded) == set(written["generator"])
    assert all(torch.equal(loaded[k], written["generator"][k]) for k in loaded)
    assert extras["singers"] == written["singers"] and extras["speaker_encoder"] == "resemblyzer"
    assert extras["step"] == 7 and cfg.model_dump(mode="json") == written["config"]
    (folder / "singers.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{folder / 'singers.json'}: not valid JSON"):
        load_model(folder)
    (folder / "generator.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=rf"{folder / 'generator.safetensors'}: not a readable safetensors"):
        load_model(folder)


def test_training_checkpoints_load_with_weights_only_and_restore_numpy_rng(tiny_manifest, tmp_path):
    # Catches a training checkpoint that needs a full unpickle (numpy's RNG state as an ndarray: weights_only=True
    # refuses it, so resume would have to unpickle), and an RNG state that does not restore numpy's stream.
    from svc_model.config import load_config
    from svc_model.train import Trainer, set_rng_state

    cfg = load_config("tiny")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"deterministic": True})})
    trainer = Trainer(cfg, tiny_manifest, tmp_path, device="cpu", log=lambda _: None, tensorboard=False)
    path = trainer.fit(steps=1).checkpoint
    trainer.close()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # torch's own check, no allowlist
    np.random.seed(123)
    expected = np.random.rand(4)
    np.random.seed(123)
    from svc_model.train import rng_state

    state = rng_state()
    np.random.rand(10)
    set_rng_state(state)
    assert np.array_equal(np.random.rand(4), expected)
    assert {"generator", "discriminator", "optim_g", "optim_d", "rng"} <= set(ckpt)


# ---- slow: a registered version, the pyfunc and the CLI ------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(tmp_path_factory, voices_dir):
    """A workspace with two singers built through Dagster and one version trained for 2 steps and registered by
    the svc_checkpoint asset, then evaluated (alias candidate)."""
    from assets.workspace import init_workspace
    from orchestration.build import build, materialize_training, open_instance
    from orchestration.singers import add_singer
    from tests.conftest import use_config

    root = tmp_path_factory.mktemp("weights") / "ws"
    ws = init_workspace(root)
    use_config(root, QUICK, "quick.yaml")
    instance = open_instance(ws)
    quiet = lambda _: None
    try:
        add_singer(ws, "alto", clip(voices_dir, "speaker-a", 2), instance=instance, push=False, log=quiet)
        add_singer(ws, "bass", clip(voices_dir, "speaker-d", 2), instance=instance, push=False, log=quiet)
        build(ws, instance=instance, log=quiet)
        out = materialize_training(ws, steps=2, device="cpu", instance=instance)
    finally:
        instance.dispose()
    import mlflow

    mlflow.set_tracking_uri(ws.tracking_uri)
    mlflow.set_registry_uri(ws.tracking_uri)
    return ws, out["svc_checkpoint"]


@pytest.mark.slow
def test_a_registered_version_holds_safetensors_and_its_training_state_beside_it(registered):
    # Catches: the registry storing the pickled training checkpoint again (or the generator in any pickle); a
    # safetensors generator that differs from the trained one; the discriminator/optimizers not logged for
    # fine-tuning (or logged inside the model, downloaded by every conversion); requirements naming this
    # unpublished project or packages at versions other than the ones it was tested with.
    import mlflow
    from svc_model.weights import load_torch_file

    ws, meta = registered
    found = tracking.resolve_model(ws, "models:/svc@candidate")
    assert str(found.version.version) == str(meta["model_version"])
    local = Path(mlflow.artifacts.download_artifacts("models:/svc@candidate"))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert [p.name for p in files if p.suffix == ".safetensors"] == ["generator.safetensors"]
    assert not [p for p in files if is_pickle(p)], [str(p.relative_to(local)) for p in files if is_pickle(p)]
    assert (local / "code" / "svc_model" / "infer.py").is_file()  # the project's code travels with the model
    from safetensors.torch import load_file

    trained = load_torch_file(meta["checkpoint"])  # the run folder's checkpoint, written by this fixture's run
    exported = load_file(str(found.path / "generator.safetensors"))
    assert set(exported) == set(trained["generator"])
    assert all(torch.equal(exported[k], trained["generator"][k]) for k in exported)
    state_uri = found.version.tags[tracking.TRAINING_STATE_TAG]
    state = load_torch_file(mlflow.artifacts.download_artifacts(state_uri))
    assert {"discriminator", "optim_g", "optim_d", "step"} <= set(state) and "generator" not in state
    assert state["step"] == 2
    assert all(torch.equal(state["discriminator"][k], trained["discriminator"][k]) for k in state["discriminator"])
    requirements = (local / "requirements.txt").read_text().split()
    assert not [r for r in requirements if "voicecraft" in r.lower()]
    ours = [r for r in requirements if r.split("==")[0] in tracking.CONVERSION_REQUIREMENTS]
    assert len(ours) == len(tracking.CONVERSION_REQUIREMENTS)
    assert all(r == f"{r.split('==')[0]}=={installed_version(r.split('==')[0])}" for r in ours), ours
    # Fine-tuning's copy has the training state beside the generator; conversion's copy does not.
    assert (found.fine_tuning_path() / "training_state.pt").is_file()
    assert not (tracking.resolve_model(ws, meta["model_version"]).path / "training_state.pt").exists()


@pytest.mark.slow
def test_the_pyfunc_from_base64_or_samples_gives_the_cli_audio_for_the_same_seed(registered, voices_dir, tmp_path):
    # Catches a pyfunc that decodes, resamples or seeds differently from `svc convert` (any sample differs), that
    # ignores the seed column (the CLI runs seed 5, the pyfunc's default is 0), or that needs a server path.
    import mlflow
    from svc_model.audio import decode, to_mono

    ws, _ = registered
    source = clip(voices_dir, "speaker-c", 1)[0]
    out = tmp_path / "cli.wav"
    result = svc("convert", "-C", str(ws.root), str(source), "-o", str(out), "--singer", "alto",
                 "--model", "models:/svc@candidate", "--seed", "5")
    assert result.exit_code == 0, result.output
    assert "models:/svc@candidate (version " in result.output
    cli_audio, cli_sr = sf.read(str(out), dtype="int16")

    model = mlflow.pyfunc.load_model("models:/svc@candidate")
    data, sr = decode(source)
    rows = pd.concat([
        model.predict(pd.DataFrame([{"audio_base64": base64.b64encode(source.read_bytes()).decode(),
                                     "target": "alto", "seed": 5}])),
        model.predict(pd.DataFrame([{"audio": to_mono(data).astype(np.float64).tolist(), "sample_rate": sr,
                                     "target": "alto", "seed": 5}])),
    ], ignore_index=True)
    assert list(rows["output"]) == ["", ""] and list(rows["sample_rate"]) == [32000, 32000]
    for encoded in rows["audio_base64"]:
        audio, rate = sf.read(io.BytesIO(base64.b64decode(encoded)), dtype="int16")
        assert rate == cli_sr and np.array_equal(audio, cli_audio)


@pytest.mark.slow
def test_the_pyfunc_reads_and_writes_server_paths_only_under_its_root(registered, voices_dir, tmp_path):
    # Catches a pyfunc that reads or writes any path a request names (the finding), a root check that
    # '..' or a symlink walks out of, and a refusal that does not say which path and which root.
    import shutil

    import mlflow

    outside = clip(voices_dir, "speaker-c", 1)[0]
    closed = mlflow.pyfunc.load_model("models:/svc@candidate")
    with pytest.raises(Exception, match=rf"source '{outside}': server paths are refused \(no audio root"):
        closed.predict(pd.DataFrame([{"source": str(outside), "target": "alto"}]))

    root = tmp_path / "audio-root"
    root.mkdir()
    shutil.copy(outside, root / "song.flac")
    (root / "escape.flac").symlink_to(outside)
    model = mlflow.pyfunc.load_model("models:/svc@candidate", model_config={"audio_root": str(root)})
    done = model.predict(pd.DataFrame([{"source": "song.flac", "target": "alto", "output": "out/song.wav"}]))
    assert done["output"][0] == str(root / "out" / "song.wav") and sf.info(str(root / "out" / "song.wav")).samplerate == 32000
    refused = {
        "source": {"source": str(outside), "target": "alto"},
        "source through ..": {"source": f"../{outside.name}", "target": "alto"},
        "source through a symlink": {"source": "escape.flac", "target": "alto"},
        "output": {"source": "song.flac", "target": "alto", "output": str(tmp_path / "written.wav")},
        "reference target": {"source": "song.flac", "target": str(outside)},
    }
    for what, row in refused.items():
        with pytest.raises(Exception, match=rf"outside the audio root {root}; refused") as err:
            model.predict(pd.DataFrame([row]))
        assert str(root) in str(err.value), what
    assert not (tmp_path / "written.wav").exists()


@pytest.mark.slow
def test_fine_tune_from_a_pickled_checkpoint_is_refused_before_training(registered, tmp_path):
    # Catches torch.load(weights_only=False) in the trainer's fine-tuning load: the payload would run.
    ws, _ = registered
    marker = tmp_path / "payload-ran"
    evil = evil_checkpoint(tmp_path / "base.pt", marker)
    result = svc("train", "-C", str(ws.root), "--local", "evil", "--fine-tune-from", str(evil), "--steps", "1",
                 "--device", "cpu")
    refused_line(result, evil)
    assert not marker.exists() and not list((ws.runs_dir / "evil").glob("step-*.pt"))
    # A registered version fine-tunes from its generator (safetensors) and its training state's discriminator.
    from assets.training_set import training_manifest
    from svc_model.train import Trainer
    from svc_model.weights import load_torch_file

    found = tracking.resolve_model(ws, "candidate")
    folder = found.fine_tuning_path()
    state = load_torch_file(folder / "training_state.pt")
    trainer = Trainer(ws.config(), training_manifest(ws), tmp_path / "tuned", device="cpu", init_from=folder,
                      log=lambda _: None, tensorboard=False)
    from safetensors.torch import load_file

    generator = load_file(str(folder / "generator.safetensors"))
    assert all(torch.equal(v, generator[k]) for k, v in trainer.generator.state_dict().items())
    assert all(torch.equal(v, state["discriminator"][k]) for k, v in trainer.discriminator.state_dict().items())
    assert trainer.step == 0 and trainer.base_lr == ws.config().train.fine_tune_learning_rate
