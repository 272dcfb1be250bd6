"""The studio: each tab's functions called directly, bad inputs included, and the page in headless Chromium."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from click.testing import CliRunner

import svc_model.audio
from assets import tracking
from assets.promotion import PromotionError, promote
from assets.workspace import init_workspace
from orchestration.build import build, materialize_training, open_instance
from orchestration.cli import main
from orchestration.singers import add_singer
from orchestration.studio import FINE_TUNE, FROM_SCRATCH, Studio, StudioError
from svc_model.infer import MAX_PITCH_SHIFT, auto_shift, check_pitch_shift
from tests.conftest import clip, free_port, tone, write

SVC = str(Path(sys.executable).parent / "svc")

ARTIFACTS = Path(__file__).parent / "artifacts"  # screenshots of each tab (git-ignored; the README's come from here)


@pytest.fixture(scope="module")
def studio_ws(tmp_path_factory, voices_dir):
    """Two singers, a 3-step model in production; the tests below add a third singer and train again.

    The tiny profile's real evaluation thresholds: a 3-step model fails them (its reconstruction is an untrained
    model's), so it reaches production only forced, as a person would have to."""
    root = tmp_path_factory.mktemp("studio") / "ws"
    ws = init_workspace(root)
    instance = open_instance(ws)
    quiet = lambda _: None
    add_singer(ws, "alto", clip(voices_dir, "speaker-a", 3), instance=instance, push=False, log=quiet)
    add_singer(ws, "bass", clip(voices_dir, "speaker-b", 3), instance=instance, push=False, log=quiet)
    build(ws, instance=instance, log=quiet)
    materialize_training(ws, steps=3, device="cpu", instance=instance)
    instance.dispose()
    with pytest.raises(PromotionError, match="version 1 failed its evaluation checks: .*reconstruction"):
        promote(ws)
    promote(ws, force=True, reason="studio fixture: a 3-step model")
    return ws


