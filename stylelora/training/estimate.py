"""How much memory a run takes, host RAM and device memory apart, and how long a step lasts, before it starts.

The memory is counted from the model's structure: the frozen weights as they are held (their training precision,
or quantized), the LoRA weights with their gradients and optimizer state, the tensors one step keeps for its
backward pass, the latent and text caches, and what the libraries themselves take. The step is replayed on
*meta* tensors (no memory, no arithmetic), which gives its floating-point operations and the bytes the backward
pass keeps; those become seconds through this machine's measured matmul speed and bytes through factors
calibrated on ``benchmarks/bench_estimate.py`` (figures in benchmarks/RESULTS.md). On a CUDA GPU the device's
share is measured instead: a short probe runs one forward and backward pass of the prepared model on a batch of
the configured size and reads the peak from the allocator. The model may be a plan on the meta device
(``families.load_plan``): then nothing is loaded at all. The result says whether the run fits and, when it does
not, which option to change first.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core import events
from ..core.config import Config

log = logging.getLogger(__name__)
GiB = 2**30
# Calibrated with benchmarks/bench_estimate.py on a CPU (builtin:small at 256 and 384 px, SD1.5- and SDXL-shaped
# models); the figures are in benchmarks/RESULTS.md. The activations' factors are each family's
# (``activation_factor``, ``half_precision_activations``).
LIBRARY_BYTES = 600 * 2**20  # a training process before any weight: torch, diffusers, transformers, peft, data
CPU_EFFICIENCY = 0.14  # a UNet training step's FLOP/s over a large fp32 matmul's FLOP/s on the same threads
STEP_OVERHEAD_S = 0.02  # per step: data, optimizer, Python
# A card's own use besides the tensors the allocator counts: the CUDA context, cuBLAS and cuDNN workspaces
# (PyTorch's documentation puts the context at 300 MB-1 GB). Not measured here: no GPU.
CUDA_CONTEXT_BYTES = int(0.75 * 2**30)
CARDS_GB = (12, 16, 24)  # the consumer cards the estimate says a run fits
# bytes per weight of a quantized linear or conv layer: optimum-quanto keeps fp8/int8 in one byte with a scale per
# output channel, and qint4 in half a byte with a bf16 scale and shift per group of 128 weights
QUANTIZED_WEIGHT_BYTES = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / 128}
# the optimizer's bytes per trainable parameter besides the fp32 weight: gradient + state
OPTIMIZER_STATE = {"adamw": 12, "adamw8bit": 6, "prodigy": 20, "adafactor": 8, "lion": 8, "came": 12,
                   "ademamix": 16, "schedulefree_adamw": 12}


@dataclass
class StepProfile:
    """One training step counted on meta tensors."""

    flops: float  # forward + backward of the UNet (and the text encoder when it trains)
    activation_bytes: int  # tensors kept for the backward pass (weights not counted)
    vae_flops: float  # encoding one batch of images (once per image with a latent cache)
    trainable: int  # LoRA parameters


@dataclass
class Estimate:
    device: str
    method: str  # "measured" (the device's share by a probe on the GPU) or "formula"
    host_bytes: int  # peak host RAM (resident memory) of the process
    device_bytes: int | None  # peak GPU memory; None on a CPU, where everything is host RAM
    step_seconds: float
    total_seconds: float
    steps: int
    host_available: int | None
    device_available: int | None = None
    parts: dict[str, int] = field(default_factory=dict)  # what the binding peak (the GPU's, else the host's) holds
    advice: list[str] = field(default_factory=list)
    cards: CardFit | None = None  # what the run takes on a GPU and which cards it fits
    loading_bytes: int = 0  # host RAM while the base is read (before model.quantize packs it); no setting lowers it

    @property
    def peak_bytes(self) -> int:
        """The peak that decides whether the run fits: the GPU's on a GPU, else the host's."""
        return self.device_bytes if self.device_bytes is not None else self.host_bytes

    @property
    def available_bytes(self) -> int | None:
        return self.device_available if self.device_bytes is not None else self.host_available

    @property
    def fits(self) -> bool:
        host = self.host_available is None or self.host_bytes <= self.host_available
        if self.device_bytes is None or self.device_available is None:
            return host
        return host and self.device_bytes <= self.device_available

    def summary(self) -> str:
        def amount(peak: int, room: int | None) -> str:
            return f"~{peak / GiB:.2f} GiB" + (f" of {room / GiB:.1f} GiB" if room else "")

        parts = ", ".join(f"{PART_NAMES[name]} {size / GiB:.2f}" for name, size in self.parts.items()
                          if name in PART_NAMES and size >= GiB / 200)
        if self.device_bytes is None:
            memory = f"memory (peak RSS) {amount(self.host_bytes, self.host_available)}"
        else:
            memory = (f"GPU memory {amount(self.device_bytes, self.device_available)}, host RAM (peak RSS) "
                      f"{amount(self.host_bytes, self.host_available)}")
        pace = f"~{_duration(self.step_seconds)} per step, ~{_duration(self.total_seconds)} for {self.steps} steps"
        text = f"estimate ({self.method}, {self.device}): {memory}" + (f" ({parts} GiB)" if parts else "") + f", {pace}"
        if not self.fits:
            text += ". It will not fit: " + "; ".join(self.advice or ["lower data.resolution or train.batch_size"])
        if self.cards is not None:
            text += f"; {self.cards.summary()}"
        return text


PART_NAMES = {"frozen_weights": "frozen weights", "activations": "activations",
              "lora_and_optimizer": "LoRA+optimizer", "latent_cache": "latent cache", "text_cache": "text cache",
              "libraries": "libraries"}


@dataclass
class CardFit:
    """One training step on a GPU in bf16, counted: the frozen weights as they are held there (``scheme``:
    none, or model.quantize's), the LoRA with its gradients and optimizer state, the activations the backward
    pass keeps, and the CUDA context; which of the usual cards (``CARDS_GB``) that fits."""

    scheme: str
    weight_bytes: int
    peak_bytes: int

    @property
    def fits(self) -> dict[int, bool]:
        return {gb: self.peak_bytes <= gb * GiB for gb in CARDS_GB}  # a "24 GB" card holds 24 GiB

    def summary(self) -> str:
        held = "bf16" if self.scheme == "none" else f"bf16, model.quantize={self.scheme}"
        yes = [gb for gb, ok in self.fits.items() if ok]
        no = [gb for gb, ok in self.fits.items() if not ok]

        def listed(sizes: list[int], word: str) -> str:
            return ", ".join(map(str, sizes[:-1])) + f" {word} " * (len(sizes) > 1) + f"{sizes[-1]} GB"

        verdict = (f"fits {listed(yes, 'and')} cards" if yes else "fits none of the 12, 16 and 24 GB cards") + (
            f", not {listed(no, 'or')}" if yes and no else "")
        weights = f"{self.weight_bytes / GiB:.1f} GiB of weights"
        return f"on a GPU ({held}): ~{self.peak_bytes / GiB:.1f} GiB ({weights}), {verdict}"


def frozen_weight_bytes(model: Any, scheme: str) -> int:
    """The bytes the frozen denoiser, text encoders and VAE take on a GPU in bf16, the denoiser's and text
    encoders' linear and conv weights quantized when ``scheme`` is not none (as ``placement.quantize_frozen``)."""
    meta = _meta_copy(model)
    per_weight = QUANTIZED_WEIGHT_BYTES.get(scheme)
    total = 0.0
    for network in (meta.denoiser, *meta.text_encoders, meta.vae):
        quantized = per_weight is not None and network is not meta.vae
        for module in network.modules():
            for name, p in module.named_parameters(recurse=False):
                layer = isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name == "weight"
                total += p.numel() * (per_weight if quantized and layer else 2)
    return int(total)


def card_fit(model: Any, config: Config, profile: StepProfile | None = None) -> CardFit:
    """``CardFit`` of ``config`` on ``model``'s architecture, ``model.quantize`` resolved as on a GPU."""
    from ..model.placement import quantize_scheme

    profile = profile or profile_step(model, config)
    scheme = quantize_scheme(config.model.quantize, model, torch.device("cuda"))
    weights = frozen_weight_bytes(model, scheme)
    family = model.family
    activations = profile.activation_bytes * family.half_precision_activations * family.activation_factor
    lora = profile.trainable * 4 + _optimizer_bytes(profile, config)
    return CardFit(scheme, weights, int(weights + activations + lora + CUDA_CONTEXT_BYTES))


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- counting on meta tensors ------------------------------------------------------------------------


@contextlib.contextmanager
def _cpu_attention() -> Iterator[None]:
    """On meta tensors scaled_dot_product_attention takes the plain path (keeping the n x n scores); a
    CPU run takes the fused kernel, which keeps only the output and a log-sum-exp. Count that one."""
    plain = torch.nn.functional.scaled_dot_product_attention

    def fused(q: torch.Tensor | None = None, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
              attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              **named: Any) -> torch.Tensor:
        # diffusers' transformers call it with query=, key=, value= (and enable_gqa=)
        q, k, v = (q if q is not None else named["query"], k if k is not None else named["key"],
                   v if v is not None else named["value"])
        if q.device.type != "meta" or attn_mask is not None:
            return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                          scale=scale)[0]

    torch.nn.functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = plain


