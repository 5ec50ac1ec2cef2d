"""Base models (built-in, diffusers folder, single file, hub id) and LoRA injection through peft."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import blocks
from .config import Config, LoraConfig
from .errors import ConfigError, ModelError, offline_hint, setting

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
# LoCon covers what kohya's conv_dim covers (sd-scripts networks/lora.py): every Conv2d and Linear
# inside the UNet's ResnetBlock2D, Downsample2D and Upsample2D. Its kxk convs (ResNet conv1/conv2, the
# down/upsampler conv) take conv_rank/conv_alpha; the 1x1 conv_shortcut (ResNets that change width)
# and time_emb_proj take the network's rank/alpha, as kohya gives 1x1 convs and Linears.
# (No other UNet module ends in these names.)
LOCON_KXK_TARGETS = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]
LOCON_LINEAR_TARGETS = ["conv_shortcut", "time_emb_proj"]
LOCON_TARGETS = LOCON_KXK_TARGETS + LOCON_LINEAR_TARGETS
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
# peft's own layers and weights: LoRA (lora_A, lora_B, lora_magnitude_vector), LoHa (hada_*), LoKr (lokr_*)
ADAPTER_PARAM = re.compile(r"(^|\.)(lora_|hada_|lokr_)")
KINDS = ("sd1", "sd2", "sd2-v", "sdxl")  # SD1.x, SD2 512 (epsilon), SD2 768-v, SDXL
KIND_NAMES = {"sd1": "SD1.x", "sd2": "SD2 512", "sd2-v": "SD2 768-v", "sdxl": "SDXL"}
KIND_PRESETS = {"sdxl": "sdxl-style", "sd2-v": "sd2-768v"}  # presets/<name>.toml made for a kind


@dataclass
class BaseModel:
    """A loaded Stable Diffusion pipeline plus what stylelora needs to know about it."""

    pipeline: Any  # diffusers StableDiffusionPipeline (or XL)
    name: str
    kind: str  # one of KINDS: "sd1", "sd2", "sd2-v" or "sdxl"

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.pipeline.text_encoder

    @property
    def text_encoder_2(self) -> torch.nn.Module | None:
        """SDXL's second (OpenCLIP-shaped) text encoder; None for SD1/SD2."""
        return getattr(self.pipeline, "text_encoder_2", None)

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer

    @property
    def token_limit(self) -> int:
        """How many tokens (start and end included) a caption may have: the text encoder's positions."""
        return token_limit(self.tokenizer, self.text_encoder)

    @property
    def tokenizers(self) -> list[Any]:
        """One tokenizer per text encoder (SDXL's second pads differently)."""
        second = getattr(self.pipeline, "tokenizer_2", None) if self.text_encoder_2 is not None else None
        return [self.tokenizer] + ([second] if second is not None else [])

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders in order: SD1/SD2 have one, SDXL two."""
        return [module for part, module in self.parts() if part.startswith("text_encoder")]

    def parts(self) -> list[tuple[str, torch.nn.Module]]:
        """The adaptable networks by canonical part name: unet, text_encoder and (SDXL) text_encoder_2."""
        found = [("unet", self.unet), ("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2)]
        return [(name, module) for name, module in found if module is not None]

    @property
    def prediction_type(self) -> str:
        return self.pipeline.scheduler.config.get("prediction_type", "epsilon")

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.pipeline.vae_scale_factor


def token_limit(tokenizer: Any, text_encoder: Any) -> int:
    """The longest token sequence ``text_encoder`` takes: its ``max_position_embeddings``, whatever the
    tokenizer's ``model_max_length`` says (ComfyUI's SD1 tokenizer config says 8192; CLIP has 77)."""
    positions = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    return min(int(tokenizer.model_max_length), int(positions)) if positions else int(tokenizer.model_max_length)


def fit_tokenizers(pipeline: Any) -> None:
    """Cut each tokenizer's ``model_max_length`` to its text encoder's positions, so every prompt and
    caption (training batches, validation, diffusers' own prompt encoding in samples and previews) is
    cut where the text encoder ends instead of crashing it."""
    for tokenizer_name, encoder_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder = getattr(pipeline, tokenizer_name, None), getattr(pipeline, encoder_name, None)
        if tokenizer is not None and encoder is not None:
            tokenizer.model_max_length = token_limit(tokenizer, encoder)


# --- built-in models ----------------------------------------------------------------------------


def _builtin_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """A CLIP tokenizer whose vocabulary is generated in code: byte-level symbols, no merges. OpenAI's
    CLIP pads with its end token; OpenCLIP's (SD2, SDXL's second) with "!" (id 0 here, as there)."""
    from transformers import CLIPTokenizer

    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    try:
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad_token)
    except TypeError:  # transformers 4: the tokenizer reads its vocabulary from files only
        import json
        import tempfile

        with tempfile.TemporaryDirectory(prefix="stylelora-tokenizer-") as tmp:
            files = {"vocab.json": json.dumps(vocab), "merges.txt": "#version: 0.2\n"}
            for name, text in files.items():  # scratch files read once here, not project output (no fileio)
                with open(Path(tmp) / name, "w", encoding="utf-8") as f:
                    f.write(text)
            return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77,
                                 pad_token=pad_token)


# Sizes of the SD1-shaped built-ins. tiny: tests and the CPU demo (64 px native). small: the same
# layout as SD1.5 (three cross-attention levels, two layers per block, VAE factor 8) at about a tenth
# of its width, 256 px native, for benchmarks that should resemble real training.
SD1_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "unet": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16),
        "vae": dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, layers_per_block=1, sample_size=64),
        "clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     projection_dim=32),
    },
    "small": {
        "unet": dict(sample_size=32, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32),
        "vae": dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=32, layers_per_block=1, sample_size=256),
        "clip": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                     projection_dim=256),
    },
}


def _clip_config(tokenizer: Any, **size: Any) -> Any:
    """A CLIP text config of the given size that fits the built-in tokenizer (77 tokens, its special ids)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **size,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny(prediction_type: str = "epsilon") -> Any:
    """An SD1.x-shaped pipeline with small, random, deterministic weights (for tests and demos).

    The VAE downsamples by 8 and the UNet has cross-attention transformer blocks with 1x1-conv
    proj_in/proj_out, as SD1.5 does, so key names and shapes exercise the real code paths.
    """
    return _build_sd1(SD1_SIZES["tiny"], prediction_type)