@pytest.fixture(scope="module")
def bad_audio(tmp_path_factory) -> dict[str, Path]:
    """The bad uploads: silence, 10 minutes, an unsupported format, a corrupt file."""
    folder = tmp_path_factory.mktemp("bad")
    return {
        "silence": write(folder / "silence.wav", np.zeros(3 * 16000, np.float32), 16000),
        "ten minutes": write(folder / "ten-minutes.wav", tone(600, 8000), 8000),
        "unsupported": _text(folder / "lyrics.txt", "la la la"),
        "corrupt": _text(folder / "broken.wav", "not really a wav file"),
    }


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_AUDIO_MESSAGES = {
    "silence": "silent",
    "ten minutes": "too long: 10.0 min > 5 min limit",  # the studio's limit (svc studio --max-upload-minutes)
    "unsupported": "unsupported extension '.txt'",
    "corrupt": "cannot decode",
}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.slow
def test_convert_tab(studio_ws, workspace, voices_dir, bad_audio, monkeypatch):
    ws = studio_ws
    studio = Studio(ws).convert_tab
    assert ("production (version 1)", "production") in studio.model_choices()
    note, singers = studio.describe_model("production")
    assert singers == ["alto", "bass"] and "svc version 1 (production)" in note
    source = clip(voices_dir, "speaker-c", 4)[-1]
    steps = []
    done = studio.convert(source, target_kind="Singer", singer="bass", pitch_shift=0,
                          progress=lambda fraction, desc: steps.append(fraction))
    audio, sr = sf.read(done.audio_path)
    assert sr == 32000 and abs(len(audio) / sr - sf.info(source).duration) < 0.05
    assert done.audio_path.parent == ws.outputs_dir / "studio"
    assert set(done.f0["curve"]) == {"source", "output"} and done.f0["f0_hz"].notna().any()
    assert "into **bass** with **svc version 1 (production)**" in done.summary and steps[-1] == 1.0
    blend = studio.convert(source, target_kind="Blend", blend=[("alto", 0.6), ("bass", 0.2), (None, 0.5)],
                           pitch_shift="auto")
    assert "into **alto:0.75+bass:0.25**" in blend.summary
    like_me = studio.convert(source, model="1", target_kind="Reference recording",
                             reference=clip(voices_dir, "speaker-d", 1)[0], pitch_shift=-3)
    assert "pitch shift -3 semitones" in like_me.summary and "svc version 1**" in like_me.summary
    assert any(c.startswith("requested (-3 st)") for c in like_me.f0["curve"].unique())

    # Two conversions named alike in the same second (every browser recording is "audio.wav"): two outputs,
    # the first one intact. Fails if the second overwrites the first.
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261207-120000")
    first = studio.convert(source, target_kind="Singer", singer="alto")
    kept = first.audio_path.read_bytes()
    second = studio.convert(source, target_kind="Singer", singer="alto", pitch_shift=5)
    assert first.audio_path != second.audio_path and second.audio_path.name.endswith("-20261207-120000-2.wav")
    assert first.audio_path.read_bytes() == kept and second.audio_path.read_bytes() != kept
    monkeypatch.undo()

    before = _listing(ws.outputs_dir)
    bad = {
        "No audio for the source": dict(source=None, singer="alto"),
        **{BAD_AUDIO_MESSAGES[k]: dict(source=path, singer="alto") for k, path in bad_audio.items()},
        "Pick a target singer": dict(source=source, singer=None),
        "unknown singer 'nobody'": dict(source=source, singer="nobody"),
        "blend weights sum to 0": dict(source=source, target_kind="Blend", blend=[("alto", 0.0), ("bass", 0.0)]),
        "Pick at least one singer for the blend": dict(source=source, target_kind="Blend", blend=[(None, 1.0)]),
        "No audio for the reference recording": dict(source=source, target_kind="Reference recording"),
        "Pitch shift must be 'auto' or -24..24": dict(source=source, singer="alto", pitch_shift=25),
        "has no version '7'": dict(source=source, singer="alto", model="7"),
    }
    for message, kwargs in bad.items():
        with pytest.raises(StudioError, match=re.escape(message)):
            studio.convert(**kwargs)
    assert _listing(ws.outputs_dir) == before

    # A workspace with nothing in production: a message, not a crash.
    empty = Studio(workspace).convert_tab
    assert empty.model_choices() == []
    assert empty.describe_model("production") == ("No version of the model 'svc' is 'production' yet: train one "
                                                  "in the Train tab and promote it.", [])
    with pytest.raises(StudioError, match="is 'production' yet"):
        empty.convert(source, singer="alto")


@pytest.mark.slow
def test_singers_tab(studio_ws, voices_dir, bad_audio, tmp_path):
    ws = studio_ws
    studio = Studio(ws).singers_tab
    table, note = studio.overview()
    assert table["singer"].tolist() == ["alto", "bass"]
    assert table["recordings"].tolist() == [3, 3] and set(table["status"]) == {"materialized"}
    assert (table["segments"] > 0).all() and (table["minutes"] > 0).all()
    assert "production: **version 1**" in note

    good = clip(voices_dir, "speaker-c", 1)
    raw_before = _listing(ws.raw_dir)
    bad = {
        "Enter a name for the singer": dict(name="  ", files=good),
        "invalid singer name 'two words'": dict(name="two words", files=good),
        "A singer named 'alto' already exists": dict(name="alto", files=good),
        "Add at least one recording": dict(name="tenor", files=[]),
        **{f"Nothing was added. recording ({path.name}): {BAD_AUDIO_MESSAGES[k]}": dict(name="tenor",
                                                                                       files=[*good, path])
           for k, path in bad_audio.items()},
    }
    for message, kwargs in bad.items():
        with pytest.raises(StudioError, match=re.escape(message)):
            studio.add_singer(**kwargs)
    assert _listing(ws.raw_dir) == raw_before and ws.singers() == ["alto", "bass"]

    # A microphone recording arrives as a WAV with a name the browser picks; it is kept under a better one.
    recording = tmp_path / "audio.wav"
    data, sr = sf.read(clip(voices_dir, "speaker-c", 3)[-1])
    sf.write(recording, data, sr)
    steps = []
    message = studio.add_singer("tenor", good, recording, progress=lambda fraction, desc: steps.append(desc))
    assert message.startswith("Added **tenor**: 2 recording(s)") and "features are built" in message
    assert any("DVC" in s for s in steps) and any("Dagster" in s for s in steps)
    kept = sorted(p.name for p in ws.singer_raw_dir("tenor").iterdir())
    assert kept[0] == good[0].name and kept[1].startswith("recording-") and kept[1].endswith(".wav")
    assert ws.singer_dvc_file("tenor").is_file()
    table, note = studio.overview()
    tenor = table.set_index("singer").loc["tenor"]
    assert tenor["recordings"] == 2 and tenor["status"] == "materialized" and tenor["segments"] > 0
    assert "Training set: **stale**" in note