def _meta_copy(model: Any) -> Any:
    """The model's denoiser, VAE and text encoders rebuilt from their configs on the meta device."""
    from ..model.base import BaseModel

    pipe, family = model.pipeline, model.family
    with torch.device("meta"):
        parts = {family.denoiser: type(model.denoiser).from_config(model.denoiser.config),
                 "vae": type(model.vae).from_config(model.vae.config)}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                parts[name] = type(encoder)(encoder.config)
    tokenizers = {name: getattr(pipe, name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
                  if getattr(pipe, name, None) is not None}
    pipeline = types.SimpleNamespace(**parts, **tokenizers, vae_scale_factor=pipe.vae_scale_factor)
    return BaseModel(pipeline, model.name, model.kind, family)


def profile_step(model: Any, config: Config, batch_size: int | None = None, resolution: int | None = None,
                 gradient_checkpointing: bool | None = None) -> StepProfile:
    """Count one training step of ``config`` on ``model``'s architecture (the weights are not touched)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..model.attention import set_attention
    from ..model.lora import add_lora

    batch = batch_size or config.train.batch_size
    side = (resolution or config.data.resolution) // model.pipeline.vae_scale_factor
    checkpointing = config.train.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    meta = _meta_copy(model)
    add_lora(meta, config.lora)
    if meta.family.sets_attention:
        set_attention(meta.denoiser, config.train.attention)
    meta.denoiser.train()
    if checkpointing:
        meta.denoiser.enable_gradient_checkpointing()
    networks = [meta.denoiser, *meta.text_encoders]
    trainable = sum(p.numel() for network in networks for p in network.parameters() if p.requires_grad)
    weights = {id(p) for network in networks for p in network.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # a weight, or a view of one (a linear layer saves its weight transposed), is held anyway: no activation
        if id(t) not in weights and (t._base is None or id(t._base) not in weights):
            kept[id(t)] = t.numel() * t.element_size()
        return t

    counter = FlopCounterMode(display=False)
    family = meta.family
    with counter, _cpu_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        latents, timesteps, text, time_ids = family.example_inputs(
            meta, batch, side, config.data.max_token_length, config.lora.train_text_encoder, "meta", torch.float32)
        out = family.predict(meta.denoiser, latents, timesteps, text, time_ids)
        out.float().square().mean().backward()
    flops = counter.get_total_flops()
    pixels = torch.zeros(batch, 3, side * model.pipeline.vae_scale_factor, side * model.pipeline.vae_scale_factor,
                         device="meta")
    vae_counter = FlopCounterMode(display=False)
    with vae_counter, torch.no_grad(), _cpu_attention():
        meta.vae.encode(pixels)
    return StepProfile(flops, sum(kept.values()), vae_counter.get_total_flops(), trainable)


# --- this machine ---------------------------------------------------------------------------------------


def matmul_flops_per_second(device: torch.device, seconds: float = 0.15) -> float:
    """A large fp32 matmul's speed on ``device`` with torch's current threads, as the machine would give it
    with nobody else running: on a CPU counted in this process's CPU seconds (a busy machine slows the
    wall clock, not the work), divided over torch's threads; on a GPU the best of short runs."""
    n = 1024 if device.type == "cpu" else 4096
    a = torch.rand(n, n, device=device, generator=torch.Generator(device).manual_seed(0))
    b = torch.rand(n, n, device=device, generator=torch.Generator(device).manual_seed(1))
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    best, spent = math.inf, 0.0
    while spent < seconds or best == math.inf:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = max(clock() - start, 1e-6)
        best, spent = min(best, took), spent + took
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    return 2 * n**3 / best * threads


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory(device: torch.device) -> int | None:
    """Bytes the run may use: the GPU's total, or the machine's memory available now plus what this
    process already holds (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"] + resident_bytes()
    except (OSError, KeyError, ValueError, IndexError):
        return None


# --- what the model holds ---------------------------------------------------------------------------------


def held_bytes(t: torch.Tensor) -> int:
    """The bytes a tensor holds: its elements at its precision; a quantized one's (optimum-quanto) packed data and
    scales. A tensor on the meta device counts what it would hold."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(held_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def networks(model: Any) -> list[torch.nn.Module]:
    """Every network of the model (denoiser, VAE, text encoders; a plan's too)."""
    pipe = model.pipeline
    found = pipe.components.values() if hasattr(pipe, "components") else vars(pipe).values()
    return [m for m in found if isinstance(m, torch.nn.Module)]


