"""Reading a base model from where users keep one: a diffusers folder, a single ``.safetensors`` file, a hub
id; and its configs alone (forms, the meta-device skeleton). Which pipeline class loads it is the family's
answer; this module only knows diffusers' and transformers' ways of storing a model."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from ..core.errors import ModelError, offline_hint, setting
from ..model.base import Configs

log = logging.getLogger(__name__)


def is_hub_id(name: str) -> bool:
    return "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1


def offline(name: str) -> str:
    return offline_hint("model", name, f"the folder ({setting('model.name', '/path/to/folder')}) or a single "
                        f".safetensors file ({setting('model.name', 'file.safetensors')})")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def folder_configs(folder: Path, denoiser: str | None = None) -> Configs:
    """The configs of a diffusers folder (``model_index.json`` and each component's config file); the
    denoiser is ``unet/`` or ``transformer/``, whichever the folder has (or ``denoiser``)."""
    index = read_json(folder / "model_index.json")

    def config(*names: str) -> dict[str, Any] | None:
        for name in names:
            for file in ("config.json", "scheduler_config.json"):
                if (folder / name / file).is_file():
                    return read_json(folder / name / file)
        return None

    return Configs(index.get("_class_name", ""), config(*([denoiser] if denoiser else ["unet", "transformer"])),
                   config("text_encoder"), config("scheduler"), config("vae"))


def pipeline_configs(pipeline: Any) -> Configs:
    """The configs of a loaded pipeline (or a skeleton namespace)."""
    denoiser = getattr(pipeline, "unet", None)
    denoiser = getattr(pipeline, "transformer", None) if denoiser is None else denoiser
    encoder = getattr(pipeline, "text_encoder", None)
    scheduler = getattr(pipeline, "scheduler", None)
    vae = getattr(pipeline, "vae", None)
    return Configs(type(pipeline).__name__, getattr(denoiser, "config", None), getattr(encoder, "config", None),
                   getattr(scheduler, "config", None), getattr(vae, "config", None))


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
    import torch

    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % TENSOR_ALIGNMENT:
                tensor.data = tensor.data.clone()


def single_file_keys(path: Path) -> list[str]:
    """The tensor names of a single-file checkpoint (only its header is read)."""
    from safetensors import SafetensorError, safe_open

    try:  # a truncated or corrupt file fails here with its own reason
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ModelError(
            f"model '{path}': not a readable .safetensors file ({e}); it may be truncated or corrupt. "
            "Download or copy it again."
        ) from None


# safetensors' names of the floating-point dtypes a model's weights are stored in
STORED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# the weight files diffusers and transformers read from a component folder without a variant (fp16 variants
# such as diffusion_pytorch_model.fp16.safetensors are read only when asked for)
WEIGHT_FILE = re.compile(r"^(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors$")


def stored_dtype(path: Path, prefix: str = "") -> Any:
    """The dtype most of a ``.safetensors`` file's floating-point tensors (those named ``prefix``...) are stored
    in, read from its header alone; None when it holds none."""
    import torch
    from safetensors import safe_open

    counts: dict[str, int] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefix):
                kind = f.get_slice(key).get_dtype()
                counts[kind] = counts.get(kind, 0) + 1
    stored = [kind for kind in sorted(counts, key=counts.__getitem__, reverse=True) if kind in STORED_DTYPES]
    return getattr(torch, STORED_DTYPES[stored[0]]) if stored else None


def stored_dtypes(folder: Path) -> dict[str, Any]:
    """Each component of a diffusers folder with the dtype its ``.safetensors`` weights are stored in; a component
    stored otherwise (``.bin``) is left to the libraries' own default."""
    dtypes: dict[str, Any] = {"default": None}
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in component.glob("*.safetensors") if WEIGHT_FILE.match(f.name))
        dtype = stored_dtype(files[0]) if files else None
        if dtype is not None:
            dtypes[component.name] = dtype
    return dtypes


