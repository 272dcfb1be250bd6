"""`svc live` on real PortAudio devices: ALSA's file plugin plays a real voice recording as the microphone and
records the speaker output to a raw file, so the whole device loop (sounddevice, PortAudio, ALSA) runs for real on a
machine without a sound card. Needs the PortAudio library (`libportaudio2`, installed by `.ci/run`)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import measured_f0, random_model_folder

ASOUNDRC = """\
pcm.nullpcm {{ type null }}
pcm.voicefile {{
    type file
    slave.pcm "nullpcm"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
pcm.voice {{
    type plug
    slave {{ pcm "voicefile"; format S16_LE; rate {rate}; channels 1 }}
}}
pcm.speakerfile {{
    type file
    slave.pcm "nullpcm"
    file "{outfile}"
    format "raw"
}}
pcm.speaker {{
    type plug
    slave {{ pcm "speakerfile"; format S16_LE; rate {rate}; channels 1 }}
}}
pcm.!default {{ type plug; slave.pcm "nullpcm" }}
"""


def portaudio_available() -> bool:
    try:
        import sounddevice  # noqa: F401
    except OSError:
        return False
    return True


needs_portaudio = pytest.mark.skipif(
    not portaudio_available() and not os.environ.get("SVC_REQUIRE_AUDIO"),
    reason="PortAudio library missing (apt install libportaudio2); .ci/run installs it and sets SVC_REQUIRE_AUDIO")


@pytest.fixture
def alsa_home(tmp_path, voices_dir):
    """A HOME whose ~/.asoundrc defines a `voice` input (a real recording) and a `speaker` output (a raw file)."""
    from svc_model.audio import decode, resample, to_mono

    rate = 48000
    data, sr = decode(sorted((voices_dir / "speaker-c").glob("*.flac"))[3])
    voice = resample(to_mono(data), sr, rate)[: 4 * rate]
    home = tmp_path / "home"
    home.mkdir()
    infile, outfile = home / "in.raw", home / "out.raw"
    (np.clip(voice, -1, 1) * 32767).astype("<i2").tofile(infile)
    (home / ".asoundrc").write_text(ASOUNDRC.format(infile=infile, outfile=outfile, rate=rate))
    return home, voice, rate, outfile


def run_in(home: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)


@needs_portaudio
def test_live_loop_converts_a_real_device_stream(alsa_home):
    # Bugs caught: blocks read from the device but not converted in order, the output written at the model's rate
    # to a 48 kHz device (pitch and duration off by 1.5), blocks dropped or repeated (the output's length and its
    # pitch track stop following the input).
    home, voice, rate, outfile = alsa_home
    result = run_in(home, f"""
import json
from svc_model.streaming import StreamingConverter, StreamConfig
from orchestration.live import run_live
from tests.conftest import random_tiny_converter
conv = random_tiny_converter()
lines = []
summary = run_live(lambda sr: StreamingConverter(conv, "alto", config=StreamConfig(), input_sr=sr, deterministic=True),
                   input_device="voice", output_device="speaker", samplerate={rate}, seconds=3.0,
                   meter=lines.append)
print(json.dumps({{"blocks": summary.blocks, "latency": summary.latency_ms, "meter": lines[-1],
                  "delay": summary.delay_samples}}))
""")
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["latency"] == 300 and "compute" in report["meter"] and "dBFS" in report["meter"]
    out = np.fromfile(outfile, dtype="<i2").astype(np.float32) / 32767
    blocks = report["blocks"]
    assert blocks >= 4
    assert len(out) == blocks * rate // 4, f"{len(out)} samples written for {blocks} blocks of 250 ms"
    # The converted stream, delayed by the algorithmic latency, follows the input's pitch.
    delay = report["delay"]  # crossfade + SOLA window held back, and the resamplers' start-up
    assert int(0.05 * rate) <= delay < int(0.07 * rate)
    n = len(out) - delay - rate // 4
    from svc_model.audio import resample

    f_in = measured_f0(resample(voice[:n], rate, 32000), 32000)
    f_out = measured_f0(resample(out[delay : delay + n], rate, 32000), 32000)
    both = (f_in > 0) & (f_out > 0)
    assert both.sum() > 50
    corr = np.corrcoef(np.log(f_in[both]), np.log(f_out[both]))[0, 1]
    assert corr > 0.9, f"output pitch vs input pitch: correlation {corr:.3f}"


@needs_portaudio
def test_unknown_device_is_a_clear_error(alsa_home):
    home = alsa_home[0]
    result = run_in(home, """
from orchestration.live import run_live, LiveError
try:
    run_live(lambda sr: None, input_device="no-such-mic", seconds=0.1)
except LiveError as exc:
    print("ERR", exc)
""")
    assert "ERR no input device matches 'no-such-mic'" in result.stdout, result.stdout + result.stderr


@needs_portaudio
def test_svc_live_lists_devices_and_converts_between_them(alsa_home, tmp_path, workspace):
    # Bugs caught: the command not wiring its options to the device loop (wrong device, no output written), the
    # list missing devices, a meter/summary that never prints.
    home, voice, rate, outfile = alsa_home
    folder = random_model_folder(tmp_path / "model")
    env = {**os.environ, "HOME": str(home)}
    svc = [sys.executable, "-m", "orchestration.cli"]
    listed = subprocess.run(svc + ["live", "--list-devices"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert " voice " in listed.stdout + " " and " speaker " in listed.stdout + " "
    run = subprocess.run(svc + ["-C", str(workspace.root), "live", "--checkpoint", str(folder), "--singer", "alto",
                                "--input-device", "voice", "--output-device", "speaker", "--samplerate", str(rate),
                                "--seconds", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "algorithmic latency 300 ms" in run.stderr and "8 blocks (0 gated)" in run.stderr
    out = np.fromfile(outfile, dtype="<i2")
    assert len(out) == 8 * rate // 4 and np.abs(out).max() > 300
    bad = subprocess.run(svc + ["-C", str(workspace.root), "live", "--checkpoint", str(folder), "--singer", "tenor",
                                "--input-device", "voice"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown singer 'tenor'" in bad.stderr and "Traceback" not in bad.stderr
