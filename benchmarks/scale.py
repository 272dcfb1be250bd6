"""Team scale on this machine: how long N singers take to build one at a time against several at once.

    .venv/bin/python benchmarks/scale.py build [--singers 4 8] [--parallel 2] [--clips 5] [--gpu-pool auto]

``build``: for each N, two fresh workspaces get the same N singers (singer i is --clips clips of one bundled
speaker, as in benchmarks/incremental.py); then `svc build --parallel 1` runs in one and `svc build --parallel P` in
the other, each as its own command, so both timings are what a person waits for: process start, Dagster, loading
the extractors (once per process: once serially, once per worker in parallel) and every partition. The machine's
core count and load average are printed with the figures; the other processes on it share the cores.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from incremental import singer_clips

from assets.workspace import init_workspace
from orchestration.jobs import PER_SINGER_ASSETS

SVC = [sys.executable, "-m", "orchestration.cli"]


def workspace_with(root: Path, n: int, clips: int, gpu_pool: str) -> Path:
    from orchestration.build import open_instance
    from orchestration.singers import add_singer

    ws = init_workspace(root)
    settings = ws.root / "svc.yaml"
    settings.write_text(settings.read_text() + f"gpu_pool: {gpu_pool}\n")
    instance = open_instance(ws)
    try:
        for i in range(n):
            name, files = singer_clips(i, clips)
            add_singer(ws, name, files, instance=instance, push=False, log=lambda _: None)
    finally:
        instance.dispose()
    return ws.root


def timed_build(root: Path, parallel: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "SVC_WORKSPACE")}
    started = time.perf_counter()
    proc = subprocess.run([*SVC, "-C", str(root), "build", "--parallel", str(parallel)], env=env,
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"svc build --parallel {parallel} failed in {root}:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return seconds


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def cmd_build(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="svc-scale-") as scratch:
        for n in args.singers:
            print(f"N = {n}: two workspaces with {n} singers...", file=sys.stderr)
            serial_ws = workspace_with(Path(scratch) / f"serial{n}", n, args.clips, args.gpu_pool)
            parallel_ws = workspace_with(Path(scratch) / f"parallel{n}", n, args.clips, args.gpu_pool)
            before = load()
            serial = timed_build(serial_ws, 1)
            print(f"  serial: {serial:.1f} s", file=sys.stderr)
            parallel = timed_build(parallel_ws, args.parallel)
            print(f"  --parallel {args.parallel}: {parallel:.1f} s", file=sys.stderr)
            rows.append({"n": n, "serial": serial, "parallel": parallel, "load_before": before, "load_after": load()})
    print(f"\n{args.clips} clips per singer, {len(PER_SINGER_ASSETS)} partitions per singer; tiny profile; "
          f"gpu_pool: {args.gpu_pool}; {os.cpu_count()} cores; wall time of each `svc build` command\n")
    print(f"| N | `--parallel 1` s | `--parallel {args.parallel}` s | speed-up | load avg before (1/5/15 min) | "
          "after |")
    print("| ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        print(f"| {r['n']} | {r['serial']:.1f} | {r['parallel']:.1f} | {r['serial'] / r['parallel']:.2f} | "
              f"{r['load_before']} | {r['load_after']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="wall time of building N singers serially and in parallel")
    build.add_argument("--singers", type=int, nargs="+", default=[4, 8], help="N: singers to build")
    build.add_argument("--parallel", type=int, default=2, help="singers at once in the parallel build")
    build.add_argument("--clips", type=int, default=5, help="clips per singer (10 bundled per speaker)")
    build.add_argument("--gpu-pool", default="auto", choices=["auto", "always", "never"],
                       help="svc.yaml gpu_pool of both workspaces (auto pools nothing on a CPU-only machine)")
    build.set_defaults(run=cmd_build)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
