"""What a FLUX.1 [dev] (or SD3.5 Large) style LoRA run takes on a GPU, counted on the meta device from the published
model's config (no weights, no GPU): stylelora's own estimate (``training.estimate.card_fit``) of the frozen
weights as held on the card, the LoRA with its AdamW state, the activations one step keeps and the CUDA context,
with and without model.quantize=nf4, and which of the 12, 16 and 24 GB cards that fits.

    python benchmarks/bench_transformer_estimate.py [--model flux-dev|sd35-large] [--resolution 1024] [--rank 16]
        [--batch-size 1] [--no-checkpointing]

Record the table in benchmarks/RESULTS.md with the machine, the command and the date.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from published_models import ROOT, flux_dev, sd35_large  # noqa: E402

sys.path.insert(0, str(ROOT))

from stylelora.core.config import Config  # noqa: E402
from stylelora.training.estimate import GiB, card_fit, profile_step  # noqa: E402

MODELS = {"flux-dev": flux_dev, "sd35-large": sd35_large}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="flux-dev")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    args = p.parse_args()
    began = time.perf_counter()
    model = MODELS[args.model]()
    base = Config().with_overrides({
        "model.name": model.name, "data.resolution": args.resolution, "lora.rank": args.rank,
        "lora.alpha": float(args.rank), "train.batch_size": args.batch_size,
        "train.gradient_checkpointing": not args.no_checkpointing})
    profile = profile_step(model, base)
    print(f"{model.name}: {args.resolution} px, batch {args.batch_size}, LoRA rank {args.rank} on "
          f"{profile.trainable / 1e6:.1f} M parameters, gradient checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}; one step {profile.flops / 1e12:.1f} TFLOP, "
          f"{profile.activation_bytes / GiB:.2f} GiB kept for the backward pass (fp32 count)")
    command = (f"python benchmarks/bench_transformer_estimate.py --model {args.model} --resolution "
               f"{args.resolution} --rank {args.rank}")
    print(f"\n`{command}`; {platform.machine()} {platform.system()}, {date.today()}, counted on the meta device\n")
    print("| model.quantize | frozen weights on the GPU | step peak (estimate) | 12 GB | 16 GB | 24 GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for scheme in ("none", "fp8", "nf4"):
        fit = card_fit(model, base.with_overrides({"model.quantize": scheme}), profile)
        marks = " | ".join("fits" if ok else "no" for ok in fit.fits.values())
        print(f"| {scheme} | {fit.weight_bytes / GiB:.1f} GiB | {fit.peak_bytes / GiB:.1f} GiB | {marks} |")
    print(f"\n{time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
