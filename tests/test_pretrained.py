"""Importing whisper-vits-svc checkpoints (`svc pretrained import/download`) and the training start point
(production, else base, else scratch).

Every weight here is RANDOM: the files have the anchor's exact layout (its published `sovits5.0.pretrain.pth`, from
tests/fixtures/anchor/synthesizer/sovits5.0_layout.json, or a reduced-width model in the same layout), not its
trained values; the tests check the import path, not voice quality."""
from __future__ import annotations

import json
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from assets import tracking
from orchestration.cli import main
from svc_model.pretrained import anchor_to_ours, ours_to_anchor, sha256_of
from tests.conftest import LENIENT, clip, use_config

LAYOUT = Path(__file__).parent / "fixtures" / "anchor" / "synthesizer" / "sovits5.0_layout.json"
SINGER_ONLY = ("posterior_encoder.", "speaker_proj.", "speaker_classifier.")  # what svc_export.py leaves out

# tiny at reduced widths, with a vec path (the anchor's layout always has enc_p.hub): a random 16-wide HuBERT
# and vec_dim 16; the speaker encoder the anchor's models were trained on (mozilla-lstm; seeded RANDOM weights).
REDUCED = LENIENT + """features:
  vec:
    backend: transformers
    pretrained: false
    random_hidden_size: 16
    random_layers: 1
    layer: 1
  speaker:
    backend: mozilla-lstm
model:
  vec_dim: 16
"""


def svc(*args: str):
    return CliRunner().invoke(main, list(args))


def reduced_workspace(ws) -> None:
    """Point ``ws`` at REDUCED and give it seeded random mozilla-lstm weights (labelled random: not the anchor's)."""
    from svc_model.features.speaker import lstm_expected_shapes
    from tests.test_speaker_lstm import WEIGHTS, save_checkpoint, seeded_state_dict

    use_config(ws.root, REDUCED, "reduced.yaml")
    save_checkpoint(ws.root / WEIGHTS, seeded_state_dict(lstm_expected_shapes()))


