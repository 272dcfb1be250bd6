"""The studio's Live tab: the WebSocket protocol against a real studio server (Gradio + uvicorn on a free port),
and headless Chromium streaming its fake microphone (a real voice) through the page.

The model has random weights (tiny profile, fixed seed), injected as the studio's production converter: the tests
are about the transport, the protocol and the page, and at initialization the model's output pitch follows its
NSF source, so "the output follows the input's pitch" is measurable without training.
"""
import asyncio
import json
import struct

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import free_port, measured_f0, random_tiny_converter

RATE = 48000


@pytest.fixture(scope="module")
def converter():
    return random_tiny_converter()


@pytest.fixture(scope="module")
def studio_server(tmp_path_factory, converter, _workspace_template):
    import shutil

    from assets.workspace import Workspace
    from orchestration.studio import Studio
    from orchestration.studio.app import serve

    root = tmp_path_factory.mktemp("live") / "ws"
    shutil.copytree(_workspace_template, root, symlinks=True)
    studio = Studio(Workspace(root))
    studio.live_tab.converter_for = lambda: (converter, "random-weight test model")
    port = free_port()
    app = serve(studio, port=port, block=False)
    yield studio, f"127.0.0.1:{port}"
    app.close()


def tone(seconds: float, f0: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * f0 * t)).astype(np.float32)


def frame(samples: np.ndarray, stamp: float = 0.0) -> bytes:
    return struct.pack("<d", stamp) + np.asarray(samples, "<f4").tobytes()


async def _open(address: str, token: str):
    import websockets

    ws = await websockets.connect(f"ws://{address}/live/ws?token={token}", max_size=2**24)
    hello = json.loads(await ws.recv())
    return ws, hello


async def _start(ws, **overrides):
    await ws.send(json.dumps({"type": "start", "sample_rate": RATE, "singer": "alto", "block_ms": 250, **overrides}))
    return json.loads(await ws.recv())


async def _closed_reason(ws) -> tuple[int, str]:
    import websockets

    try:
        while True:
            await asyncio.wait_for(ws.recv(), 60)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code, exc.rcvd.reason


def test_the_socket_converts_blocks_and_refuses_bad_clients_without_stopping(studio_server):
    # Bugs caught: the token not checked (any web page could stream to the server), replies not one block per
    # block or at the wrong rate, the timestamp not echoed (the page could not measure the round trip), a bad
    # message crashing the handler or the server instead of closing that connection with a reason, the model
    # lock or event loop blocked so that a second client stops being served.
    import websockets

    studio, address = studio_server
    token = studio.live_tab.token

    async def scenario():
        # a wrong token never gets a hello
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(f"ws://{address}/live/ws?token=wrong") as ws:
                await ws.recv()
        good, hello = await _open(address, token)
        assert hello == {"type": "hello", "singers": ["alto", "bass"], "model": "random-weight test model"}
        ready = await _start(good)
        assert ready["latency_ms"] == 300 and ready["block_samples"] == 12000 and ready["singer"] == "alto"
        voice = tone(3.0)
        received = []
        for i in range(4):
            await good.send(frame(voice[i * 12000 : (i + 1) * 12000], stamp=1000.0 + i))
            reply = await good.recv()
            stamp, compute_ms, _ = struct.unpack_from("<dff", reply)
            assert stamp == 1000.0 + i and compute_ms > 0
            received.append(np.frombuffer(reply, "<f4", offset=16))
        assert [len(r) for r in received] == [12000] * 4

        bad_cases = [
            (frame(np.zeros(10))[:7], None, 1007, "malformed audio frame"),
            (frame(np.zeros(int(2.5 * RATE))), None, 1009, "is over 2 s"),
            (frame(np.full(100, np.nan)), None, 1007, "NaN"),
            (None, {"sample_rate": 1000}, 1007, "sample_rate must be an integer"),
            (None, {"singer": "tenor"}, 1007, "unknown singer 'tenor'"),
            (None, {"block_ms": 333}, 1007, "block_ms must be one of"),
            ("not json", None, 1007, "JSON"),
        ]
        for payload, start_overrides, code, reason in bad_cases:
            bad, _ = await _open(address, token)
            if start_overrides is not None:
                await bad.send(json.dumps({"type": "start", "sample_rate": RATE, "singer": "alto",
                                           **start_overrides}))
            else:
                await _start(bad)
                await bad.send(payload)
            got = await _closed_reason(bad)
            assert got[0] == code and reason in got[1], (payload, start_overrides, got)
            # the good client is still served between bad ones
            await good.send(frame(voice[:12000], stamp=7.0))
            assert struct.unpack_from("<d", await good.recv())[0] == 7.0
        # audio before start is refused; a client that vanishes mid-stream does not disturb the server
        early, _ = await _open(address, token)
        await early.send(frame(np.zeros(100)))
        assert await _closed_reason(early) == (1008, "send a start message first")
        gone, _ = await _open(address, token)
        await _start(gone)
        await gone.send(frame(voice[:12000]))
        gone.transport.abort()
        await good.send(frame(voice[:12000], stamp=8.0))
        assert struct.unpack_from("<d", await good.recv())[0] == 8.0
        # a target swap takes effect at the next block
        await good.send(json.dumps({"type": "target", "singer": "bass"}))
        await good.send(frame(voice[:12000], stamp=9.0))
        assert struct.unpack_from("<d", await good.recv())[0] == 9.0
        await good.close()
        return np.concatenate(received)

    out = asyncio.run(scenario())
    from svc_model.audio import resample

    f = measured_f0(resample(out, RATE, 32000), 32000)
    assert abs(np.median(f[f > 0]) - 220) < 10


