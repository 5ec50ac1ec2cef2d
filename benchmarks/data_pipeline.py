"""Time the data side of training: batches per second with the latent/text caches cold and warm.

    python benchmarks/data_pipeline.py [--model builtin:tiny] [--data datasets/example] [--resolution 256]

Prints seconds per epoch for: no cache, memory cache (first epoch fills it, second reads it), and the
disk cache read by a second run. Only the batch source runs (no UNet), so the figures are what
caching saves per epoch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stylelora.core.config import Config  # noqa: E402
from stylelora.data.batches import BatchSource, TrainingSet  # noqa: E402
from stylelora.families import load_base_model  # noqa: E402


def epoch_seconds(source: BatchSource, batches: int) -> float:
    started = time.perf_counter()
    for _ in range(batches):
        source.next_batch()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--data", default="datasets/example")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    model = load_base_model(args.model)
    cache_dir = tempfile.mkdtemp(prefix="stylelora-bench-")
    base = Config().with_overrides({
        "model.name": args.model, "data.path": args.data, "data.resolution": args.resolution,
        "train.batch_size": args.batch_size, "cache.dir": cache_dir,
    })
    for mode in ("off", "memory", "disk"):
        config = base.with_overrides({"cache.latents": mode, "cache.text_encoder": mode != "off"})
        data = TrainingSet.from_config(config)
        per_epoch = len(data.epoch_batches(0))
        source = BatchSource(data, config, model)
        first, second = epoch_seconds(source, per_epoch), epoch_seconds(source, per_epoch)
        line = f"cache={mode:6s} epoch 1: {first:6.2f} s  epoch 2: {second:6.2f} s"
        if mode == "disk":  # a second run: a fresh source reads what the first one wrote
            line += f"  new run, epoch 1: {epoch_seconds(BatchSource(data, config, model), per_epoch):6.2f} s"
        print(f"{line}  ({len(data)} images, {per_epoch} batches of {args.batch_size})")


if __name__ == "__main__":
    main()