def anchor_file(path: Path, cfg, kind: str = "singer", seed: int = 0, drop: tuple[str, ...] = (),
                change: dict | None = None) -> dict[str, torch.Tensor]:
    """A whisper-vits-svc file made from our own model at ``cfg``'s widths, in the anchor's key names (the layout
    equality is proven by tests/test_anchor_model.py). kind "singer": what svc_export.py writes (model_g with
    enc_p, flow, dec); "pretrain": model_g and model_d. Returns the anchor-named generator tensors."""
    from svc_model.model import SVCModel
    from svc_model.model.discriminators import Discriminator

    torch.manual_seed(seed)
    model = SVCModel(cfg.model, cfg.spectrogram.n_fft // 2 + 1, cfg.audio.sample_rate)
    generator = {ours_to_anchor(k): v.clone() + 0.01 * torch.randn_like(v)  # not the init a fresh model has
                 for k, v in model.state_dict().items() if kind == "pretrain" or not k.startswith(SINGER_ONLY)}
    for key in drop:
        del generator[key]
    generator.update(change or {})
    payload = {"model_g": generator}
    if kind == "pretrain":
        m = cfg.model
        disc = Discriminator(m.mpd_periods, m.mrd_resolutions, m.mpd_channels, m.mrd_channels, m.msd_channels)
        payload["model_d"] = {ours_to_anchor(k): v for k, v in disc.state_dict().items()}
    torch.save(payload, path)
    return generator


def speaker_file(path: Path, seed: int = 1, shape=(256,), value: float | None = None) -> Path:
    vector = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    vector *= 0.8 / np.linalg.norm(vector)  # the anchor's singer*.npy are float32 (256,), norm ~0.8
    if value is not None:
        vector[0] = value
    np.save(path, vector)
    return path


def nothing_registered(ws) -> bool:
    folder = ws.root / "models" / "pretrained"
    return tracking.model_versions(ws) == [] and not (folder.is_dir() and any(folder.iterdir()))


@pytest.mark.slow
def test_a_file_in_the_published_layout_and_size_imports_as_base(workspace, tmp_path):
    # Catches: a key of the published sovits5.0.pretrain.pth that the reader or converter drops, renames wrongly
    # (prefixes, weight_g/weight_v), or mis-shapes; a converted checkpoint that load_model cannot read strictly;
    # a version registered without the alias base or with a wrong kind/sha256.
    layout = json.loads(LAYOUT.read_text())
    gen = torch.Generator().manual_seed(0)
    payload = {part: {k: torch.randn(shape, generator=gen) * 0.05 for k, shape in layout[part].items()}
               for part in ("model_g", "model_d")}
    path = tmp_path / "sovits5.0.pretrain.pth"
    torch.save(payload, path)
    assert path.stat().st_size > 200e6  # ~212 MB of float32, as the published file
    use_config(workspace.root, "extends: base\n", "pretrain.yaml")  # the published model is the base profile's size

    result = svc("pretrained", "import", "-C", str(workspace.root), str(path))
    assert result.exit_code == 0, result.output
    assert "kind: pretrain" in result.output and "ppg_dim 1280, vec_dim 256" in result.output
    assert "hidden 192" in result.output and "warning" not in result.output
    version = tracking.alias_version(workspace, "base")
    assert version is not None and str(version.version) == "1"
    assert version.tags["kind"] == "pretrain" and version.tags["sha256"] == sha256_of(path)
    assert version.tags["source_file"] == path.name and version.tags["speaker_encoder"] == "mozilla-lstm"
    models = svc("models", "-C", str(workspace.root)).output.splitlines()
    assert any(line.split()[:2] == ["1", "base"] for line in models), models

    from svc_model.train import load_model
    from svc_model.weights import read_checkpoint

    found = tracking.resolve_model(workspace, "base")
    assert (found.path / "generator.safetensors").is_file()  # the registry holds no pickle of the weights
    model, cfg, extras = load_model(found.path)  # strict
    # The discriminator is fine-tuning's part: in the version's training state, not in the model.
    extras["discriminator"] = read_checkpoint(found.fine_tuning_path(), training_state=True)["discriminator"]
    ours = model.state_dict()
    for key in ("enc_p.pre.weight", "emb_g.weight", "enc_q.enc.in_layers.3.weight_v", "flow.flows.2.post.bias",
                "dec.ups.0.weight_g", "dec.resblocks.5.convs1.1.weight_v", "speaker_classifier.classifier.1.weight_g"):
        assert torch.equal(ours[anchor_to_ours(key)], payload["model_g"][key]), key
    for key in ("MRD.discriminators.0.convs.0.weight_v", "MSD.conv_post.weight_g", "MSD.conv_post.bias"):
        assert torch.equal(extras["discriminator"][anchor_to_ours(key)], payload["model_d"][key]), key
    assert set(extras["discriminator"]) == {anchor_to_ours(k) for k in payload["model_d"]}
    assert extras["imported_from"] == {"file": path.name, "sha256": sha256_of(path), "kind": "pretrain"}
    assert extras["speaker_encoder"] == "mozilla-lstm" and extras["step"] == 0 and cfg.model.ppg_dim == 1280


def test_an_exported_singer_model_imports_and_converts_at_once(workspace, tmp_path, voices_dir):
    # Catches: an exported model (no enc_q, emb_g, speaker_classifier) that fails the strict load; speaker files
    # that do not become conversion targets; a converted model that cannot convert (shapes, features) or gives
    # non-finite audio or a different length.
    reduced_workspace(workspace)
    cfg = workspace.config()
    path = tmp_path / "alto.pth"
    generator = anchor_file(path, cfg, "singer")
    spk = speaker_file(tmp_path / "alto.spk.npy")

    result = svc("pretrained", "import", "-C", str(workspace.root), str(path), "--speaker", f"alto={spk}")
    assert result.exit_code == 0, result.output
    assert "kind: singer" in result.output and "ppg_dim 384, vec_dim 16" in result.output
    assert "posterior_encoder" in result.output and "singers: alto" in result.output
    assert "converted alto.pth once" in result.output and "the original is not loaded again" in result.output
    assert "warning" not in result.output  # the workspace has the model's widths and speaker encoder
    version = tracking.alias_version(workspace, "base")
    assert version.tags["kind"] == "singer" and version.tags["singers"] == "alto"
    # Converted once into the project's form without pickles (a singer model has no discriminator to keep).
    converted = [p for p in (workspace.root / "models" / "pretrained").iterdir() if not p.name.startswith(".")]
    assert len(converted) == 1 and sorted(f.name for f in converted[0].iterdir()) == [
        "config.json", "generator.safetensors", "singers.json"]

    from svc_model.train import load_model

    model, _, extras = load_model(tracking.resolve_model(workspace, "base").path)
    assert tracking.TRAINING_STATE_TAG not in version.tags  # no discriminator: no training state logged
    assert np.allclose(extras["singers"]["alto"]["embedding"], np.load(spk))
    ours = model.state_dict()
    for key in ("enc_p.hub.weight", "flow.flows.2.enc.in_layers.0.weight_v", "dec.conv_post.weight"):
        assert torch.equal(ours[anchor_to_ours(key)], generator[key]), key

    _assert_converts(workspace, voices_dir, tmp_path, "models:/svc@base")


def test_bad_files_are_refused_with_the_key_and_nothing_is_registered(workspace, tmp_path):
    # Catches: a wrong shape or missing key that slips through (or an error that does not name the key and the
    # expected shape); a pickle whose code runs on load; a traceback instead of one line; a half-done import.
    reduced_workspace(workspace)
    cfg = workspace.config()
    root = str(workspace.root)

    def refused(path, *extra) -> str:
        result = svc("pretrained", "import", "-C", root, str(path), *extra)
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
        return errors[0]

    bad = tmp_path / "shape.pth"
    anchor_file(bad, cfg, change={"enc_p.enc.attn_layers.0.conv_o.weight": torch.zeros(64, 32, 1)})
    line = refused(bad)
    assert f"{bad}" in line and "'enc_p.enc.attn_layers.0.conv_o.weight' has shape [64, 32, 1], expected [64, 64, 1]" in line

    missing = tmp_path / "missing.pth"
    anchor_file(missing, cfg, "pretrain", drop=("flow.flows.0.enc.in_layers.0.bias",))
    line = refused(missing)
    assert "lacks key 'flow.flows.0.enc.in_layers.0.bias' (expected shape [128])" in line

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pth"
    torch.save({"model_g": {"enc_p.pre.weight": Payload()}}, evil)
    line = refused(evil)
    assert "not a loadable torch checkpoint of plain tensors (refused by weights_only=True" in line
    assert "GLOBAL posix.system" in line and "weights_only` set to `False`" not in line and not marker.exists()
    raw = tmp_path / "evil-pickle.pth"  # a bare pickle, not torch's zip format
    raw.write_bytes(pickle.dumps({"model_g": Payload()}))
    assert "refused by weights_only=True" in refused(raw) and not marker.exists()

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    assert "not a loadable torch checkpoint" in refused(text)

    good = tmp_path / "good.pth"
    anchor_file(good, cfg)
    wrong = speaker_file(tmp_path / "wrong.npy", shape=(128,))
    line = refused(good, "--speaker", f"alto={wrong}")
    assert f"{wrong}: speaker embedding has shape [128]" in line and "expected a float array of shape [256]" in line
    nan = speaker_file(tmp_path / "nan.npy", value=float("nan"))
    assert f"{nan}: speaker embedding contains NaN" in refused(good, "--speaker", f"alto={nan}")
    assert "invalid alias" in refused(good, "--name", "production")

    assert nothing_registered(workspace) and not marker.exists()


def test_download_offline_says_where_to_get_the_file_and_where_to_put_it(workspace, monkeypatch):
    # Catches: an offline download that hangs, leaves a partial file, or fails without saying what to do.
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    result = svc("pretrained", "download", "-C", str(workspace.root), "sovits5.0")
    assert result.exit_code == 1
    dest = workspace.root / "models" / "pretrained" / "sovits5.0.pretrain.pth"
    line = next(l for l in result.output.splitlines() if l.startswith("error:"))
    assert "https://github.com/PlayVoice/so-vits-svc-5.0/releases/download/5.0/sovits5.0.pretrain.pth" in line
    assert f"put it at {dest}" in line and f"svc pretrained import {dest}" in line and "no network" in line
    assert not dest.parent.is_dir() or not any(dest.parent.iterdir())
    assert "unknown published model" in svc("pretrained", "download", "-C", str(workspace.root), "nope").output


def test_download_writes_through_a_temp_file_and_verifies_a_known_sha256(workspace, monkeypatch):
    # Catches: a download written in place (a broken transfer would leave a truncated .pth that looks complete),
    # and a published size/sha256 that is not checked once it is filled in.
    import hashlib
    import io

    from svc_model import pretrained

    body = b"fake weights " * 1000

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(body))}

    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: Response(body))
    entry = dict(pretrained.PUBLISHED["sovits5.0"], sha256="0" * 64)
    monkeypatch.setitem(pretrained.PUBLISHED, "sovits5.0", entry)
    result = svc("pretrained", "download", "-C", str(workspace.root), "sovits5.0")
    folder = workspace.root / "models" / "pretrained"
    assert result.exit_code == 1 and "sha256 differs from the published" in result.output
    assert list(folder.iterdir()) == []  # the temp file is gone and nothing has the final name
    entry["sha256"], entry["size"] = hashlib.sha256(body).hexdigest(), len(body)
    result = svc("pretrained", "download", "-C", str(workspace.root), "sovits5.0")
    assert result.exit_code == 0, result.output
    assert [p.name for p in folder.iterdir()] == ["sovits5.0.pretrain.pth"]
    assert (folder / "sovits5.0.pretrain.pth").read_bytes() == body
    assert "pretrained import" in result.output