def frozen_bytes(model: Any, as_loaded: bool = False) -> int:
    """The frozen weights and buffers of every network as they are held now (quantized ones packed), or
    ``as_loaded``: in their float precision, as they are read before being quantized."""
    seen: set[int] = set()
    total = 0
    for network in networks(model):
        for t in [*network.parameters(), *network.buffers()]:
            if t.requires_grad or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size() if as_loaded else held_bytes(t.data)
    return total


# --- the estimate ---------------------------------------------------------------------------------------


def _cache_bytes(config: Config, model: Any, num_images: int) -> tuple[int, int]:
    """(latent cache, text cache): the VAE's mean and spread of every image (and flip side) at its bucket in fp32
    on the host, when the latent cache is in memory; the text encoders' states of every caption, when cached."""
    side = config.data.resolution // model.pipeline.vae_scale_factor
    sides = 2 if config.data.random_flip else 1
    latents = 0
    if config.cache.latents == "memory" and config.data.center_crop:
        latents = num_images * sides * 2 * model.vae.config.latent_channels * side * side * 4
    text = 0
    if config.cache.text_encoder and not config.lora.train_text_encoder and not config.data.shuffle_tags:
        encoders = model.text_encoders
        dtype = next(encoders[0].parameters()).dtype if encoders else torch.float32
        _, _, states, _ = model.family.example_inputs(model, 1, 1, config.data.max_token_length, False, "meta", dtype)
        per_caption = sum(held_bytes(t) for t in (states.states, getattr(states, "pooled", None)) if t is not None)
        text = num_images * per_caption
    return latents, text


