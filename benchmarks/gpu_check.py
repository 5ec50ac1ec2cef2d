"""The GPU check: full-size SD1.5- and SDXL-shaped UNet and FLUX.1- and SD3.5-shaped transformer training steps
against the card's own bf16 rate.

    bash benchmarks/gpu_check.sh              # on a CUDA machine: one command, under 8 minutes
    bash benchmarks/gpu_check.sh --dry-run    # anywhere: tiny widths on the CPU, every code path once

For each model (random weights; stylelora's LoRA, rank 16 on its default UNet targets, set up by the
trainer's own ``models.prepare_for_training``: fp32 LoRA on a bf16 frozen base, SDPA) it times the
training step (noise, UNet forward under bf16 autocast, MSE loss, backward, gradient clipping, AdamW),
with gradient checkpointing on and off and ``torch.compile`` on and off:

- SD1.5-shaped UNet, 512 px (64x64 latents), batch 4;
- SDXL-shaped UNet, 1024 px (128x128 latents), batch 1, with its added text/time conditioning;
- FLUX.1 [dev]- and SD3.5-Large-shaped transformers, 1024 px, batch 1, flow matching (``transformer_step.py``),
  gradient checkpointing on, the frozen base in bf16 and in nf4 (``model.quantize``, quantized as the trainer
  does it: on the host, block by block).

It reports images/s, peak CUDA memory, and the share of the card's measured bf16 matmul rate (one large
GEMM, timed here) that the step reaches: the step's FLOPs (counted once with torch's FlopCounterMode,
without recomputation, so checkpointing shows as a lower share) divided by its time. The rows are
appended to benchmarks/RESULTS.md (``--results``) with the card's name. Variants that would pass the time
budget are skipped and said so. ``--dry-run`` builds the models at a tiny width on the CPU, runs every
variant without compilation for one step, and one compiled variant (SD1.5-shaped, through dynamo with the
``eager`` backend: no code generation on a CPU); it writes nothing unless ``--results`` is given. ``--models``
picks the models (``--models flux sd35``: the transformers alone, within the time limit).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import transformer_step as dit  # noqa: E402

from stylelora import families  # noqa: E402
from stylelora.core.config import Config  # noqa: E402
from stylelora.model.base import BaseModel, Configs  # noqa: E402
from stylelora.model.placement import compile_unet, prepare_for_training  # noqa: E402

MODELS = {"sd15": "SD1.5-shaped UNet", "sdxl": "SDXL-shaped UNet", "flux": "FLUX.1-shaped transformer",
          "sd35": "SD3.5-Large-shaped transformer"}


def sd15_unet(width: float) -> dict[str, Any]:
    c = [_w(x, width) for x in (320, 640, 1280, 1280)]
    return dict(sample_size=64, block_out_channels=c, layers_per_block=2, cross_attention_dim=_w(768, width),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8)


def sdxl_unet(width: float) -> dict[str, Any]:
    if width == 1:  # SDXL 1.0 base's own UNet config, as benchmarks/sdxl_gpu_step.py holds it
        from sdxl_gpu_step import SDXL_UNET

        return dict(SDXL_UNET)
    c = [_w(x, width) for x in (320, 640, 1280)]
    pooled, time_dim = _w(1280, width), max(8, _w(256, width))
    return dict(sample_size=128, block_out_channels=c, layers_per_block=2, cross_attention_dim=_w(2048, width),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 2, 4), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=6 * time_dim + pooled)


def _w(channels: int, width: float) -> int:
    return max(32, int(channels * width) // 32 * 32)


@dataclass
class Case:
    name: str
    unet: dict[str, Any]
    pixels: int
    batch: int


def cases(dry_run: bool) -> list[Case]:
    width = 0.1 if dry_run else 1.0
    return [Case("SD1.5-shaped UNet", sd15_unet(width), 64 if dry_run else 512, 1 if dry_run else 4),
            Case("SDXL-shaped UNet", sdxl_unet(width), 64 if dry_run else 1024, 1)]


def trainable_unet(case: Case, device: torch.device, checkpointing: bool, compile_mode: str) -> tuple[Any, list]:
    """The UNet with LoRA as the trainer sets it up (models.prepare_for_training), and its LoRA weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # random weights made on the card: seconds, not a minute on its host's CPU
        unet = UNet2DConditionModel(**case.unet)
    family, kind = families.detect(Configs("", unet.config))  # the family tells SD1.5 from SDXL by structure
    model = BaseModel(SimpleNamespace(unet=unet, vae=dit.no_vae(), text_encoder=None), "gpu-check", kind, family)
    cuda = device.type == "cuda"
    config = Config().with_overrides({"lora.rank": 16, "lora.alpha": 16.0,
                                      "train.gradient_checkpointing": checkpointing,
                                      "train.compile": compile_mode if cuda else "off"})
    params, _ = prepare_for_training(model, config, device, "bf16" if cuda else "no")
    if compile_mode != "off" and not cuda:  # a dry run traces with the eager backend: no code generation on a CPU
        compile_unet(unet, compile_mode, backend="eager")
    return unet, params


