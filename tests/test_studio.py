"""The studio: each tab's functions called directly, bad inputs included, and the page in headless Chromium."""
from __future__ import annotations

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
import soundfile as sf
from click.testing import CliRunner

from assets.promotion import promote
from assets.workspace import init_workspace
from orchestration.build import build, materialize_training, open_instance
from orchestration.cli import main
from orchestration.singers import add_singer
from orchestration.studio import FINE_TUNE, FROM_SCRATCH, Studio, StudioError
from tests.conftest import clip, free_port, tone, use_config, write

ARTIFACTS = Path(__file__).parent / "artifacts"  # screenshots of each tab (git-ignored; the README's come from here)


@pytest.fixture(scope="module")
def studio_ws(tmp_path_factory, voices_dir):
    """Two singers, a 3-step model in production; the tests below add a third singer and train again."""
    root = tmp_path_factory.mktemp("studio") / "ws"
    ws = init_workspace(root)
    use_config(root)
    instance = open_instance(ws)
    quiet = lambda _: None
    add_singer(ws, "alto", clip(voices_dir, "speaker-a", 3), instance=instance, push=False, log=quiet)
    add_singer(ws, "bass", clip(voices_dir, "speaker-b", 3), instance=instance, push=False, log=quiet)
    build(ws, instance=instance, log=quiet)
    materialize_training(ws, steps=3, device="cpu", instance=instance)
    instance.dispose()
    promote(ws)
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
def test_convert_tab(studio_ws, workspace, voices_dir, bad_audio):
    ws = studio_ws
    studio = Studio(ws)
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

    before = _listing(ws.outputs_dir)
    bad = {
        "No audio for the source": dict(source=None, singer="alto"),
        **{BAD_AUDIO_MESSAGES[k]: dict(source=path, singer="alto") for k, path in bad_audio.items()},
        "Pick a target singer": dict(source=source, singer=None),
        "unknown singer 'tenor'": dict(source=source, singer="tenor"),
        "blend weights sum to 0": dict(source=source, target_kind="Blend", blend=[("alto", 0.0), ("bass", 0.0)]),
        "Pick at least one singer for the blend": dict(source=source, target_kind="Blend", blend=[(None, 1.0)]),
        "No audio for the reference recording": dict(source=source, target_kind="Reference recording"),
        "Pitch shift must be 'auto' or -12..12": dict(source=source, singer="alto", pitch_shift=13),
        "has no version '7'": dict(source=source, singer="alto", model="7"),
    }
    for message, kwargs in bad.items():
        with pytest.raises(StudioError, match=re.escape(message)):
            studio.convert(**kwargs)
    assert _listing(ws.outputs_dir) == before

    # A workspace with nothing in production: a message, not a crash.
    empty = Studio(workspace)
    assert empty.model_choices() == []
    assert empty.describe_model("production") == ("No version of the model 'svc' is 'production' yet: train one "
                                                  "in the Train tab and promote it.", [])
    with pytest.raises(StudioError, match="is 'production' yet"):
        empty.convert(source, singer="alto")


@pytest.mark.slow
def test_singers_tab(studio_ws, voices_dir, bad_audio, tmp_path):
    ws = studio_ws
    studio = Studio(ws)
    table, note = studio.singers_overview()
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
    table, note = studio.singers_overview()
    tenor = table.set_index("singer").loc["tenor"]
    assert tenor["recordings"] == 2 and tenor["status"] == "materialized" and tenor["segments"] > 0
    assert "Training set: **stale**" in note