def estimate(model: Any, config: Config, device: torch.device, steps: int, num_images: int,
             probe: bool = True) -> Estimate:
    """The memory and time of ``steps`` steps of ``config`` on ``model`` (prepared for training on ``device``, its
    frozen weights in the run's precision; or a plan of it on the meta device), host RAM and device memory apart;
    the device's share measured with a probe on CUDA when ``probe`` (and the weights are real), else from the
    formula."""
    profile = profile_step(model, config)
    fp32 = StepProfile(profile.flops, profile.activation_bytes, profile.vae_flops, profile.trainable)
    if base_dtype(model.denoiser) in (torch.bfloat16, torch.float16):
        profile.activation_bytes = int(profile.activation_bytes * model.family.half_precision_activations)
    encode_once = config.cache.latents != "off" and config.data.center_crop
    gpu = device.type == "cuda"
    planned = next(model.denoiser.parameters()).device.type == "meta"
    if gpu and probe and not planned:
        measured_peak, step_s, vae_s = _probe_cuda(model, config, device)
        method = "measured"
    else:
        speed = matmul_flops_per_second(device) * CPU_EFFICIENCY
        step_s = profile.flops / speed + STEP_OVERHEAD_S
        vae_s = profile.vae_flops / speed
        measured_peak, method = None, "formula"
    latent_cache, text_cache = _cache_bytes(config, model, num_images)
    weights = frozen_bytes(model)
    step = {"frozen_weights": weights, "activations": int(profile.activation_bytes * model.family.activation_factor),
            "lora_and_optimizer": _optimizer_bytes(profile, config), "text_cache": text_cache}
    # Loading reads every weight to the host in its float precision first (a quantized base is quantized
    # block by block after that); the latent cache always lives on the host.
    loading = LIBRARY_BYTES + frozen_bytes(model, as_loaded=True)
    if gpu:
        device_bytes = measured_peak if measured_peak is not None else sum(step.values())
        host = max(loading, LIBRARY_BYTES + latent_cache)
        parts = step if measured_peak is None else {"measured on the GPU": measured_peak}
    else:
        device_bytes = None
        parts = {**step, "latent_cache": latent_cache, "libraries": LIBRARY_BYTES}
        host = max(loading, sum(parts.values()))
    batches_to_encode = math.ceil(num_images / config.train.batch_size)
    total = steps * (step_s + (0 if encode_once else vae_s)) + (batches_to_encode * vae_s if encode_once else 0)
    result = Estimate(str(device), method, host, device_bytes, step_s, total, steps,
                      available_memory(torch.device("cpu")), available_memory(device) if gpu else None, parts,
                      cards=card_fit(model, config, fp32), loading_bytes=loading)
    if not result.fits:
        result.advice = advice(model, config, result)
    return result