def step_inputs(case: Case, device: torch.device) -> dict[str, Any]:
    side = case.pixels // 8
    cfg = case.unet
    inputs: dict[str, Any] = {
        "latents": torch.randn(case.batch, 4, side, side, device=device),
        "encoder_hidden_states": torch.randn(case.batch, 77, cfg["cross_attention_dim"], device=device),
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        time_ids = torch.tensor([case.pixels, case.pixels, 0, 0, case.pixels, case.pixels], device=device)
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(case.batch, pooled, device=device),
                                       "time_ids": time_ids.repeat(case.batch, 1).float()}
    return inputs


def make_step(unet: Any, params: list, inputs: dict[str, Any], device: torch.device) -> Any:
    """One training step as the loop does it: noise, forward under autocast, loss, backward, clip, AdamW."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    finish = dit.optimizer_tail(params, device)
    latents = inputs["latents"]
    extra = {"added_cond_kwargs": inputs["added_cond_kwargs"]} if "added_cond_kwargs" in inputs else {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> torch.Tensor:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=device)
        with autocast:
            pred = unet(scheduler.add_noise(latents, noise, t), t, inputs["encoder_hidden_states"], **extra).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        return finish(loss)

    return step


def step_flops(case: Case, device: torch.device) -> float:
    """FLOPs of one forward+backward (no recomputation), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, params = trainable_unet(case, device, False, "off")
    step = make_step(unet, params, step_inputs(case, device), device)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = float(counter.get_total_flops())
    del unet, params, step
    return flops


def gemm_rate(device: torch.device, dry_run: bool) -> float:
    """The card's bf16 matmul rate in FLOP/s: the best of several large square GEMMs."""
    n = 256 if dry_run else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(3 if dry_run else 10):
        sync(device)
        start = time.perf_counter()
        for _ in range(1 if dry_run else 10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / (1 if dry_run else 10))
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Row:
    case: str
    checkpointing: bool
    compile: str
    images_per_s: float | None = None
    peak_gib: float | None = None
    share: float | None = None
    compile_s: float | None = None
    note: str = ""
    base: str = "bf16"  # the frozen base: bf16, or model.quantize's scheme


def run_variant(case: Case, device: torch.device, checkpointing: bool, compile_mode: str, steps: int,
                flops: float, rate: float) -> Row:
    row = Row(case.name, checkpointing, compile_mode)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        unet, params = trainable_unet(case, device, checkpointing, compile_mode)
        step = make_step(unet, params, step_inputs(case, device), device)
        sync(device)
        start = time.perf_counter()
        step()  # warm-up; compiles when compile is on
        step()
        sync(device)
        row.compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync(device)
        seconds = (time.perf_counter() - start) / steps
        if not torch.isfinite(loss):
            row.note = f"loss {loss.item()}"
        row.images_per_s = case.batch / seconds
        row.share = flops / seconds / rate
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        row.note = "out of memory"
    finally:
        unet = params = step = None  # noqa: F841  (free before the next variant)
    return row


def run_transformer_variant(case: dit.TransformerCase, device: torch.device, scheme: str, steps: int, flops: float,
                            rate: float) -> Row:
    row = Row(case.name, True, "off", base=scheme if scheme != "none" else "bf16")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = params = step = None
    try:
        start = time.perf_counter()
        model, params = dit.trainable_transformer(case, device, scheme)
        setup = time.perf_counter() - start
        step = dit.make_step(case, model, params, dit.step_inputs(case, model, device), device)
        sync(device)
        start = time.perf_counter()
        step()
        step()
        sync(device)
        row.compile_s = time.perf_counter() - start
        row.note = f"set-up {setup:.0f} s"
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync(device)
        seconds = (time.perf_counter() - start) / steps
        if not torch.isfinite(loss):
            row.note += f", loss {loss.item()}"
        row.images_per_s = case.batch / seconds
        row.share = flops / seconds / rate
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        row.note = "out of memory"
    finally:
        model = params = step = None  # noqa: F841  (free before the next variant)
    return row


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU (dry run)"


