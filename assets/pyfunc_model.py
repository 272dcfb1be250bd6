"""The MLflow pyfunc that conversion loads: ``models:/svc@production`` -> something that converts audio.

Logged as "models from code" (this file is stored with the model and executed on load), so no pickled Python
object is ever loaded. The weights, config and singer table travel as the ``checkpoint`` artifact.

``predict`` takes a DataFrame with columns ``source`` (audio path), ``target`` (a singer name, a reference
recording path, or a JSON blend such as ``{"alice": 0.7, "bob": 0.3}``), ``output`` (path to write) and optional
``pitch_shift`` (semitones or "auto"); it returns one row per input with the written path and what was applied.
"""
from __future__ import annotations

import json

import pandas as pd

import mlflow


class SVCModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from svc_model.infer import Converter

        self.converter = Converter.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from svc_model.audio import write_audio

        rows = []
        for record in model_input.to_dict("records"):
            target = record["target"]
            if isinstance(target, str) and target.strip().startswith("{"):
                target = json.loads(target)
            shift = record.get("pitch_shift", 0)
            shift = 0 if shift is None or (isinstance(shift, float) and shift != shift) else shift
            result = self.converter.convert(record["source"], target, shift)
            write_audio(record["output"], result.audio, result.sample_rate)
            rows.append({"output": record["output"], "target": result.target, "pitch_shift": result.pitch_shift,
                         "seconds": len(result.audio) / result.sample_rate})
        return pd.DataFrame(rows)


mlflow.models.set_model(SVCModel())
