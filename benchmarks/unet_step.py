"""One UNet training step alone (forward, MSE, backward, fused AdamW on the LoRA): seconds per step.

    python benchmarks/unet_step.py --model PEER/model [--precision fp32|bf16] [--attention stylelora|diffusers|plain]
                                   [--onednn ieee|tf32|bf16] [--compile] [--no-lora] [--threads 2]
    python benchmarks/unet_step.py --sdpa [--threads 2]

The first form builds the model's UNet with rank-4 LoRA on to_q/to_k/to_v/to_out.0 (the issue-16 setting;
``--no-lora``: none, the input's gradient instead), fixed random inputs at --resolution and --batch-size,
and times --steps warm steps after two (``--compile``: after the compiling step, timed apart). Attention:
stylelora's processor (fp32 attention on a CPU), diffusers' AttnProcessor2_0, or diffusers' plain matmul
processor. ``--onednn`` sets oneDNN's fp32 math mode (bf16 or tf32 inside fp32 convolutions and matmuls).
The second form times PyTorch's SDPA kernels (flash and math, fp32 and bf16) at the SD UNet's attention
shapes. Figures go in benchmarks/RESULTS.md with the machine, its load and the date.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

F = torch.nn.functional
SHAPES = [(1024, 1024, 16), (1024, 77, 16), (256, 256, 32), (256, 77, 32), (64, 64, 64), (64, 77, 64)]


def sdpa_table(repeats: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("| queries x keys, head width | fp32 flash | fp32 math | bf16 flash | bf16 math |")
    print("| --- | --- | --- | --- | --- |")
    for queries, keys, width in SHAPES:
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
                q = torch.randn(2, 8, queries, width, dtype=dtype, requires_grad=True)
                k, v = (torch.randn(2, 8, keys, width, dtype=dtype, requires_grad=True) for _ in range(2))
                grad = torch.randn(2, 8, queries, width, dtype=dtype)
                with sdpa_kernel(backend):
                    for _ in range(2):
                        F.scaled_dot_product_attention(q, k, v).backward(grad)
                    start = time.perf_counter()
                    for _ in range(repeats):
                        F.scaled_dot_product_attention(q, k, v).backward(grad)
                cells.append(f"{(time.perf_counter() - start) / repeats * 1000:.2f} ms")
        print(f"| {queries} x {keys}, {width} | " + " | ".join(cells) + " |")


def unet_step(args: argparse.Namespace) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from stylelora.core.config import LoraConfig
    from stylelora.families import load_base_model
    from stylelora.model.attention import CpuSdpaProcessor
    from stylelora.model.lora import add_lora

    if args.onednn:
        torch.backends.mkldnn.matmul.fp32_precision = args.onednn
        torch.backends.mkldnn.conv.fp32_precision = args.onednn
    model = load_base_model(args.model)
    unet = model.unet
    bf16 = args.precision == "bf16"
    unet.requires_grad_(False)
    params: list[torch.nn.Parameter] = []
    if not args.no_lora:
        params = add_lora(model, LoraConfig(rank=4, alpha=4, unet_targets=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = {id(p) for p in params}
    for p in unet.parameters():  # the frozen base in the run's precision, the LoRA in fp32
        p.data = p.data.to(torch.bfloat16 if bf16 and id(p) not in trainable else torch.float32)
    processor = {"stylelora": CpuSdpaProcessor, "diffusers": AttnProcessor2_0, "plain": AttnProcessor}[args.attention]
    unet.set_attn_processor(processor())
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    g = torch.Generator().manual_seed(0)
    side = args.resolution // model.pipeline.vae_scale_factor
    latents = torch.randn(args.batch_size, unet.config.in_channels, side, side, generator=g)
    text = torch.randn(args.batch_size, 77, unet.config.cross_attention_dim, generator=g)
    target = torch.randn(latents.shape, generator=g)
    timesteps = torch.linspace(10, 900, args.batch_size).long()

    def step() -> None:
        sample = latents.clone().requires_grad_(not params)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            pred = unet(sample, timesteps, text).sample
        F.mse_loss(pred.float(), target).backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if args.compile:
        unet.compile()
        start, cpu = time.perf_counter(), time.process_time()
        step()
        print(f"compiling step: {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")
    for _ in range(2):
        step()
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.precision}, attention {args.attention}, oneDNN {args.onednn or 'default'}, "
          f"compile {'on' if args.compile else 'off'}, {'no LoRA' if args.no_lora else 'LoRA rank 4'}, "
          f"{args.resolution} px batch {args.batch_size}, {torch.get_num_threads()} threads: "
          f"{statistics.median(times):.3f} s per step (median of {args.steps}), peak RSS {peak:.0f} MiB, "
          f"CPU time {statistics.median(cpu_times):.3f} s per step (on a shared machine the steadier figure)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--attention", choices=["stylelora", "diffusers", "plain"], default="stylelora")
    p.add_argument("--onednn", choices=["ieee", "tf32", "bf16"], default="")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-lora", action="store_true")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    p.add_argument("--sdpa", action="store_true", help="time the attention kernels alone")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sdpa:
        sdpa_table(args.steps)
    else:
        unet_step(args)


if __name__ == "__main__":
    main()
