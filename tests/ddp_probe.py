"""Run by tests/test_distributed.py, under torchrun or as one plain process: train a few steps with the project's
Trainer and save every rank's weights after every step (``<out>/rank<r>-step<s>.pt``), so the test can compare the
ranks with each other and with a single process. Usage: ddp_probe.py CONFIG.json MANIFEST.parquet OUT STEPS"""
import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch

from svc_model.config import SVCConfig
from svc_model.train import Trainer


def main() -> None:
    config, manifest, out, steps = sys.argv[1:5]
    out = Path(out)
    rank = int(os.environ.get("RANK", 0))
    cfg = SVCConfig.model_validate(json.loads(Path(config).read_text()))
    trainer = Trainer(cfg, pd.read_parquet(manifest), out / "run", device="cpu", tensorboard=False,
                      log=lambda _: None)
    step = trainer.train_step

    def save(items: torch.Tensor) -> None:
        weights = {**{f"g.{k}": v for k, v in trainer.generator.state_dict().items()},
                   **{f"d.{k}": v for k, v in trainer.discriminator.state_dict().items()},
                   "items": items}
        torch.save(weights, out / f"rank{rank}-step{trainer.step}.pt")

    def step_and_save(batch):
        result = step(batch)
        save(batch["seeds"])
        return result

    save(torch.zeros(0, dtype=torch.long))  # the starting weights, to measure how far each step moves them

    trainer.train_step = step_and_save
    trainer.fit(int(steps))
    trainer.close()


if __name__ == "__main__":
    main()