def test_a_model_that_does_not_fit_the_workspace_is_flagged_on_import_and_refused_as_start(workspace, tmp_path):
    # Catches: an import into a workspace whose features cannot feed the model passing silently, and training
    # that starts from a base of other widths (it would fail deep in a strict load, or mix embeddings).
    from assets.pretrained import resolve_start_point

    use_config(workspace.root)  # tiny: no vec path (vec_dim 0), resemblyzer
    reduced = workspace.config().model.model_copy(update={"vec_dim": 16})
    path = tmp_path / "wide.pth"
    anchor_file(path, workspace.config().model_copy(update={"model": reduced}))
    result = svc("pretrained", "import", "-C", str(workspace.root), str(path))
    assert result.exit_code == 0, result.output
    assert "warning: this workspace's config (lenient.yaml) does not fit the imported model" in result.output
    assert "model.vec_dim: 16 (workspace: 0)" in result.output
    assert "features.vec.backend: transformers, random_hidden_size: 16" in result.output
    assert "features.speaker.backend: mozilla-lstm (workspace: resemblyzer)" in result.output
    with pytest.raises(ValueError, match=r"cannot start from base:v1: .*model.vec_dim: 16 vs 0; "
                                         r"features.speaker.backend: mozilla-lstm vs resemblyzer"):
        resolve_start_point(workspace, "auto", log=lambda _: None)
    with pytest.raises(ValueError, match="no version of 'svc' has the alias 'production'"):
        resolve_start_point(workspace, "production", log=lambda _: None)
    assert resolve_start_point(workspace, "scratch", log=lambda _: None).label == "scratch"