def _evaluation_tags(ws, version: str) -> dict[str, float]:
    tags = tracking.client(ws).get_model_version(ws.settings.registered_model_name, version).tags
    return {k.removeprefix("eval."): float(v) for k, v in tags.items()
            if k.startswith("eval.") and k not in ("eval.passed", "eval.failed_checks")}


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a training and its evaluation, on a CPU shared with other jobs
def test_train_tab(studio_ws, workspace, caplog):
    ws = studio_ws
    studio = Studio(ws, dagster_url="http://dagster.test:3000/").train_tab
    before = studio.view()  # before a launch: the latest `svc train` run, the fixture's
    assert before.state == "succeeded" and before.version == "1" and not before.promotable
    assert before.step == before.steps == 3 and sorted(before.losses["loss"].unique()) == ["mel", "stft"]
    assert "](http://dagster.test:3000/runs/" in before.links and "[MLflow run" in before.links
    assert re.search(r"failed its evaluation checks \([a-z_,]*reconstruction[a-z_,]*\) and is in production",
                     before.status), before.status
    # The metrics come from the report's metrics.json: the very figures recorded on the version.
    metrics = json.loads((ws.asset_dir("evaluation_report") / "metrics.json").read_text())
    assert metrics["model_version"] == 1 and "Evaluation of svc version 1" in before.evaluation
    shown = dict(zip(before.metrics["metric"], before.metrics["value"]))
    assert set(shown) == {"f0_corr", "f0_rmse_cents", "vuv_error", "target_similarity", "source_similarity",
                          "similarity_gap", "reconstruction_mel", "rtf"}
    assert shown == {k: metrics[k] for k in shown}
    recorded = _evaluation_tags(ws, "1")
    assert all(abs(shown[k] - recorded[k]) < 1e-5 for k in shown)
    assert len(before.figures) == 2

    for message, args in {
        "Choose 'Fine-tune from production' or 'From scratch'": ("sideways", 2, "cpu"),
        "Steps must be a whole number of at least 1": (FINE_TUNE, 0, "cpu"),
        "Device must be auto, cpu or cuda": (FINE_TUNE, 2, "tpu"),
        "Processes must be a whole number of at least 1": (FINE_TUNE, 2, "cpu", 0),
    }.items():
        with pytest.raises(StudioError, match=re.escape(message)):
            studio.launch_training(*args, user="alice")
    with pytest.raises(StudioError, match="No singers yet"):
        Studio(workspace).train_tab.launch_training(FROM_SCRATCH, 2, "cpu", user="alice")

    caplog.set_level(logging.INFO, logger="svc.audit")
    studio.launch_training(FINE_TUNE, 2, "cpu", user="alice")
    assert any(r.getMessage().startswith("alice: launched training") for r in caplog.records)
    with pytest.raises(StudioError, match="still running"):
        studio.launch_training(FINE_TUNE, 2, "cpu", user="alice")
    seen = set()
    view = studio.view()
    while view.active:  # bounded by the test's timeout: no clock in the assertion, on a CPU shared with others
        seen.add(view.state)
        time.sleep(1)
        view = studio.view()
    assert view.state == "succeeded", view.status
    assert seen <= {"starting", "running"} and "running" in seen
    assert "(fine-tune) finished: 2 steps" in view.status and view.version == "2" and view.promotable
    assert view.losses["step"].max() == 2 and "[MLflow run" in view.links
    assert "Evaluation of svc version 2" in view.evaluation and len(view.figures) == 2
    assert dict(zip(view.metrics["metric"], view.metrics["value"])) != shown  # version 2's own figures
    # Who launched it is on the MLflow run and on the version it registered.
    client = tracking.client(ws)
    version = client.get_model_version("svc", "2")
    assert version.tags["launched_by"] == "alice"
    assert client.get_run(version.run_id).data.tags["launched_by"] == "alice"

    with pytest.raises(StudioError, match="No trained version to promote"):
        studio.promote(None, user="alice")
    with pytest.raises(StudioError, match="--force needs --reason"):
        studio.promote("2", force=True, reason="", user="alice")
    # The real thresholds: a 2-step fine-tune fails them too, and is refused unless forced; the refusal is audited.
    with pytest.raises(StudioError, match="version 2 failed its evaluation checks"):
        studio.promote("2", user="alice")
    assert any(r.getMessage().startswith("alice: promotion of version 2 refused: version 2 failed its evaluation")
               for r in caplog.records)
    assert studio.promote("2", force=True, reason="studio test", user="alice") == \
        "production -> version 2 (was 1); FORCED: studio test"
    assert client.get_model_version("svc", "2").tags["promotion.by"] == "alice"
    assert "alice: production -> version 2 (was 1); FORCED: studio test" in [r.getMessage() for r in caplog.records]
    with pytest.raises(StudioError, match="already in production"):
        studio.promote("2", user="alice")
    assert not studio.view().promotable
    # Version 2 was trained on every singer the workspace has (tenor too, when test_singers_tab ran first).
    assert Studio(ws).convert_tab.describe_model("production")[1] == sorted(ws.singers())


