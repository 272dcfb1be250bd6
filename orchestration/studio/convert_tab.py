"""The Convert tab: pick a model version and a target (a singer, a reference recording, a blend), convert."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from assets.workspace import Workspace
from orchestration.service import MAX_PITCH_SHIFT, check_pitch_shift
from orchestration.studio.common import Progress, StudioError, check_audio, no_progress, slug

TARGET_KINDS = ("Singer", "Reference recording", "Blend")
BLEND_SLOTS = 3


@dataclass
class Conversion:
    audio_path: Path  # the converted audio, under outputs/studio
    f0: pd.DataFrame  # seconds, f0_hz (NaN where unvoiced), curve
    summary: str  # markdown: model, target, shift, timing


class ConvertTab:
    """Conversion with any registered version; converters are loaded once per version and kept."""

    def __init__(self, ws: Workspace, max_upload_s: float):
        self.ws = ws
        self.max_upload_s = max_upload_s
        self._converters: dict[str, object] = {}  # model version -> Converter (model and extractors loaded once)
        self._lock = threading.Lock()  # page events run on worker threads

    def model_choices(self) -> list[tuple[str, str]]:
        """``(label, value)`` for the model picker: the aliases first, then every registered version."""
        from assets import tracking

        versions = tracking.model_versions(self.ws)
        choices = []
        for alias in (tracking.PRODUCTION, tracking.CANDIDATE):
            found = [v for v in versions if alias in (getattr(v, "aliases", None) or [])]
            if found:
                choices.append((f"{alias} (version {found[0].version})", alias))
        return choices + [(f"version {v.version}", str(v.version)) for v in reversed(versions)]

    def _model_version(self, model: str):
        """The registered version ``model`` (an alias or a version number) names, via the one resolver."""
        from assets import tracking

        name = self.ws.settings.registered_model_name
        try:
            return tracking.resolve_model(self.ws, model)
        except tracking.ModelNotFoundError as exc:
            if exc.alias:
                raise StudioError(f"No version of the model {name!r} is {model!r} yet: train one in the Train tab "
                                  f"and promote it.") from None
            raise StudioError(f"The model {name!r} has no version {model!r}.") from None

    def converter(self, model: str = "production"):
        """The converter for ``model`` (an alias or a version number) and a label naming the version."""
        from svc_model.infer import Converter

        found = self._model_version(model)
        mv = found.version
        with self._lock:
            if mv.version not in self._converters:
                self._converters[mv.version] = Converter.from_checkpoint(found.path, root=self.ws.root)
        alias = f" ({model})" if not str(model).isdigit() else ""
        return self._converters[mv.version], f"{self.ws.settings.registered_model_name} version {mv.version}{alias}"

    def describe_model(self, model: str = "production") -> tuple[str, list[str]]:
        """Markdown naming the model version, and the singers it knows; a missing model is a message, not an error."""
        try:
            converter, label = self.converter(model)
        except StudioError as exc:
            return str(exc), []
        singers = sorted(converter.singers)
        return f"Model: **{label}**, singers: {', '.join(singers) or 'none'}", singers

    def _target(self, kind: str, singer: str | None, reference: str | Path | None,
                blend: Iterable[tuple[str | None, float]]):
        if kind == "Singer":
            if not singer:
                raise StudioError("Pick a target singer.")
            return singer
        if kind == "Reference recording":
            return str(check_audio(self.ws, reference, "the reference recording", self.max_upload_s))
        if kind == "Blend":
            weights: dict[str, float] = {}
            for name, weight in blend:
                if name:  # the same singer in two slots adds up
                    weights[name] = weights.get(name, 0.0) + float(weight or 0.0)
            if not weights:
                raise StudioError("Pick at least one singer for the blend.")
            return weights
        raise StudioError(f"Unknown target kind {kind!r}; choose one of {', '.join(TARGET_KINDS)}.")

    def convert(self, source: str | Path | None, *, model: str = "production", target_kind: str = "Singer",
                singer: str | None = None, reference: str | Path | None = None,
                blend: Iterable[tuple[str | None, float]] = (), pitch_shift: float | str = 0,
                progress: Progress = no_progress) -> Conversion:
        """Convert ``source`` into a singer, a reference recording's voice or a blend; writes outputs/studio/."""
        from svc_model.audio import AudioError, resample, write_audio
        from svc_model.storage import claim_new_path

        source = check_audio(self.ws, source, "the source", self.max_upload_s)
        try:
            pitch_shift = check_pitch_shift(pitch_shift)
        except ValueError:
            raise StudioError(f"Pitch shift must be 'auto' or -{MAX_PITCH_SHIFT}..{MAX_PITCH_SHIFT} semitones, "
                              f"got {pitch_shift!r}.") from None
        target = self._target(target_kind, singer, reference, blend)
        progress(0.0, "loading the model")
        converter, label = self.converter(model)
        try:
            result = converter.convert(str(source), target, pitch_shift, progress=lambda done, total: progress(
                done / total, f"converting piece {done}/{total}"))
        except AudioError as exc:
            raise StudioError(f"{Path(exc.path).name}: {exc.problem}") from None
        except (ValueError, FileNotFoundError) as exc:
            raise StudioError(str(exc)) from None
        progress(1.0, "measuring the output's pitch")
        # Browser recordings all share a name: two conversions in the same second must not share an output.
        out = claim_new_path(self.ws.outputs_dir / "studio"
                             / f"{slug(source.stem)}-to-{slug(result.target)}-{time.strftime('%Y%m%d-%H%M%S')}.wav")
        try:
            write_audio(out, result.audio, result.sample_rate)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        # The output's own f0, measured as the source's was: how well the model followed the requested pitch.
        measured = converter.extractor("pitch").extract(resample(result.audio, result.sample_rate, 16000))[:, 0]
        curves = {"source": result.source_f0, "output": measured}
        voiced = result.source_f0 > 0
        followed = float((measured[: len(voiced)] > 0)[voiced[: len(measured)]].mean()) if voiced.any() else 0.0
        if result.pitch_shift:
            curves[f"requested ({result.pitch_shift:+.0f} st)"] = result.output_f0
        f0 = pd.concat([pd.DataFrame({"seconds": pd.RangeIndex(len(v)) / 100, "f0_hz": pd.Series(v).where(v > 0),
                                      "curve": name}) for name, v in curves.items()], ignore_index=True)
        summary = (f"Converted **{source.name}** into **{result.target}** with **{label}**: pitch shift "
                   f"{result.pitch_shift:+.0f} semitones, {len(result.audio) / result.sample_rate:.1f} s of audio in "
                   f"{result.chunks} piece(s), {result.seconds:.1f} s; the output is voiced in {followed:.0%} of the "
                   f"source's voiced frames. Saved as `{self.ws.relative(out)}`.")
        return Conversion(out, f0, summary)


def f0_figure(f0: pd.DataFrame):
    """Source against output f0; unvoiced frames are gaps (a line plot would join them)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3), layout="constrained")
    ax = fig.add_subplot()
    for name, curve in f0.groupby("curve", sort=False):
        ax.plot(curve["seconds"], curve["f0_hz"], label=name, linestyle="--" if name.startswith("requested") else "-",
                linewidth=1.2)
    ax.set_title("f0: source against output", fontsize=10)
    ax.set_xlabel("seconds")
    ax.set_ylabel("f0 (Hz)")
    ax.legend(fontsize=8, loc="upper right")
    return fig
