"""The Live tab: the browser's microphone streamed over a WebSocket to the streaming converter, the converted blocks
streamed back and played.

Protocol (``/live/ws?token=...``; the token is in the tab's HTML, which only an authenticated page receives, so a
page from another site cannot open the socket either):

- server -> client, text: ``{"type": "hello", "singers": [...], "model": ...}`` after the token is checked;
- client -> server, text: ``{"type": "start", "sample_rate": 48000, "singer": "alto", "pitch_shift": 0,
  "block_ms": 250}`` (the microphone's rate; the server resamples both ways), then ``{"type": "target",
  "singer": ...}`` or ``{"type": "pitch", "semitones": ...}`` at any time: they take effect at the next block;
- server -> client, text: ``{"type": "ready", "latency_ms": ..., "block_samples": ...}``;
- client -> server, binary: 8 bytes (float64 client timestamp, echoed back) + float32 mono PCM at ``sample_rate``,
  at most :data:`MAX_FRAME_S` of audio per frame;
- server -> client, binary: the echoed timestamp, float32 compute ms, float32 0, then the converted float32 PCM at
  ``sample_rate`` (one block per full block received).

A bad message closes that connection with a reason (1007 malformed data, 1008 policy, 1009 too big); the model runs
in a worker thread, one block at a time across clients, so other clients keep being served.
"""
from __future__ import annotations

import asyncio
import json
import math
import secrets
import struct
import threading

import numpy as np

from orchestration.studio.common import StudioError

MAX_FRAME_S = 2.0
SAMPLE_RATES = (8000, 192000)
BLOCK_CHOICES = (100, 150, 200, 250, 300, 400, 500)
HEADER = struct.Struct("<d")
REPLY_HEADER = struct.Struct("<dff")
CLOSE_INVALID, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_ERROR = 1007, 1008, 1009, 1011