def base_dtype(denoiser: torch.nn.Module) -> torch.dtype:
    """The precision of the denoiser's frozen weights: the run's, whatever the LoRA's (fp32)."""
    return next(p for p in denoiser.parameters() if not p.requires_grad).dtype


def _optimizer_bytes(profile: StepProfile, config: Config) -> int:
    """The LoRA weights (fp32), their gradients and the optimizer's state."""
    return profile.trainable * (4 + OPTIMIZER_STATE.get(config.train.optimizer, 12))


def _probe_cuda(model: Any, config: Config, device: torch.device) -> tuple[int, float, float]:
    """(peak bytes, seconds per step, seconds per VAE batch) measured on the GPU with random inputs; the
    LoRA weights, their gradients and every random stream are left as they were."""
    denoiser, vae, family = model.denoiser, model.vae, model.family
    batch, side = config.train.batch_size, config.data.resolution
    dtype = base_dtype(denoiser)
    with torch.random.fork_rng(devices=[device]):
        pixels = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with torch.no_grad():
            vae.encode(pixels)
        torch.cuda.synchronize(device)
        vae_s, vae_peak = time.perf_counter() - start, torch.cuda.max_memory_allocated(device)
        del pixels
        with torch.no_grad():  # the text as the step gets it (encoded beforehand unless an encoder trains)
            latents, timesteps, text, time_ids = family.example_inputs(
                model, batch, side // model.pipeline.vae_scale_factor, config.data.max_token_length, False, device,
                dtype)
        times = []
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):  # the first pass warms kernels up; the second is timed
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = family.predict(denoiser, latents, timesteps, text, time_ids).float().square().mean()
            loss.backward()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device)
        for p in denoiser.parameters():
            p.grad = None
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    optimizer = trainable * (OPTIMIZER_STATE.get(config.train.optimizer, 12) - 4)  # gradients were measured
    return max(peak + optimizer, vae_peak), times[-1] + STEP_OVERHEAD_S, vae_s