def build_small(prediction_type: str = "epsilon") -> Any:
    """``builtin:small``: SD1.5's layout at a tenth of its width (256 px native), for benchmarks."""
    return _build_sd1(SD1_SIZES["small"], prediction_type)


def _build_sd1(size: dict[str, Any], prediction_type: str) -> Any:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    tokenizer = _builtin_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**size["unet"], use_linear_projection=False)
        vae = AutoencoderKL(
            **size["vae"],
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
        )
        text_encoder = CLIPTextModel(_clip_config(tokenizer, **size["clip"]))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl(prediction_type: str = "epsilon") -> Any:
    """An SDXL-shaped pipeline with small random deterministic weights: two text encoders, the
    added time/text conditioning, and SDXL's block layout (DownBlock2D then two cross-attention
    levels, two layers per block), so SGM key names and the XL loaders are exercised for real."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _builtin_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            cross_attention_dim=64,  # text_encoder hidden (32) + text_encoder_2 hidden (32)
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + pooled text_encoder_2
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=64,
            force_upcast=True,  # as SDXL's own VAE: it overflows in fp16
        )
        encoders = []
        for cls in (CLIPTextModel, CLIPTextModelWithProjection):
            encoders.append(cls(_clip_config(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, projection_dim=32, hidden_act="gelu")))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=_builtin_tokenizer(pad_token="!"),  # OpenCLIP's, as SDXL's tokenizer_2
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_sd2v(prediction_type: str = "v_prediction") -> Any:
    """An SD2-768-v-shaped pipeline with small random deterministic weights: linear proj_in/proj_out, a
    number of heads per block, an OpenCLIP-shaped text encoder (gelu, a tokenizer that pads with "!"),
    v-prediction, 96 px native (768-v is 96 latents wide, this is 12); its cross-attention is 48 wide,
    so only its structure says SD2."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    tokenizer = _builtin_tokenizer(pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=12, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16,
        )
        vae = AutoencoderKL(**SD1_SIZES["tiny"]["vae"], down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
        text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, projection_dim=48, hidden_act="gelu"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


BUILTIN = {"tiny": build_tiny, "small": build_small, "tiny-sdxl": build_tiny_sdxl, "tiny-sd2v": build_tiny_sd2v}


# --- loading ------------------------------------------------------------------------------------


def _setting(config: Any, key: str) -> Any:
    """One value of a diffusers config (a dict) or a transformers config (attributes); None when absent."""
    if config is None:
        return None
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def detect_kind(pipeline_class: str, unet_config: Any, text_encoder_config: Any = None,
                scheduler_config: Any = None) -> str:
    """sd1, sd2, sd2-v or sdxl, from the model's structure rather than one width.

    SDXL: an XL pipeline class, or a UNet with SDXL's added text/time conditioning. SD2: linear
    proj_in/proj_out (SD1 uses 1x1 convs), an OpenCLIP-shaped text encoder (gelu; OpenAI's CLIP uses
    quick_gelu) or SD2's 1024-wide cross-attention. SD2-768-v: the scheduler predicts v; without a
    scheduler config, a UNet 96 latents wide (768 px; SD2-512 is 64).
    """
    if "XL" in pipeline_class or _setting(unet_config, "addition_embed_type") == "text_time":
        return "sdxl"
    open_clip = _setting(text_encoder_config, "hidden_act") == "gelu"
    if not (_setting(unet_config, "use_linear_projection") or open_clip
            or _setting(unet_config, "cross_attention_dim") == 1024):
        return "sd1"
    prediction = _setting(scheduler_config, "prediction_type")
    if prediction is None:
        return "sd2-v" if (_setting(unet_config, "sample_size") or 0) >= 96 else "sd2"
    return "sd2-v" if prediction == "v_prediction" else "sd2"


def _kind(pipeline: Any) -> str:
    encoder = getattr(pipeline, "text_encoder", None)
    return detect_kind(type(pipeline).__name__, pipeline.unet.config, getattr(encoder, "config", None),
                       pipeline.scheduler.config)


def _apply_kind(pipeline: Any, name: str, kind: str, prediction_type: str) -> str:
    """The kind of ``pipeline``, with ``model.kind`` (``kind``) applied: it may correct SD1 against SD2 and
    SD2-512 against 768-v (which sets the prediction type when ``prediction_type`` is auto), never the
    architecture itself (SDXL or not)."""
    detected = _kind(pipeline)
    if kind == "auto" or kind == detected:
        return detected
    if (kind == "sdxl") != (detected == "sdxl"):
        raise ConfigError(
            f"model.kind: '{kind}' does not fit '{name}', which is {KIND_NAMES[detected]} by its structure "
            f"({'two text encoders and added time conditioning' if detected == 'sdxl' else 'one text encoder'}); "
            "set model.kind=auto"
        )
    if prediction_type == "auto" and kind in ("sd2", "sd2-v"):
        from diffusers import DDIMScheduler

        pipeline.scheduler = DDIMScheduler.from_config(
            pipeline.scheduler.config, prediction_type="v_prediction" if kind == "sd2-v" else "epsilon")
    return kind


def _is_hub_id(name: str) -> bool:
    return "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1


def _offline_hint(name: str) -> str:
    return offline_hint("model", name, f"the folder ({setting('model.name', '/path/to/folder')}) or a single "
                        f".safetensors file ({setting('model.name', 'file.safetensors')})")


def load_base_model(name: str, config_source: str = "", prediction_type: str = "auto",
                    kind: str = "auto") -> BaseModel:
    """Load a base model named by one string: ``builtin:NAME``, a folder, a file or a hub id.

    Its kind is detected from its structure (``detect_kind``); ``kind`` (``model.kind``) corrects it."""
    if name.startswith("builtin:"):
        key = name.split(":", 1)[1]
        if key not in BUILTIN:
            raise ModelError(
                f"model '{name}': no such built-in model; built-ins are "
                + ", ".join(f"builtin:{k}" for k in BUILTIN)
            )
        pipeline = BUILTIN[key](**_pt(prediction_type))
        for component in pipeline.components.values():  # from_pretrained gives eval mode; so do built-ins
            if isinstance(component, torch.nn.Module):
                component.eval()
        return BaseModel(pipeline, name, _apply_kind(pipeline, name, kind, prediction_type))

    path = Path(name).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(
            f"model '{name}': pickled checkpoints ({path.suffix}) can run code when loaded and are "
            "not opened. Convert it to .safetensors or use a diffusers folder."
        )
    if path.is_dir():
        pipeline = _load_folder(path, name)
    elif path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelError(f"model '{name}': file not found")
        pipeline = _load_single_file(path, config_source)
    elif path.exists():
        raise ModelError(
            f"model '{name}': not a diffusers folder or a .safetensors file; give one of those, "
            "a hub id, or builtin:tiny"
        )
    elif _is_hub_id(name):
        pipeline = _load_hub(name)
    else:
        raise ModelError(
            f"model '{name}': no such folder or file. Give a diffusers folder, a .safetensors "
            "checkpoint, a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, or builtin:tiny"
        )
    if prediction_type != "auto":
        from diffusers import DDIMScheduler

        pipeline.scheduler = DDIMScheduler.from_config(
            pipeline.scheduler.config, prediction_type=prediction_type
        )
    fit_tokenizers(pipeline)
    own_aligned_memory(pipeline)
    return BaseModel(pipeline, name, _apply_kind(pipeline, name, kind, prediction_type))


# torch allocates every CPU tensor on a 64-byte boundary; safetensors maps a file's tensors at 8-byte
# offsets, and diffusers and transformers keep those views as the weights. MKL's sgemm (outside its
# conditional-reproducibility mode) sums a one-row product, such as the UNet's time embedding for one
# image, in an order that depends on the weight's alignment on AVX2 CPUs (AMD EPYC: up to 1e-6 apart),
# so the same weights gave other last bits loaded from a file than built in code.
TENSOR_ALIGNMENT = 64


def own_aligned_memory(pipeline: Any) -> None:
    """Give every CPU weight and buffer of ``pipeline``'s modules that sits off a 64-byte boundary memory
    of its own, as torch allocates it: a model loaded from a file then computes bit for bit as the same
    weights built in code (``TENSOR_ALIGNMENT``)."""
    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % TENSOR_ALIGNMENT:
                tensor.data = tensor.data.clone()


def _pt(prediction_type: str) -> dict[str, str]:
    return {} if prediction_type == "auto" else {"prediction_type": prediction_type}


def _pipeline_class(folder: Path) -> Any:
    import json

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return StableDiffusionXLPipeline if "XL" in index.get("_class_name", "") else StableDiffusionPipeline


def _load_folder(path: Path, name: str) -> Any:
    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"model '{name}': the folder has no model_index.json, so it is not a diffusers pipeline "
            "folder. Point at the folder that holds model_index.json, unet/, vae/ and text_encoder/."
        )
    try:
        return _pipeline_class(path).from_pretrained(
            str(path), safety_checker=None, requires_safety_checker=False, use_safetensors=None
        )
    except Exception as e:  # diffusers raises many kinds for broken folders
        raise ModelError(f"model '{name}': cannot load this diffusers folder: {e}") from e


SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1."  # SGM checkpoints keep the second text encoder here


def _load_single_file(path: Path, config_source: str) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import SafetensorError, safe_open

    try:  # reads the header only; a truncated or corrupt file fails here with its own reason
        with safe_open(str(path), framework="pt") as f:
            xl = any(k.startswith(SDXL_SINGLE_FILE_KEY) for k in f.keys())
    except (SafetensorError, OSError) as e:
        raise ModelError(
            f"model '{path}': not a readable .safetensors file ({e}); it may be truncated or corrupt. "
            "Download or copy it again."
        ) from None

    kwargs: dict[str, Any] = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    if config_source:
        kwargs["config"] = config_source
        kwargs["local_files_only"] = Path(config_source).is_dir()
    try:
        return (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_single_file(str(path), **kwargs)
    except Exception as e:
        raise ModelError(
            f"model '{path}': cannot load this single-file checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Loading a single file needs the "
            "component configs from the hub; offline, set model.config to a local diffusers folder "
            f"of the same architecture ({setting('model.config', '/path/to/sd15-folder')})."
        ) from e


def _load_hub(name: str) -> Any:
    from diffusers import DiffusionPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            name, safety_checker=None, requires_safety_checker=False, local_files_only=offline
        )
    except Exception as e:
        raise ModelError(_offline_hint(name)) from e
    return pipeline


