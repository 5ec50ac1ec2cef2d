"""A base model and its family: ``BaseModel`` (a loaded pipeline, its name and kind) and the model-family
interface, one implementation per family of base models (``stylelora/families/``).

A family owns everything its models do differently: how to tell one from its configs or file keys, its
built-in tiny model, how a caption becomes conditioning, what the denoiser is fed and learns to predict,
which modules get LoRA and how users name its blocks, how its adapters are named in kohya files and
described in metadata, how it is written as one checkpoint, how a preview is rendered, and what the
memory estimate replays. The trainer, the previewer, the formats, the estimate and the shells ask the
family of the model in hand (``BaseModel.family``, ``ModelLayout.family``); they never test the kind.

A family may have several kinds (SD2: ``sd2`` 512 px epsilon and ``sd2-v`` 768 px v-prediction): a kind
is what ``model.kind`` names and what metadata records; kinds of one ``architecture`` have the same
modules, so ``model.kind`` may turn one into another. ``stylelora.families`` registers the families.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from ..core.config import Config, LoraConfig, TrainConfig
    from .text import TextStates


# the flow-matching options of the config (``ModelFamily.applies``: only flow models use them)
FLOW_FIELDS = frozenset({"train.timestep_sampling", "train.logit_mean", "train.logit_std", "train.flow_shift",
                         "train.loss_weighting"})


@dataclass(frozen=True)
class Configs:
    """A model's component configs as read before (or without) loading it; any may be missing."""

    pipeline_class: str = ""
    denoiser: Mapping[str, Any] | None = None  # unet/ or transformer/config.json
    text_encoder: Any = None  # a dict or a transformers config
    scheduler: Mapping[str, Any] | None = None
    vae: Mapping[str, Any] | None = None

    def get(self, part: str, key: str) -> Any:
        """One value of a component's config (a dict or a transformers config); None when absent."""
        config = getattr(self, part)
        if config is None:
            return None
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


@dataclass
class LoraTarget:
    """Where one part gets adapter layers: peft's target names, with per-name rank and alpha exceptions."""

    part: str
    module: torch.nn.Module
    names: list[str]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """What the denoiser learns: how noise and timesteps are drawn, the noisy input, the target, the weights.
    Everything random is drawn from the per-example generators (keyed by seed, epoch and slot)."""

    def draw(self, generators: list[torch.Generator], latent_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, timesteps) of each example, from its own generator."""
        ...

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-example loss weights (all ones without a weighting scheme)."""
        ...

    def spread(self, images: int, per_image: int) -> torch.Tensor:
        """Fixed timesteps for the validation loss: ``per_image`` per image, spread over the schedule."""
        ...