# ---- limits and authentication -----------------------------------------------------------------------------------
def test_one_pitch_shift_limit():
    assert MAX_PITCH_SHIFT == 24 and check_pitch_shift(24) == 24.0 and check_pitch_shift("-24") == -24.0
    assert check_pitch_shift("auto") == "auto"
    for bad in (25, -24.5, float("nan"), "up"):
        with pytest.raises(ValueError, match=r"out of range \(-24\.\.24 semitones\)|must be a number"):
            check_pitch_shift(bad)
    assert auto_shift(50.0, 1000.0) == 24 and auto_shift(1000.0, 50.0) == -24  # 52 semitones apart


def _declares_hours(path: Path) -> Path:
    """A FLAC whose header declares 2**36 samples (99 days at 8 kHz) while holding one second of audio."""
    sf.write(path, tone(1.0, 8000), 8000)
    data = bytearray(path.read_bytes())
    at = 8 + 10  # STREAMINFO: after "fLaC" and its block header; the total sample count ends these 8 bytes
    data[at:at + 8] = (int.from_bytes(data[at:at + 8], "big") | (1 << 36) - 1).to_bytes(8, "big")
    path.write_bytes(data)
    assert sf.info(path).duration > 8e6
    return path


def test_an_upload_over_the_length_limit_is_refused_before_decoding(workspace, tmp_path, monkeypatch):
    decoded = []
    real_decode = svc_model.audio.decode
    monkeypatch.setattr(svc_model.audio, "decode", lambda path, *args, **kwargs: decoded.append(Path(path).name)
                        or real_decode(path, *args, **kwargs))
    studio = Studio(workspace, max_upload_s=300)
    huge = _declares_hours(tmp_path / "huge.flac")
    with pytest.raises(StudioError, match=re.escape("the source (huge.flac): too long: 143165.6 min > 5 min limit")):
        studio.convert_tab.convert(huge, singer="alto")
    with pytest.raises(StudioError, match=re.escape("Nothing was added. recording (huge.flac): too long")):
        studio.singers_tab.add_singer("tenor", [huge])
    assert decoded == [] and workspace.singers() == []
    # The same check decodes a file within the limit: the spy sees the decoder when it runs.
    with pytest.raises(StudioError, match="Pick a target singer"):
        studio.convert_tab.convert(write(tmp_path / "short.wav", tone(2.0, 16000), 16000), singer=None)
    assert decoded == ["short.wav"]


