"""Images/s and peak RSS of whole training commands, run alternately so machine load hits them alike.

    python benchmarks/side_by_side.py --batch-size 2 --steps 10 30 --repeats 2 \\
        --run ours "python -m stylelora train --model M --data D --steps {steps} ..." \\
        --run reference "python train_text_to_image_lora.py ... --max_train_steps {steps}"

Each command is run once per step count per repeat, in turn (ours 10, reference 10, ours 30, ...), as a
child process; ``{steps}`` and ``{out}`` (a fresh output folder) are filled in. Images/s comes from the
difference between the longest and the shortest run, so start-up (imports, model load, the final save)
cancels: ``(steps_b - steps_a) * batch / (seconds_b - seconds_a)``, by wall time and by the child's CPU time
(user + system; at one thread the steadier figure on a shared machine). Peak RSS is the child's own
(``wait4``), the largest over its runs. The 1-minute load average is printed before and after each run,
since a figure taken on a busy machine is not worth keeping.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def load() -> float:
    return os.getloadavg()[0]


def run_once(command: str, log: Path) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds, peak RSS MiB, exit status) of one child process."""
    with open(log, "w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(shlex.split(command), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, child.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs=2, action="append", metavar=("NAME", "COMMAND"), required=True)
    p.add_argument("--steps", nargs=2, type=int, default=[10, 30])
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--logs", type=Path, help="keep each run's output here (default: a temporary folder)")
    args = p.parse_args()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="side_by_side_"))
    logs.mkdir(parents=True, exist_ok=True)
    seconds: dict[tuple[str, int], list[float]] = {}
    cpu_seconds: dict[tuple[str, int], list[float]] = {}
    peaks: dict[str, float] = {}
    for repeat in range(args.repeats):
        for steps in args.steps:
            for name, template in args.run:
                out = logs / f"{name}-{steps}-{repeat}"
                command = template.format(steps=steps, out=out)
                before = load()
                wall, cpu, rss, status = run_once(command, logs / f"{name}-{steps}-{repeat}.log")
                print(f"{name:>10} {steps:3d} steps: {wall:7.1f} s, CPU {cpu:7.1f} s, peak RSS {rss:6.0f} MiB, "
                      f"exit {status}, "
                      f"load {before:.2f} -> {load():.2f}", flush=True)
                if status != 0:
                    raise SystemExit(f"{name} failed; see {logs / f'{name}-{steps}-{repeat}.log'}")
                seconds.setdefault((name, steps), []).append(wall)
                cpu_seconds.setdefault((name, steps), []).append(cpu)
                peaks[name] = max(peaks.get(name, 0.0), rss)
    low, high = args.steps
    rates, cpu_rates = {}, {}
    for name, _ in args.run:
        for clock, into in ((seconds, rates), (cpu_seconds, cpu_rates)):
            dt = statistics.median(clock[(name, high)]) - statistics.median(clock[(name, low)])
            into[name] = (high - low) * args.batch_size / dt if dt > 0 else float("nan")
    first, last = args.run[0][0], args.run[-1][0]
    print(f"\n| run | images/s (steps {low}->{high}) | images per CPU second | peak RSS | vs {last} |\n"
          "|---|---|---|---|---|")
    for name, _ in args.run:
        print(f"| {name} | {rates[name]:.2f} | {cpu_rates[name]:.2f} | {peaks[name]:.0f} MiB | "
              f"x{rates[name] / rates[last]:.2f} images/s (x{cpu_rates[name] / cpu_rates[last]:.2f} by CPU time), "
              f"x{peaks[name] / peaks[last]:.2f} RSS |")
    print(f"({first} first; logs in {logs})")


if __name__ == "__main__":
    main()