@pytest.mark.slow
def test_train_tab(studio_ws, workspace):
    ws = studio_ws
    studio = Studio(ws, dagster_url="http://dagster.test:3000/")
    before = studio.training_view()  # before a launch: the latest `svc train` run, the fixture's
    assert before.state == "succeeded" and before.version == "1" and not before.promotable
    assert before.step == before.steps == 3 and sorted(before.losses["loss"].unique()) == ["mel", "stft"]
    assert "](http://dagster.test:3000/runs/" in before.links and "[MLflow run" in before.links
    assert "passed its evaluation checks and is in production" in before.status
    assert "## Overall" in before.report and "![" not in before.report and len(before.figures) == 2

    for message, args in {
        "Choose 'Fine-tune from production' or 'From scratch'": ("sideways", 2, "cpu"),
        "Steps must be a whole number of at least 1": (FINE_TUNE, 0, "cpu"),
        "Device must be auto, cpu or cuda": (FINE_TUNE, 2, "tpu"),
    }.items():
        with pytest.raises(StudioError, match=re.escape(message)):
            studio.launch_training(*args)
    with pytest.raises(StudioError, match="No singers yet"):
        Studio(workspace).launch_training(FROM_SCRATCH, 2, "cpu")

    studio.launch_training(FINE_TUNE, 2, "cpu")
    with pytest.raises(StudioError, match="still running"):
        studio.launch_training(FINE_TUNE, 2, "cpu")
    seen, deadline = set(), time.monotonic() + 300
    view = studio.training_view()
    while view.active and time.monotonic() < deadline:
        seen.add(view.state)
        time.sleep(1)
        view = studio.training_view()
    assert view.state == "succeeded", view.status
    assert seen <= {"starting", "running"} and "running" in seen
    assert "(fine-tune) finished: 2 steps" in view.status and view.version == "2" and view.promotable
    assert view.losses["step"].max() == 2 and "[MLflow run" in view.links
    assert "# svc version 2" in view.report and len(view.figures) == 2

    with pytest.raises(StudioError, match="No trained version to promote"):
        studio.promote(None)
    with pytest.raises(StudioError, match="--force needs --reason"):
        studio.promote("2", force=True, reason="")
    assert studio.promote("2", force=True, reason="studio test") == \
        "production -> version 2 (was 1); FORCED: studio test"
    with pytest.raises(StudioError, match="already in production"):
        studio.promote("2")
    assert not studio.training_view().promotable
    assert studio.describe_model("production")[1] == ["alto", "bass", "tenor"]


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


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _convert_and_wait(page) -> None:
    page.locator("#convert").click()
    page.locator("#summary").get_by_text("Converted").wait_for(timeout=120_000)
    page.locator("#output audio").first.wait_for(state="attached")


def _pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_browser_converts_an_upload(page, voices_dir):
    page.locator("#convert").click()
    page.locator("#summary").get_by_text("Error: No audio for the source").wait_for()
    page.locator("#source input[type=file]").set_input_files(str(clip(voices_dir, "speaker-c", 4)[-1]))
    _pick(page, "singer", "tenor")
    _convert_and_wait(page)
    assert "into tenor with svc version 2 (production)" in page.locator("#summary").inner_text()
    _screenshot(page, "studio-convert.png")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_browser_converts_a_recording(page):
    source = page.locator("#source")
    source.get_by_role("button", name="Record audio").click()
    source.get_by_role("button", name="Record", exact=True).click()
    page.wait_for_timeout(2500)
    source.get_by_role("button", name="Stop").click()
    source.locator("audio").first.wait_for(state="attached")
    _convert_and_wait(page)
    assert "into alto with svc version 2 (production)" in page.locator("#summary").inner_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_browser_adds_a_singer_and_trains(page, voices_dir):
    page.get_by_role("tab", name="Singers").click()
    page.locator("#new-name textarea").fill("soprano")
    page.locator("#new-files input[type=file]").set_input_files([str(p) for p in clip(voices_dir, "speaker-d", 1)])
    page.get_by_role("button", name="Add singer").click()
    page.locator("#add-result").get_by_text("Added soprano").wait_for(timeout=180_000)
    page.get_by_text("Training set: stale").wait_for()
    _screenshot(page, "studio-singers.png")

    page.get_by_role("tab", name="Train").click()
    page.locator("#steps input").fill("2")
    _pick(page, "device", "cpu")
    page.locator("#train-status").get_by_text("finished").wait_for()  # the last run, test_train_tab's
    page.locator("#launch").click()
    page.locator("#train-status").get_by_text("Starting svc train").wait_for()
    page.locator("#train-status").get_by_text("Registered svc version 3").wait_for(timeout=400_000)
    assert "(fine-tune) finished: 2 steps" in page.locator("#train-status").inner_text()
    page.locator("#promote").wait_for()  # offered: version 3 is not in production
    _screenshot(page, "studio-train.png")