def test_the_live_tab_streams_the_microphone_in_the_browser(studio_server, chromium, tmp_path, voices_dir):
    # Bugs caught: the page never connects (wrong URL or token), the AudioWorklet never delivers blocks, replies not
    # played/recorded, the latency not shown, or the returned audio unrelated to what was sung.
    from playwright.sync_api import sync_playwright

    from svc_model.audio import decode, resample, to_mono

    studio, address = studio_server
    data, sr = decode(sorted((voices_dir / "speaker-c").glob("*.flac"))[3])
    voice = resample(to_mono(data), sr, RATE)
    mic = tmp_path / "mic.wav"
    sf.write(str(mic), voice, RATE, subtype="PCM_16")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}", "--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page()
        try:
            page.goto(f"http://{address}/", wait_until="networkidle")
            page.get_by_role("tab", name="Live").click()
            page.wait_for_function("document.querySelector('#live-singer') && "
                                   "document.querySelector('#live-singer').options.length == 2", timeout=60000)
            page.click("#live-start")
            page.wait_for_function("window.svcLive && window.svcLive.received.length >= 12 * 48000 / 4",
                                   timeout=180000)
            state = page.evaluate("({received: window.svcLive.received.slice(), rate: window.svcLive.sampleRate,"
                                  " rtts: window.svcLive.rtts, latency: window.svcLive.latency,"
                                  " error: window.svcLive.error})")
            latency_text = page.inner_text("#live-latency")
            page.click("#live-stop")
            page.screenshot(path=str(tmp_path / "live.png"))
        finally:
            browser.close()
    assert state["error"] is None
    assert state["latency"] == 300 and "round trip" in latency_text and "algorithmic latency 300 ms" in latency_text
    assert len(state["rtts"]) >= 12 and all(r > 0 for r in state["rtts"])
    out = np.asarray(state["received"], np.float32)
    rate = int(state["rate"])
    from svc_model.audio import resample as rs

    f_out = measured_f0(rs(out, rate, 32000), 32000)
    voiced = f_out[f_out > 0]
    # The fake microphone loops the recording; the converted stream must be voiced singing-range pitch that
    # moves as the voice does (a constant buzz or silence would fail).
    assert len(voiced) > 0.3 * len(f_out), f"only {len(voiced)} of {len(f_out)} frames voiced"
    f_in = measured_f0(resample(voice, RATE, 32000), 32000)
    lo, hi = np.percentile(f_in[f_in > 0], [5, 95])
    assert lo * 0.8 < np.median(voiced) < hi * 1.25
    assert np.std(np.log2(voiced)) * 12 > 1.0, "the output pitch does not move"
    # Aligned with the (looping) recording at the best lag, the output's pitch track follows the input's.
    looped = np.concatenate([f_in, f_in, f_in])
    best = -1.0
    for lag in range(len(f_in)):
        ref = looped[lag : lag + len(f_out)]
        both = (ref > 0) & (f_out > 0)
        if both.sum() > 0.3 * len(f_out):
            best = max(best, float(np.corrcoef(np.log(ref[both]), np.log(f_out[both]))[0, 1]))
    assert best > 0.8, f"output pitch vs the microphone's at the best alignment: correlation {best:.2f}"