# --- module names and shapes only: export, convert, resize -------------------------------------


def load_skeleton(name: str, config_source: str = "", prediction_type: str = "auto", kind: str = "auto") -> BaseModel:
    """The base model's UNet and text encoders built from their configs on the meta device: every
    module's name and weight shape, no weights and no VAE (an SDXL skeleton takes a few MB), which is
    all that exporting, converting or resizing an adapter maps it onto and checks it against.

    Its ``pipeline`` holds only ``unet``, ``text_encoder`` and ``text_encoder_2``: it cannot generate.
    A diffusers folder gives one, a hub id too (only its config files are fetched), and so does a
    single-file checkpoint with ``config_source`` (a diffusers folder of its architecture). Anything
    else (built-ins, which are small; a single file without configs; names that are refused) is
    loaded by ``load_base_model``, with its messages."""
    path = Path(name).expanduser()
    configs = Path(config_source).expanduser() if config_source else None
    folder: Path | None = None
    if path.is_dir() and (path / "model_index.json").is_file():
        folder = path
    elif (path.is_file() and path.suffix.lower() == ".safetensors" and configs is not None
          and (configs / "model_index.json").is_file()):
        folder = configs
    elif not name.startswith("builtin:") and not path.exists() and _is_hub_id(name):
        folder = _hub_configs(name)
    if folder is None:
        return load_base_model(name, config_source, prediction_type, kind)
    return _skeleton(folder, name, kind)


