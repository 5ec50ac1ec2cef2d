"""AdamW step time over a LoRA's weights: torch's for-loop, foreach and fused implementations.

    python benchmarks/optimizer_step.py [--model builtin:small] [--rank 16] [--targets to_q,to_k,...] [--repeats 50]

The LoRA is injected as training does (``models.add_lora``) and given random gradients; each
implementation then takes ``--repeats`` steps, interleaved so that machine load hits all alike.
Prints the median milliseconds per step (wall and process CPU time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from stylelora.core.config import LoraConfig  # noqa: E402
from stylelora.families import load_base_model  # noqa: E402
from stylelora.model.lora import add_lora  # noqa: E402

KINDS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:small")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="", help="comma-separated UNet module names (default: stylelora's)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lora = LoraConfig(rank=args.rank, alpha=args.rank)
    if args.targets:
        lora.unet_targets = args.targets.split(",")
    params = add_lora(load_base_model(args.model), lora)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sets = {}
    for name, kwargs in KINDS.items():
        copies = [torch.nn.Parameter(p.detach().clone().to(device)) for p in params]
        for c in copies:
            c.grad = torch.randn_like(c)
        sets[name] = torch.optim.AdamW(copies, lr=1e-4, **kwargs)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in KINDS}
    for _ in range(args.repeats):
        for name, optimizer in sets.items():
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            optimizer.step()
            sync()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    count = sum(p.numel() for p in params)
    print(f"{args.model}, rank {args.rank}: {len(params)} LoRA tensors, {count / 1e6:.2f} M weights, on {device}, "
          f"{torch.get_num_threads()} threads; median ms per step (wall / CPU):")
    for name, samples in times.items():
        wall = statistics.median(t[0] for t in samples[2:]) * 1000
        cpu = statistics.median(t[1] for t in samples[2:]) * 1000
        print(f"  {name:<9} {wall:7.2f} / {cpu:7.2f}")


if __name__ == "__main__":
    main()
