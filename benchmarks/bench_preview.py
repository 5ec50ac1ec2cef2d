"""Latency of a strength change (slider move to image) against one plain diffusers generation.

    python benchmarks/bench_preview.py                      # builtin:tiny, 64 px
    python benchmarks/bench_preview.py --model builtin:small  # SD1.5's layout at a tenth of its width, 256 px

For each repeat it times, interleaved so that machine load hits all alike:
- ``plain``: a separate diffusers StableDiffusionPipeline of the same weights, no LoRA, ``pipe(prompt, ...)``;
- ``slider``: ``Previewer.generate(..., scale=s)`` with a new strength ``s`` every time (the base is
  never reloaded; the deltas at ``s`` are fused into the base weights, kept aside), adapter on UNet and
  text encoder;
- ``slider_unet``: the same with an adapter on the UNet only (text embeddings come from the cache);
- ``slider_unfused``: as ``slider`` with ``Previewer(fuse=False)``: peft's LoRA layers run beside the base;
- ``diffusers_lora``: for reference, diffusers' own way: ``pipe.set_adapters([name], [s])`` then ``pipe(...)``.
The target is slider / plain <= 1.05 (nothing but the generation itself). Prints a Markdown row.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import torch  # noqa: E402

from stylelora.adapters.formats import Adapter, ModelLayout, save_diffusers, save_kohya
from stylelora.core.config import LoraConfig  # noqa: E402
from stylelora.families import load_base_model
from stylelora.model.lora import add_lora, lora_state
from stylelora.preview.previewer import Previewer

PROMPT = "a watercolour painting of a lighthouse at dusk"


def random_adapter(model_name: str, rank: int, text_encoder: bool) -> Adapter:
    model = load_base_model(model_name)
    add_lora(model, LoraConfig(rank=rank, alpha=rank, train_text_encoder=text_encoder))
    state = lora_state(model)
    g = torch.Generator().manual_seed(0)
    for sd in state.values():
        for key, value in sd.items():
            sd[key] = torch.randn(value.shape, generator=g) * (0.05 if "lora_B" in key else 1 / rank)
    return Adapter(state, {part: float(rank) for part in state}, {})


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steadier figure."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny", help="builtin:tiny, builtin:small, or any model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model
        layout = ModelLayout.of(load_base_model(model))
        both = save_kohya(root / "both.safetensors", random_adapter(model, args.rank, True), layout, "fp32")
        unet_only_adapter = random_adapter(model, args.rank, False)
        unet_only = save_kohya(root / "unet.safetensors", unet_only_adapter, layout, "fp32")
        diffusers_dir = save_diffusers(root / "unet_diffusers", unet_only_adapter, layout, "fp32").parent

        plain = load_base_model(model).pipeline
        plain.set_progress_bar_config(disable=True)
        reference = load_base_model(model).pipeline
        reference.set_progress_bar_config(disable=True)
        reference.load_lora_weights(str(diffusers_dir), adapter_name="style")

        preview = Previewer(model, device="cpu")
        preview.attach(both, "both")
        preview.attach(unet_only, "unet")
        unfused = Previewer(model, device="cpu", fuse=False)
        unfused.attach(both, "both")
        size = args.size or preview.model.native_resolution
        settings = {"steps": args.steps, "guidance": 7.5, "width": size, "height": size, "seed": 1}

        def run_plain() -> None:
            plain(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, width=size, height=size,
                  generator=torch.Generator().manual_seed(1))

        def run_reference(scale: float) -> None:
            reference.set_adapters(["style"], adapter_weights=[scale])
            reference(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, width=size, height=size,
                      generator=torch.Generator().manual_seed(1))

        # warm-up: first calls allocate and fill the base and embedding caches
        run_plain()
        run_reference(0.9)
        preview.generate(PROMPT, adapter="both", scale=0.9, **settings)
        preview.generate(PROMPT, adapter="unet", scale=0.9, **settings)
        unfused.generate(PROMPT, adapter="both", scale=0.9, **settings)

        times: dict[str, list[tuple[float, float]]] = {"plain": [], "slider": [], "slider_unet": [],
                                                       "slider_unfused": [], "diffusers_lora": []}
        for i in range(args.repeats):
            scale = 0.1 + 0.27 * i  # a new strength every time: no image cache can answer
            times["plain"].append(timed(run_plain))
            times["slider"].append(timed(lambda s=scale: preview.generate(PROMPT, adapter="both", scale=s, **settings)))
            times["slider_unet"].append(
                timed(lambda s=scale: preview.generate(PROMPT, adapter="unet", scale=s, **settings)))
            times["slider_unfused"].append(
                timed(lambda s=scale: unfused.generate(PROMPT, adapter="both", scale=s, **settings)))
            times["diffusers_lora"].append(timed(lambda s=scale: run_reference(s)))
        assert preview.base_loads == 1

    threads = torch.get_num_threads()
    print(f"model {args.model}, {size}x{size}, {args.steps} steps, rank {args.rank}, {threads} threads, "
          f"{args.repeats} repeats; medians, ratio to plain:")
    medians = {}
    for i, clock in enumerate(("wall", "cpu")):
        med = {k: statistics.median(t[i] for t in v) for k, v in times.items()}
        medians[clock] = med
        for key, value in med.items():
            print(f"  {clock:4s} {key:15s} {value:8.3f} s   x{value / med['plain']:.3f}   all: "
                  + " ".join(f"{t[i]:.3f}" for t in times[key]))

    def cell(key: str) -> str:
        return " / ".join(f"{m[key]:.3f} s (x{m[key] / m['plain']:.3f})" for m in medians.values())

    print("\n| date | machine | model | size | steps | plain diffusers | strength change, UNet+TE adapter "
          "| strength change, UNet adapter | unfused (fuse=False), UNet+TE | diffusers set_adapters "
          "|  (each: wall / CPU time)")
    print(f"| {date.today()} | {platform.machine()} CPU, {threads} thread(s) | {args.model} | {size} | {args.steps} "
          f"| {cell('plain')} | {cell('slider')} | {cell('slider_unet')} | {cell('slider_unfused')} "
          f"| {cell('diffusers_lora')} |")


if __name__ == "__main__":
    main()
