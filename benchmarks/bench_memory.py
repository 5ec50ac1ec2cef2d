"""Peak host RAM of a training run up to its first step, on models of the real SD1.5 and SDXL architectures and
FLUX.1 [dev]'s widths (random weights, nothing downloaded), beside the run's own estimate and the frozen weights'
size.

    python benchmarks/bench_memory.py --shape sd15|sdxl|flux-dev-slice|sd35-large-slice [--models DIR]
                                      [--precision bf16] [--quantize auto|none|nf4|int8|fp8] [--resolution 64]
                                      [--limit-gib 16] [--code DIR] [--set section.field=value]
    python benchmarks/bench_memory.py --shape sd15|sdxl|flux-dev-slice|sd35-large-slice|flux-dev|sd35-large --estimates

The second form runs no step: ``stylelora train --estimate`` for fp32, bf16 and bf16 with nf4 (the table in the
README), each of which plans the model on the meta device and reads no weight (its own peak RSS is printed too).

The model is written once as a diffusers folder under --models, stored as it ships (``real_shapes.py``: SD in fp16,
SDXL takes 6.9 GB of disk; FLUX in bf16). ``flux-dev`` is FLUX.1 [dev] whole, as configs alone (its 31 GiB of bf16
weights fit no 24 GB machine); ``flux-dev-slice`` has its widths and 2 of its 19 double blocks, 4 of its 38 single
blocks and 2 of T5-XXL's 24 layers, so the measured and the estimated can be set side by side
(``sd35-large-slice``: SD3.5 Large's widths, 4 of its 38 joint blocks). ``stylelora train``
then runs one step on a one-image dataset with the caches on (the defaults), in a fresh process under ``prlimit
--as`` (--limit-gib of address space: a machine of that much memory, and stricter, since the address space also
counts the mapped model files and reserved but unused memory). While it runs the process's memory is read every 50
ms: the figures are its peak resident memory as the kernel counts it (VmHWM: its own memory plus the pages of the
model files it has mapped while reading them, which are page cache the kernel takes back under pressure) and its
peak anonymous memory (RssAnon: what it holds itself). --code runs another checkout of stylelora (the version
before a change) with the same settings.
Prints one Markdown row for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GiB = 2**30
WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "no": 4, "auto": 4}


def status(pid: int) -> dict[str, int]:
    """A process's memory counters in bytes (VmRSS, RssAnon, RssFile, VmHWM), from /proc."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(VmRSS|RssAnon|RssFile|VmHWM):\s+(\d+) kB",
                                                                      text, re.MULTILINE)}


def watch(process: subprocess.Popen, peaks: dict[str, int]) -> None:
    while process.poll() is None:
        for key, value in status(process.pid).items():
            peaks[key] = max(peaks.get(key, 0), value)
        time.sleep(0.05)


def frozen_weight_bytes(folder: Path, precision: str) -> int:
    """The model's weights in the run's precision (every network: denoiser, VAE, text encoders)."""
    from stylelora.families import load_plan
    from stylelora.training.estimate import networks

    plan = load_plan(str(folder))
    return sum(p.numel() for network in networks(plan) for p in network.parameters()) * WEIGHT_BYTES[precision]


def dataset(folder: Path) -> Path:
    from peer_shape import write_photos

    return write_photos(folder, count=1, size=512)


ESTIMATED = re.compile(r"estimate \(\w+, \w+\): memory \(peak RSS\) ~(\d+\.\d+) GiB")
SETTINGS = {"fp32": ["train.mixed_precision=no"], "bf16": ["train.mixed_precision=bf16"],
            "bf16 + nf4": ["train.mixed_precision=bf16", "model.quantize=nf4"]}