@pytest.mark.slow  # 40-60 s on two shared cores
def test_training_starts_from_base_then_from_production_and_converts(workspace, tmp_path, voices_dir):
    # The chain: a reduced-width file in the anchor's layout imports, fine-tunes for a few steps through
    # Dagster on a workspace whose features have its widths, and svc convert with the result gives finite audio
    # of the source's length. Catches: training that ignores base (or production once promoted), a missing or
    # wrong init_from tag on the run or the version, and a fine-tuned model that no longer converts.
    from assets.promotion import promote
    from orchestration.build import build, materialize_training, open_instance
    from orchestration.singers import add_singer

    reduced_workspace(workspace)
    cfg = workspace.config()
    path = tmp_path / "sovits-reduced.pth"
    generator = anchor_file(path, cfg, "pretrain")
    assert svc("pretrained", "import", "-C", str(workspace.root), str(path)).exit_code == 0

    instance = open_instance(workspace)
    try:
        quiet = lambda _: None
        add_singer(workspace, "alto", clip(voices_dir, "speaker-a", 3), instance=instance, push=False, log=quiet)
        add_singer(workspace, "bass", clip(voices_dir, "speaker-d", 3), instance=instance, push=False, log=quiet)
        build(workspace, instance=instance, log=quiet)
        first = materialize_training(workspace, steps=2, device="cpu", instance=instance)["svc_checkpoint"]
        client = tracking.client(workspace)
        assert first["init_from"] == "base:v1" and first["fine_tuned_from_version"] == "1"
        run = client.get_run(first["mlflow_run_id"])
        assert run.data.tags["init_from"] == "base:v1" and run.data.tags["fine_tuned_from_version"] == "1"
        assert run.data.metrics["train/lr"] == pytest.approx(cfg.train.fine_tune_learning_rate, rel=1e-3)
        assert client.get_model_version("svc", "2").tags["init_from"] == "base:v1"

        from svc_model.train import load_model

        tuned, _, _ = load_model(first["checkpoint"])
        moved = tuned.state_dict()[anchor_to_ours("enc_p.pre.weight")]
        assert not torch.equal(moved, generator["enc_p.pre.weight"])  # trained, from the base's weights:
        assert torch.allclose(moved, generator["enc_p.pre.weight"], atol=0.01)  # 2 steps at lr 5e-5 move little

        promote(workspace, "2", force=True, reason="test: 2 steps")
        second = materialize_training(workspace, steps=2, device="cpu", instance=instance)["svc_checkpoint"]
        assert second["init_from"] == "production:v2" and second["model_version"] == 3
        assert client.get_run(second["mlflow_run_id"]).data.tags["init_from"] == "production:v2"
        assert client.get_model_version("svc", "3").tags["init_from"] == "production:v2"
    finally:
        instance.dispose()

    _assert_converts(workspace, voices_dir, tmp_path, "models:/svc/3")


def _assert_converts(workspace, voices_dir, tmp_path, model_uri: str) -> None:
    """`svc convert` with ``model_uri`` into alto gives finite, non-silent audio of the source's length."""
    source = clip(voices_dir, "speaker-c", 1)[0]
    out = tmp_path / "converted.wav"
    result = svc("convert", "-C", str(workspace.root), str(source), "-o", str(out), "--singer", "alto",
                 "--model", model_uri)
    assert result.exit_code == 0, result.output
    audio, sr = sf.read(str(out))
    assert sr == 32000 and np.isfinite(audio).all() and np.abs(audio).max() > 0
    assert abs(len(audio) / sr - sf.info(str(source)).duration) < 0.01
