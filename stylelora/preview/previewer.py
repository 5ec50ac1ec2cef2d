"""Preview: render a base model with LoRA adapters at any strength, without ever reloading the base.

``Previewer`` loads the base pipeline once. Adapters are injected beside the base weights with peft
(one peft adapter per attached file). A render at strength s adds s times the adapter's deltas into the
base weights (fused: the denoising steps then cost what a LoRA-free model does) and keeps the touched base
weights aside, so the next strength or adapter starts from them again and strength 0 gives exactly the
base model's image. With ``fuse=False`` the layers stay unfused and only peft's per-layer scale
(``LoraLayer.set_scale``) changes. Adapter files are read with stylelora's own strict reader
(``formats.load_adapter``), so a file meant for another model fails with the keys named.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..adapters.adapter import Adapter, ModelLayout
from ..adapters.checkpoint_files import STEP_DIR, list_checkpoints, run_folder_config, stores_alphas
from ..adapters.convert import find_adapter_file
from ..adapters.formats import load_adapter
from ..adapters.merge import check_strength
from ..core.config import GenerateSettings
from ..core.errors import ConfigError, FormatError
from ..data import images
from ..families import load_base_model
from ..model.base import BaseModel, ModelFamily
from ..model.blocks import GROUPS
from ..model.lora import ADAPTER_PARAM
from .samplers import DEFAULT_SAMPLER, check_sampler, make_scheduler, sampler_label

log = logging.getLogger(__name__)

CACHE_SIZE = 32

# --- where an adapter comes from ----------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSource:
    """A resolved adapter location: the file to read, a default name, and the alphas when the file lacks them."""

    file: Path
    name: str
    alpha: float | None = None  # only for checkpoints saved before they stored alphas: from config.toml
    conv_alpha: float | None = None
    text: tuple[int, int] | None = None  # a checkpoint's (clip skip, max token length), from config.toml


def _checkpoint_source(folder: Path) -> AdapterSource:
    run_dir = folder.parent.parent
    run = run_folder_config(run_dir) if (run_dir / "config.toml").is_file() else None
    text = (run.model.clip_skip, run.data.max_token_length) if run is not None else None
    if stores_alphas(folder):  # its lora.safetensors reads like any adapter file, every module's alpha included
        return AdapterSource(folder / "lora.safetensors", f"{run_dir.name}-{folder.name}", text=text)
    alpha = conv_alpha = None
    if run is not None:
        alpha, conv_alpha = run.lora.alpha, getattr(run.lora, "conv_alpha", None)  # conv_alpha: runs with LoCon
    else:
        log.warning("%s: no config.toml in the run folder, so the LoRA alpha is unknown; using alpha = rank", folder)
    return AdapterSource(folder / "lora.safetensors", f"{run_dir.name}-{folder.name}", alpha, conv_alpha, text)


def find_adapter(path: str | Path) -> AdapterSource:
    """Resolve what a user pointed at: an adapter file, a diffusers folder, a run folder or a checkpoint.

    A run folder gives its final adapter (the kohya file), or its newest checkpoint while training
    has not finished. Raises FormatError naming the path when nothing usable is there.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FormatError(f"{p}: no such adapter file or folder")
    checkpoint = p.parent if p.name == "lora.safetensors" else p
    if (checkpoint / "state.json").is_file() and (checkpoint / "lora.safetensors").is_file():
        return _checkpoint_source(checkpoint)
    if p.is_dir() and (p / "config.toml").is_file() and list_checkpoints(p):
        try:
            file, _, name = find_adapter_file(p)
        except FormatError:  # training not finished: its newest checkpoint
            return _checkpoint_source(list_checkpoints(p)[-1])
        return AdapterSource(file, name)
    try:
        file, _, name = find_adapter_file(p)
    except FormatError as e:
        raise FormatError(f"{e}. Give a .safetensors LoRA file, a diffusers LoRA folder, a run folder or a "
                          "checkpoint folder (checkpoints/step-NNNNNN)") from None
    return AdapterSource(file, name)


