"""The model families and the one registry of them: which families exist, which one a model belongs to, and
loading a base model named by one string (``builtin:NAME``, a diffusers folder, a single file, a hub id).

Adding a family is a module with a ``ModelFamily`` subclass and one ``register`` line below. Registration
order is detection order: a family that claims any model of its architecture (SD1) comes last.
Importing the package registers the families' kinds with the config (``model.kind``), which
``stylelora/__init__`` does, so every Config validates against them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import config as _config
from ..core.errors import ConfigError, ModelError
from ..core.fileio import PICKLE_SUFFIXES
from ..model.base import BaseModel, Configs, ModelFamily
from . import loading
from .flux import Flux
from .sd1 import SD1
from .sd2 import SD2
from .sd3 import SD3
from .sdxl import SDXL

log = logging.getLogger(__name__)
FAMILIES: list[ModelFamily] = []


def register(family: ModelFamily, before: str | None = None) -> ModelFamily:
    """Add ``family`` to the registry (before the family named ``before``, else ahead of the catch-all SD1),
    and its kinds to the values ``model.kind`` takes."""
    clash = sorted(set(family.kinds) & set(kinds()) | set(family.builtins) & set(builtin_names()))
    if clash:
        raise ValueError(f"family {family.name}: {', '.join(clash)} already registered")
    names = [f.name for f in FAMILIES]
    at = names.index(before) if before in names else len(FAMILIES) - (1 if "sd1" in names else 0)
    FAMILIES.insert(at, family)
    _sync_config_kinds()
    return family


def unregister(family: ModelFamily) -> None:
    """Take ``family`` out again (tests register families of their own)."""
    FAMILIES.remove(family)
    for kind in family.kinds:  # the other kinds keep their order
        _config.unregister_model_kind(kind)


def _sync_config_kinds() -> None:
    """Give the config the kinds plainest family first (SD1, SD2, SDXL, then the transformers): the order
    ``model.kind`` offers them in, and the order its checks try the families in."""
    for family in FAMILIES:
        for kind in family.kinds:
            _config.unregister_model_kind(kind)
    for family in reversed(FAMILIES):
        for kind in family.kinds:
            _config.register_model_kind(kind, family)


# --- looking families up ----------------------------------------------------------------------------------


def kinds() -> list[str]:
    return [kind for family in FAMILIES for kind in family.kinds]


def builtin_names() -> list[str]:
    return [f"builtin:{name}" for family in FAMILIES for name in family.builtins]


def suggestions() -> list[str]:
    """What a model picker offers: each family's built-in first, then well-known hub ids (SD1's first)."""
    offered = [name for family in reversed(FAMILIES) for name in family.suggestions]
    return sorted(offered, key=lambda name: not name.startswith("builtin:"))


def family_of(kind: str) -> ModelFamily:
    """The family of ``kind``; ConfigError naming ``model.kind`` for a kind no family has."""
    for family in FAMILIES:
        if kind in family.kinds:
            return family
    raise ConfigError(f"model.kind: '{kind}' is not a model family; choose one of auto, {', '.join(kinds())}")


def for_parts(parts: Iterable[str]) -> ModelFamily:
    """The first family whose adapter parts include all of ``parts`` (an adapter known by its parts alone)."""
    wanted = set(parts)
    for family in reversed(FAMILIES):  # the plainest first: SD1 before SD2 before SDXL
        if wanted <= set(family.parts):
            return family
    raise ModelError(f"no model family has the adapter parts {sorted(wanted)}")


def detect(configs: Configs) -> tuple[ModelFamily, str]:
    """(family, kind) of a model with these configs, from its structure rather than one width."""
    for family in FAMILIES:
        kind = family.detect(configs)
        if kind is not None:
            return family, kind
    raise ModelError(f"a '{configs.pipeline_class or 'model'}' of no known family; stylelora trains "
                     + ", ".join(f.display(k) for f in FAMILIES for k in f.kinds))


def detect_kind(pipeline_class: str, unet_config: Any, text_encoder_config: Any = None,
                scheduler_config: Any = None) -> str:
    """The kind of a model with this pipeline class and these component configs."""
    return detect(Configs(pipeline_class, unet_config, text_encoder_config, scheduler_config))[1]


def display_name(kind: str) -> str:
    return family_of(kind).display(kind)


# --- loading ------------------------------------------------------------------------------------------------


def _with_kind(pipeline: Any, name: str, kind: str, prediction_type: str) -> BaseModel:
    """The loaded pipeline as a BaseModel of its detected kind, or of ``kind`` (``model.kind``) when given: it
    may turn one kind into another of the same architecture (SD1 against SD2, SD2-512 against 768-v, which
    sets the prediction type when ``prediction_type`` is auto), never change the architecture."""
    family, detected = detect(loading.pipeline_configs(pipeline))
    if kind in ("auto", detected):
        return BaseModel(pipeline, name, detected, family)
    wanted = family_of(kind)
    if wanted.architecture != family.architecture:
        raise ConfigError(
            f"model.kind: '{kind}' does not fit '{name}', which is {family.display(detected)} by its structure "
            f"({family.structure}); set model.kind=auto"
        )
    wanted.apply_kind(pipeline, kind, prediction_type)
    return BaseModel(pipeline, name, kind, wanted)


def _builtin(name: str) -> tuple[ModelFamily, Any]:
    key = name.split(":", 1)[1]
    for family in FAMILIES:
        if key in family.builtins:
            return family, family.builtins[key]
    raise ModelError(f"model '{name}': no such built-in model; built-ins are " + ", ".join(builtin_names()))


def load_base_model(name: str, config_source: str = "", prediction_type: str = "auto", kind: str = "auto",
                    dtype: Any = None, vae_dtype: Any = None) -> BaseModel:
    """Load a base model named by one string: ``builtin:NAME``, a folder, a file or a hub id.

    Its kind is detected from its structure (``detect``); ``kind`` (``model.kind``) corrects it. ``dtype`` is the
    precision the frozen weights will be used in (a run's training precision): each component is read straight
    into it, one tensor at a time (diffusers' and transformers' own ``dtype``), never as an fp32 pipeline cast
    afterwards; the VAE goes into ``vae_dtype``, by default the family's ``vae_dtype`` for that precision (SDXL's
    stays fp32 in an fp16 run). Without ``dtype`` every component keeps the precision it is stored in (a
    built-in's is fp32: its weights are an fp32 random draw, cast component by component once built)."""
    path = Path(name).expanduser()
    if name.startswith("builtin:"):
        _, builder = _builtin(name)
        pipeline = builder(**({} if prediction_type == "auto" else {"prediction_type": prediction_type}))
        _cast_builtin(pipeline, dtype, vae_dtype)
        return _with_kind(pipeline, name, kind, prediction_type)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(
            f"model '{name}': pickled checkpoints ({path.suffix}) can run code when loaded and are "
            "not opened. Convert it to .safetensors or use a diffusers folder."
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            loading.load_folder(path, name, None)  # says what is missing
        configs = loading.folder_configs(path)
        family, detected = detect(configs)
        dtypes = None
        if dtype is not None:
            dtypes = {"default": dtype, "vae": vae_dtype or family.vae_dtype(configs.vae, dtype)}
        pipeline = loading.load_folder(path, name, family.pipeline_class(detected), dtypes)
    elif path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelError(f"model '{name}': file not found")
        family, detected = _single_file_family(loading.single_file_keys(path))
        pipeline = family.load_single_file(path, config_source, detected, dtype) or loading.load_single_file(
            path, config_source, family.pipeline_class(detected), family.single_file_kwargs(detected), dtype)
    elif path.exists():
        raise ModelError(
            f"model '{name}': not a diffusers folder or a .safetensors file; give one of those, "
            "a hub id, or builtin:tiny"
        )
    elif loading.is_hub_id(name):
        pipeline = loading.load_hub(name, dtype)
    else:
        raise ModelError(
            f"model '{name}': no such folder or file. Give a diffusers folder, a .safetensors "
            "checkpoint, a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, or builtin:tiny"
        )
    family, _ = detect(loading.pipeline_configs(pipeline))
    if dtype is not None:  # a single file or a hub model is read in one dtype: the VAE's own comes after
        wanted = vae_dtype or family.vae_dtype(pipeline.vae.config, dtype)
        if pipeline.vae.dtype != wanted:
            pipeline.vae.to(wanted)
    if prediction_type != "auto":
        family.set_prediction_type(pipeline, prediction_type)
    family.fit_tokenizers(pipeline)
    loading.own_aligned_memory(pipeline)
    return _with_kind(pipeline, name, kind, prediction_type)


def _cast_builtin(pipeline: Any, dtype: Any, vae_dtype: Any) -> None:
    """A built-in's components in ``dtype`` (the VAE in ``vae_dtype`` or its family's), one at a time, in eval
    mode as ``from_pretrained`` gives them; a built-in is small, and defined by its fp32 random draw."""
    import torch

    family, _ = detect(loading.pipeline_configs(pipeline))
    for part, component in pipeline.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        component.eval()
        if dtype is None:
            continue
        wanted = vae_dtype or family.vae_dtype(component.config, dtype) if part == "vae" else dtype
        for t in [*component.parameters(), *component.buffers()]:  # tensor by tensor, as the loaders do
            if t.is_floating_point():
                t.data = t.data.to(wanted)


def _single_file_family(keys: list[str]) -> tuple[ModelFamily, str]:
    for family in FAMILIES:
        kind = family.detect_single_file(keys)
        if kind is not None:
            return family, kind
    raise ModelError("a single file of no known model family")  # unreachable while SD1 takes any file


# --- module names and shapes only: export, convert, resize -------------------------------------------------


def load_skeleton(name: str, config_source: str = "", prediction_type: str = "auto", kind: str = "auto") -> BaseModel:
    """The base model's adaptable parts built from their configs on the meta device: every module's name and
    weight shape, no weights and no VAE, which is all that exporting, converting or resizing an adapter maps
    it onto and checks it against.

    Its ``pipeline`` holds only the adaptable parts: it cannot generate. A diffusers folder gives one, a hub
    id too (only its config files are fetched), and so does a single-file checkpoint with ``config_source``
    (a diffusers folder of its architecture). Anything else (built-ins, which are small; a single file
    without configs; names that are refused) is loaded by ``load_base_model`` in the precision it is stored in,
    with its messages."""
    skeleton = _meta_model(name, config_source, prediction_type, kind, whole=False)
    return skeleton if skeleton is not None else load_base_model(name, config_source, prediction_type, kind)


def load_plan(name: str, config_source: str = "", prediction_type: str = "auto",
              kind: str = "auto") -> BaseModel | None:
    """Every network of the base model (denoiser, VAE, text encoders) built from its configs on the meta device:
    the structure a run's memory and time are counted on before anything is loaded (``training.estimate``). None
    where the configs are not at hand without loading the model (built-ins, a single file without
    ``config_source``)."""
    return _meta_model(name, config_source, prediction_type, kind, whole=True)


def _meta_model(name: str, config_source: str, prediction_type: str, kind: str, whole: bool) -> BaseModel | None:
    """The model's networks on the meta device from its config files (``whole``: every one, else only the
    adaptable parts), or None where no config folder is at hand."""
    from types import SimpleNamespace

    path = Path(name).expanduser()
    configs = Path(config_source).expanduser() if config_source else None
    folder: Path | None = None
    if path.is_dir() and (path / "model_index.json").is_file():
        folder = path
    elif (path.is_file() and path.suffix.lower() == ".safetensors" and configs is not None
          and (configs / "model_index.json").is_file()):
        folder = configs
    elif not name.startswith("builtin:") and not path.exists() and loading.is_hub_id(name):
        folder = loading.hub_configs(name)
    if folder is None:
        return None
    try:
        family, detected = detect(loading.folder_configs(folder))
    except (OSError, ValueError) as e:
        raise ModelError(f"model '{name}': cannot read the model configs in {folder}: {e}") from e
    if kind not in ("auto", detected):
        wanted = family_of(kind)
        if wanted.architecture != family.architecture:
            raise ConfigError(f"model.kind: '{kind}' does not fit '{name}', which is {family.display(detected)} by "
                              "its structure; set model.kind=auto")
        family, detected = wanted, kind
    parts = loading.skeleton_parts(folder, name, None if whole else family.parts)
    if whole and "vae" in parts:
        parts["vae_scale_factor"] = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    return BaseModel(SimpleNamespace(**parts), name, detected, family)


# --- what a model is, without loading it -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """A base model's kind and native resolution, as read from its configs (forms show them)."""

    kind: str
    native_resolution: int

    def describe(self) -> str:
        return f"{display_name(self.kind)}, {self.native_resolution} px native"

    @property
    def display(self) -> str:
        return display_name(self.kind)

    @property
    def preset(self) -> str | None:
        """The preset made for this kind (presets/<name>.toml), if there is one."""
        return family_of(self.kind).presets.get(self.kind)


def _folder_facts(folder: Path) -> ModelFacts:
    configs = loading.folder_configs(folder)
    family, kind = detect(configs)
    return ModelFacts(kind, family.configured_resolution(configs))


def peek_model(name: str, config_source: str = "") -> ModelFacts | None:
    """The kind and native resolution of the model ``name`` from its configs, without loading weights: a
    built-in, a diffusers folder, a single file (by its keys), a hub id in the local cache. None when that
    cannot be known before loading."""
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
            family, kind = _single_file_family(loading.single_file_keys(path))
            return ModelFacts(kind, family.single_file_resolution(kind))
        if not path.exists() and loading.is_hub_id(name):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "model_index.json")
            return _folder_facts(Path(cached).parent) if isinstance(cached, str) else None
    except (OSError, ValueError, ModelError) as e:  # unreadable configs: the loader will say what is wrong
        log.debug("cannot tell what %s is before loading it: %s", name, e)
    return None


def load_tokenizer(name: str) -> Any | None:
    """Only the (first) tokenizer of the model ``name`` (cheap; for counting caption tokens), or None."""
    if name.startswith("builtin:"):
        from ..model.builtin import clip_tokenizer

        return clip_tokenizer()
    return loading.load_clip_tokenizer(name)


# The families, in detection order: SD1 takes any other conditional UNet, so it comes last; the transformers
# are told apart first (by their transformer's own config keys).
register(SDXL())
register(SD2())
register(SD1())
register(Flux(), before="sdxl")
register(SD3(), before="sdxl")