def _hub_configs(name: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    try:
        return Path(snapshot_download(name, allow_patterns=["model_index.json", "*/config.json"],
                                      local_files_only=offline))
    except Exception as e:  # offline and not cached, or no such repo
        raise ModelError(_offline_hint(name)) from e


def _skeleton(folder: Path, name: str, kind: str = "auto") -> BaseModel:
    import json
    from types import SimpleNamespace

    import transformers
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
            encoders = {}
            for part in ("text_encoder", "text_encoder_2"):
                class_name = (index.get(part) or [None, None])[1]
                if class_name:
                    cls = getattr(transformers, class_name)
                    encoders[part] = cls(cls.config_class.from_pretrained(str(folder / part)))
    except (OSError, ValueError, AttributeError, TypeError) as e:  # a missing or broken config file
        raise ModelError(f"model '{name}': cannot read the model configs in {folder}: {e}") from e
    scheduler = folder / "scheduler" / "scheduler_config.json"
    detected = detect_kind(index.get("_class_name", ""), unet.config,
                           encoders["text_encoder"].config if "text_encoder" in encoders else None,
                           _read_json(scheduler) if scheduler.is_file() else None)
    if kind != "auto" and (kind == "sdxl") != (detected == "sdxl"):
        raise ConfigError(f"model.kind: '{kind}' does not fit '{name}', which is {KIND_NAMES[detected]} by its "
                          "structure; set model.kind=auto")
    return BaseModel(SimpleNamespace(unet=unet, **encoders), name, detected if kind == "auto" else kind)


# --- what a model is, without loading it ----------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """A base model's kind and native resolution, as read from its configs (forms show them)."""

    kind: str
    native_resolution: int

    def describe(self) -> str:
        return f"{KIND_NAMES[self.kind]}, {self.native_resolution} px native"


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _folder_facts(folder: Path) -> ModelFacts:
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    encoder = folder / "text_encoder" / "config.json"
    scheduler = folder / "scheduler" / "scheduler_config.json"
    vae = folder / "vae" / "config.json"
    kind = detect_kind(index.get("_class_name", ""), unet, _read_json(encoder) if encoder.is_file() else None,
                       _read_json(scheduler) if scheduler.is_file() else None)
    levels = len(_read_json(vae).get("block_out_channels", [0] * 4)) if vae.is_file() else 4
    return ModelFacts(kind, int(unet.get("sample_size", 64)) * 2 ** (levels - 1))


# what diffusers assumes for a single-file checkpoint of each family (its SD2 default is 2.1, 768-v)
_SINGLE_FILE_FACTS = {"sdxl": ModelFacts("sdxl", 1024), "sd2": ModelFacts("sd2-v", 768), "sd1": ModelFacts("sd1", 512)}


def peek_model(name: str, config_source: str = "") -> ModelFacts | None:
    """The kind and native resolution of the model ``name`` from its configs, without loading weights: a
    built-in, a diffusers folder, a single file (by its keys: SGM's second text encoder says SDXL, an
    OpenCLIP one SD2), a hub id in the local cache. None when that cannot be known before loading."""
    try:
        if name.startswith("builtin:"):
            model = load_base_model(name)
            return ModelFacts(model.kind, model.native_resolution)
        path = Path(name).expanduser()
        if path.is_dir() and (path / "model_index.json").is_file():
            return _folder_facts(path)
        if path.is_file() and path.suffix.lower() == ".safetensors":
            if config_source and (Path(config_source) / "model_index.json").is_file():
                return _folder_facts(Path(config_source))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
            if any(k.startswith(SDXL_SINGLE_FILE_KEY) for k in keys):
                return _SINGLE_FILE_FACTS["sdxl"]
            return _SINGLE_FILE_FACTS["sd2" if any(k.startswith("cond_stage_model.model.") for k in keys) else "sd1"]
        if not path.exists() and name.count("/") == 1 and not name.startswith((".", "/", "~")):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "model_index.json")
            return _folder_facts(Path(cached).parent) if isinstance(cached, str) else None
    except (OSError, ValueError, ModelError) as e:  # unreadable configs: the loader will say what is wrong
        log.debug("cannot tell what %s is before loading it: %s", name, e)
    return None


# --- LoRA ---------------------------------------------------------------------------------------


def peft_config(lora: LoraConfig, targets: list[str], rank_pattern: dict[str, int] | None = None,
                alpha_pattern: dict[str, float] | None = None) -> Any:
    """The peft config of ``lora.type``: LoRA (and LoCon, DoRA), LoHa or LoKr, all through peft."""
    from peft import LoHaConfig, LoKrConfig
    from peft import LoraConfig as PeftLoraConfig

    common: dict[str, Any] = {"r": lora.rank, "target_modules": targets, "rank_pattern": rank_pattern or {},
                              "alpha_pattern": alpha_pattern or {}}
    if lora.type == "loha":
        return LoHaConfig(alpha=lora.alpha, **common)
    if lora.type == "lokr":
        return LoKrConfig(alpha=lora.alpha, decompose_factor=lora.lokr_factor, **common)
    return PeftLoraConfig(lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.dora,
                          init_lora_weights="gaussian", **common)


