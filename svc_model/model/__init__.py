"""The VITS-style SVC model: encoders, flow, NSF decoder, discriminators, losses."""
from svc_model.model.synthesizer import SVCModel, TrainOutput, count_parameters

__all__ = ["SVCModel", "TrainOutput", "count_parameters"]
