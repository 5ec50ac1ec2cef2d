"""Training images/s with one process and with several (accelerate launch, DDP over gloo on the CPU).

    python benchmarks/bench_processes.py [--model builtin:small] [--resolution 256] [--batch-size 1]
                                         [--steps 12] [--processes 2]

Runs `stylelora train` as a user would, three ways on the same data and settings:
1 process with 1 torch thread, 1 process with as many threads as processes in the last run, and
`accelerate launch --multi_gpu --num_processes N ... --set train.device=cpu` (1 thread each, as
accelerate sets). Each process trains `--batch-size` images per step, so N processes train N times the
images per step. images/s is read from the run's metrics.jsonl: images of steps 3..last over their time.
Record the figures in benchmarks/RESULTS.md with the machine, its load (`uptime`), the command and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def images_per_second(run: Path, images_per_step: int) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = records[1], records[-1]  # from the end of step 2: start-up and first steps excluded
    return (last["step"] - first["step"]) * images_per_step / (last["seconds"] - first["seconds"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(launch: list[str], args: argparse.Namespace, out: Path, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    command = [*launch, "stylelora", "train", "--model", args.model, "--data", str(ROOT / "datasets/example"),
               "--output", str(out), "--steps", str(args.steps), "--resolution", str(args.resolution),
               "--batch-size", str(args.batch_size), "--rank", "16", "--set", "train.device=cpu"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:small")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--processes", type=int, default=2)
    args = p.parse_args()
    n = args.processes
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    ways = [
        ("1 process, 1 thread", [sys.executable, "-m"], 1, args.batch_size),
        (f"1 process, {n} threads", [sys.executable, "-m"], n, args.batch_size),
        (f"{n} processes (accelerate launch), 1 thread each",
         [accelerate, "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m"],
         1, args.batch_size * n),
    ]
    print(f"{args.model} {args.resolution}px, batch {args.batch_size} per process, {args.steps} steps, CPU, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, launch, threads, per_step) in enumerate(ways):
            out = Path(tmp) / f"run{i}"
            run(launch, args, out, threads)
            print(f"  {name:<45} {images_per_second(out, per_step):6.2f} images/s ({per_step} images per step)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
