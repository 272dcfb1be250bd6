"""Adding singer N+1 to a workspace with N singers built, against rebuilding every singer's features.

    .venv/bin/python benchmarks/incremental.py [--singers 3 4] [--clips 5]

For each N: a workspace with N singers is built (this also loads the extractors, so both timings below are warm);
singer N+1 is added and `build` times the incremental rebuild; then a fresh workspace with all N+1 singers is
built from scratch (the full rebuild). Both go through the same Dagster materializations as `svc build` on a
real instance. The bundled voices are four speakers with ten clips each; a "singer" here is --clips clips of one
speaker (speaker-a clips 0-4, speaker-b 0-4, ..., then speaker-a 5-9, ...), so every singer has a similar size.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from assets.workspace import init_workspace  # noqa: E402
from orchestration.build import build, open_instance  # noqa: E402
from orchestration.singers import add_singer  # noqa: E402

VOICES = Path(__file__).resolve().parent.parent / "examples" / "voices"
SPEAKERS = ["speaker-a", "speaker-b", "speaker-c", "speaker-d"]


def singer_clips(index: int, clips: int) -> tuple[str, list[Path]]:
    speaker, block = SPEAKERS[index % len(SPEAKERS)], index // len(SPEAKERS)
    files = sorted((VOICES / speaker).glob("*.flac"))[block * clips:(block + 1) * clips]
    if len(files) < clips:
        raise SystemExit(f"not enough bundled clips for singer {index + 1} with --clips {clips}")
    return f"singer-{index + 1}", files


def timed_build(ws, instance) -> tuple[float, int]:
    started = time.perf_counter()
    steps = build(ws, instance=instance, log=lambda _: None)
    return time.perf_counter() - started, sum(len(s.assets) for s in steps)


def workspace_with(root: Path, singers: range, clips: int):
    ws = init_workspace(root)
    instance = open_instance(ws)
    for i in singers:
        name, files = singer_clips(i, clips)
        add_singer(ws, name, files, instance=instance, push=False, log=lambda _: None)
    return ws, instance


def measure(n: int, clips: int, scratch: Path) -> dict:
    ws, instance = workspace_with(scratch / f"n{n}", range(n), clips)
    warm_s, _ = timed_build(ws, instance)
    name, files = singer_clips(n, clips)
    add_singer(ws, name, files, instance=instance, push=False, log=lambda _: None)
    incremental_s, incremental_parts = timed_build(ws, instance)
    instance.dispose()

    full_ws, full_instance = workspace_with(scratch / f"full{n + 1}", range(n + 1), clips)
    full_s, full_parts = timed_build(full_ws, full_instance)
    full_instance.dispose()
    return {"n": n, "first_build_s": warm_s, "incremental_s": incremental_s, "incremental_parts": incremental_parts,
            "full_s": full_s, "full_parts": full_parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--singers", type=int, nargs="+", default=[3, 4], help="N: singers already built")
    parser.add_argument("--clips", type=int, default=5, help="clips per singer")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="svc-incremental-") as scratch:
        for n in args.singers:
            print(f"N = {n}: building {n} singers, adding one, then rebuilding all {n + 1} from scratch...",
                  file=sys.stderr)
            rows.append(measure(n, args.clips, Path(scratch)))
    print(f"\n{args.clips} clips per singer; tiny profile on the CPU; extractors loaded before both timings\n")
    print("| N | add singer N+1: partitions | seconds | full rebuild of N+1: partitions | seconds | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['n']} | {r['incremental_parts']} | {r['incremental_s']:.1f} | {r['full_parts']} | "
              f"{r['full_s']:.1f} | {r['incremental_s'] / r['full_s']:.2f} |")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
