"""Training on a workspace: the manifest of every singer's segments and features, and the run folders.

A tracked training run (the ``svc_checkpoint`` asset) trains in ``runs/dagster-<key>``, where the key is a hash of
what defines the training (:func:`training_definition`): the same definition re-run after a kill finds its folder
and resumes from the last good checkpoint; a folder is *complete* once its model is registered, and a complete
folder is never resumed (training the same definition again starts ``runs/dagster-<key>-2``). Completed folders
beyond the newest ``train.keep_runs`` of a registered model are pruned (:func:`prune_run_folders`); incomplete ones
are kept for resume.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from assets.workspace import Workspace
from svc_model.storage import TEMP_MARK, atomic_path, atomic_write_text

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
    with atomic_path(run_dir / "manifest.parquet") as tmp:
        manifest.to_parquet(tmp, index=False)
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


# ---- tracked run folders ---------------------------------------------------------------------------------------
RUN_FOLDER_PREFIX = "dagster-"
RUN_RECORD = "run.json"  # what the folder trains, its attempts, and whether its model is registered
LOCK_FILE = "train.lock"
PATH_COLUMNS = ("audio", "pitch", "ppg", "vec", "speaker")  # the manifest's file columns (as assets.training)
# Settings that change no trained weight: editing them between a kill and the re-run still resumes.
UNKEYED_SETTINGS = (("train", "keep_checkpoints"), ("train", "keep_runs"), ("train", "log_every"),
                    ("evaluation",))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def training_definition(ws: Workspace, manifest: pd.DataFrame, cfg, start_label: str, steps: int) -> dict:
    """What a tracked training run trains on and how, as comparable strings.

    ``manifest`` is the training set as stored (workspace-relative paths). Besides its rows, the feature files it
    names count by size and modification time (re-extracted features, even with the same paths, are other data),
    and each singer's DVC md5. Then the config (less :data:`UNKEYED_SETTINGS`), the start point (``scratch``,
    ``production:v3``...) and the total steps.
    """
    files = []
    for column in PATH_COLUMNS:
        for rel in manifest[column]:
            try:
                st = ws.resolve(rel).stat()
                files.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}")
            except OSError:
                files.append(f"{rel}\tmissing")
    config = cfg.model_dump(mode="json")
    for keys in UNKEYED_SETTINGS:
        parent = config
        for key in keys[:-1]:
            parent = parent.get(key, {})
        parent.pop(keys[-1], None)
    singers = sorted(str(s) for s in manifest["singer"].unique())
    return {
        "training_set": _sha256(manifest.to_csv(index=False)),
        "feature_files": _sha256("\n".join(sorted(files))),
        "data_versions": {s: ws.singer_data_version(s) or "" for s in singers},
        "config": _sha256(json.dumps(config, sort_keys=True)),
        "start": start_label,
        "steps": int(steps),
    }


def training_key(definition: dict) -> str:
    return _sha256(json.dumps(definition, sort_keys=True))[:16]


def read_run_record(folder: Path) -> dict | None:
    """A run folder's ``run.json``, or ``None`` if it has none or it cannot be read (then the folder is neither
    resumed nor pruned: it is not known what it holds)."""
    try:
        record = json.loads((folder / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "key" in record else None


@dataclass
class RunFolder:
    """One tracked training: its folder under ``runs/`` and its record."""

    path: Path
    record: dict

    @property
    def complete(self) -> bool:
        return bool(self.record.get("complete"))

    @property
    def attempts(self) -> list[dict]:
        return self.record.setdefault("attempts", [])

    def save(self) -> None:
        atomic_write_text(self.path / RUN_RECORD, json.dumps(self.record, indent=2) + "\n")

    def add_attempt(self, **attempt) -> None:
        self.attempts.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **attempt})
        self.save()

    def mark_complete(self, model_version: str) -> None:
        self.record.update(complete=True, model_version=str(model_version),
                           completed=time.strftime("%Y-%m-%dT%H:%M:%S%z"), completed_ns=time.time_ns())
        self.save()


def run_folder_for(ws: Workspace, definition: dict, registered_model: str,
                   is_registered=lambda record: None) -> RunFolder:
    """The folder to train ``definition`` in: its newest incomplete folder (to resume), else a new one.

    ``is_registered(record)`` gives the registered version of a record's model if it reached the registry after
    all (a kill between registering and writing the record): such a folder is marked complete here, not resumed.
    """
    key = training_key(definition)
    name = RUN_FOLDER_PREFIX + key
    n = 1
    while True:
        path = ws.runs_dir / (name if n == 1 else f"{name}-{n}")
        record = read_run_record(path) if path.exists() else None
        # A folder without a record is new, or was left by a kill before its record was written (then it holds
        # no checkpoint yet and is taken over).
        if record is None and (not path.exists() or not any(path.glob("step-*.pt"))):
            folder = RunFolder(path, {"key": key, "definition": definition, "registered_model": registered_model,
                                      "complete": False, "attempts": []})
            path.mkdir(parents=True, exist_ok=True)
            folder.save()
            return folder
        if record is not None and record.get("key") == key:
            folder = RunFolder(path, record)
            version = None if folder.complete else is_registered(record)
            if version:
                folder.mark_complete(version)
            if not folder.complete:
                return folder
        n += 1


def run_folder_of(ws: Workspace, dagster_run_id: str) -> Path | None:
    """The tracked run folder a Dagster run trains (or trained) in, from the attempts in each ``run.json``; the
    ``runs/dagster-<run id[:8]>`` of versions before run records; ``None`` before its first checkpoint attempt."""
    if ws.runs_dir.is_dir():
        for path in ws.runs_dir.glob(RUN_FOLDER_PREFIX + "*"):
            record = read_run_record(path) if path.is_dir() else None
            if record and any(a.get("dagster_run_id") == dagster_run_id for a in record.get("attempts", [])):
                return path
    legacy = ws.runs_dir / f"{RUN_FOLDER_PREFIX}{dagster_run_id[:8]}"
    return legacy if legacy.is_dir() else None


def read_history(folder: Path) -> list[dict]:
    """A run folder's ``history.jsonl`` (one dict of losses per step); a line still being appended (or torn by a
    kill) is skipped."""
    rows = []
    try:
        lines = (folder / "history.jsonl").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def run_lock(folder: Path):
    """An exclusive lock on a run folder while it trains (a second run of the same definition must not write the
    same checkpoints; pruning skips a locked folder)."""
    from filelock import FileLock

    return FileLock(str(folder / LOCK_FILE), timeout=0)


def prune_run_folders(ws: Workspace, keep: int, registered_model: str, log=print) -> list[Path]:
    """Delete completed tracked run folders of ``registered_model`` beyond the newest ``keep`` (by completion time).

    Kept: incomplete folders (they resume), folders without a readable ``run.json`` (``--local`` runs, folders of
    older versions), other models' folders, and any folder another process holds locked. A folder is renamed to a
    temp name before it is deleted, so a kill mid-way leaves something :func:`sweep_stale_temps` removes.
    """
    from filelock import Timeout

    if not ws.runs_dir.is_dir():
        return []
    done = []
    for path in ws.runs_dir.iterdir():
        if not path.is_dir() or not path.name.startswith(RUN_FOLDER_PREFIX):
            continue
        record = read_run_record(path)
        if record and record.get("complete") and record.get("registered_model") == registered_model:
            done.append((int(record.get("completed_ns", 0)), path.name, path))
    done.sort(reverse=True)
    removed = []
    for _, _, path in done[keep:]:
        try:
            with run_lock(path):
                doomed = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-prune")
                path.rename(doomed)
        except Timeout:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    if removed:
        log(f"pruned {len(removed)} completed run folder(s) beyond the newest {keep} (train.keep_runs): "
            + ", ".join(p.name for p in removed))
    return removed
