"""The studio's page: the Gradio layout of the three tabs wired to their classes, and serving it.

Serving: bound to anything but loopback, the studio needs credentials (``svc studio --auth USER:PASS`` or
``SVC_STUDIO_AUTH``); with them Gradio's login guards the page and every API route. Uploads are limited in bytes by
Gradio (``max_file_size``: cut off as they arrive), and in length from the file's header before they are decoded
(:func:`orchestration.studio.common.check_audio`). Promotion and training are done on behalf of the signed-in user
(``local`` without --auth), who is recorded on the MLflow run or version and in ``logs/audit.log``.
"""
import functools
import ipaddress
import logging
import os
import sys

import gradio as gr

from orchestration.service import LOCAL_USER, MAX_PITCH_SHIFT, audit_log
from orchestration.studio import Studio
from orchestration.studio.common import StudioError
from orchestration.studio.convert_tab import BLEND_SLOTS, TARGET_KINDS, f0_figure
from orchestration.studio.train_tab import FINE_TUNE, FROM_SCRATCH, TrainingView

log = logging.getLogger(__name__)

AUTH_ENV = "SVC_STUDIO_AUTH"


class StudioAuthError(ValueError):
    """The studio was asked to serve a network without credentials, or the credentials are malformed."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only. Names other than ``localhost`` count as the network:
    what they resolve to can change."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None, host: str) -> tuple[str, str] | None:
    """``USER:PASS`` -> ``(user, password)``; ``None`` on loopback without credentials. Raises
    :class:`StudioAuthError` for malformed credentials, or none where the host is not loopback."""
    if not text:
        if is_loopback(host):
            return None
        raise StudioAuthError(
            f"refusing to serve the studio on {host!r} without authentication: anyone who reaches the port could "
            f"add singers, start training and promote to production. Give --auth USER:PASS (or set {AUTH_ENV}="
            f"USER:PASS, which keeps the password out of the process list), or bind to 127.0.0.1.")
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise StudioAuthError(f"--auth / {AUTH_ENV} must be USER:PASS with a non-empty user and password")
    return user.strip(), password


def user_of(request: gr.Request | None) -> str:
    """Who sent a page event: the signed-in user, or ``local`` when the studio has no login (loopback only)."""
    return (request.username if request is not None else None) or LOCAL_USER


def _progress_html(view: TrainingView) -> str:
    if not view.steps or view.state == "none":
        return ""
    return f"<progress value='{view.step}' max='{view.steps}' style='width:100%'></progress>"


def build_app(studio: Studio):
    """The Gradio layout: three tabs wired to the tab classes."""

    def on(trigger, fn, inputs, outputs, message, **event_options):
        """Run ``fn`` on ``trigger``. A StudioError (or an unexpected error, whose trace goes to the terminal) is
        shown in the ``message`` output; the other outputs keep what they show."""
        at = outputs.index(message)

        @functools.wraps(fn)  # Gradio reads fn's signature for its gr.Progress and gr.Request arguments
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except StudioError as exc:
                text = f"**Error:** {exc}"
            except Exception as exc:
                log.exception("studio: %s failed", fn.__name__)
                text = (f"**Unexpected error** ({type(exc).__name__}): {exc}. The details are in the terminal "
                        f"running `svc studio`.")
            return tuple(text if i == at else gr.skip() for i in range(len(outputs)))

        return trigger(guarded, inputs, outputs, **event_options)

    ws = studio.ws
    converting, singers_tab, training = studio.convert_tab, studio.singers_tab, studio.train_tab
    with gr.Blocks(title="VoiceCraft SVC studio", analytics_enabled=False) as app:
        gr.Markdown(f"# VoiceCraft SVC studio\nWorkspace `{ws.root}`")
        page_message = gr.Markdown()
        with gr.Tab("Convert", id="convert"):
            with gr.Row():
                with gr.Column():
                    source = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Source: upload or record",
                                      elem_id="source")
                    model = gr.Dropdown([("production", "production")], value="production", label="Model",
                                        elem_id="model")
                    model_note = gr.Markdown()
                    target_kind = gr.Radio(list(TARGET_KINDS), value="Singer", label="Target")
                    singer = gr.Dropdown(label="Singer", elem_id="singer")
                    reference = gr.Audio(sources=["upload", "microphone"], type="filepath", visible=False,
                                         label="Reference recording: sound like me")
                    with gr.Group(visible=False) as blend_group:
                        blend_names, blend_weights = [], []
                        for i in range(BLEND_SLOTS):
                            with gr.Row():
                                blend_names.append(gr.Dropdown(label=f"Singer {i + 1}"))
                                blend_weights.append(gr.Slider(0, 1, value=0.5 if i < 2 else 0.0, step=0.05,
                                                               label="Weight"))
                    auto_pitch = gr.Checkbox(label="Auto pitch: move to the target's median pitch", value=False)
                    semitones = gr.Slider(-MAX_PITCH_SHIFT, MAX_PITCH_SHIFT, value=0, step=1,
                                          label="Pitch shift (semitones)")
                    convert_button = gr.Button("Convert", variant="primary", elem_id="convert")
                with gr.Column():
                    output = gr.Audio(label="Converted", type="filepath", interactive=False, elem_id="output")
                    summary = gr.Markdown(elem_id="summary")
                    f0_plot = gr.Plot(label="f0", show_label=False)

        with gr.Tab("Singers", id="singers"):
            singer_table = gr.Dataframe(label="Singers", interactive=False)
            singers_note = gr.Markdown()
            with gr.Group():
                gr.Markdown("### Add a singer\nThe same path as `svc add-singer`: the recordings are validated, "
                            "versioned with DVC and registered in Dagster, then the singer's assets are built.")
                new_name = gr.Textbox(label="Name", placeholder="letters, digits, - and _", elem_id="new-name")
                new_files = gr.File(label="Recordings", file_count="multiple", type="filepath", elem_id="new-files")
                new_recording = gr.Audio(sources=["microphone"], type="filepath", label="Or record one")
                add_button = gr.Button("Add singer", variant="primary")
            add_result = gr.Markdown(elem_id="add-result")

        with gr.Tab("Train", id="train"):
            gr.Markdown("Each training is one Dagster run (training set, checkpoint in MLflow, evaluation) on this "
                        f"workspace's instance. {training.tensorboard_link()}")
            with gr.Row():
                mode = gr.Radio([FINE_TUNE, FROM_SCRATCH], value=FINE_TUNE, label="Start from")
                steps = gr.Number(label="Steps", value=ws.config().train.steps, precision=0, minimum=1,
                                  elem_id="steps")
                device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device", elem_id="device")
                nproc = gr.Number(label="Processes (one per GPU)", value=1, precision=0, minimum=1, elem_id="nproc")
            launch_button = gr.Button("Launch training", variant="primary", elem_id="launch")
            train_message = gr.Markdown(elem_id="train-message")
            train_status = gr.Markdown(elem_id="train-status")
            train_progress = gr.HTML()
            train_links = gr.Markdown()
            loss_plot = gr.LinePlot(x="step", y="value", color="loss", title="Training losses", height=280)
            with gr.Group(visible=False) as promote_group:
                with gr.Row():
                    force = gr.Checkbox(label="Force (--force): despite a failing or worse evaluation", value=False,
                                        elem_id="force")
                    reason = gr.Textbox(label="Reason (--reason), recorded on the version", elem_id="reason")
                promote_button = gr.Button("Promote to production", variant="primary", elem_id="promote")
            evaluation = gr.Markdown(elem_id="evaluation")
            metrics = gr.Dataframe(label="Evaluation metrics (metrics.json)", interactive=False, elem_id="metrics")
            figures = gr.Gallery(label="Evaluation figures", columns=2, height="auto")
            # The version the promote button acts on: a hidden field rather than session state, so that the API
            # (`/gradio_api/call/promote`) names it as the page does.
            version_state = gr.Textbox(visible=False)
            timer = gr.Timer(2.0, active=False)

        # ---- Convert
        def model_changed(chosen):
            note, names = converting.describe_model(chosen or "production")
            first = names[0] if names else None
            second = names[1] if len(names) > 1 else None
            return (note, gr.Dropdown(choices=names, value=first),
                    *[gr.Dropdown(choices=names, value=v) for v in (first, second, *[None] * (BLEND_SLOTS - 2))])

        model_outputs = [model_note, singer, *blend_names]
        on(model.change, model_changed, model, model_outputs, model_note)

        def kind_changed(kind):
            return (gr.Dropdown(visible=kind == "Singer"), gr.Audio(visible=kind == "Reference recording"),
                    gr.Group(visible=kind == "Blend"))

        target_kind.change(kind_changed, target_kind, [singer, reference, blend_group])
        auto_pitch.change(lambda auto: gr.Slider(interactive=not auto), auto_pitch, semitones)

        def convert(source, model, kind, singer, reference, auto, shift, *blend, progress=gr.Progress()):
            done = converting.convert(source, model=model or "production", target_kind=kind, singer=singer,
                                      reference=reference, blend=zip(blend[:BLEND_SLOTS], blend[BLEND_SLOTS:]),
                                      pitch_shift="auto" if auto else shift,
                                      progress=lambda fraction, desc: progress(fraction, desc=desc))
            return str(done.audio_path), done.summary, f0_figure(done.f0)

        on(convert_button.click, convert, [source, model, target_kind, singer, reference, auto_pitch, semitones,
                                           *blend_names, *blend_weights], [output, summary, f0_plot], summary,
           api_name="convert")

        # ---- Singers
        def add(name, files, recording, progress=gr.Progress()):
            message = singers_tab.add_singer(name, files, recording,
                                             progress=lambda fraction, desc: progress(fraction, desc=desc))
            return (message, *singers_tab.overview(), gr.Textbox(value=""), gr.File(value=None),
                    gr.Audio(value=None))

        on(add_button.click, add, [new_name, new_files, new_recording],
           [add_result, singer_table, singers_note, new_name, new_files, new_recording], add_result,
           api_name="add_singer")

        # ---- Train
        def show_training():
            view = training.view()
            return (view.status, _progress_html(view), view.links, view.losses, gr.Group(visible=view.promotable),
                    view.evaluation, view.metrics, [str(p) for p in view.figures], view.version,
                    gr.Timer(active=view.active))

        training_outputs = [train_status, train_progress, train_links, loss_plot, promote_group, evaluation, metrics,
                            figures, version_state, timer]

        def launch(mode, steps, device, processes, request: gr.Request):
            training.launch_training(mode, steps, device, processes, user=user_of(request))
            return "", *show_training()

        on(launch_button.click, launch, [mode, steps, device, nproc], [train_message, *training_outputs],
           train_message,
           api_name="launch_training")
        on(timer.tick, show_training, None, training_outputs, train_status)

        def load_models():
            """The model picker, on production (as `svc convert` defaults to)."""
            return gr.Dropdown(choices=converting.model_choices() or [("none registered yet", "production")],
                               value="production")

        def promote(version, force, reason, request: gr.Request):
            message = training.promote(version, force, reason, user=user_of(request))
            return message, load_models(), *show_training()

        on(promote_button.click, promote, [version_state, force, reason], [train_message, model, *training_outputs],
           train_message, api_name="promote")

        # ---- on page load: what the workspace holds now
        def load_page():
            return "", load_models(), *singers_tab.overview(), *show_training()

        loaded = on(app.load, load_page, None, [page_message, model, singer_table, singers_note, *training_outputs],
                    page_message)
        on(loaded.then, model_changed, model, model_outputs, model_note)
        with gr.Tab("Live", id="live"):
            studio.live_tab.build(gr)
    return app


def _audit_to_terminal_and_file(studio: Studio) -> None:
    """The audit log's lines go to the terminal and to logs/audit.log in the workspace (appended)."""
    audit_log.setLevel(logging.INFO)
    audit_log.propagate = False
    path = studio.ws.root / "logs" / "audit.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s audit %(message)s")
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(path)):
        handler.setFormatter(formatter)
        audit_log.addHandler(handler)


def serve(studio: Studio, *, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
          max_file_size: int | None = None, block: bool = True):
    """Run the studio until interrupted. ``auth``: ``(user, password)``, required unless ``host`` is loopback;
    ``max_file_size``: bytes per uploaded file; Gradio cuts a bigger upload off as it arrives. ``block=False``
    returns the running app (tests). The Live tab's WebSocket (``/live/ws``) is routed before Gradio's own."""
    if auth is None and not is_loopback(host):
        raise StudioAuthError(f"refusing to serve the studio on {host!r} without authentication")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the studio works offline
    _audit_to_terminal_and_file(studio)
    app = build_app(studio)
    # Gradio serves only files under allowed paths: the conversions and the evaluation report's figures.
    app.queue().launch(server_name=host, server_port=port, show_error=False, ssr_mode=False,
                       auth=[auth] if auth else None, max_file_size=max_file_size,
                       allowed_paths=[str(studio.ws.outputs_dir), str(studio.ws.asset_dir("evaluation_report"))],
                       app_kwargs={"routes": [studio.live_tab.route()]}, prevent_thread_lock=not block)
    return app
