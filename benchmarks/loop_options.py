"""Seconds per optimizer step of the training loop with each loop option, on builtin:tiny (or --model).

    python benchmarks/loop_options.py [--steps 20] [--resolution 64] [--model builtin:tiny-sdxl]
                                      [--only "default (adamw, sdpa)" ...]

Times steps after the first two (warm-up) from the trainer's own Progress events, in wall-clock and
process CPU seconds (the latter is steadier on a shared machine); every variant trains
the same seeded data. Figures go to benchmarks/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

VARIANTS: dict[str, dict[str, object]] = {
    "default (adamw, sdpa)": {},
    "gradient_checkpointing": {"train.gradient_checkpointing": True},
    "ema": {"train.ema": True},
    "min_snr 5 + noise_offset 0.05": {"train.min_snr_gamma": 5.0, "train.noise_offset": 0.05},
    "locon conv_rank 8": {"lora.conv_rank": 8},
    "dora": {"lora.dora": True},
    "prodigy": {"train.optimizer": "prodigy", "train.lr": 1.0},
    "adafactor": {"train.optimizer": "adafactor"},
    "attention default": {"train.attention": "default"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--model", default="builtin:tiny", help="a built-in model, e.g. builtin:tiny-sdxl")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these variants")
    args = parser.parse_args()

    from conftest import make_dataset, tiny_config
    from stylelora.core import events
    from stylelora.training.loop import train

    root = Path(tempfile.mkdtemp())
    data = make_dataset(root / "data", n=4, size=(96, 80))
    print(f"{args.model}, {args.resolution} px")
    print(f"| variant | wall s/step | CPU s/step (steps 3-{args.steps}) |\n|---|---|---|")
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        if args.only and name not in args.only:
            continue
        stamps: dict[int, tuple[float, float]] = {}

        def on_event(e: object, stamps: dict[int, tuple[float, float]] = stamps) -> None:
            if isinstance(e, events.Progress):
                stamps[e.step] = (time.perf_counter(), time.process_time())

        config = tiny_config(data, root / f"run{i}", **{"train.steps": args.steps, "data.resolution": args.resolution,
                                                       "model.name": args.model, **overrides})
        train(config, on_event)
        n = args.steps - 2
        wall, cpu = ((stamps[args.steps][k] - stamps[2][k]) / n for k in (0, 1))
        print(f"| {name} | {wall:.3f} | {cpu:.3f} |", flush=True)


if __name__ == "__main__":
    main()
