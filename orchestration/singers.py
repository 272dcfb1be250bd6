"""Adding singers: copy and validate recordings, version them with DVC, register the Dagster partition.

``svc add-singer`` and the singer sensor share the registration code here, so both routes leave the same state:
a ``data/raw/<singer>.dvc`` file, a ``singers`` partition and an observation of ``raw_recordings`` whose data
version is the DVC md5.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import dagster as dg

from assets.partitions import SINGERS, roster_version
from assets.workspace import Workspace, WorkspaceError, validate_singer_name

RAW_RECORDINGS = dg.AssetKey("raw_recordings")
SINGER_ROSTER = dg.AssetKey("singer_roster")
DATA_VERSION_TAG = "dagster/data_version"


# ---- Dagster state ---------------------------------------------------------------------------------------------
def raw_recordings_observation(singer: str, version: str) -> dg.AssetObservation:
    return dg.AssetObservation(
        asset_key=RAW_RECORDINGS,
        partition=singer,
        tags={DATA_VERSION_TAG: version},
        metadata={"dvc_md5": version, "dvc_file": f"data/raw/{singer}.dvc"},
    )


def roster_observation(singers: Iterable[str]) -> dg.AssetObservation:
    names = sorted(singers)
    return dg.AssetObservation(asset_key=SINGER_ROSTER, tags={DATA_VERSION_TAG: roster_version(names)},
                               metadata={"singers": ", ".join(names) or "(none)", "count": len(names)})


def observe_roster(instance: dg.DagsterInstance) -> None:
    """Record the registered singers as ``singer_roster``'s data version, if it changed."""
    singers = instance.get_dynamic_partitions(SINGERS)
    if latest_observed_version(instance, None, SINGER_ROSTER) != roster_version(singers):
        instance.report_runless_asset_event(roster_observation(singers))


def latest_observed_version(instance: dg.DagsterInstance, singer: str | None,
                            asset_key: dg.AssetKey = RAW_RECORDINGS) -> str | None:
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[singer] if singer else None), limit=1
    ).records
    if not records:
        return None
    observation = records[0].event_log_entry.asset_observation
    return (observation.tags or {}).get(DATA_VERSION_TAG) if observation else None


@dataclass
class SingerSync:
    """What has to change in Dagster to match the ``.dvc`` files on disk."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def plan_singer_sync(ws: Workspace, instance: dg.DagsterInstance) -> SingerSync:
    """Compare DVC-tracked singers with the registered partitions and the last observed data versions."""
    registered = set(instance.get_dynamic_partitions(SINGERS))
    plan = SingerSync()
    for singer in ws.singers():
        version = ws.singer_data_version(singer)
        if version is None:
            continue
        plan.versions[singer] = version
        if singer not in registered:
            plan.new.append(singer)
        elif latest_observed_version(instance, singer) != version:
            plan.changed.append(singer)
    return plan


def register_singer(ws: Workspace, instance: dg.DagsterInstance, singer: str) -> str:
    """Add the partition (if new) and record the current DVC md5 as the data version. Returns the md5.

    Holds the workspace lock, so the check-then-add cannot interleave with another registration or removal."""
    with ws.lock(f"registering singer {singer!r}"):
        version = ws.singer_data_version(singer)
        if version is None:
            raise WorkspaceError(f"{ws.singer_dvc_file(singer)}: missing; run `dvc add data/raw/{singer}` first")
        if not instance.has_dynamic_partition(SINGERS, singer):
            instance.add_dynamic_partitions(SINGERS, [singer])
            observe_roster(instance)
        if latest_observed_version(instance, singer) != version:
            instance.report_runless_asset_event(raw_recordings_observation(singer, version))
        return version


# ---- copying recordings ------------------------------------------------------------------------------------------
@dataclass
class AddSingerReport:
    singer: str
    added: list[tuple[str, float]] = field(default_factory=list)  # (file name in data/raw/<singer>, seconds)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)
    data_version: str | None = None
    previous_version: str | None = None
    pushed: bool = False

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.added)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _expand(paths: Iterable[str | Path]) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Files to consider as ``(source, name in the singer folder)``; folders are walked recursively."""
    from svc_model.audio import is_audio_file

    found, skipped = [], []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                if is_audio_file(child):
                    found.append((child, str(child.relative_to(path))))
                else:
                    skipped.append((str(child), f"not an audio file (extension {child.suffix or 'none'!r})"))
        elif path.is_file():
            found.append((path, path.name))
        else:
            skipped.append((str(path), "no such file or folder"))
    return found, skipped


