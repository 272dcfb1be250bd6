"""Training on a workspace: the manifest of every singer's segments and features, and a run folder."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from assets.workspace import Workspace

FEATURE_ASSETS = ("pitch", "ppg", "vec", "speaker_embedding")


def training_manifest(ws: Workspace, singers: list[str] | None = None) -> pd.DataFrame:
    """One row per segment of every (or the given) singer, with absolute feature paths and a stable split."""
    from svc_model.data import join_singer

    cfg = ws.config()
    singers = ws.singers() if singers is None else singers
    if not singers:
        raise ValueError(f"{ws.root}: no singers yet; add one with `svc add-singer NAME FILES...`")
    frames = []
    for singer in singers:
        dirs = {a: ws.partition_dir(a, singer) for a in ("clean_audio", *FEATURE_ASSETS)}
        missing = [a for a, d in dirs.items() if not (d / "manifest.parquet").is_file()]
        if missing:
            raise ValueError(f"singer {singer!r} has no {', '.join(missing)} yet; run `svc -C {ws.root} build`")
        frames.append(join_singer(singer, dirs["clean_audio"], {a: dirs[a] for a in FEATURE_ASSETS},
                                  cfg.train.valid_fraction))
    return pd.concat(frames, ignore_index=True)


def train_workspace(ws: Workspace, *, name: str = "default", steps: int | None = None,
                    init_from: str | Path | None = None, fresh: bool = False, device: str = "auto",
                    singers: list[str] | None = None, log=print):
    """Train on the workspace's features in ``runs/<name>`` (resuming what is there unless ``fresh``)."""
    import shutil

    from svc_model.train import Trainer

    run_dir = ws.runs_dir / name
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    manifest = training_manifest(ws, singers)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(run_dir / "manifest.parquet", index=False)
    counts = manifest["split"].value_counts().to_dict()
    log(f"training on {manifest['singer'].nunique()} singer(s): {counts.get('train', 0)} train / "
        f"{counts.get('valid', 0)} valid segments, {manifest['duration_s'].sum() / 60:.1f} min; run {run_dir}")
    trainer = Trainer(ws.config(), manifest, run_dir, device=device, init_from=init_from, log=log)
    try:
        result = trainer.fit(steps)
    finally:
        trainer.close()
    if result.history:
        first, last = result.history[0], result.history[-1]
        log(f"mel loss {first['mel']:.3f} -> {last['mel']:.3f} over {len(result.history)} steps "
            f"({result.seconds / len(result.history):.2f} s/step)")
    return result, run_dir
