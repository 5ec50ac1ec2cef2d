"""Export time by phase: read the file, load the base model, map keys, write, verify.

    python benchmarks/bench_export.py [--model builtin:tiny] [--rank 16] [--conv-rank 8] [--repeat 3]

Builds a random adapter of the given rank on the model (UNet attention + text encoder, LoCon on the
resnet convs when --conv-rank > 0), saves it as kohya fp16, then times converting it to diffusers
and back to kohya, phase by phase. Prints one line per phase (median of --repeat runs, seconds).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stylelora import convert, formats  # noqa: E402
from stylelora.config import TEXT_ENCODER_TARGETS, UNET_TARGETS  # noqa: E402
from stylelora.formats import Adapter, ModelLayout  # noqa: E402
from stylelora.models import load_base_model, lora_alphas, lora_state  # noqa: E402


def random_adapter(model_name: str, rank: int, conv_rank: int) -> Adapter:
    from peft import LoraConfig, inject_adapter_in_model

    model = load_base_model(model_name)
    targets = list(UNET_TARGETS) + (["conv1", "conv2"] if conv_rank else [])
    pattern = {"conv1": conv_rank, "conv2": conv_rank} if conv_rank else {}
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, rank_pattern=pattern),
                            model.unet)
    for part, module in model.parts():
        if part.startswith("text_encoder"):
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_ENCODER_TARGETS), module)
    gen = torch.Generator().manual_seed(0)
    for _, module in model.parts():
        for name, p in module.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.1
    return Adapter.from_module_alphas(lora_state(model), lora_alphas(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--conv-rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    times: dict[str, list[float]] = {}

    def timed(phase: str, fn, *a, **k):
        start = time.perf_counter()
        result = fn(*a, **k)
        times.setdefault(phase, []).append(time.perf_counter() - start)
        return result

    adapter = random_adapter(args.model, args.rank, args.conv_rank)
    with tempfile.TemporaryDirectory() as tmp:
        src = formats.save_kohya(Path(tmp) / "src.safetensors", adapter, load_base_model(args.model))
        size = src.stat().st_size
        for i in range(args.repeat):
            tensors, metadata = timed("read file", formats.read_safetensors, src)
            model = timed("load base model", load_base_model, args.model)
            layout = timed("model layout", ModelLayout.of, model)
            loaded = timed("map keys (strict)", formats.adapter_from_tensors, tensors, metadata, layout)
            out = Path(tmp) / f"d{i}"
            timed("write+verify diffusers", formats.save_diffusers, out, loaded, layout)
            timed("write+verify kohya", formats.save_kohya, Path(tmp) / f"k{i}.safetensors", loaded, layout)
            timed("export() kohya->diffusers total", convert.export, src, "diffusers", Path(tmp) / f"e{i}",
                  base_model=args.model)

    print(f"# {args.model}, rank {args.rank}, conv rank {args.conv_rank}: {len(tensors)} tensors, "
          f"{size / 1e6:.2f} MB fp16; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeat}")
    for phase, values in times.items():
        print(f"{phase:34s} {statistics.median(values):8.3f} s")


if __name__ == "__main__":
    main()