def run_adapters(run_dir: str | Path) -> list[AdapterSource]:
    """Every checkpoint of a run, oldest first, then its final adapter: the rows of a checkpoint grid."""
    run = Path(run_dir).expanduser()
    sources = [_checkpoint_source(folder) for folder in list_checkpoints(run)]
    final = find_adapter(run)
    if not STEP_DIR.match(final.file.parent.name):
        sources.append(final)
    if not sources:
        raise FormatError(f"{run}: no adapter and no checkpoint in this run folder")
    return sources


def file_stamp(path: Path) -> tuple[str, int, int]:
    """(resolved path, modification time in ns, size): a file with the same stamp was not rewritten."""
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


@dataclass
class _Attached:
    name: str
    peft_name: str  # peft adapter names must be valid module keys; user names need not be
    parts: tuple[str, ...]
    source: AdapterSource
    stamp: tuple[str, int, int]  # of source.file when it was read
    clip_skip: int = 1  # how its captions were encoded (the embedded config), so prompts are too
    max_token_length: int = 75


def _peft_config(adapter: Adapter, part: str) -> Any:
    """A peft config (LoRA, LoHa or LoKr) that recreates ``adapter``'s layers for one part, rank and alpha
    per module."""
    from peft import LoHaConfig, LoKrConfig
    from peft import LoraConfig as PeftLoraConfig

    fields = adapter.peft_fields(part)
    config_class = {"loha": LoHaConfig, "lokr": LoKrConfig}.get(adapter.network, PeftLoraConfig)

    # Exact names: a regex that must match the whole module path, so no other module is caught.
    def exact(patterns: dict[str, float]) -> dict[str, float]:
        return {"^" + re.escape(p): v for p, v in patterns.items()}

    return config_class(**{
        **fields,
        "target_modules": "|".join(re.escape(p) for p in fields["target_modules"]),
        "rank_pattern": exact(fields["rank_pattern"]),
        "alpha_pattern": exact(fields["alpha_pattern"]),
    })