class ModelFamily:
    """One family of base models. Subclasses set the class attributes and implement the methods; the
    defaults here are the ones most families share. Methods take the ``BaseModel`` (or its pipeline) they
    answer for."""

    # --- identity ------------------------------------------------------------------------------------
    name: ClassVar[str]  # "sd1"
    kinds: ClassVar[dict[str, str]]  # kind -> display name ("sd2-v": "SD2 768-v"); the first is the default
    architecture: ClassVar[str]  # kinds of one architecture may be turned into each other by model.kind
    presets: ClassVar[dict[str, str]] = {}  # kind -> presets/<name>.toml made for it
    builtins: ClassVar[dict[str, Callable[..., Any]]] = {}  # builtin:<name> -> builder(**prediction_type)
    suggestions: ClassVar[tuple[str, ...]] = ()  # what a model picker offers: a built-in, well-known hub ids
    denoiser: ClassVar[str] = "unet"  # the pipeline component that denoises; also its adapter part name
    denoiser_label: ClassVar[str] = "UNet"  # how messages name it
    # adaptable text encoders in order, by pipeline component; lora.text_encoders picks them as te1, te2
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder",)
    default_targets: ClassVar[list[str]] = []  # denoiser modules that get LoRA when lora.unet_targets is empty
    strength_groups: ClassVar[tuple[str, ...]] = ()  # per-block strength groups of the denoiser (IN, MID, OUT)
    below_native_warning: ClassVar[frozenset[str]] = frozenset()  # kinds that learn worse far below native size
    structure: ClassVar[str] = ""  # its structure in a few words, for "model.kind does not fit" messages
    # rectified flow (SD3.5, FLUX.1): trains with ``losses.FlowObjective`` and renders with its own flow-matching
    # sampler only; the flow-matching options apply to it, SD's DDPM options (min-SNR, ...) do not
    flow_matching: ClassVar[bool] = False
    # whether train.attention picks the denoiser's attention processors (the SD UNets); a diffusion transformer
    # keeps diffusers' own (they already call scaled-dot-product attention)
    sets_attention: ClassVar[bool] = True
    # several denoiser modules share one kohya name (q, k and v fused in the original layout): kohya files hold
    # them as one module (``adapters.fused``); otherwise two modules with one name are an error
    kohya_fuses: ClassVar[bool] = False
    # config fields that do not apply to this family's models (the form hides them, the run ignores them)
    unused_fields: ClassVar[frozenset[str]] = frozenset()
    # The memory estimate's calibration of the activations its meta replay counts (fp32 tensors the backward pass
    # keeps, weights not counted), measured on a CPU per architecture (benchmarks/RESULTS.md): the resident bytes
    # per counted byte (gradients in flight, allocator slack), and the share of them a bf16/fp16 base keeps.
    # The UNet's: builtin:small at 256 and 384 px, checked on SD1.5- and SDXL-shaped runs.
    activation_factor: ClassVar[float] = 2.7
    half_precision_activations: ClassVar[float] = 0.7

    @property
    def parts(self) -> tuple[str, ...]:
        """Every part that can carry an adapter: the denoiser, then the adaptable text encoders."""
        return (self.denoiser, *self.text_parts)

    def display(self, kind: str) -> str:
        return self.kinds[kind]

    def applies(self, field: str) -> bool:
        """Whether the config field ``field`` (``train.min_snr_gamma``) means anything for this family's models:
        the flow-matching options only for flow models, and none of ``unused_fields``."""
        return field not in self.unused_fields and (field not in FLOW_FIELDS or self.flow_matching)

    def quantize_on_gpu(self, kind: str) -> str:
        """What ``model.quantize=auto`` holds the frozen base in on a GPU: none (the SD UNets fit), nf4..."""
        return "none"

    def learns_worse_below_native(self, kind: str) -> bool:
        """Whether training ``kind`` far below its native size deserves a warning (SDXL, SD2-768-v)."""
        return kind in self.below_native_warning

    # --- detection and loading -------------------------------------------------------------------------
    def detect(self, configs: Configs) -> str | None:
        """This family's kind for a model with these configs, or None when it is not of this family."""
        raise NotImplementedError

    def detect_single_file(self, keys: Sequence[str]) -> str | None:
        """This family's kind for a single-file checkpoint with these tensor names, or None."""
        return None

    def single_file_resolution(self, kind: str) -> int:
        """The native resolution diffusers assumes for a single file of ``kind`` (configs unknown)."""
        raise NotImplementedError

    def pipeline_class(self, kind: str) -> Any:
        """The diffusers pipeline class that loads a folder or a single file of ``kind``."""
        raise NotImplementedError

    def single_file_kwargs(self, kind: str) -> dict[str, Any]:
        """Extra keyword arguments of ``pipeline_class(kind).from_single_file``."""
        return {}

    def load_single_file(self, path: Path, config_source: str, kind: str, dtype: Any = None) -> Any | None:
        """The pipeline of a single file of ``kind`` loaded this family's way, every component read straight into
        ``dtype`` (as stored when None), or None for diffusers' own ``pipeline_class(kind).from_single_file``
        (FLUX.1: a transformer-only file beside a folder's other parts)."""
        return None

    def set_prediction_type(self, pipeline: Any, prediction_type: str) -> None:
        """Apply ``model.prediction_type`` (set, not auto) to a loaded pipeline; ConfigError where it means nothing."""
        from ..core.errors import ConfigError

        raise ConfigError(f"model.prediction_type: {self.name} models have no prediction type to choose; "
                          "set model.prediction_type=auto")

    def configured_resolution(self, configs: Configs) -> int:
        """The native resolution of a model known by its configs alone (forms show it before loading)."""
        raise NotImplementedError

    def apply_kind(self, pipeline: Any, kind: str, prediction_type: str) -> None:
        """Make a loaded pipeline of this architecture behave as ``kind`` (``model.kind`` set by the user)."""

    def check_config(self, config: Config) -> list[str]:
        """Errors of settings that do not fit ``config.model.kind`` (one of this family's kinds)."""
        return []

    def check_model(self, model: BaseModel, config: Config) -> None:
        """Raise ConfigError for settings that do not fit the loaded model (clip skip beyond its layers)."""

    def ignored_settings(self, kind: str) -> dict[str, str]:
        """Config fields a model of ``kind`` trains without, each with why (import-kohya leaves such a setting out
        and says so)."""
        return {}

    # --- what a loaded model is ------------------------------------------------------------------------
    def native_resolution(self, pipeline: Any) -> int:
        return int(getattr(pipeline, self.denoiser).config.sample_size * pipeline.vae_scale_factor)

    def prediction_type(self, pipeline: Any) -> str:
        return str(pipeline.scheduler.config.get("prediction_type", "epsilon"))

    def size_multiple(self, pipeline: Any) -> int:
        """Image sides must be multiples of this many pixels."""
        return int(pipeline.vae_scale_factor)

    def tokenizers(self, pipeline: Any) -> list[Any]:
        raise NotImplementedError

    def text_encoders(self, pipeline: Any) -> list[torch.nn.Module]:
        raise NotImplementedError

    def token_limit(self, pipeline: Any) -> int:
        raise NotImplementedError

    def caption_tokenizer(self, pipeline: Any) -> Any:
        """The tokenizer caption lengths are counted with against ``token_limit`` (the dataset check)."""
        return pipeline.tokenizer

    def fit_tokenizers(self, pipeline: Any) -> None:
        """Make each tokenizer cut where its text encoder ends (called once after loading)."""

    # --- conditioning and the training step ------------------------------------------------------------
    def tokenize(self, model: BaseModel, captions: list[str], max_token_length: int) -> list[torch.Tensor]:
        """Token ids of ``captions``, one tensor per text encoder (``text.tokenize``: CLIP's 75-token chunks)."""
        from .text import tokenize

        return tokenize(model.tokenizers, captions, max_token_length)

    def encode_text(self, encoders: Sequence[Any], ids: Sequence[torch.Tensor], clip_skip: int = 1,
                    frozen: TextStates | None = None) -> TextStates:
        """The denoiser's text conditioning from ``tokenize``'s ids; ``frozen``: what ``encode_frozen_text`` gave
        for these captions (not computed again)."""
        raise NotImplementedError

    def encode_frozen_text(self, encoders: Sequence[Any], ids: Sequence[torch.Tensor]) -> TextStates | None:
        """The share of the conditioning that comes from text encoders that never train (T5), computed once per
        caption while a CLIP encoder trains and passed back to ``encode_text``; None when there is none."""
        return None

    def objective(self, model: BaseModel, train: TrainConfig) -> Objective:
        """What the denoiser learns in this run (it may also set the sampling scheduler to match)."""
        raise NotImplementedError

    def predict(self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextStates,
                time_ids: torch.Tensor | None) -> torch.Tensor:
        """The denoiser's prediction for a batch (``time_ids``: SDXL's size and crop conditioning)."""
        raise NotImplementedError

    def example_inputs(self, model: BaseModel, batch: int, side: int, max_token_length: int, encode: bool,
                       device: Any, dtype: Any) -> tuple[torch.Tensor, torch.Tensor, TextStates, torch.Tensor | None]:
        """(noisy latents, timesteps, text, time ids) shaped as one training step's (zeros; latents ``side``
        latent pixels square; the text encoders run when ``encode``, as when they train), for the estimate's
        replay on meta tensors and its GPU probe."""
        raise NotImplementedError

    def conditioning_tokens(self, max_token_length: int) -> int:
        """How many text states a caption of ``data.max_token_length`` tokens gives the denoiser."""
        raise NotImplementedError

    def vae_dtype(self, vae_config: Mapping[str, Any] | None, weight_dtype: torch.dtype) -> torch.dtype:
        """The VAE's precision in a run whose frozen weights are ``weight_dtype``, from the VAE's config alone (the
        loader decides it before any weight is read)."""
        return weight_dtype

    def decode(self, model: BaseModel, latents: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Pixels (-1..1) of latents as the pipeline returns them with ``output_type="latent"`` for an image of
        ``size`` (height, width), decoded in the VAE's own precision."""
        vae = model.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample

    # --- LoRA: where it goes, how users name the blocks ---------------------------------------------------
    def lora_targets(self, model: BaseModel, lora: LoraConfig) -> list[LoraTarget]:
        """Where ``lora`` puts adapter layers: the denoiser's modules (``lora.blocks``, convs) and, when the
        text encoder trains, the chosen encoders'."""
        raise NotImplementedError

    def text_selection(self, name: str) -> tuple[str, ...] | None:
        """The text-encoder parts ``te`` (all), ``te1`` or ``te2`` name (``lora.text_encoders``, split's
        ``--keep``); None for another name. A model with one adaptable encoder takes it for any of them."""
        if name not in ("te", "both", "te1", "te2"):
            return None
        if len(self.text_parts) == 1 or name in ("te", "both"):
            return self.text_parts
        return (self.text_parts[int(name[-1]) - 1],)

    def check_blocks(self, selectors: Sequence[str], field: str = "lora.blocks") -> None:
        """ConfigError for a malformed block selector of this family."""

    def select_blocks(self, paths: Sequence[str], selectors: Sequence[str], field: str = "lora.blocks",
                      what: str = "this model's denoiser") -> list[str]:
        """The denoiser module paths inside the selected blocks; ConfigError for a block the model lacks."""
        raise NotImplementedError

    def block_group(self, path: str) -> str | None:
        """The per-block strength group (one of ``strength_groups``) of a denoiser module path."""
        return None

    # --- adapter files ---------------------------------------------------------------------------------------
    def kohya_names(self, modules: Mapping[str, Sequence[str]], denoiser_config: Any) -> dict[tuple[str, str], str]:
        """The kohya name (A1111, ComfyUI, sd-scripts) of every (part, module path) that has one."""
        raise NotImplementedError

    def kohya_prefix(self, part: str) -> str:
        """The prefix of a part's kohya names (``lora_unet_``, ``lora_te_``, ...)."""
        raise NotImplementedError

    def kohya_aliases(self, modules: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, str]]:
        """Other kohya names some tools write for these modules: read, never written."""
        return {}

    def metadata(self, kind: str) -> dict[str, str]:
        """The metadata that says which base model an adapter is for (ss_base_model_version, modelspec)."""
        raise NotImplementedError

    def save_single_file(self, pipeline: Any, out: Path, precision: str) -> Path:
        """Write a (merged) pipeline as the one checkpoint file A1111 and ComfyUI load, verified."""
        from ..core.errors import FormatError

        raise FormatError(f"a {self.name} model cannot be written as one checkpoint file by this version; "
                          "write a diffusers folder instead (an output path without .safetensors)")

    # --- preview ---------------------------------------------------------------------------------------------
    def prompt_embeddings(self, model: BaseModel, prompt: str, negative_prompt: str, guided: bool, clip_skip: int,
                          max_token_length: int) -> dict[str, Any]:
        """The pipeline's prompt arguments, encoded as training encodes captions."""
        raise NotImplementedError

    def sample_settings(self, kind: str) -> dict[str, Any]:
        """How this family's models render where the user set nothing else (samples, previews, ``generate``):
        ``steps`` and ``guidance`` (``GenerateSettings`` fields)."""
        return {"steps": 20, "guidance": 7.5}


