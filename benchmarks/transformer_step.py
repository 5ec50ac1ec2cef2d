"""One FLUX.1- or SD3.5-shaped transformer training step as stylelora's loop takes it, for benchmarks/gpu_check.py:
the transformer with random weights (FLUX.1 [dev]'s or SD3.5 Large's published config, or a tiny width for a dry
run), LoRA rank 16 on the family's default targets set up by the trainer's own ``prepare_for_training`` (fp32
LoRA on a bf16 frozen base, or on an nf4 one with ``model.quantize=nf4``, gradient checkpointing), then flow
matching: a sigma per image, the noisy latents, the family's ``predict`` (FLUX: packed latents, guidance input),
the velocity loss, backward, clipping and fused AdamW. The FLOPs are counted once on the meta device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from published_models import FLUX_DEV_TRANSFORMER, SD35_LARGE_TRANSFORMER

from stylelora import families
from stylelora.core.config import Config
from stylelora.model.base import BaseModel
from stylelora.model.placement import prepare_for_training

TINY = {"flux-dev": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
        "sd35-large": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                           caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=32)}


@dataclass
class TransformerCase:
    name: str
    kind: str  # the family's kind: flux-dev, sd35-large
    config: dict[str, Any]
    pixels: int
    batch: int
    text_tokens: int

    @property
    def family(self) -> Any:
        return families.family_of(self.kind)


def transformer_cases(dry_run: bool) -> list[TransformerCase]:
    flux, sd35 = dict(FLUX_DEV_TRANSFORMER), dict(SD35_LARGE_TRANSFORMER)
    if dry_run:
        flux.update(TINY["flux-dev"])
        sd35.update(TINY["sd35-large"])
    return [TransformerCase("FLUX.1-shaped transformer", "flux-dev", flux, 64 if dry_run else 1024, 1,
                            16 if dry_run else 512),
            TransformerCase("SD3.5-Large-shaped transformer", "sd35-large", sd35, 64 if dry_run else 1024, 1,
                            16 if dry_run else 77 + 256)]


def _transformer(case: TransformerCase) -> Any:
    import diffusers

    return getattr(diffusers, case.family.transformer_class)(**case.config)


def no_vae() -> torch.nn.Module:
    """The VAE of a model built for a denoiser step alone: no weights, and the empty config the placement reads
    its precision from."""
    vae = torch.nn.Module()
    vae.config = {}
    return vae


def _model(case: TransformerCase, transformer: Any) -> BaseModel:
    """The transformer as a stylelora model; its text encoders are empty stand-ins (their states are inputs here)."""
    family = case.family
    encoders = {part: torch.nn.Module() for part in (*family.text_parts, family.t5_part)}
    pipeline = SimpleNamespace(transformer=transformer, vae=no_vae(), **encoders)
    return BaseModel(pipeline, "gpu-check", case.kind, family)


def trainable_transformer(case: TransformerCase, device: torch.device, scheme: str) -> tuple[BaseModel, list]:
    """The transformer with LoRA as the trainer sets it up, its frozen base bf16 or quantized (``scheme``)."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)  # 12B random weights: made in bf16
    try:
        with torch.device(device):
            transformer = _transformer(case)
    finally:
        torch.set_default_dtype(default)
    model = _model(case, transformer)
    config = Config().with_overrides({"lora.rank": 16, "lora.alpha": 16.0, "train.gradient_checkpointing": True,
                                      "model.quantize": scheme})
    params, _ = prepare_for_training(model, config, device, "bf16" if cuda else "no")
    return model, params


def step_inputs(case: TransformerCase, model: BaseModel, device: torch.device) -> dict[str, Any]:
    latents, _, text, _ = case.family.example_inputs(model, case.batch, case.pixels // 8, 75, False, device,
                                                     torch.float32)
    generator = torch.Generator(device).manual_seed(0)
    text.states = torch.randn(case.batch, case.text_tokens, text.states.shape[-1], device=device, generator=generator)
    text.pooled = torch.randn(text.pooled.shape, device=device, generator=generator)
    return {"latents": torch.randn(latents.shape, device=device, generator=generator), "text": text}


def optimizer_tail(params: list, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """What follows a step's loss, as the loop does it: backward, clip to norm 1, AdamW (fused on a GPU), the
    gradients dropped. Returns the loss, detached."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def finish(loss: torch.Tensor) -> torch.Tensor:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return finish


def make_step(case: TransformerCase, model: BaseModel, params: list, inputs: dict[str, Any],
              device: torch.device) -> Any:
    """One training step as the loop does it: sigma, noisy latents, predict under autocast, loss, backward, clip,
    AdamW."""
    finish = optimizer_tail(params, device)
    latents, text = inputs["latents"], inputs["text"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> torch.Tensor:
        noise = torch.randn_like(latents)
        sigma = torch.rand(latents.shape[0], device=device)
        s = sigma.view(-1, 1, 1, 1)
        with autocast:
            pred = case.family.predict(model.denoiser, (1 - s) * latents + s * noise, sigma, text, None)
            loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        return finish(loss)

    return step


def meta_flops(case: TransformerCase) -> float:
    """FLOPs of one forward and backward (no recomputation), counted on the meta device (no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    from stylelora.model.lora import add_lora

    with torch.device("meta"):
        model = _model(case, _transformer(case))
    add_lora(model, Config().with_overrides({"lora.rank": 16}).lora)
    meta = torch.device("meta")
    inputs = step_inputs_meta(case, model, meta)
    with FlopCounterMode(display=False) as counter:
        pred = case.family.predict(model.denoiser, inputs["latents"], torch.zeros(case.batch, device=meta),
                                   inputs["text"], None)
        pred.float().square().mean().backward()
    return float(counter.get_total_flops())


def step_inputs_meta(case: TransformerCase, model: BaseModel, device: torch.device) -> dict[str, Any]:
    latents, _, text, _ = case.family.example_inputs(model, case.batch, case.pixels // 8, 75, False, device,
                                                     torch.float32)
    text.states = torch.zeros(case.batch, case.text_tokens, text.states.shape[-1], device=device)
    return {"latents": latents, "text": text}
