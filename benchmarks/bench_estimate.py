"""The memory and time estimate against a measured run: peak RSS and seconds per step on the CPU.

    python benchmarks/bench_estimate.py [--model builtin:small] [--resolutions 256 384] [--steps 8]
                                        [--batch-size 1] [--threads 1] [--mixed-precision auto]

Each resolution runs in a fresh process: a real `stylelora.train.train` of --steps steps on the example
dataset, which emits its estimate (the `Estimated` event) before the first step. The process then
reports its peak RSS (getrusage) and the wall and CPU seconds per step after the first two steps (the
latent cache is warm by then, and the estimate is of such a step). The table gives both and the ratio.
Record the figures in benchmarks/RESULTS.md with the machine, its load, the command and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from stylelora.core import events
from stylelora.core.config import Config
from stylelora.training.loop import train

model, resolution, steps, batch, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), \
    int(sys.argv[6])
if threads:
    torch.set_num_threads(threads)
out = Path(tempfile.mkdtemp()) / "run"
config = Config().with_overrides({
    "model.name": model, "data.path": str(Path(sys.argv[1]) / "datasets/example"), "data.resolution": resolution,
    "train.steps": steps, "train.batch_size": batch, "train.output_dir": str(out), "lora.rank": 16,
    "lora.alpha": 16.0, "train.log_with": "none", "train.mixed_precision": sys.argv[7]})
marks, estimate = [], None

def on_event(e):
    global estimate
    if isinstance(e, events.Estimated):
        estimate = e
    if isinstance(e, events.Progress):
        marks.append((e.step, time.perf_counter(), time.process_time()))

train(config, on_event)
(s0, w0, c0), (s1, w1, c1) = marks[1], marks[-1]
print(json.dumps({
    "resolution": resolution, "estimate_peak_mib": estimate.peak_bytes / 2**20,
    "estimate_step_s": estimate.step_seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "wall_step_s": (w1 - w0) / (s1 - s0), "cpu_step_s": (c1 - c0) / (s1 - s0), "threads": torch.get_num_threads(),
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 384])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--mixed-precision", default="auto", help="train.mixed_precision (auto: bf16 on AMX CPUs)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    rows = []
    for resolution in args.resolutions:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), args.model, str(resolution), str(args.steps),
                               str(args.batch_size), str(args.threads), args.mixed_precision],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"load average after: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print("| resolution | estimated peak | measured peak RSS | ratio | estimated s/step | measured wall s/step "
          "| measured CPU s/step | ratio (CPU) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['resolution']} | {r['estimate_peak_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB "
              f"| {r['estimate_peak_mib'] / r['peak_rss_mib']:.2f} | {r['estimate_step_s']:.3f} "
              f"| {r['wall_step_s']:.3f} | {r['cpu_step_s']:.3f} | {r['estimate_step_s'] / r['cpu_step_s']:.2f} |")


if __name__ == "__main__":
    main()