def _matches(path: str, names: list[str]) -> bool:
    """peft's rule for a list of target names: the module path is a name or ends with ``.name``."""
    return any(path == name or path.endswith("." + name) for name in names)


def unet_targets(model: BaseModel, lora: LoraConfig, names: list[str]) -> list[str]:
    """The UNet modules that get LoRA: ``names`` as peft matches them, and with ``lora.blocks`` only those
    inside the selected blocks (as full module paths; ConfigError for a block the UNet lacks)."""
    if not lora.blocks:
        return names
    paths = [path for path, _ in model.unet.named_modules() if path and _matches(path, names)]
    return blocks.select(paths, lora.blocks)


def add_lora(model: BaseModel, lora: LoraConfig) -> list[torch.nn.Parameter]:
    """Freeze the base model and inject the adapter layers (``lora.type``) with peft; returns the
    trainable parameters."""
    from peft import inject_adapter_in_model

    conv_rank = lora.conv_rank or (lora.rank if lora.type == "locon" else 0)
    unet_names = [*lora.unet_targets, *(LOCON_TARGETS if conv_rank else [])]
    targets: list[tuple[torch.nn.Module, list[str]]] = [(model.unet, unet_targets(model, lora, unet_names))]
    if lora.train_text_encoder:
        chosen = blocks.TEXT_PARTS["te" if lora.text_encoders == "both" else lora.text_encoders]
        if model.text_encoder_2 is None:  # SD1/SD2: the one text encoder
            chosen = ("text_encoder",)
        targets += [(m, lora.text_encoder_targets) for part, m in model.parts() if part in chosen]
    for module in [model.vae] + [m for _, m in model.parts()]:
        module.requires_grad_(False)
    params: list[torch.nn.Parameter] = []
    for module, names in targets:
        rank_pattern: dict[str, int] = {}
        alpha_pattern: dict[str, float] = {}
        if module is model.unet and conv_rank:
            # LoCon as kohya's conv_dim (and LoHa/LoKr on convs): the kxk convs with their own rank and
            # alpha, the rest of the ResNet/down/upsample blocks' layers (conv_shortcut, time_emb_proj) at
            # the network's.
            rank_pattern = {name: conv_rank for name in LOCON_KXK_TARGETS}
            alpha_pattern = {name: lora.conv_alpha for name in LOCON_KXK_TARGETS}
        if lora.type == "lokr":
            _check_lokr_split(module, names, lora.lokr_factor)
        try:
            inject_adapter_in_model(peft_config(lora, names, rank_pattern, alpha_pattern), module,
                                    adapter_name=ADAPTER_NAME)
        except ValueError as e:
            raise ModelError(f"cannot add LoRA to {type(module).__name__}: {e}") from e
        # peft leaves only its own layers trainable in the module it injected into
        params += [p for p in module.parameters() if p.requires_grad]
    return params


def _check_lokr_split(module: torch.nn.Module, names: list[str], factor: int) -> None:
    """ConfigError when peft would split a targeted layer's side other than LyCORIS does: a ``factor`` above
    the side's square root (peft: factor x rest, LyCORIS: rest x factor). Those Kronecker factors cannot be
    rewritten in LyCORIS' split, so its loader could not read the file."""
    sides = {(path, side) for path, layer in module.named_modules()
             if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and _matches(path, names)
             for side in layer.weight.shape[:2]}
    for path, side in sorted(sides):
        if factor > 0 and side % factor == 0 and factor * factor > side:
            small, large = lycoris_factorization(side, factor)
            narrowest = min(s for _, s in sides)
            raise ConfigError(
                f"lora.lokr_factor: {factor} splits the {side} channels of {path} as {factor} x {side // factor} "
                f"in peft, where LyCORIS splits them {small} x {large}, so LyCORIS could not load the adapter; use "
                f"-1 or a factor of at most {math.isqrt(narrowest)} (the square root of the narrowest adapted side, "
                f"{narrowest})"
            )


WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # accelerate's mixed_precision -> base weights
# model.quantize -> optimum-quanto's weight type
QUANTO_WEIGHTS = {"fp8": "qfloat8", "int8": "qint8", "nf4": "qint4"}