def estimates(args: argparse.Namespace, folder: Path) -> None:
    """One row per precision: the estimate's host peak and its parts, and the estimating process's own peak."""
    print("| model | precision | frozen weights (as held) | estimated peak RSS | parts | `--estimate`'s own peak RSS |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="stylelora-bench-memory-") as tmp:
        data = dataset(Path(tmp) / "data")
        for name, settings in SETTINGS.items():
            command = [sys.executable, "-m", "stylelora", "train", "--estimate", "--model", str(folder), "--data",
                       str(data), "--output", str(Path(tmp) / "run"), "--steps", "1", "--resolution",
                       str(args.resolution), "--set", "train.log_with=none", "--set", "train.device=cpu"]
            for field in [*settings, *args.set]:
                command += ["--set", field]
            env = dict(os.environ, PYTHONPATH=str(args.code), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            process = subprocess.Popen(command, cwd=args.code, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
            peaks: dict[str, int] = {}
            watcher = threading.Thread(target=watch, args=(process, peaks), daemon=True)
            watcher.start()
            output, _ = process.communicate()
            watcher.join()
            said = ESTIMATED.search(output)  # a run that will not fit exits 1 after its estimate: a row all the same
            if not said:
                print(output[-3000:], file=sys.stderr)
                continue
            parts = re.search(r"GiB \((frozen weights [^)]*)\)", output)
            frozen = re.search(r"frozen weights (\d+\.\d+)", parts.group(1)) if parts else None
            own_peak = f"{peaks.get('VmHWM', 0) / GiB:.2f} GiB"
            print(f"| {args.shape} | {name} | {frozen.group(1) + ' GiB' if frozen else '-'} | {said.group(1)} GiB "
                  f"| {parts.group(1) if parts else '-'} | {own_peak} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["sd15", "sdxl", "flux-dev-slice", "sd35-large-slice", "flux-dev",
                                            "sd35-large"], default="sd15",
                        help="flux-dev, sd35-large: only --estimates (configs alone; their weights fit no 24 GB "
                             "machine)")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "stylelora-real-shapes")
    parser.add_argument("--precision", default="bf16", help="train.mixed_precision")
    parser.add_argument("--quantize", default="auto", help="model.quantize (auto, none, fp8, int8, nf4)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--limit-gib", type=float, default=16.0, help="address-space limit (prlimit --as)")
    parser.add_argument("--code", type=Path, default=ROOT, help="the stylelora checkout to run")
    parser.add_argument("--set", action="append", default=[], help="more config fields for the run")
    parser.add_argument("--estimates", action="store_true", help="only the estimates, fp32/bf16/nf4")
    args = parser.parse_args()

    from real_shapes import CONFIGS_ONLY, write_model

    if args.shape in CONFIGS_ONLY and not args.estimates:
        parser.error(f"--shape {args.shape}: only with --estimates (its bf16 weights do not fit this machine)")
    folder = args.models / args.shape
    if not (folder / "model_index.json").is_file():
        print(f"writing {folder} ...", file=sys.stderr)
        folder.mkdir(parents=True, exist_ok=True)
        (CONFIGS_ONLY.get(args.shape) or write_model)(args.shape, folder)
    if args.estimates:
        estimates(args, folder)
        return
    frozen = frozen_weight_bytes(folder, args.precision)
    with tempfile.TemporaryDirectory(prefix="stylelora-bench-memory-") as tmp:
        data = dataset(Path(tmp) / "data")
        command = ["prlimit", f"--as={int(args.limit_gib * GiB)}", "--", sys.executable, "-m", "stylelora", "train",
                   "--model", str(folder), "--data", str(data), "--output", str(Path(tmp) / "run"), "--steps", "1",
                   "--resolution", str(args.resolution), "--set", f"train.mixed_precision={args.precision}",
                   "--set", f"model.quantize={args.quantize}", "--set", "train.log_with=none"]
        for field in args.set:
            command += ["--set", field]
        env = dict(os.environ, PYTHONPATH=str(args.code), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        print(f"load average before: {os.getloadavg()[0]:.2f}; {' '.join(command)}", file=sys.stderr)
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=args.code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        peaks: dict[str, int] = {}
        watcher = threading.Thread(target=watch, args=(process, peaks), daemon=True)
        watcher.start()
        output, _ = process.communicate()
        watcher.join()
        seconds = time.perf_counter() - start
    hwm = max(peaks.get("VmHWM", 0), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    said = ESTIMATED.search(output)
    precision_line = next((line for line in output.splitlines() if line.startswith("precision:")), "")
    print(output[-3000:] if process.returncode else precision_line, file=sys.stderr)
    print(f"load average after: {os.getloadavg()[0]:.2f}; {seconds:.0f} s", file=sys.stderr)
    estimate = f"{float(said.group(1)):.2f} GiB" if said else "-"
    result = "ran" if process.returncode == 0 else f"failed (exit {process.returncode})"
    print("| model | precision | code | frozen weights | peak RSS (VmHWM) | peak anonymous | anonymous / frozen "
          "| estimate | limit | result |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    precision = args.precision + (f" + {args.quantize}" if args.quantize not in ("auto", "none") else "")
    print(f"| {args.shape} | {precision} | {args.code.name} | {frozen / GiB:.2f} GiB | {hwm / GiB:.2f} GiB "
          f"| {peaks.get('RssAnon', 0) / GiB:.2f} GiB | {peaks.get('RssAnon', 0) / frozen:.2f} | {estimate} "
          f"| {args.limit_gib:g} GiB | {result} |")


if __name__ == "__main__":
    main()