def _lora_layers(family: ModelFamily, part: str, module: torch.nn.Module) -> list[tuple[str | None, Any]]:
    """peft's adapter layers of one part (LoRA, LoHa, LoKr: each takes ``set_scale`` and ``enable_adapters``),
    each with its per-block strength group (the denoiser's only; SD: IN, MID, OUT)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(family.block_group(name) if part == family.denoiser else None, m) for name, m in module.named_modules()
            if isinstance(m, BaseTunerLayer)]


def block_scales(given: Mapping[str, float] | None, groups: Sequence[str] = GROUPS) -> dict[str, float]:
    """Per-block strengths (A1111's "LoRA block weight"), as multipliers of the main strength for the denoiser's
    ``groups`` (the SD UNet's IN, MID and OUT); a group not given keeps 1. ConfigError names a wrong group or
    value."""
    scales = dict.fromkeys(groups, 1.0)
    for group, value in (given or {}).items():
        key = group.upper()
        if key not in scales and value == 1:  # as if not given (the app's sliders at rest, a model without groups)
            continue
        if key not in scales:
            known = f"the groups are {', '.join(groups)}" if groups else "this model has no per-block groups"
            raise ConfigError(f"block strength '{group}': no such group; {known}")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"block strength {key}: must be a finite number, got {value!r}")
        scales[key] = float(value)
    return scales


class Previewer:
    """A base model loaded once, with adapters attached by name and rendered at any strength.

    ``generate(prompt, adapter=name, scale=s)`` renders with one adapter at strength ``s`` on UNet
    and text encoder (from -1 to 2, ``STRENGTHS``: 0 is the base model exactly, 1 the adapter as trained,
    negative values push away from the style). The base is never reloaded; the deltas are fused into
    its weights for a render and the weights as loaded are kept aside (``fuse=False``: never fused).
    The base image for given settings is rendered once per session, and text embeddings are reused
    whenever the text encoder is unchanged. Calls are serialised with a lock (one pipeline).
    """

    def __init__(
        self,
        model: str | BaseModel = "builtin:tiny",
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        config_source: str = "",
        prediction_type: str = "auto",
        fuse: bool = True,
    ) -> None:
        # a model in memory (the one a run trains) is rendered where and as it is: never loaded, moved or cast
        self.in_memory = isinstance(model, BaseModel)
        self.model_name = model.name if isinstance(model, BaseModel) else model
        self.fuse = fuse
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.base_loads = 0  # how often the base model was loaded (tests and benchmarks count it)
        self._lock = threading.RLock()
        if isinstance(model, BaseModel):
            self.device, self.dtype = model.denoiser.device, model.denoiser.dtype
            model.pipeline.set_progress_bar_config(disable=True)
        self.model: BaseModel = model if isinstance(model, BaseModel) else self._load(model, config_source,
                                                                                       prediction_type)
        self._layout = ModelLayout.of(self.model)  # taken before any LoRA layer wraps a module
        self._parts = [part for part, _ in self.model.parts()]
        self._default_scheduler = self.pipeline.scheduler
        self._schedulers: dict[str, Any] = {DEFAULT_SAMPLER: self._default_scheduler}
        self._adapters: dict[str, _Attached] = {}
        self._layers: dict[str, list[tuple[str | None, Any]]] = {part: [] for part in self._parts}
        self._next_id = 0
        self._kept: dict[Any, torch.Tensor] = {}  # LoRA layer -> its base weight as loaded (while fused)
        # (peft adapter, strength, block strengths) now added into the base weights
        self._fused: tuple[str, float, tuple[tuple[str, float], ...]] | None = None
        self._base_cache: OrderedDict[tuple[str, GenerateSettings], Image.Image] = OrderedDict()
        self._embeds_cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._refresh_layers()  # a model in memory may carry LoRA layers already: the base renders without them

    def _load(self, model: str, config_source: str, prediction_type: str) -> BaseModel:
        # read straight into the preview's precision, the VAE too (the pipeline upcasts a VAE that overflows in
        # fp16 while it decodes): a model stored in fp16 never has an fp32 copy on a GPU's host
        loaded = load_base_model(model, config_source, prediction_type, dtype=self.dtype, vae_dtype=self.dtype)
        self.base_loads += 1
        pipe = loaded.pipeline
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        for part in (loaded.denoiser, pipe.vae, *loaded.text_encoders):
            part.eval().requires_grad_(False)
        return loaded

    @property
    def pipeline(self) -> Any:
        return self.model.pipeline

    @property
    def adapters(self) -> list[str]:
        """Names of the attached adapters, in the order they were attached."""
        return list(self._adapters)

    # --- adapters -------------------------------------------------------------------------------

    def attach(self, path: str | Path | AdapterSource, name: str | None = None) -> str:
        """Attach an adapter (kohya or diffusers file, diffusers folder, run or checkpoint folder).

        Returns its name (``name``, or one derived from the path). Attaching under a name already in
        use replaces that adapter (e.g. the same run after more training), unless it is the same file
        unchanged (same path, modification time and size): then nothing is read again.
        """
        source = path if isinstance(path, AdapterSource) else find_adapter(path)
        name = name or source.name
        stamp = file_stamp(source.file)  # before reading: a rewrite during the read is seen next time
        with self._lock:
            known = self._adapters.get(name)
            if known is not None and known.stamp == stamp:
                return name
        adapter = load_adapter(source.file, self._layout)
        if source.alpha is not None:
            adapter = replace(
                adapter, alpha=dict.fromkeys(adapter.state, source.alpha), module_alpha={},
                conv_alpha=dict.fromkeys(adapter.state, source.conv_alpha) if source.conv_alpha else {},
            )
        with self._lock:
            if name in self._adapters:
                self.detach(name)
            self._unfuse()  # new layers must wrap the base weights as loaded
            peft_name = f"stylelora_{self._next_id}"
            self._next_id += 1
            for part in adapter.state:
                self._inject(part, peft_name, adapter)
            trained = adapter.config
            text = source.text or ((trained.model.clip_skip, trained.data.max_token_length) if trained else (1, 75))
            self._adapters[name] = _Attached(name, peft_name, tuple(adapter.state), source, stamp, *text)
            self._refresh_layers()
        log.info("attached %s from %s (%s)", name, source.file, ", ".join(adapter.state))
        return name

    def attach_run(self, run_dir: str | Path) -> list[str]:
        """Attach every checkpoint of a run and its final adapter; returns their names, oldest first."""
        return [self.attach(source) for source in run_adapters(run_dir)]

    def _inject(self, part: str, peft_name: str, adapter: Adapter) -> None:
        from peft.functional import inject_adapter_in_model, set_peft_model_state_dict

        module = getattr(self.pipeline, part)
        try:
            with warnings.catch_warnings():  # several adapters side by side is the point here
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                inject_adapter_in_model(_peft_config(adapter, part), module, adapter_name=peft_name)
            result = set_peft_model_state_dict(module, adapter.state[part], adapter_name=peft_name)
        except (ValueError, RuntimeError) as e:  # shape mismatch: the file is for another model
            self._remove(peft_name)
            raise FormatError(f"adapter does not fit this base model ({part}): {str(e).splitlines()[0]}") from e
        missing = [k for k in result.missing_keys if f".{peft_name}" in k and ADAPTER_PARAM.search(k)]
        if result.unexpected_keys or missing:
            self._remove(peft_name)
            raise FormatError(f"adapter does not fit this base model ({part}): "
                              f"{(result.unexpected_keys + missing)[:5]}")
        module.to(self.device)
        module.requires_grad_(False)

    def detach(self, name: str) -> None:
        """Remove an attached adapter (its layers and cached text embeddings)."""
        with self._lock:
            attached = self._require(name)
            self._unfuse()
            self._remove(attached.peft_name)
            del self._adapters[name]
            for key in [k for k in self._embeds_cache if k[-1] and k[-1][0] == attached.peft_name]:
                del self._embeds_cache[key]
            self._refresh_layers()

    def _remove(self, peft_name: str) -> None:
        from peft.functional import delete_adapter

        for part in self._parts:
            module = getattr(self.pipeline, part)
            with warnings.catch_warnings():  # "was active ... now deleted": _activate sets it per render
                warnings.simplefilter("ignore", UserWarning)
                delete_adapter(module, peft_name, prefix="lora_")
            getattr(module, "peft_config", {}).pop(peft_name, None)

    def _refresh_layers(self) -> None:
        family = self.model.family
        self._layers = {part: _lora_layers(family, part, getattr(self.pipeline, part)) for part in self._parts}

    def _require(self, name: str) -> _Attached:
        if name not in self._adapters:
            attached = ", ".join(self._adapters) or "none"
            raise ConfigError(f"adapter '{name}': not attached (attached: {attached}); attach it first")
        return self._adapters[name]

    def _resolve(self, adapter: str | None) -> _Attached | None:
        if adapter is not None:
            return self._require(adapter)
        if len(self._adapters) > 1:
            raise ConfigError(f"several adapters are attached ({', '.join(self._adapters)}); say which one")
        return next(iter(self._adapters.values()), None)

    def _activate(self, attached: _Attached | None, scale: float, groups: Mapping[str, float] | None = None) -> None:
        """Make ``attached`` the only active adapter at ``scale`` (times its group's strength in ``groups`` for
        UNet layers); None switches every LoRA layer off.

        Fused (the default, for plain LoRA/LoCon layers): the deltas at those strengths are added into the base
        weights and every LoRA layer is switched off. Otherwise peft's layers run beside the base weights."""
        fused = self.fuse and attached is not None and self._fusable(attached)
        wanted = (attached.peft_name, scale, tuple(sorted((groups or {}).items()))) if fused and attached else None
        if self._fused != wanted:
            self._unfuse()
        for part in self._parts:
            on = attached is not None and part in attached.parts and not fused
            for group, layer in self._layers[part]:
                layer.enable_adapters(on)
                if on:
                    layer.set_adapter([attached.peft_name], inference_mode=True)
                    layer.set_scale(attached.peft_name, scale * (groups or {}).get(group or "", 1.0))
        if wanted is not None and self._fused != wanted:
            self._fuse(attached, scale, groups or {})
            self._fused = wanted

    def _fusable(self, attached: _Attached) -> bool:
        """Plain LoRA/LoCon layers fuse; LoHa, LoKr (other peft layer types) and DoRA run unfused."""
        from peft.tuners.lora import LoraLayer

        return all(isinstance(layer, LoraLayer) and not layer.use_dora.get(attached.peft_name, False)
                   for part in attached.parts for _, layer in self._layers[part])

    def _fuse(self, attached: _Attached, scale: float, groups: Mapping[str, float]) -> None:
        """Add ``attached``'s deltas at ``scale`` (times each group's strength) into the base weights, keeping
        those weights aside first."""
        with torch.no_grad():
            for part in attached.parts:
                for group, layer in self._layers[part]:
                    if attached.peft_name not in layer.lora_A:
                        continue
                    weight = layer.get_base_layer().weight
                    kept = self._kept.setdefault(layer, weight.detach().clone())
                    layer.set_scale(attached.peft_name, scale * groups.get(group or "", 1.0))
                    weight.copy_(kept + layer.get_delta_weight(attached.peft_name).to(weight.dtype))

    def _unfuse(self) -> None:
        """Put the kept base weights back (bit for bit): no adapter is added into them any more."""
        with torch.no_grad():
            for layer, kept in self._kept.items():
                layer.get_base_layer().weight.copy_(kept)
        self._kept.clear()
        self._fused = None

    # --- rendering ------------------------------------------------------------------------------

    def resolve(self, settings: GenerateSettings | None = None, **overrides: Any) -> GenerateSettings:
        """``settings`` (default ``GenerateSettings()``) with ``overrides`` (its fields by name, ``seed=7``),
        made definite for this model: width and height default to its native resolution and must be
        multiples of the VAE's scale factor; the sampler is named canonically."""
        s = (settings or GenerateSettings()).replace(**overrides)
        family = self.model.family
        own = family.sample_settings(self.model.kind)  # the model's steps and guidance where none are set
        s = s.replace(steps=s.steps or own["steps"], guidance=own["guidance"] if s.guidance is None else s.guidance)
        if family.flow_matching and check_sampler(s.sampler) != DEFAULT_SAMPLER:
            raise ConfigError(f"sampler: {family.display(self.model.kind)} renders with its own flow-matching "
                              f"sampler; leave sampler unset ({DEFAULT_SAMPLER})")
        multiple = family.size_multiple(self.pipeline)
        native = self.model.native_resolution
        width, height = s.width or native, s.height or native
        for field, value in (("width", width), ("height", height)):
            if value <= 0 or value % multiple:
                raise ConfigError(f"{field}: must be a positive multiple of {multiple}, got {value}")
        return s.replace(width=width, height=height, sampler=check_sampler(s.sampler))

    def generate(self, prompt: str, settings: GenerateSettings | None = None, *, adapter: str | None = None,
                 scale: float = 1.0, blocks: Mapping[str, float] | None = None, **overrides: Any) -> Image.Image:
        """One image with ``adapter`` (default: the only attached one, if any) at strength ``scale``.

        ``blocks`` gives per-block strengths ({"MID": 0, "OUT": 0.5}: multipliers of ``scale`` for the UNet's
        IN, MID and OUT layers, as A1111's "LoRA block weight"); a group at 0 renders exactly as the adapter
        without that group's modules. ``settings`` and ``overrides`` as in ``resolve``. The image's
        ``info["parameters"]`` holds A1111-style parameters; ``images.save_png`` writes them.
        """
        s = self.resolve(settings, **overrides)
        groups = block_scales(blocks, self.model.family.strength_groups)
        with self._lock:
            return self._render(prompt, s, self._resolve(adapter), scale, groups)

    def base(self, prompt: str, settings: GenerateSettings | None = None, **overrides: Any) -> Image.Image:
        """The base model's image (no adapter), from the session cache when it was rendered before."""
        s = self.resolve(settings, **overrides)
        with self._lock:
            return self._render(prompt, s, None, 0.0)

    def _render(self, prompt: str, settings: GenerateSettings, attached: _Attached | None,
                scale: float, groups: Mapping[str, float] | None = None) -> Image.Image:
        scale = check_strength(scale, "scale")  # beyond the range the weights drift into noise (a NaN image)
        if settings.clip_skip == 0:  # as the adapter was trained (the base image too, so they compare)
            settings = settings.replace(clip_skip=attached.clip_skip if attached is not None else 1)
        if attached is None or scale == 0:
            image = self._base(prompt, settings)
        else:
            image = self._run(prompt, settings, attached, scale, groups)
        strength = {attached.name: scale} if attached is not None else {}
        image.info[images.PARAMETERS_KEY] = self.parameters(prompt, settings, strength, groups)
        return image

    def _base(self, prompt: str, settings: GenerateSettings) -> Image.Image:
        key = (prompt, settings)
        cached = self._base_cache.get(key)
        if cached is None:
            cached = self._run(prompt, settings, None, 0.0)
            self._base_cache[key] = cached
            while len(self._base_cache) > CACHE_SIZE:
                self._base_cache.popitem(last=False)
        self._base_cache.move_to_end(key)
        return cached.copy()

    def _run(self, prompt: str, settings: GenerateSettings, attached: _Attached | None, scale: float,
             groups: Mapping[str, float] | None = None) -> Image.Image:
        self._activate(attached, scale, groups)
        embeddings = self._embeddings(prompt, settings, attached, scale)
        pipe = self.pipeline
        pipe.scheduler = self._scheduler(settings.sampler)
        result = pipe(
            **embeddings,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            width=settings.width,
            height=settings.height,
            generator=torch.Generator("cpu").manual_seed(settings.seed),  # same noise on every device
            output_type="latent" if self.in_memory else "pil",
        )
        if not self.in_memory:
            return result.images[0]
        with torch.no_grad():  # a training model's denoiser may return another precision than its VAE's
            pixels = self.model.family.decode(self.model, result.images)
        return pipe.image_processor.postprocess(pixels, output_type="pil")[0]

    def _embeddings(self, prompt: str, settings: GenerateSettings, attached: _Attached | None,
                    scale: float) -> dict[str, Any]:
        """Prompt embeddings as pipeline arguments, reused while the text encoders are unchanged."""
        guided = settings.guidance > 1.0
        adapts_text = attached is not None and any(part in attached.parts for part in self.model.family.text_parts)
        text_lora = (attached.peft_name, scale) if adapts_text else None
        length = attached.max_token_length if attached is not None else 75
        key = (prompt, settings.negative_prompt if guided else "", guided, settings.clip_skip, length, text_lora)
        if key not in self._embeds_cache:
            with torch.no_grad():
                self._embeds_cache[key] = self._encode(prompt, settings, guided, length)
            while len(self._embeds_cache) > CACHE_SIZE * 4:
                self._embeds_cache.popitem(last=False)
        self._embeds_cache.move_to_end(key)
        return self._embeds_cache[key]

    def _encode(self, prompt: str, settings: GenerateSettings, guided: bool, length: int) -> dict[str, Any]:
        """Prompt embeddings as training encodes captions, the family's way."""
        return self.model.family.prompt_embeddings(self.model, prompt, settings.negative_prompt, guided,
                                                   settings.clip_skip, length)

    def _scheduler(self, name: str) -> Any:
        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self._default_scheduler)
        return self._schedulers[name]

    def parameters(self, prompt: str, settings: GenerateSettings, strengths: dict[str, Any] | None = None,
                   groups: Mapping[str, float] | None = None) -> str:
        """A1111-style parameters text for an image rendered from ``prompt`` with resolved ``settings``.

        ``strengths`` maps adapter name to strength (a number, or a list of them for a sweep); ``groups``
        are per-block strengths, written when any is not 1.
        """
        fields: dict[str, Any] = {
            "Steps": settings.steps,
            "Sampler": sampler_label(self._scheduler(settings.sampler)),
            "CFG scale": f"{settings.guidance:g}",
            "Seed": settings.seed,
            "Size": f"{settings.width}x{settings.height}",
            "Model": self.model_name,
        }
        if settings.clip_skip > 1:  # A1111 writes it only when it is not 1
            fields["Clip skip"] = settings.clip_skip
        if strengths:
            fields["Lora"] = ", ".join(strengths)
            values = {_format_scales(v) for v in strengths.values()}
            fields["Lora strength"] = values.pop() if len(values) == 1 else ", ".join(
                _format_scales(v) for v in strengths.values())
            if groups and any(v != 1 for v in groups.values()):
                fields["Lora block strength"] = ", ".join(f"{g} {v:g}" for g, v in groups.items())
        return images.format_parameters(prompt, settings.negative_prompt, fields)

    # --- views ----------------------------------------------------------------------------------

    def generate_batch(self, prompt: str, seeds: Iterable[int], settings: GenerateSettings | None = None, *,
                       adapter: str | None = None, scale: float = 1.0, **overrides: Any) -> list[Image.Image]:
        """One image per seed (other arguments as ``generate``); each equals the single-seed image."""
        s = (settings or GenerateSettings()).replace(**overrides)
        return [self.generate(prompt, s.replace(seed=seed), adapter=adapter, scale=scale) for seed in seeds]

    def compare(self, prompt: str, settings: GenerateSettings | None = None, *, adapter: str | None = None,
                scale: float = 1.0, blocks: Mapping[str, float] | None = None,
                **overrides: Any) -> tuple[Image.Image, Image.Image]:
        """(base image, adapter image) for one prompt and seed; ``blocks`` as in ``generate``."""
        s = self.resolve(settings, **overrides)
        groups = block_scales(blocks, self.model.family.strength_groups)
        with self._lock:
            attached = self._resolve(adapter)
            return self._render(prompt, s, attached, 0.0), self._render(prompt, s, attached, scale, groups)

    def sweep(self, prompt: str, scales: Sequence[float], settings: GenerateSettings | None = None, *,
              adapter: str | None = None, blocks: Mapping[str, float] | None = None, **overrides: Any) -> Image.Image:
        """One prompt and seed at several strengths, as a strip labelled with the strengths."""
        s = self.resolve(settings, **overrides)
        groups = block_scales(blocks, self.model.family.strength_groups)
        with self._lock:
            attached = self._resolve(adapter)
            tiles = [self._render(prompt, s, attached, scale, groups) for scale in scales]
        sheet = images.strip(tiles, [f"{scale:g}" for scale in scales])
        strengths = {attached.name: list(scales)} if attached else {}
        sheet.info[images.PARAMETERS_KEY] = self.parameters(prompt, s, strengths, groups)
        return sheet

    def grid(self, prompt: str, adapters: Sequence[str], scales: Sequence[float],
             settings: GenerateSettings | None = None, **overrides: Any) -> Image.Image:
        """Rows of adapters (e.g. a run's checkpoints) by columns of strengths, labelled.

        ``adapters`` are names of attached adapters, or paths, which are attached first.
        """
        s = self.resolve(settings, **overrides)
        names = [a if a in self._adapters else self.attach(a) for a in adapters]
        with self._lock:
            rows = [[self._render(prompt, s, self._require(name), scale) for scale in scales] for name in names]
        sheet = images.grid(rows, [f"{scale:g}" for scale in scales], names)
        sheet.info[images.PARAMETERS_KEY] = self.parameters(prompt, s, {name: list(scales) for name in names})
        return sheet



def _format_scales(value: float | Sequence[float]) -> str:
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return ", ".join(f"{x:g}" for x in value)