def prepare_for_training(
    model: BaseModel, config: Config, device: torch.device, mixed_precision: str
) -> tuple[list[torch.nn.Parameter], torch.dtype]:
    """Make ``model`` ready to train: LoRA (or LoCon/DoRA) layers injected with peft and kept in fp32, on a
    frozen base cast to the training precision (``mixed_precision``: "no", "fp16" or "bf16") and, with
    ``model.quantize``, quantized; all on ``device``, with the configured attention kernel, gradient
    checkpointing, memory format and compilation, UNet (and the text encoders when they train) in train
    mode and the VAE in eval mode. A VAE that overflows in fp16 (SDXL's) stays in fp32 when the run is
    fp16 (``vae_dtype``).

    Returns the trainable LoRA parameters and the dtype of the base weights.
    """
    from .attention import set_attention  # imports diffusers: not at import time

    train = config.train
    params = add_lora(model, config.lora)
    text_encoders = model.text_encoders
    training = [any(p.requires_grad for p in encoder.parameters()) for encoder in text_encoders]
    set_attention(model.unet, train.attention)
    if train.gradient_checkpointing:
        _enable_gradient_checkpointing(model, training)
    weight_dtype = WEIGHT_DTYPES.get(mixed_precision, torch.float32)
    quantized = config.model.quantize != "none"
    _place_weights(model, {id(p) for p in params}, weight_dtype, device, quantized)
    if quantized:
        quantize_frozen(model, config.model.quantize)
        for _, module in model.parts():
            module.to(device)
    if device.type == "cuda":  # TF32 matmuls for whatever still runs in fp32 (Ampere and newer; ignored before)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if train.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    model.vae.eval()
    model.unet.train()
    for encoder, trains in zip(text_encoders, training, strict=True):
        encoder.train(trains)
    if train.compile != "off":
        compile_unet(model.unet, train.compile)
    return params, weight_dtype


def _enable_gradient_checkpointing(model: BaseModel, training: list[bool]) -> None:
    """Gradient checkpointing on the UNet and on each text encoder that trains (``training``)."""
    model.unet.enable_gradient_checkpointing()
    for encoder, trains in zip(model.text_encoders, training, strict=True):
        if trains:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _place_weights(model: BaseModel, trainable: set[int], weight_dtype: torch.dtype, device: torch.device,
                   quantized: bool) -> None:
    """Every weight on ``device``: the ``trainable`` (LoRA) ones in fp32, the frozen base in ``weight_dtype``
    (the VAE in ``vae_dtype``).

    One tensor at a time, straight to the device in the training precision: the frozen base never has an
    fp32 copy on the GPU, and the LoRA weights are never rounded through bf16/fp16. A part to be
    ``quantized`` stays on the host until it is, so the device only ever holds its quantized weights."""
    for module in (model.unet, model.vae, *model.text_encoders):
        dtype = vae_dtype(model, weight_dtype) if module is model.vae else weight_dtype
        where = torch.device("cpu") if quantized and module is not model.vae else device
        for p in module.parameters():
            p.data = p.data.to(where, torch.float32 if id(p) in trainable else dtype)
        for b in module.buffers():
            b.data = b.data.to(where, dtype if b.is_floating_point() else b.dtype)


def quantize_frozen(model: BaseModel, kind: str) -> None:
    """Quantize the frozen weights of the UNet and the text encoders in place with optimum-quanto
    (``kind``: fp8, int8 or nf4, per ``model.quantize``). peft's LoRA layers (``lora_*``) are left out, so
    they stay trainable in fp32; the VAE is left alone (it only encodes, once per image with the cache)."""
    try:
        from optimum import quanto
    except ImportError as e:
        raise ModelError(
            f"model.quantize: '{kind}' needs the optimum-quanto package; install it with 'pip install "
            "optimum-quanto', or set model.quantize=none"
        ) from e
    weights = getattr(quanto, QUANTO_WEIGHTS[kind])
    for _, module in model.parts():
        for block in _blocks(module):  # block by block: one block's float and quantized weights at a time
            quanto.quantize(module, weights=weights, include=[block, f"{block}.*"], exclude=["*lora_*"])
            quanto.freeze(module)
            _return_freed_host_memory()
        for name, p in module.named_parameters():  # quanto's modules come back trainable; only LoRA trains
            p.requires_grad_("lora_" in name)
        # What was not quantized (norms, biases) may still be views of the model file mapped into memory;
        # copies let the mapping, and with it every float weight read from the file, go.
        for t in [*(p for p in module.parameters() if type(p.data) is torch.Tensor), *module.buffers()]:
            t.data = t.data.clone()
    _return_freed_host_memory()


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