class LiveProtocolError(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason[:120]  # a close reason must fit in 123 bytes


class LiveTab:
    """One per studio: a token for the socket, and the model lock shared by every live connection."""

    def __init__(self, converter_for):
        self.converter_for = converter_for  # () -> (Converter, model label); raises StudioError
        self.token = secrets.token_urlsafe(24)
        self._model_lock = threading.Lock()

    # ---- the page ---------------------------------------------------------------------------------------------
    def html(self) -> str:
        return f"""
<div id="svc-live" data-token="{self.token}">
  <div class="live-row">
    <label>Singer <select id="live-singer"></select></label>
    <label>Pitch shift <input id="live-pitch" type="number" value="0" min="-24" max="24" step="1" style="width:5em"></label>
    <label>Block <select id="live-block">{''.join(f'<option value="{b}"{" selected" if b == 250 else ""}>{b} ms</option>' for b in BLOCK_CHOICES)}</select></label>
    <button id="live-start" class="lg primary">Start</button>
    <button id="live-stop" class="lg secondary" disabled>Stop</button>
  </div>
  <div id="live-status">Press Start and allow the microphone. Use headphones: the converted voice plays back.</div>
  <div id="live-latency"></div>
</div>"""

    JS = r"""
const root = element.querySelector('#svc-live') || element;
const token = root.dataset.token;
const $ = (id) => root.querySelector('#' + id);
const state = window.svcLive = {received: [], sent: 0, rtts: [], computes: [], latency: null, error: null,
                                sampleRate: null, closed: null};
let ctx = null, ws = null, media = null, node = null, playhead = 0, pending = [], pendingLen = 0, blockSamples = 0;
const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/live/ws?token=' + token;
function status(text) { $('live-status').textContent = text; }
function hello() {
  const probe = new WebSocket(url);
  probe.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === 'hello') {
      $('live-singer').innerHTML = msg.singers.map((s) => `<option value="${s}">${s}</option>`).join('');
      status(`Model: ${msg.model}. Press Start and allow the microphone. Use headphones.`);
    } else if (msg.type === 'error') { status(msg.message); }
    probe.close();
  };
  probe.onclose = (ev) => { if (ev.code !== 1000 && ev.code !== 1005 && ev.reason) status(ev.reason); };
}
hello();
async function start() {
  $('live-start').disabled = true;
  try {
    ctx = new AudioContext();
    media = await navigator.mediaDevices.getUserMedia({audio: {echoCancellation: false, noiseSuppression: false,
                                                               autoGainControl: false, channelCount: 1}});
    const source = ctx.createMediaStreamSource(media);
    const code = `class SvcCapture extends AudioWorkletProcessor {
      process(inputs) { const ch = inputs[0][0]; if (ch) this.port.postMessage(ch.slice(0)); return true; } }
      registerProcessor('svc-capture', SvcCapture);`;
    await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([code], {type: 'application/javascript'})));
    node = new AudioWorkletNode(ctx, 'svc-capture');
    const mute = ctx.createGain(); mute.gain.value = 0;
    source.connect(node); node.connect(mute); mute.connect(ctx.destination);
    state.sampleRate = ctx.sampleRate;
    ws = new WebSocket(url); ws.binaryType = 'arraybuffer';
    ws.onmessage = (ev) => {
      if (typeof ev.data === 'string') {
        const msg = JSON.parse(ev.data);
        if (msg.type === 'ready') {
          blockSamples = msg.block_samples; state.latency = msg.latency_ms;
          status(`Streaming to ${msg.singer}: block ${msg.block_ms} ms, algorithmic latency ${msg.latency_ms} ms`);
        } else if (msg.type === 'hello') {
          ws.send(JSON.stringify({type: 'start', sample_rate: ctx.sampleRate, singer: $('live-singer').value,
                                  pitch_shift: Number($('live-pitch').value) || 0, block_ms: Number($('live-block').value)}));
        }
        return;
      }
      const view = new DataView(ev.data);
      const sentAt = view.getFloat64(0, true), compute = view.getFloat32(8, true);
      const pcm = new Float32Array(ev.data.slice(16));
      const rtt = performance.now() - sentAt;
      state.rtts.push(rtt); state.computes.push(compute);
      for (const v of pcm) state.received.push(v);
      const buf = ctx.createBuffer(1, pcm.length, ctx.sampleRate); buf.copyToChannel(pcm, 0);
      const play = ctx.createBufferSource(); play.buffer = buf; play.connect(ctx.destination);
      playhead = Math.max(playhead, ctx.currentTime + 0.02); play.start(playhead); playhead += buf.duration;
      const sorted = [...state.rtts].sort((a, b) => a - b);
      $('live-latency').textContent = `round trip ${rtt.toFixed(0)} ms (median ${sorted[Math.floor(sorted.length / 2)].toFixed(0)}), ` +
        `compute ${compute.toFixed(0)} ms per block, algorithmic latency ${state.latency} ms, ` +
        `total ≈ ${(state.latency + sorted[Math.floor(sorted.length / 2)]).toFixed(0)} ms`;
    };
    ws.onclose = (ev) => { state.closed = ev.reason || String(ev.code); if (ev.reason) status('Stopped: ' + ev.reason); stop(); };
    node.port.onmessage = (ev) => {
      if (!ws || ws.readyState !== WebSocket.OPEN || !blockSamples) return;
      pending.push(ev.data); pendingLen += ev.data.length;
      while (pendingLen >= blockSamples) {
        const frame = new ArrayBuffer(8 + 4 * blockSamples);
        new DataView(frame).setFloat64(0, performance.now(), true);
        const out = new Float32Array(frame, 8); let filled = 0;
        while (filled < blockSamples) {
          const head = pending[0], take = Math.min(head.length, blockSamples - filled);
          out.set(head.subarray(0, take), filled); filled += take;
          if (take === head.length) pending.shift(); else pending[0] = head.subarray(take);
        }
        pendingLen -= blockSamples; ws.send(frame); state.sent += 1;
      }
    };
    $('live-stop').disabled = false;
  } catch (err) {
    state.error = String(err); status('Cannot start: ' + err); $('live-start').disabled = false;
  }
}
function stop() {
  if (ws && ws.readyState === WebSocket.OPEN) ws.close(1000, 'stopped');
  if (media) media.getTracks().forEach((t) => t.stop());
  if (node) node.disconnect();
  ws = null; media = null; node = null; pending = []; pendingLen = 0; blockSamples = 0;
  $('live-start').disabled = false; $('live-stop').disabled = true;
}
$('live-start').addEventListener('click', start);
$('live-stop').addEventListener('click', stop);
$('live-pitch').addEventListener('change', () => { if (ws && ws.readyState === WebSocket.OPEN)
  ws.send(JSON.stringify({type: 'pitch', semitones: Number($('live-pitch').value) || 0})); });
$('live-singer').addEventListener('change', () => { if (ws && ws.readyState === WebSocket.OPEN)
  ws.send(JSON.stringify({type: 'target', singer: $('live-singer').value})); });
"""

    def build(self, gr) -> None:
        """The tab's body (inside ``gr.Tab``)."""
        gr.Markdown("Sing into the microphone and hear the production model's singer. The page streams the "
                    "microphone to the server and plays the converted blocks back as they arrive.")
        gr.HTML(self.html(), js_on_load=self.JS, elem_id="live-panel")

    # ---- the socket -------------------------------------------------------------------------------------------
    def route(self):
        """A Starlette WebSocket route for ``/live/ws``."""
        from starlette.routing import WebSocketRoute

        return WebSocketRoute("/live/ws", self.handle)

    async def handle(self, websocket) -> None:
        if not secrets.compare_digest(websocket.query_params.get("token", ""), self.token):
            await websocket.close(code=CLOSE_POLICY, reason="missing or wrong token: open the studio page")
            return
        await websocket.accept()
        try:
            converter, label = await asyncio.to_thread(self.converter_for)
        except StudioError as exc:
            await websocket.send_text(json.dumps({"type": "error", "message": str(exc)}))
            await websocket.close(code=CLOSE_ERROR, reason=str(exc)[:120])
            return
        await websocket.send_text(json.dumps({"type": "hello", "singers": sorted(converter.singers), "model": label}))
        session = None
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    started = session is None  # _control refuses anything but "start" before a session exists
                    session = self._control(converter, session, message["text"])
                    if started:
                        await websocket.send_text(json.dumps(session["ready"]))
                    continue
                data = message.get("bytes") or b""
                reply = await asyncio.to_thread(self._block, session, data)
                await websocket.send_bytes(reply)
        except LiveProtocolError as exc:
            await websocket.close(code=exc.code, reason=exc.reason)
        except Exception as exc:  # the model failed: tell this client, keep the server up
            await websocket.close(code=CLOSE_ERROR, reason=f"conversion failed: {exc}"[:120])

    def _control(self, converter, session, text: str):
        from svc_model.streaming import BlockResampler, StreamConfig, StreamingConverter

        try:
            msg = json.loads(text)
            kind = msg["type"]
        except (ValueError, KeyError, TypeError):
            raise LiveProtocolError(CLOSE_INVALID, "control messages must be JSON objects with a 'type'") from None
        try:
            if kind == "start":
                if session is not None:
                    raise LiveProtocolError(CLOSE_POLICY, "already started")
                rate = msg.get("sample_rate")
                if not isinstance(rate, (int, float)) or not SAMPLE_RATES[0] <= rate <= SAMPLE_RATES[1] \
                        or rate != int(rate):
                    raise LiveProtocolError(CLOSE_INVALID, f"sample_rate must be an integer from {SAMPLE_RATES[0]} "
                                                           f"to {SAMPLE_RATES[1]} Hz, got {rate!r}")
                block_ms = msg.get("block_ms", 250)
                if block_ms not in BLOCK_CHOICES:
                    raise LiveProtocolError(CLOSE_INVALID, f"block_ms must be one of {BLOCK_CHOICES}, got {block_ms!r}")
                streamer = StreamingConverter(converter, msg.get("singer"), float(msg.get("pitch_shift") or 0),
                                              StreamConfig(block_ms=block_ms, gate_db=msg.get("gate_db")),
                                              input_sr=int(rate))
                ready = {"type": "ready", "latency_ms": streamer.cfg.latency_ms, "block_ms": block_ms,
                         "block_samples": streamer.block_samples, "singer": streamer.target.name,
                         "sample_rate": int(rate)}
                back = BlockResampler(streamer.sr, int(rate)) if streamer.sr != int(rate) else None
                return {"streamer": streamer, "back": back, "ready": ready}
            if session is None:
                raise LiveProtocolError(CLOSE_POLICY, "send a start message first")
            if kind == "target":
                session["streamer"].set_target(msg.get("singer"))
            elif kind == "pitch":
                session["streamer"].set_pitch_shift(msg.get("semitones"))
            else:
                raise LiveProtocolError(CLOSE_INVALID, f"unknown message type {kind!r}")
            return session
        except (ValueError, TypeError) as exc:  # unknown singer, pitch out of range
            raise LiveProtocolError(CLOSE_INVALID, str(exc)) from None

    def _block(self, session, data: bytes) -> bytes:
        import time

        if session is None:
            raise LiveProtocolError(CLOSE_POLICY, "send a start message first")
        if len(data) < HEADER.size or (len(data) - HEADER.size) % 4:
            raise LiveProtocolError(CLOSE_INVALID, "malformed audio frame: 8-byte timestamp + float32 samples")
        streamer = session["streamer"]
        n = (len(data) - HEADER.size) // 4
        if n > MAX_FRAME_S * streamer.input_sr:
            raise LiveProtocolError(CLOSE_TOO_BIG, f"audio frame of {n} samples is over {MAX_FRAME_S:g} s")
        (sent_at,) = HEADER.unpack_from(data)
        x = np.frombuffer(data, dtype="<f4", offset=HEADER.size)
        if not np.isfinite(x).all() or not math.isfinite(sent_at):
            raise LiveProtocolError(CLOSE_INVALID, "audio frame contains NaN or inf")
        started = time.perf_counter()
        with self._model_lock:
            y = streamer.process(x)
        if session["back"] is not None:
            y = session["back"](y)
        compute_ms = (time.perf_counter() - started) * 1000
        return REPLY_HEADER.pack(sent_at, compute_ms, 0.0) + np.asarray(y, "<f4").tobytes()
