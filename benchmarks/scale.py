"""Team scale on this machine: how long N singers take to build one at a time against several at once.

    .venv/bin/python benchmarks/scale.py build [--singers 4 8] [--parallel 2] [--clips 5] [--gpu-pool auto]
    .venv/bin/python benchmarks/scale.py train [--nproc 1 2] [--steps 20] [--device cpu] [--work /tmp/svc-quality]

``build``: for each N, two fresh workspaces get the same N singers (singer i is --clips clips of one bundled
speaker, as in benchmarks/incremental.py); then `svc build --parallel 1` runs in one and `svc build --parallel P` in
the other, each as its own command, so both timings are what a person waits for: process start, Dagster, loading
the extractors (once per process: once serially, once per worker in parallel) and every partition. The machine's
core count and load average are printed with the figures; the other processes on it share the cores.

``train``: training steps per second of the tiny profile on three bundled voices (features cached in --work, as
benchmarks/quality.py makes them) through the real distributed path (``assets.distributed.launch``: torchrun,
DDP, gloo on the CPU, NCCL on CUDA) for each process count, once at the same global batch (the config's
``train.batch_size``, split over the ranks) and once at the same per-rank batch (the global batch grows). A step's
time is ``(t(5 + steps) - t(5)) / steps`` from two runs, so process start, the first steps and the closing
validation and checkpoint cancel out.
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


def train_seconds(cfg, manifest, nproc: int, steps: int, device: str, work: Path) -> float:
    """Seconds inside ``Trainer.fit`` (rank 0) for ``steps`` steps from scratch with ``nproc`` processes."""
    import shutil

    from assets.distributed import launch

    run_dir = work / f"scale-train-{nproc}-{cfg.train.batch_size}-{steps}"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = launch(nproc=nproc, cfg=cfg, manifest=manifest, run_dir=run_dir, device=device, init_from=None,
                    target_steps=steps, log=lambda _: None)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result.seconds


def cmd_train(args: argparse.Namespace) -> None:
    from quality import build_features

    from svc_model.config import load_config

    cfg = load_config("tiny")
    train_cfg = cfg.train.model_copy(update={"validate_every": 10**6, "checkpoint_every": 10**6, "log_every": 10**6})
    cfg = cfg.model_copy(update={"train": train_cfg})
    manifest, _, _ = build_features(cfg, args.work, log=lambda m: print(m, file=sys.stderr))
    manifest = manifest.assign(split="train")
    batch = cfg.train.batch_size
    rows = []
    for nproc in args.nproc:
        for per_rank in sorted({max(1, batch // nproc), batch}):
            sized = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": per_rank})})
            before = load()
            short = train_seconds(sized, manifest, nproc, 5, args.device, args.work)
            long = train_seconds(sized, manifest, nproc, 5 + args.steps, args.device, args.work)
            per_step = (long - short) / args.steps
            rows.append({"nproc": nproc, "per_rank": per_rank, "global": per_rank * nproc, "s_step": per_step,
                         "items_s": per_rank * nproc / per_step, "load": before})
            print(f"  nproc {nproc}, batch {per_rank} per rank: {per_step:.3f} s/step", file=sys.stderr)
    print(f"\ntiny profile, {len(manifest)} segments, device {args.device}, {os.cpu_count()} cores, "
          f"{args.steps} timed steps; OMP threads per rank = cores // nproc\n")
    print("| processes | batch per rank | global batch | s/step | items/s | load avg before (1/5/15 min) |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['nproc']} | {r['per_rank']} | {r['global']} | {r['s_step']:.3f} | {r['items_s']:.2f} | "
              f"{r['load']} |")


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
    train = commands.add_parser("train", help="training steps per second for 1 and 2 processes (torchrun + DDP)")
    train.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to time")
    train.add_argument("--steps", type=int, default=20, help="timed steps per run")
    train.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    train.add_argument("--work", type=Path, default=Path("/tmp/svc-quality"),
                       help="feature cache (shared with benchmarks/quality.py)")
    train.set_defaults(run=cmd_train)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