def _check_existence(ws: Workspace, singer: str, append: bool) -> bool:
    """Whether the singer exists; refuses a new singer that exists and an append to one that does not."""
    target = ws.singer_raw_dir(singer)
    exists = target.exists() or ws.singer_dvc_file(singer).exists()
    if exists and not append:
        raise WorkspaceError(f"singer {singer!r} already exists in {target}; use --append to add recordings")
    if append and not exists:
        raise WorkspaceError(f"singer {singer!r} does not exist yet; drop --append to create it")
    return exists


def add_singer(
    ws: Workspace,
    singer: str,
    paths: Iterable[str | Path],
    *,
    append: bool = False,
    instance: dg.DagsterInstance | None = None,
    push: bool = True,
    log: Callable[[str], None] = print,
    lock_timeout: float | None = None,
) -> AddSingerReport:
    """Copy, validate and version a singer's recordings; register the singer in Dagster.

    The originals are only read. Files are validated while copied into a staging folder under ``data/raw``
    (without the workspace lock: decoding is the slow part). Then, holding the workspace lock (see
    :meth:`Workspace.lock`), the singer's existence is checked again (another `svc add-singer` of the same name
    may have won meanwhile), duplicates against what is already there are skipped, the files are moved into
    ``data/raw/<singer>/``, and ``dvc add``, ``dvc push`` and the registration run. If anything fails before the
    move, or the lock is not had within ``lock_timeout``, ``data/raw`` is unchanged.
    """
    from svc_model.audio import AudioError, load_recording
    from svc_model.storage import sweep_stale_temps, temp_sibling

    validate_singer_name(singer)
    ws.ensure_runtime_dirs()
    target = ws.singer_raw_dir(singer)
    _check_existence(ws, singer, append)  # refuse early, before any decoding; checked again under the lock
    cfg = ws.config().audio
    report = AddSingerReport(singer=singer)
    candidates, report.skipped = _expand(paths)
    for path, reason in report.skipped:
        log(f"  skip {path}: {reason}")

    sweep_stale_temps(ws.raw_dir)  # staging folders of add-singer runs that were killed
    staging = temp_sibling(target)
    staging.mkdir(parents=True)
    try:
        staged: list[tuple[Path, str, str, object]] = []  # (source, name, md5, recording)
        seen: dict[str, str] = {}
        for source, name in candidates:
            try:
                rec = load_recording(source, cfg)
            except AudioError as exc:
                report.skipped.append((str(source), exc.problem))
                log(f"  skip {source}: {exc.problem}")
                continue
            digest = _md5(source)
            if digest in seen:
                report.skipped.append((str(source), f"same content as {seen[digest]} (already added)"))
                log(f"  skip {source}: same content as {seen[digest]}")
                continue
            if (staging / name).exists():
                report.skipped.append((str(source), f"a different file named {name} is already in this batch"))
                log(f"  skip {source}: a different file named {name} is in this batch; rename it")
                continue
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, staging / name)
            seen[digest] = name
            staged.append((source, name, digest, rec))

        def nothing_usable() -> WorkspaceError:
            detail = "; ".join(f"{p}: {why}" for p, why in report.skipped) or "no files given"
            return WorkspaceError(f"singer {singer!r}: no usable recordings, nothing was added ({detail})")

        if not staged:
            raise nothing_usable()
        with ws.lock(f"add-singer {singer!r}", timeout=lock_timeout, log=log):
            exists = _check_existence(ws, singer, append)
            report.previous_version = ws.singer_data_version(singer) if exists else None
            existing = {}
            if target.is_dir():
                existing = {_md5(p): str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
            for source, name, digest, rec in staged:
                if digest in existing:
                    report.skipped.append((str(source), f"same content as {existing[digest]} (already added)"))
                    log(f"  skip {source}: same content as {existing[digest]}")
                elif (target / name).exists():
                    report.skipped.append((str(source), f"a different file named {name} is already in {target}"))
                    log(f"  skip {source}: a different file named {name} exists; rename it")
                else:
                    report.added.append((name, rec.duration_s))
                    report.notes += [(name, note) for note in rec.notes]
                    log(f"  add  {source} -> data/raw/{singer}/{name} ({rec.duration_s:.1f} s)")
                    continue
                (staging / name).unlink()
            if not report.added:
                raise nothing_usable()
            if exists:
                for name, _ in report.added:
                    dest = target / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    (staging / name).rename(dest)
            else:
                staging.rename(target)
            try:
                ws.run_tool("dvc", "add", "-q", str(target.relative_to(ws.root)))
            except WorkspaceError:
                if not exists:  # leave data/raw as it was
                    shutil.rmtree(target, ignore_errors=True)
                raise
            report.data_version = ws.singer_data_version(singer)
            if push:
                ws.run_tool("dvc", "push", "-q", str(ws.singer_dvc_file(singer).relative_to(ws.root)))
                report.pushed = True
            if instance is not None:
                register_singer(ws, instance, singer)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


# ---- removing a singer ---------------------------------------------------------------------------------------------
@dataclass
class RemovalReport:
    singer: str
    derived_removed: list[str] = field(default_factory=list)  # assets whose partition folder was deleted
    raw_removed: bool = False
    partition_removed: bool = False


def remove_singer(ws: Workspace, singer: str, instance: dg.DagsterInstance, *,
                  log: Callable[[str], None] = print) -> RemovalReport:
    """Remove a singer from the workspace: derived data, the recordings' working copy, the ``.dvc`` file and the
    Dagster partition (its run history stays).

    The recordings stay in DVC's cache and remote, and the ``.dvc`` file stays in git history, so an older commit
    still checks them out. Refused when the working copy has changes that DVC has not cached.
    """
    from orchestration.jobs import PER_SINGER_ASSETS

    validate_singer_name(singer)
    with ws.lock(f"remove-singer {singer!r}", log=log):
        raw, dvc_file = ws.singer_raw_dir(singer), ws.singer_dvc_file(singer)
        registered = instance.has_dynamic_partition(SINGERS, singer)
        if not (raw.exists() or dvc_file.exists() or registered):
            raise WorkspaceError(f"no singer {singer!r} in {ws.root} (singers: {', '.join(ws.singers()) or 'none'})")
        if dvc_file.exists() and raw.exists():
            status = ws.run_tool("dvc", "status", "-q", str(dvc_file.relative_to(ws.root)), check=False)
            if status.returncode != 0:
                raise WorkspaceError(f"data/raw/{singer}/ has changes that DVC has not recorded; run "
                                     f"`dvc add data/raw/{singer}` (or `svc add-singer {singer} --append`) first, "
                                     "so that nothing is lost")
        report = RemovalReport(singer)
        for asset in PER_SINGER_ASSETS:
            if ws.remove_partition(asset, singer):
                report.derived_removed.append(asset)
                log(f"  removed data/derived/{asset}/{singer}/")
        if dvc_file.exists():
            # Without --outs: DVC only forgets the output; the cache (and the remote) keep the recordings.
            ws.run_tool("dvc", "remove", "-q", str(dvc_file.relative_to(ws.root)))
            log(f"  removed data/raw/{singer}.dvc (the recordings stay in DVC's cache and in git history)")
        if raw.exists():
            shutil.rmtree(raw)
            report.raw_removed = True
            log(f"  removed the working copy data/raw/{singer}/")
        if registered:
            instance.delete_dynamic_partition(SINGERS, singer)
            observe_roster(instance)
            report.partition_removed = True
            log(f"  removed Dagster partition {singer!r}; training_set now needs a rebuild")
    return report
