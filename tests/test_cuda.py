"""The CUDA training path: runs where a GPU is present, skipped with the reason elsewhere (CI has none)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from svc_model.config import load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the GPU training path was not exercised")


def _cfg(**loss_weights):
    cfg = load_config("tiny")
    train = cfg.train.model_copy(update={
        "fp16": True, "loss_weights": cfg.train.loss_weights.model_copy(update=loss_weights)})
    return cfg.model_copy(update={"train": train})


def test_training_steps_on_cuda_with_mixed_precision_and_the_output_similarity_loss(tiny_manifest, tmp_path):
    # Fails if an RNN backward runs in eval mode (cuDNN refuses it), if autocast produces non-finite losses, or if
    # a loss tensor ends up on the wrong device.
    from svc_model.train import Trainer

    trainer = Trainer(_cfg(output_similarity=1.0), tiny_manifest, tmp_path, device="cuda", log=lambda _: None,
                      tensorboard=False)
    assert trainer.amp and trainer.amp_dtype in (torch.bfloat16, torch.float16)
    result = trainer.fit(steps=3)
    assert result.step == 3 and len(result.history) == 3
    assert all(np.isfinite(v) for h in result.history for v in h.values())
    assert "output_similarity" in result.history[-1]