def format_rows(rows: list[Row], device: torch.device, rate: float, dry_run: bool) -> str:
    import diffusers
    import peft

    lines = [
        f"\n### GPU check: {card_name(device)}, {date.today()}"
        f"{' (DRY RUN: tiny widths, not figures)' if dry_run else ''}\n",
        f"`bash benchmarks/gpu_check.sh{' --dry-run' if dry_run else ''}`; torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, peft {peft.__version__}; measured {'fp32' if dry_run else 'bf16'} "
        f"GEMM rate {rate / 1e12:.1f} TFLOP/s. LoRA rank 16 on stylelora's default UNet/transformer targets, fp32 "
        "LoRA on a bf16 (or nf4) base, SDPA, fused AdamW.\n",
        "| model | gradient checkpointing | compile | frozen base | images/s | peak CUDA memory | share of GEMM rate "
        "| warm-up (2 steps, incl. compile) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        head = f"| {r.case} | {'on' if r.checkpointing else 'off'} | {r.compile} | {r.base} |"
        if r.images_per_s is None:
            lines.append(f"{head} {r.note} | | | |")
            continue
        peak = f"{r.peak_gib:.1f} GiB" if r.peak_gib is not None else "n/a (CPU)"
        lines.append(f"{head} {r.images_per_s:.2f} | {peak} | {100 * r.share:.1f} % | "
                     f"{r.compile_s:.0f} s{(' ' + r.note) if r.note else ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny widths on the CPU, one step per variant")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--budget", type=float, default=400, help="seconds; variants that would pass it are skipped")
    p.add_argument("--results", type=Path, help="append the rows here (default on a GPU: benchmarks/RESULTS.md)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS),
                   help="the models to time (default: all four)")
    args = p.parse_args()
    began = time.perf_counter()
    if args.dry_run:
        device, steps = torch.device("cpu"), 1
    elif torch.cuda.is_available():
        device, steps = torch.device("cuda"), args.steps
    else:
        raise SystemExit("gpu_check: no CUDA GPU here; use --dry-run to check the script on a CPU")
    results = args.results or (None if args.dry_run else ROOT / "benchmarks" / "RESULTS.md")
    rate = gemm_rate(device, args.dry_run)
    print(f"{card_name(device)}: GEMM rate {rate / 1e12:.2f} TFLOP/s", flush=True)
    rows: list[Row] = []
    # Eager variants first, then the transformers (bf16 and nf4 bases), then compiled ones: a budget cut drops the
    # slowest-to-measure last.
    wanted = {MODELS[m] for m in args.models}
    eager = [(c, gc, "off") for c in cases(args.dry_run) for gc in (False, True) if c.name in wanted]
    compiled = [(c, gc, "default") for c in cases(args.dry_run) for gc in (False, True) if c.name in wanted]
    transformers = [(c, True, scheme) for c in dit.transformer_cases(args.dry_run) if c.name in wanted
                    for scheme in ("none", "nf4")]
    order = [*eager, *transformers, *compiled]
    flops: dict[str, float] = {}
    last_cost: dict[tuple[str, str], float] = {}
    if args.dry_run:  # one compiled variant checks that path; the other three would only take minutes
        order = [v for v in order if v[2] != "default" or (v[0].name.startswith("SD1.5") and not v[1])]
    for case, checkpointing, compile_mode in order:
        elapsed = time.perf_counter() - began
        # A variant costs what the last one of its model and compile mode did; a first compiled one, a guess.
        expected = last_cost.get((case.name, compile_mode), 2 * last_cost.get((case.name, "off"), 0.0) + 60)
        transformer = isinstance(case, dit.TransformerCase)
        if elapsed + expected > args.budget and not args.dry_run:
            row = Row(case.name, checkpointing, "off" if transformer else compile_mode,
                      note=f"skipped: time budget ({args.budget:.0f} s)",
                      base=compile_mode if transformer and compile_mode != "none" else "bf16")
            rows.append(row)
            print(f"{case.name} checkpointing={checkpointing} {compile_mode}: skipped (budget)", flush=True)
            continue
        if case.name not in flops:
            flops[case.name] = dit.meta_flops(case) if transformer else step_flops(case, device)
        start = time.perf_counter()
        if transformer:  # its third entry is the frozen base's quantization, not a compile mode
            row = run_transformer_variant(case, device, compile_mode, steps, flops[case.name], rate)
        else:
            row = run_variant(case, device, checkpointing, compile_mode, steps, flops[case.name], rate)
        last_cost[(case.name, compile_mode)] = time.perf_counter() - start
        rows.append(row)
        label = f"base={row.base}" if transformer else f"compile={compile_mode}"
        print(f"{case.name} checkpointing={checkpointing} {label}: "
              f"{row.images_per_s or 0:.2f} images/s, peak {row.peak_gib or 0:.1f} GiB, "
              f"share {100 * (row.share or 0):.1f} %,"
              f" warm-up {row.compile_s or 0:.1f} s {row.note}", flush=True)
    text = format_rows(rows, device, rate, args.dry_run)
    print(text)
    if results is not None:
        with open(results, "a", encoding="utf-8") as f:
            f.write(text)
        print(f"rows appended to {results}")
    print(f"gpu_check: {time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