def advice(model: Any, config: Config, result: Estimate) -> list[str]:
    """What to change, most effective first, each with the peak it would give (from the formula)."""
    if result.available_bytes is None:
        return []
    train = config.train
    base = profile_step(model, config).activation_bytes
    factor = model.family.activation_factor
    kept = result.parts.get("activations", int(base * factor))  # what the step's activations hold
    per_byte = kept / base if base else factor
    on_host = result.device_bytes is None
    # on the host the peak may be the loading, not the step: the options below change only the step
    fixed = (sum(result.parts.values()) if on_host else result.peak_bytes) - kept
    floor = result.loading_bytes if on_host else 0
    options: list[tuple[str, int]] = []
    if not train.gradient_checkpointing:
        saved = profile_step(model, config, gradient_checkpointing=True).activation_bytes
        options.append(("set train.gradient_checkpointing=true", int(fixed + saved * per_byte)))
    if train.batch_size > 1:
        half = max(1, train.batch_size // 2)
        options.append((f"set train.batch_size={half} with train.gradient_accumulation_steps="
                        f"{train.gradient_accumulation_steps * train.batch_size // half} (the same images per step)",
                        int(fixed + base * half / train.batch_size * per_byte)))
    if result.device.startswith("cuda") and base_dtype(model.denoiser) == torch.float32:
        options.append(("set train.mixed_precision=bf16 (or fp16): the base weights take half the memory",
                        int(result.peak_bytes - frozen_bytes(model) / 2)))
    if config.data.resolution > 256:
        lower = max(256, config.data.resolution * 3 // 4 // 64 * 64)
        options.append((f"lower data.resolution to {lower}",
                        int(fixed + base * (lower / config.data.resolution) ** 2 * per_byte)))
    options = sorted(((text, max(floor, peak)) for text, peak in options if max(floor, peak) < result.peak_bytes),
                     key=lambda o: o[1])
    said = [f"{text} (~{peak / GiB:.2f} GiB)" for text, peak in options]
    if on_host and floor > result.available_bytes:
        quantized = frozen_bytes(model) < frozen_bytes(model, as_loaded=True)
        packed = ", before model.quantize packs them" if quantized else ""
        said.append(f"reading the base model alone takes ~{floor / GiB:.2f} GiB (its weights in the run's precision"
                    f"{packed}): use a machine with more memory, or train on a GPU")
    return said


def emit_estimate(model: Any, config: Config, device: torch.device, steps: int, num_images: int,
                  on_event: events.EventHandler) -> Estimate | None:
    """Estimate the run and report it as an ``Estimated`` event (a warning when it will not fit). The
    estimate only advises: if it cannot be made, the run goes on and a log line says why. It draws no
    number from the run's random streams, so a resumed run and an uninterrupted one stay the same."""
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            result = estimate(model, config, device, steps, num_images)
    except (RuntimeError, ValueError, TypeError, AttributeError, NotImplementedError) as e:  # meta tensors miss it
        log.warning("no memory and time estimate for this run (%s: %s)", type(e).__name__, e)
        return None
    on_event(events.Estimated(result.summary(), result.fits, result.peak_bytes, result.step_seconds,
                              result.total_seconds, result.method, result.advice, result.host_bytes,
                              result.device_bytes))
    return result