def test_studio_refuses_the_network_without_auth(workspace):
    env = {k: v for k, v in os.environ.items() if k != "SVC_STUDIO_AUTH"}
    refused = subprocess.run([SVC, "-C", str(workspace.root), "studio", "--host", "0.0.0.0", "--port",
                              str(free_port())], capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 1
    assert ("error: refusing to serve the studio on '0.0.0.0' without authentication: anyone who reaches the port "
            "could add singers, start training and promote to production. Give --auth USER:PASS") in refused.stderr
    malformed = subprocess.run([SVC, "-C", str(workspace.root), "studio", "--host", "0.0.0.0", "--auth", "alice"],
                               capture_output=True, text=True, timeout=120, env=env)
    assert malformed.returncode == 1
    assert "--auth / SVC_STUDIO_AUTH must be USER:PASS with a non-empty user and password" in malformed.stderr


@pytest.fixture
def authenticated_studio(workspace):
    """`svc studio` on all interfaces with a login (from SVC_STUDIO_AUTH) and a 1 MB upload limit."""
    port = free_port()
    log_path = workspace.root / "studio-server.log"
    env = {**os.environ, "SVC_STUDIO_AUTH": "alice:s3cret pass"}
    with log_path.open("w") as log:
        server = subprocess.Popen([SVC, "-C", str(workspace.root), "studio", "--host", "0.0.0.0", "--port", str(port),
                                   "--max-upload-mb", "1"], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"svc studio exited ({server.returncode}):\n{log_path.read_text()}"
            try:
                requests.get(url, timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, f"svc studio did not answer:\n{log_path.read_text()}"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.slow
def test_auth_guards_the_page_and_the_api(authenticated_studio, workspace):
    url = authenticated_studio
    secret = workspace.outputs_dir / "studio" / "someone-else.wav"  # a file the studio would serve
    write(secret, tone(1.0, 16000), 16000)
    anonymous = requests.Session()
    page = anonymous.get(url)
    assert "VoiceCraft SVC studio" not in page.text and str(workspace.root) not in page.text  # the login form only
    for path in ("/config", "/gradio_api/info", "/gradio_api/openapi.json", f"/gradio_api/file={secret}"):
        assert anonymous.get(url + path).status_code == 401, path
    for path, kwargs in {
        "/gradio_api/call/promote": dict(json={"data": ["1", True, "anonymous"]}),
        "/gradio_api/call/launch_training": dict(json={"data": [FROM_SCRATCH, 2, "cpu", 1]}),
        "/gradio_api/queue/join": dict(json={"data": [], "fn_index": 0, "session_hash": "x"}),
        "/gradio_api/upload": dict(files={"files": ("a.wav", secret.read_bytes())}),
    }.items():
        assert anonymous.post(url + path, **kwargs).status_code == 401, path
    assert anonymous.post(url + "/login", data={"username": "alice", "password": "wrong"}).status_code == 400
    assert anonymous.get(url + "/config").status_code == 401

    alice = requests.Session()
    assert alice.post(url + "/login", data={"username": "alice", "password": "s3cret pass"}).status_code == 200
    assert "VoiceCraft SVC studio" in alice.get(url + "/config").text
    assert alice.get(url + f"/gradio_api/file={secret}").content == secret.read_bytes()
    # Gradio's byte limit: refused before the upload is stored; a small one goes through.
    assert alice.post(url + "/gradio_api/upload", files={"files": ("big.wav", b"\0" * (1024 * 1024 + 1))}
                      ).status_code == 413
    assert alice.post(url + "/gradio_api/upload", files={"files": ("a.wav", secret.read_bytes())}).status_code == 200
    # A promotion through the API acts as alice: the registry refuses it (nothing is registered), and the audit log
    # names her.
    event = alice.post(url + "/gradio_api/call/promote", json={"data": ["1", False, ""]})
    assert event.status_code == 200, event.text
    result = alice.get(url + f"/gradio_api/call/promote/{event.json()['event_id']}").text
    assert "model 'svc' has no version 1" in result
    audit = (workspace.root / "logs" / "audit.log").read_text()
    assert "audit alice: promotion of version 1 refused: model 'svc' has no version 1" in audit


def test_tensorboard_opens_on_the_training_logs(workspace, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((argv, env)))
    result = CliRunner().invoke(main, ["-C", str(workspace.root), "tensorboard", "--port", "6123"])
    assert result.exit_code == 0, result.output
    (argv, env), = calls
    assert argv == [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(workspace.runs_dir),
                    "--host", "127.0.0.1", "--port", "6123"]
    assert Path(argv[0]).is_file() and env["SVC_WORKSPACE"] == str(workspace.root)


# ---- the page in a browser ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def studio_url(studio_ws, tmp_path_factory):
    """`svc studio` on the trained workspace, in a process of its own; stopped however the tests end."""
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "studio-server.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        # A session of its own, so that stopping it reaches a training it launched too, as Ctrl-C in a terminal does.
        server = subprocess.Popen([str(Path(sys.executable).parent / "svc"), "-C", str(studio_ws.root), "studio",
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"svc studio exited ({server.returncode}):\n{log_path.read_text()}"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, f"svc studio did not answer:\n{log_path.read_text()}"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Gradio closes its server on Ctrl-C
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory, voices_dir, chromium):
    """Headless Chromium whose microphone plays a recorded voice (Chromium's fake media devices)."""
    from playwright.sync_api import sync_playwright

    # The fake capture device takes a 16-bit WAV.
    mic = tmp_path_factory.mktemp("mic") / "voice.wav"
    data, sr = sf.read(clip(voices_dir, "speaker-c", 3)[-1])
    sf.write(mic, data, sr, subtype="PCM_16")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}", "--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, studio_url):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, permissions=["microphone"])
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(studio_url)
    page.get_by_text("Model: svc version").wait_for()  # the page has loaded the workspace
    yield page
    context.close()


def _production_version(ws) -> str:
    return str(tracking.alias_version(ws, tracking.PRODUCTION).version)


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _is_upload(response) -> bool:
    return "/upload" in response.url and response.request.method == "POST"


def _convert_and_wait(page) -> None:
    """Click Convert and wait for the summary to change to a result; a failure quotes what the page and the
    server said (the summary alone cannot tell a slow conversion from an error or a lost source)."""
    summary = page.locator("#summary")
    before = summary.inner_text()
    page.locator("#convert").click()
    try:
        # While pending, the summary shows Gradio's timer and progress above the last message (which may be an
        # earlier error); the result replaces both.
        page.wait_for_function(
            "before => { const t = document.querySelector('#summary').innerText.trim();"
            " return t.includes('Converted') || (t !== before && /^(Error|Unexpected error)/.test(t)); }",
            arg=before.strip(), timeout=180_000)
    except Exception as exc:  # playwright's TimeoutError
        raise AssertionError(f"no result after Convert ({type(exc).__name__}); the summary reads "
                             f"{summary.inner_text()!r}\n{_server_log_tail()}") from None
    text = summary.inner_text()
    assert "Converted" in text, f"the conversion failed: {text!r}\n{_server_log_tail()}"
    page.locator("#output audio").first.wait_for(state="attached")


def _server_log_tail(lines: int = 40) -> str:
    log_path = ARTIFACTS / "studio-server.log"
    tail = log_path.read_text(errors="replace").splitlines()[-lines:] if log_path.exists() else ["(no log)"]
    return "svc studio's log ends:\n" + "\n".join(tail)


def _pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_browser_converts_an_upload(page, voices_dir, studio_ws):
    page.locator("#convert").click()
    page.locator("#summary").get_by_text("Error: No audio for the source").wait_for()
    # Convert sends the file's server path: clicked before the upload has answered, it would send no source.
    with page.expect_response(_is_upload):
        page.locator("#source input[type=file]").set_input_files(str(clip(voices_dir, "speaker-c", 4)[-1]))
    _pick(page, "singer", "bass")
    _convert_and_wait(page)
    production = _production_version(studio_ws)  # 2 after test_train_tab, the fixture's 1 when run alone
    assert f"into bass with svc version {production} (production)" in page.locator("#summary").inner_text()
    _screenshot(page, "studio-convert.png")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_browser_converts_a_recording(page, studio_ws):
    source = page.locator("#source")
    source.get_by_role("button", name="Record audio").click()
    source.get_by_role("button", name="Record", exact=True).click()
    page.wait_for_timeout(2500)
    # The recording is uploaded when it stops; Convert waits for that upload as it would for a file's.
    with page.expect_response(_is_upload, timeout=60_000):
        source.get_by_role("button", name="Stop").click()
    source.locator("audio").first.wait_for(state="attached")
    _convert_and_wait(page)
    production = _production_version(studio_ws)
    assert f"into alto with svc version {production} (production)" in page.locator("#summary").inner_text()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_browser_adds_a_singer_and_trains(page, voices_dir, studio_ws):
    page.get_by_role("tab", name="Singers").click()
    page.locator("#new-name textarea").fill("soprano")
    page.locator("#new-files input[type=file]").set_input_files([str(p) for p in clip(voices_dir, "speaker-d", 1)])
    page.get_by_role("button", name="Add singer").click()
    page.locator("#add-result").get_by_text("Added soprano").wait_for(timeout=180_000)
    page.get_by_text("Training set: stale").wait_for()
    _screenshot(page, "studio-singers.png")

    # The versions so far depend on which tests ran before this one in the module; read them, do not assume.
    production = _production_version(studio_ws)
    new = str(max(int(v.version) for v in tracking.model_versions(studio_ws)) + 1)
    page.get_by_role("tab", name="Train").click()
    page.locator("#steps input").fill("2")
    _pick(page, "device", "cpu")
    page.locator("#train-status").get_by_text("finished").wait_for()  # the last run (the fixture's or a test's)
    page.locator("#launch").click()
    page.locator("#train-status").get_by_text("Starting svc train").wait_for()
    page.locator("#train-status").get_by_text(f"Registered svc version {new}").wait_for(timeout=1_200_000)
    assert "(fine-tune) finished: 2 steps" in page.locator("#train-status").inner_text()
    page.locator("#promote").wait_for()  # offered: the new version is not in production
    _screenshot(page, "studio-train.png")
    # Without --auth (loopback) the page acts as "local": on the run it launched and on the promotion.
    client = tracking.client(studio_ws)
    assert client.get_model_version("svc", new).tags["launched_by"] == "local"
    page.locator("#promote").click()
    page.locator("#train-message").get_by_text(f"version {new} failed its evaluation checks").wait_for()
    page.locator("#force input").check()
    page.locator("#reason textarea").fill("browser test")
    page.locator("#promote").click()
    page.locator("#train-message").get_by_text(
        f"production -> version {new} (was {production}); FORCED: browser test").wait_for()
    assert client.get_model_version("svc", new).tags["promotion.by"] == "local"