@dataclass
class BaseModel:
    """A pipeline plus what stylelora needs to know about it. Everything that depends on the architecture
    (which component denoises, which text encoders there are, the native size) is the family's answer."""

    pipeline: Any  # a diffusers pipeline (a skeleton holds only the adaptable parts, on the meta device)
    name: str
    kind: str  # one of family.kinds, e.g. "sd2-v"
    family: ModelFamily

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that denoises (SD's UNet, a diffusion transformer): ``pipeline.<family.denoiser>``."""
        return getattr(self.pipeline, self.family.denoiser)

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under the name Stable Diffusion code knows it by (tests and benchmarks use it)."""
        return self.denoiser

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.pipeline.text_encoder

    @property
    def text_encoder_2(self) -> torch.nn.Module | None:
        return getattr(self.pipeline, "text_encoder_2", None)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer that counts a caption's tokens against ``token_limit`` (CLIP's; T5's for FLUX.1, SD3.5)."""
        return self.family.caption_tokenizer(self.pipeline)

    @property
    def tokenizers(self) -> list[Any]:
        """One tokenizer per text encoder, in the order of ``text_encoders``."""
        return self.family.tokenizers(self.pipeline)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """Every text encoder the conditioning uses, in order (adaptable or frozen)."""
        return self.family.text_encoders(self.pipeline)

    @property
    def token_limit(self) -> int:
        """How many tokens (start and end included) a caption may have before the first encoder cuts it."""
        return self.family.token_limit(self.pipeline)

    def parts(self) -> list[tuple[str, torch.nn.Module]]:
        """The networks that can carry an adapter, by part name (the denoiser first, then its text encoders)."""
        found = [(part, getattr(self.pipeline, part, None)) for part in self.family.parts]
        return [(part, module) for part, module in found if module is not None]

    @property
    def prediction_type(self) -> str:
        return self.family.prediction_type(self.pipeline)

    @property
    def native_resolution(self) -> int:
        return self.family.native_resolution(self.pipeline)