def vae_dtype(model: BaseModel, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's precision for a run whose base weights are ``weight_dtype``: fp32 instead of fp16 for a VAE
    that overflows in fp16 (SDXL's own; its config says force_upcast, a fixed fp16 VAE does not)."""
    if weight_dtype == torch.float16 and model.kind == "sdxl" and model.vae.config.get("force_upcast", False):
        return torch.float32
    return weight_dtype


def lora_state(model: BaseModel) -> dict[str, dict[str, torch.Tensor]]:
    """The canonical adapter: peft state dicts keyed by the model's own module paths."""
    from peft import get_peft_model_state_dict

    out: dict[str, dict[str, torch.Tensor]] = {}
    for part, module in model.parts():
        if any(ADAPTER_PARAM.search(n) for n, _ in module.named_parameters()):
            sd = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
            out[part] = {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}
    return out


def set_lora_state(model: BaseModel, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load canonical LoRA weights into the injected layers of ``model``."""
    from peft import set_peft_model_state_dict

    for part, sd in state.items():
        module = getattr(model, part)
        result = set_peft_model_state_dict(module, sd, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ModelError(f"{part}: LoRA weights for modules this model lacks: {unexpected[:5]}")


def module_shapes(model: BaseModel) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every module (per part) that can carry LoRA, every Linear and Conv2d of the UNet and text
    encoders, with its weight shape. A module peft has wrapped keeps its own path (``.base_layer``
    dropped) and peft's own layers are left out, so the answer is the same before and after LoRA.

    This is the model's own list of names; adapter loading maps file keys onto it (never guessing).
    """
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for part, module in model.parts():
        out[part] = {
            name.removesuffix(".base_layer"): tuple(sub.weight.shape)
            for name, sub in module.named_modules()
            if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)) and not ADAPTER_PARAM.search(name)
        }
    return out


def adaptable_modules(model: BaseModel) -> dict[str, list[str]]:
    """Module paths (per part) that can carry LoRA, sorted: the names of ``module_shapes``."""
    return {part: sorted(shapes) for part, shapes in module_shapes(model).items()}


def lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """How LyCORIS splits one side of a weight for LoKr (``lycoris.functional.factorization``), smaller part
    first: ``factor`` and the rest when it divides, else the divisor pair nearest the square root whose smaller
    part is at most ``factor`` (any size for -1). peft's copy returns ``(factor, rest)`` unsorted, so the two
    differ where ``factor`` is above the square root."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > 1 + dimension or new_m > limit:  # LyCORIS compares with the first pair's sum
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


def full_lokr_rank(w2: torch.Tensor) -> int:
    """The rank at which peft builds a LoKr module's second factor as this full matrix. LyCORIS and
    ComfyUI scale a module of two full factors by 1, so its alpha is this rank in every file."""
    return int(max(w2.shape[0], w2.shape[1]))


def lora_alphas(model: BaseModel) -> dict[str, dict[str, float]]:
    """The alpha of every adapted module, per part (rank_pattern/alpha_pattern included): LoRA layers keep
    it in ``lora_alpha``, LoHa and LoKr layers in ``alpha``. A LoKr module of two full factors is given
    the alpha that keeps peft's scale at ``full_lokr_rank`` (the rank the canonical adapter states)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    out: dict[str, dict[str, float]] = {}
    for part, module in model.parts():
        found = {}
        for name, sub in module.named_modules():
            if isinstance(sub, LoraLayer) and ADAPTER_NAME in sub.lora_alpha:
                found[name] = float(sub.lora_alpha[ADAPTER_NAME])
            elif isinstance(sub, LycorisLayer) and ADAPTER_NAME in sub.alpha:
                found[name] = float(sub.alpha[ADAPTER_NAME])
                w1, w2 = getattr(sub, "lokr_w1", {}), getattr(sub, "lokr_w2", {})
                if ADAPTER_NAME in w1 and ADAPTER_NAME in w2:
                    found[name] = found[name] / sub.r[ADAPTER_NAME] * full_lokr_rank(w2[ADAPTER_NAME])
        if found:
            out[part] = found
    return out


def load_tokenizer(name: str) -> Any | None:
    """Only the tokenizer of the model ``name`` (cheap; for counting caption tokens), or None.

    None when the model keeps no tokenizer locally: a single-file checkpoint, or a hub id that is
    not in the local cache (nothing is downloaded here).
    """
    if name.startswith("builtin:"):
        return _builtin_tokenizer()
    path = Path(name).expanduser()
    folder: Path | None = None
    if path.is_dir():
        folder = path / "tokenizer"
    elif not path.exists() and name.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        for sub in ("tokenizer/", ""):  # a pipeline keeps it in tokenizer/, a CLIP repo at its root
            cached = try_to_load_from_cache(name, f"{sub}tokenizer_config.json")
            if isinstance(cached, str):
                folder = Path(cached).parent
                break
    # transformers 5 returns an empty tokenizer for a folder without vocab files, so check first.
    files = {p.name for p in folder.iterdir()} if folder is not None and folder.is_dir() else set()
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        return None
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:  # not a CLIP tokenizer after all
        log.debug("no tokenizer for %s: %s", name, e)
        return None
