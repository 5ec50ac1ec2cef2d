"""One LoRA training step of a full-size SDXL UNet (random weights, nothing downloaded): seconds and peak memory.

    python benchmarks/sdxl_gpu_step.py [--resolution 1024] [--batch-size 1] [--precision bf16]
                                       [--steps 10] [--checkpointing on off] [--size sdxl|tiny]

The UNet is built from SDXL 1.0 base's own config (2.6 B parameters, 3 levels, 1/2/10 transformer layers,
2048-wide cross-attention, text/time added conditioning) straight on the GPU, cast to the precision;
LoRA (rank 16, stylelora's default UNet targets) is injected with peft, as training does, and kept in
fp32. One step is what ``stylelora.train`` does per micro-batch after the batch is ready: noise, forward
with SDXL's pooled text and time ids, MSE, backward, AdamW step. Text encoders and the VAE are left out
(the text-encoder cache and the latent cache take them off the step).

Prints one Markdown row per gradient-checkpointing setting (median seconds per step after two warm-up
steps, CUDA's peak allocated memory) for benchmarks/RESULTS.md. ``--size tiny`` runs the same code on
builtin:tiny-sdxl's UNet, on the CPU when there is no GPU, to check the script itself.

For a GPU check script: ``run_step_benchmark(checkpointing=True)`` returns the figures as a dict, and
``main(["--steps", "5"])`` prints the rows; the exit status is 0 on success.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SDXL_UNET: dict[str, Any] = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
POOLED_WIDTH = {"sdxl": 1280, "tiny": 32}  # text_encoder_2's projection
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _unet(size: str, device: torch.device) -> Any:
    from diffusers import UNet2DConditionModel

    if size == "tiny":
        from stylelora.families.sdxl import build_tiny_sdxl

        return build_tiny_sdxl().unet.to(device)
    with torch.device(device):  # built in place: no 10 GB fp32 copy in host memory
        torch.manual_seed(0)
        return UNet2DConditionModel(**SDXL_UNET)


def run_step_benchmark(checkpointing: bool, *, size: str = "sdxl", resolution: int = 1024, batch_size: int = 1,
                       precision: str = "bf16", steps: int = 10, rank: int = 16) -> dict[str, Any]:
    """Time ``steps`` training steps of the UNet with LoRA; returns the figures as a dict."""
    from peft import LoraConfig, inject_adapter_in_model

    from stylelora.model.attention import set_attention
    from stylelora.model.blocks import UNET_TARGETS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if size == "sdxl" and device.type != "cuda":
        raise SystemExit("the full-size SDXL step needs a CUDA GPU; --size tiny checks the script on a CPU")
    dtype = DTYPES[precision]
    unet = _unet(size, device)
    unet.requires_grad_(False)
    if dtype != torch.float32:
        unet.to(dtype=dtype)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS,
                                       init_lora_weights="gaussian"), unet, adapter_name="default")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()
    set_attention(unet, "sdpa")
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    side = resolution // 8
    cross = unet.config.cross_attention_dim
    generator = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(batch_size, 4, side, side, generator=generator).to(device)
    states = torch.randn(batch_size, 77, cross, generator=generator).to(device)
    pooled = torch.randn(batch_size, POOLED_WIDTH[size], generator=generator).to(device)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size,
                            dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [], []
    for _ in range(steps + 2):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (batch_size,), device=device)
            pred = unet(latents + noise, timesteps, states,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "size": size, "resolution": resolution, "batch_size": batch_size, "precision": precision,
        "checkpointing": checkpointing, "seconds_per_step": statistics.median(seconds[2:]),
        "peak_gib": peak, "lora_params": sum(p.numel() for p in params),
        "unet_params": sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in params),
        "finite_loss": all(torch.isfinite(torch.tensor(losses)).tolist()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["sdxl", "tiny"], default="sdxl")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--precision", choices=list(DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"])
    args = p.parse_args(argv)
    print("| device | UNet | resolution, batch | precision | gradient checkpointing | s/step | peak memory "
          "| loss finite |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting in args.checkpointing:
        r = run_step_benchmark(setting == "on", size=args.size, resolution=args.resolution,
                               batch_size=args.batch_size, precision=args.precision, steps=args.steps)
        print(f"| {r['device']} | {r['size']} ({r['unet_params'] / 1e6:.0f} M + LoRA {r['lora_params'] / 1e6:.1f} M) "
              f"| {r['resolution']} px, {r['batch_size']} | {r['precision']} | {setting} | {r['seconds_per_step']:.3f} "
              f"| {r['peak_gib']:.2f} GiB | {r['finite_loss']} |".replace("nan GiB", "n/a (CPU)"), flush=True)
        del r
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
