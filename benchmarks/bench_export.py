"""Export time by phase (read the file, load the base model, map keys, write, verify), and the peak
memory of converting an SDXL adapter.

    python benchmarks/bench_export.py [--model builtin:tiny] [--rank 16] [--conv-rank 8] [--repeat 3]
    python benchmarks/bench_export.py --sdxl-memory [--rank 32] [--conv-rank 8]

The first builds a random adapter of the given rank on the model (UNet attention + text encoder,
LoCon as kohya's conv_dim when --conv-rank > 0), saves it as kohya fp16, then times converting it to
diffusers and back to kohya, phase by phase. Prints one line per phase (median of --repeat runs, seconds).

--sdxl-memory writes the configs of SDXL base 1.0 (UNet, CLIP-L, CLIP-G; no weights, nothing is
downloaded), a random adapter of that exact architecture as a kohya fp16 file, and runs
``stylelora export FILE --format diffusers --model CONFIG_FOLDER`` and back to kohya, each in a fresh
process, printing each one's peak resident memory (VmHWM, Linux) beside that of a process that only
imports stylelora, torch, diffusers and transformers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from real_shapes import CLIP_G, CLIP_L, SDXL_UNET  # noqa: E402  (beside this script)

from stylelora.adapters import convert, formats  # noqa: E402
from stylelora.adapters.formats import Adapter, ModelLayout  # noqa: E402
from stylelora.core.config import TEXT_ENCODER_TARGETS  # noqa: E402
from stylelora.families import load_base_model, load_skeleton
from stylelora.model.blocks import (
    LOCON_KXK_TARGETS,
    LOCON_TARGETS,
    UNET_TARGETS,  # noqa: E402
)
from stylelora.model.lora import lora_alphas, lora_state

ROOT = Path(__file__).resolve().parent.parent


def random_adapter(model_name: str, rank: int, conv_rank: int) -> Adapter:
    from peft import LoraConfig, inject_adapter_in_model

    model = load_base_model(model_name)
    targets = list(UNET_TARGETS) + (LOCON_TARGETS if conv_rank else [])
    pattern = dict.fromkeys(LOCON_KXK_TARGETS, conv_rank) if conv_rank else {}
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


# SDXL base 1.0's component configs: one owner, real_shapes.py (it also writes them as whole models)
SDXL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
              "text_encoder": ["transformers", "CLIPTextModel"],
              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "vae": ["diffusers", "AutoencoderKL"]}


def write_sdxl_configs(folder: Path) -> Path:
    for rel, config in {"model_index.json": SDXL_INDEX, "unet/config.json": SDXL_UNET,
                        "text_encoder/config.json": CLIP_L, "text_encoder_2/config.json": CLIP_G}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(config), encoding="utf-8")
    return folder


def random_skeleton_adapter(skeleton, rank: int, conv_rank: int) -> Adapter:
    """Random LoRA weights for every module training would adapt (UNet attention, both CLIPs' attention
    and MLP, LoCon as kohya's conv_dim), shaped from the meta-device skeleton."""
    layout = ModelLayout.of(skeleton)
    gen = torch.Generator().manual_seed(0)
    state: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for part, shapes in layout.shapes.items():
        targets = UNET_TARGETS + (LOCON_TARGETS if conv_rank else []) if part == "unet" else TEXT_ENCODER_TARGETS
        for path, shape in shapes.items():
            if not any(path == t or path.endswith("." + t) for t in targets):
                continue
            kxk = len(shape) == 4 and shape[2] * shape[3] > 1
            r = conv_rank if kxk else rank
            down = torch.randn((r, shape[1], *shape[2:]), generator=gen).mul_(0.01)
            up = torch.randn((shape[0], r, *[1] * (len(shape) - 2)), generator=gen).mul_(0.01)
            state.setdefault(part, {}).update({f"{path}.lora_A.weight": down, f"{path}.lora_B.weight": up})
            alphas.setdefault(part, {})[path] = float(r)
    return Adapter.from_module_alphas(state, alphas)


# Runs ``python -m stylelora ARGS`` (or only the imports) and prints its own peak RSS in KiB: VmHWM,
# which belongs to this process's memory map (ru_maxrss would carry the parent's peak across fork+exec).
_PEAK = """
import runpy, sys
args = sys.argv[1:]
if args:
    sys.argv = ["stylelora", *args]
    try:
        runpy.run_module("stylelora", run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
else:
    import diffusers, torch, transformers, stylelora.adapters.convert  # noqa
print("PEAK_KIB", next(x.split()[1] for x in open("/proc/self/status") if x.startswith("VmHWM:")))
"""


def peak_rss_mib(*args: str) -> float:
    done = subprocess.run([sys.executable, "-c", _PEAK, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: stylelora {' '.join(args)}\n{done.stderr[-2000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("PEAK_KIB"))
    return int(line.split()[1]) / 1024


def sdxl_memory(rank: int, conv_rank: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_sdxl_configs(Path(tmp) / "sdxl-base-configs")
        skeleton = load_skeleton(str(folder))
        unet_params = sum(p.numel() for p in skeleton.unet.parameters())
        adapter = random_skeleton_adapter(skeleton, rank, conv_rank)
        src = formats.save_kohya(Path(tmp) / "sdxl-style.safetensors", adapter, skeleton)
        size = src.stat().st_size
        modules = adapter.num_modules()
        del skeleton, adapter
        floor = peak_rss_mib()
        to_diffusers = peak_rss_mib("export", str(src), "--format", "diffusers", "--out", str(Path(tmp) / "d"),
                                    "--model", str(folder))
        to_kohya = peak_rss_mib("export", str(Path(tmp) / "d"), "--format", "kohya",
                                "--out", str(Path(tmp) / "back.safetensors"), "--model", str(folder))
    print(f"# SDXL base 1.0 architecture (UNet {unet_params / 1e9:.3f} B parameters, on the meta device), adapter "
          f"rank {rank}, conv rank {conv_rank}: modules {modules}, {size / 1e6:.1f} MB fp16 kohya; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'imports only (stylelora, torch, diffusers, transformers)':58s} {floor:8.0f} MiB peak RSS")
    print(f"{'stylelora export kohya -> diffusers --model <configs>':58s} {to_diffusers:8.0f} MiB peak RSS")
    print(f"{'stylelora export diffusers -> kohya --model <configs>':58s} {to_kohya:8.0f} MiB peak RSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--conv-rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sdxl-memory", action="store_true", help="peak RSS of converting an SDXL adapter")
    args = parser.parse_args()
    if args.sdxl_memory:
        sdxl_memory(args.rank, args.conv_rank)
        return

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
