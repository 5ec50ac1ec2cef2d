"""A model made ready to train: precision, devices, quantization of the frozen base, attention kernel,
gradient checkpointing, memory format, compilation and train/eval modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.config import Config
from ..core.errors import ModelError
from .base import BaseModel
from .lora import add_lora

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # accelerate's mixed_precision -> base weights
# model.quantize -> optimum-quanto's weight type
QUANTO_WEIGHTS = {"fp8": "qfloat8", "int8": "qint8", "nf4": "qint4"}


def prepare_for_training(
    model: BaseModel, config: Config, device: torch.device, mixed_precision: str
) -> tuple[list[torch.nn.Parameter], torch.dtype]:
    """Make ``model`` ready to train: LoRA (or LoCon/DoRA) layers injected with peft and kept in fp32, on a
    frozen base in the training precision (``mixed_precision``: "no", "fp16" or "bf16") and, with
    ``model.quantize``, quantized; all on ``device``, with the configured attention kernel, gradient
    checkpointing, memory format and compilation, UNet (and the text encoders when they train) in train
    mode and the VAE in eval mode. A VAE that overflows in fp16 (SDXL's) stays in fp32 when the run is
    fp16 (the family's ``vae_dtype``).

    The loop loads the base in its training precision already (``load_base_model(dtype=...)``), so the cast
    here changes nothing; a model passed in another precision is cast tensor by tensor. On the meta device
    (a plan: ``families.load_plan``) the same steps give the structure the estimate counts.

    Returns the trainable LoRA parameters and the dtype of the base weights.
    """
    from .attention import set_attention  # imports diffusers: not at import time

    train = config.train
    params = add_lora(model, config.lora)
    text_encoders = model.text_encoders
    training = [any(p.requires_grad for p in encoder.parameters()) for encoder in text_encoders]
    if model.family.sets_attention:  # a diffusion transformer keeps diffusers' own processors
        set_attention(model.denoiser, train.attention)
    if train.gradient_checkpointing:
        _enable_gradient_checkpointing(model, training)
    weight_dtype = WEIGHT_DTYPES.get(mixed_precision, torch.float32)
    scheme = quantize_scheme(config.model.quantize, model, device)
    quantized = scheme != "none"
    _place_weights(model, {id(p) for p in params}, weight_dtype, device, quantized)
    if quantized:
        quantize_frozen(model, scheme)
        for module in (model.denoiser, *model.text_encoders):
            module.to(device)
    if device.type == "cuda":  # TF32 matmuls for whatever still runs in fp32 (Ampere and newer; ignored before)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if train.channels_last:
        model.denoiser.to(memory_format=torch.channels_last)
    model.vae.eval()
    model.denoiser.train()
    for encoder, trains in zip(text_encoders, training, strict=True):
        encoder.train(trains)
    if train.compile != "off":
        compile_unet(model.denoiser, train.compile)
    return params, weight_dtype


def builds_cpu_kernel(scheme: str, device: torch.device) -> bool:
    """Whether a run quantized with ``scheme`` on ``device`` first has optimum-quanto compile its CPU kernel for
    unpacking 4-bit weights: a C++ build of a minute or more, once per install, that would otherwise pass in
    silence before the first step."""
    if scheme != "nf4" or device.type != "cpu":
        return False
    try:
        from optimum.quanto.library.extensions import get_extension

        build = Path(get_extension("quanto_cpp").build_directory)
    except (ImportError, KeyError, AttributeError):  # no quanto (refused later, by name), or another layout
        return False
    return not (build / "pytorch_version.txt").is_file()


def quantize_scheme(setting: str, model: BaseModel, device: torch.device) -> str:
    """``model.quantize`` as it applies to ``model`` on ``device``: auto is the family's choice on a GPU
    (``ModelFamily.quantize_on_gpu``: nf4 for FLUX.1 and SD3.5) and none elsewhere."""
    if setting != "auto":
        return setting
    return model.family.quantize_on_gpu(model.kind) if device.type == "cuda" else "none"


def _enable_gradient_checkpointing(model: BaseModel, training: list[bool]) -> None:
    """Gradient checkpointing on the denoiser and on each text encoder that trains (``training``)."""
    model.denoiser.enable_gradient_checkpointing()
    for encoder, trains in zip(model.text_encoders, training, strict=True):
        if trains:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _place_weights(model: BaseModel, trainable: set[int], weight_dtype: torch.dtype, device: torch.device,
                   quantized: bool) -> None:
    """Every weight on ``device``: the ``trainable`` (LoRA) ones in fp32, the frozen base in ``weight_dtype``
    (the VAE in its family's ``vae_dtype``).

    One tensor at a time, straight to the device in the training precision: the frozen base never has an
    fp32 copy on the GPU, and the LoRA weights are never rounded through bf16/fp16. A part to be
    ``quantized`` stays on the host until it is, so the device only ever holds its quantized weights."""
    for module in (model.denoiser, model.vae, *model.text_encoders):
        dtype = model.family.vae_dtype(model.vae.config, weight_dtype) if module is model.vae else weight_dtype
        host = quantized and module is not model.vae and device.type != "meta"
        where = torch.device("cpu") if host else device
        for p in module.parameters():
            p.data = p.data.to(where, torch.float32 if id(p) in trainable else dtype)
        for b in module.buffers():
            b.data = b.data.to(where, dtype if b.is_floating_point() else b.dtype)


def quantize_frozen(model: BaseModel, scheme: str) -> None:
    """Quantize the frozen weights of the denoiser and the text encoders in place with optimum-quanto
    (``scheme``: fp8, int8 or nf4, per ``model.quantize``). peft's LoRA layers (``lora_*``) are left out, so
    they stay trainable in fp32; the VAE is left alone (it only encodes, once per image with the cache)."""
    try:
        from optimum import quanto
    except ImportError as e:
        raise ModelError(
            f"model.quantize: '{scheme}' needs the optimum-quanto package; install it with 'pip install "
            "optimum-quanto', or set model.quantize=none"
        ) from e
    weights = getattr(quanto, QUANTO_WEIGHTS[scheme])
    for module in (model.denoiser, *model.text_encoders):
        for block in _blocks(module):  # block by block: one block's float and quantized weights at a time
            quanto.quantize(module, weights=weights, include=[block, f"{block}.*"], exclude=["*lora_*"])
            quanto.freeze(module)
            _return_freed_host_memory()
        for layer in module.modules():
            if isinstance(layer, quanto.QLinear):
                layer.register_forward_pre_hook(_contiguous_input)
        for name, p in module.named_parameters():  # quanto's modules come back trainable; only LoRA trains
            p.requires_grad_("lora_" in name)
        # What was not quantized (norms, biases) may still be views of the model file mapped into memory;
        # copies let the mapping, and with it every float weight read from the file, go.
        for t in [*(p for p in module.parameters() if type(p.data) is torch.Tensor), *module.buffers()]:
            t.data = t.data.clone()
    _return_freed_host_memory()


def _contiguous_input(layer: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """quanto's 4-bit matmul (torch's int4 kernel, taken for bf16 weights wider than 128 on a CPU or a recent
    GPU) refuses an input that is not contiguous in memory, and SD2's and SDXL's linear ``proj_in`` is handed a
    permuted view: without a copy those runs stopped at their first step."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def _blocks(module: torch.nn.Module, depth: int = 3) -> list[str]:
    """Names of ``module``'s children, each one that holds a list of blocks (the UNet's down_blocks, a
    text encoder's text_model.encoder.layers) opened up to ``depth`` levels: the units quantized one at
    a time."""
    names = []
    for name, child in module.named_children():
        lists = any(isinstance(m, torch.nn.ModuleList) for m in child.modules())
        if depth > 0 and lists and not list(child.parameters(recurse=False)):
            names += [f"{name}.{b}" for b in _blocks(child, depth - 1)]
        else:
            names.append(name)
    return names


def _return_freed_host_memory() -> None:
    """Hand the heap that quantizing freed (each block's float weights and temporaries) back to the OS.
    glibc keeps freed blocks for reuse, which left the process holding ~500 MiB more than its quantized
    weights on the peer model (measured); a no-op where the C library has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def compile_unet(unet: torch.nn.Module, mode: str, backend: str = "inductor") -> None:
    """``torch.compile`` the UNet in place (``train.compile``: default or max-autotune). The module, its
    parameters and its state dict stay the same objects, so peft, checkpoints and samples are unaffected;
    the first step (and the first sample, which runs without gradients) pays the compilation."""
    unet.compile(mode=None if mode == "default" else mode, backend=backend)