def load_folder(path: Path, name: str, pipeline_class: Any, dtypes: dict[str, Any] | None = None) -> Any:
    """The pipeline of a diffusers folder, each component read straight into its dtype in ``dtypes`` (diffusers'
    per-component ``dtype``: ``{"default": ..., "vae": ...}``), one tensor at a time."""
    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"model '{name}': the folder has no model_index.json, so it is not a diffusers pipeline "
            "folder. Point at the folder that holds model_index.json, unet/, vae/ and text_encoder/."
        )
    import inspect

    # the SD pipelines' safety checker stays off; other pipelines have none to turn off
    off = ({"safety_checker": None, "requires_safety_checker": False}
           if "safety_checker" in inspect.signature(pipeline_class.__init__).parameters else {})
    try:
        return pipeline_class.from_pretrained(str(path), use_safetensors=None, dtype=dtypes or stored_dtypes(path),
                                              **off)
    except Exception as e:  # diffusers raises many kinds for broken folders
        raise ModelError(f"model '{name}': cannot load this diffusers folder: {e}") from e


def load_single_file(path: Path, config_source: str, pipeline_class: Any, kwargs: dict[str, Any],
                     dtype: Any = None) -> Any:
    """The pipeline of a single-file checkpoint, every component read straight into ``dtype`` (the file's own
    precision when None)."""
    kwargs = dict(kwargs, torch_dtype=dtype or stored_dtype(path))
    if config_source:
        kwargs["config"] = config_source
        kwargs["local_files_only"] = Path(config_source).is_dir()
    try:
        return pipeline_class.from_single_file(str(path), **kwargs)
    except Exception as e:
        raise ModelError(
            f"model '{path}': cannot load this single-file checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Loading a single file needs the "
            "component configs from the hub; offline, set model.config to a local diffusers folder "
            f"of the same architecture ({setting('model.config', '/path/to/diffusers-folder')})."
        ) from e


def load_hub(name: str, dtype: Any = None) -> Any:
    """A hub model's pipeline, every component read straight into ``dtype`` (the libraries' default when None)."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(
            name, safety_checker=None, requires_safety_checker=False, local_files_only=hub_offline(), dtype=dtype
        )
    except Exception as e:
        raise ModelError(offline(name)) from e


def hub_configs(name: str) -> Path:
    """The config files of a hub model (no weights), downloaded or from the cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["model_index.json", "*/config.json"],
                                      local_files_only=hub_offline()))
    except Exception as e:  # offline and not cached, or no such repo
        raise ModelError(offline(name)) from e


def skeleton_parts(folder: Path, name: str, parts: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The model's ``parts`` (every network in ``model_index.json`` when None) built from their configs on the
    meta device: every module's name and weight shape, no weights (an SDXL UNet and its text encoders take a
    few MB)."""
    import diffusers
    import torch
    import transformers

    index = read_json(folder / "model_index.json")
    built: dict[str, Any] = {}
    try:
        with torch.device("meta"):  # every tensor made on the meta device, none allocated on the host first
            for part in parts if parts is not None else [k for k, v in index.items() if isinstance(v, list)]:
                library, class_name = (index.get(part) or [None, None])[:2]
                if not class_name or library not in ("diffusers", "transformers"):
                    continue
                cls = getattr(transformers if library == "transformers" else diffusers, class_name)
                if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):  # a tokenizer, a scheduler
                    continue
                if library == "transformers":
                    built[part] = cls(cls.config_class.from_pretrained(str(folder / part)))
                else:
                    built[part] = cls.from_config(cls.load_config(str(folder / part)))
    except (OSError, ValueError, AttributeError, TypeError) as e:  # a missing or broken config file
        raise ModelError(f"model '{name}': cannot read the model configs in {folder}: {e}") from e
    return built


def load_clip_tokenizer(name: str) -> Any | None:
    """Only the (first) tokenizer of the model ``name`` (cheap; for counting caption tokens), or None.

    None when the model keeps no tokenizer locally: a single-file checkpoint, or a hub id that is
    not in the local cache (nothing is downloaded here).
    """
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
