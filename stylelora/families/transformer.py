"""What the diffusion-transformer families (FLUX.1, SD3.5) share: rectified-flow training (``FlowObjective``),
CLIP plus a frozen T5 text encoder (T5's states cached like any frozen encoder's, also while CLIP trains), LoRA
on the transformer blocks' linear layers, blocks named by their kind and number (``double.3``, ``joint.12``),
kohya names and single files in the original (BFL, MMDiT) layout, where one original module may hold several
diffusers modules side by side (q, k and v). Each family module states its layout and conditioning."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.errors import ConfigError, FormatError, ModelError, setting
from ..model.base import Configs, LoraTarget, ModelFamily
from ..model.lora import matches

if TYPE_CHECKING:
    import torch

    from ..core.config import Config, LoraConfig, TrainConfig
    from ..model.base import BaseModel, Objective
    from ..model.text import TextStates

# (original module, place among the modules fused into it, whether its two halves are swapped): where one
# diffusers module of a transformer sits in the original layout
Original = tuple[str, int, bool]
CLIP_TOKENS = 77
# train.* and model.* options of the SD UNets that mean nothing to a flow-matching transformer
UNET_ONLY_FIELDS = frozenset({
    "model.prediction_type", "model.clip_skip", "data.max_token_length", "train.min_snr_gamma",
    "train.zero_terminal_snr", "train.attention", "train.channels_last", "lora.conv_rank", "lora.conv_alpha",
    "lora.lokr_factor",
})


class TransformerFamily(ModelFamily):
    """The shared behaviour of the diffusion-transformer families; FLUX and SD3 subclass it."""

    denoiser: ClassVar[str] = "transformer"
    denoiser_label: ClassVar[str] = "transformer"
    flow_matching: ClassVar[bool] = True
    sets_attention: ClassVar[bool] = False
    kohya_fuses: ClassVar[bool] = True
    unused_fields: ClassVar[frozenset[str]] = UNET_ONLY_FIELDS
    # fitted on a FLUX.1 [dev]-wide transformer (benchmarks/bench_memory.py --shape flux-dev-slice): 1.59 and 1.55
    # in fp32 at 64 and 256 px, bf16 keeping half; at SD3.5 Large's widths (--shape sd35-large-slice) they give 5%
    # more than the fp32 runs held, so SD3.5 shares them
    activation_factor: ClassVar[float] = 1.6
    half_precision_activations: ClassVar[float] = 0.5
    # block names users type -> the diffusers ModuleList that holds them ({"double": "transformer_blocks"})
    block_lists: ClassVar[dict[str, str]] = {}
    # aliases of a block name: the original layout's and diffusers' ("double_blocks" -> "double")
    block_aliases: ClassVar[dict[str, str]] = {}
    kohya_text_prefixes: ClassVar[dict[str, str]] = {}  # text part -> lora_te1_ ... (sd-scripts' prefixes)
    max_sequence_lengths: ClassVar[dict[str, int]] = {}  # kind -> T5 tokens (diffusers' and sd-scripts' default)
    samplers: ClassVar[dict[str, dict[str, Any]]] = {}  # kind -> sample_settings
    t5_part: ClassVar[str] = ""  # the pipeline component of the frozen T5 encoder
    t5_tokenizer: ClassVar[str] = ""
    transformer_class: ClassVar[str] = ""  # diffusers' class of the denoiser
    title: ClassVar[str] = ""  # how messages name the models: FLUX.1, SD3.5

    # --- what a model is -------------------------------------------------------------------------------
    def prediction_type(self, pipeline: Any) -> str:
        return "flow"

    def configured_resolution(self, configs: Configs) -> int:
        return int(configs.get("vae", "sample_size") or 1024)

    def single_file_resolution(self, kind: str) -> int:
        return 1024

    def token_limit(self, pipeline: Any) -> int:
        """Captions are read by T5 (CLIP gives only its first window): T5's length counts."""
        return self.max_sequence_lengths[self.kind_of(pipeline)]

    def caption_tokenizer(self, pipeline: Any) -> Any:
        return getattr(pipeline, self.t5_tokenizer)

    def kind_of(self, pipeline: Any) -> str:
        from .loading import pipeline_configs

        return self.detect(pipeline_configs(pipeline)) or next(iter(self.kinds))

    def quantize_on_gpu(self, kind: str) -> str:
        """nf4: FLUX.1's 12B transformer (24 GB in bf16) and T5-XXL (9.5 GB) fit a 16 GB card only so."""
        return "nf4"

    def sample_settings(self, kind: str) -> dict[str, Any]:
        return dict(self.samplers[kind])

    def ignored_settings(self, kind: str) -> dict[str, str]:
        """What these models read of a caption is fixed by their pipelines (import-kohya leaves these out)."""
        reads = (f"{self.title} reads a caption's first 77 CLIP tokens and up to "
                 f"{self.max_sequence_lengths[kind]} T5 tokens, as its pipeline does")
        return {"model.clip_skip": f"{reads}; clip skip does not apply to {self.title}",
                "data.max_token_length": f"{reads}; 75-token chunks do not apply to {self.title}"}

    def check_config(self, config: Config) -> list[str]:
        """Settings a flow-matching transformer cannot train with (also checked on the loaded model)."""
        lora, train = config.lora, config.train
        errors = []
        if lora.type != "lora":
            errors.append(f"lora.type: {lora.type} is not trained on {self.title} models here (their kohya files fuse "
                          "q, k and v into one module, which LyCORIS' layers cannot be); set lora.type=lora")
        for field, value, off in (("train.min_snr_gamma", train.min_snr_gamma, 0),
                                  ("train.zero_terminal_snr", train.zero_terminal_snr, False),
                                  ("model.prediction_type", config.model.prediction_type, "auto")):
            if value != off:
                errors.append(f"{field}: is for the SD UNets' DDPM training; {self.title} models learn a flow "
                              f"(see train.loss_weighting and train.flow_shift); set {field}={str(off).lower()}")
        resolution, step = config.data.resolution, config.data.bucket_step
        for field, value in (("data.resolution", resolution), ("data.bucket_step", step)):
            if value % 16:
                errors.append(f"{field}: {value} is not a multiple of 16, which {self.title}'s 2x2 patches of 8x "
                              f"latents need; use {max(16, value // 16 * 16)}")
        return errors

    def check_model(self, model: BaseModel, config: Config) -> None:
        errors = self.check_config(config)
        if errors:
            raise ConfigError("\n".join(errors))

    # --- text: CLIP (adaptable) and T5 (frozen, cached) ---------------------------------------------------
    def fit_tokenizers(self, pipeline: Any) -> None:
        from ..model.text import token_limit

        for name, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tokenizer, module = getattr(pipeline, name, None), getattr(pipeline, encoder, None)
            if tokenizer is not None and module is not None and "CLIP" in type(module).__name__:
                tokenizer.model_max_length = token_limit(tokenizer, module)

    def tokenizers(self, pipeline: Any) -> list[Any]:
        names = ("tokenizer", "tokenizer_2", "tokenizer_3")[: len(self.text_encoders(pipeline))]
        return [getattr(pipeline, name) for name in names]

    def text_encoders(self, pipeline: Any) -> list[Any]:
        return [getattr(pipeline, part) for part in (*self.text_parts, self.t5_part)]

    def tokenize(self, model: BaseModel, captions: list[str], max_token_length: int) -> list[torch.Tensor]:
        """CLIP's ids (one window: these models read CLIP's first 77 tokens, as their pipelines do) per CLIP
        encoder, then T5's, padded to the kind's ``max_sequence_length``."""
        from ..model.text import token_ids

        *clips, t5 = model.tokenizers
        ids = [token_ids(tokenizer, captions, CLIP_TOKENS - 2) for tokenizer in clips]
        length = self.max_sequence_lengths[model.kind]
        ids.append(t5(captions, padding="max_length", max_length=length, truncation=True,
                      return_tensors="pt").input_ids)
        return ids

    def encode_t5(self, encoder: Any, ids: torch.Tensor) -> torch.Tensor:
        return encoder(ids.to(encoder.device))[0]

    def encode_frozen_text(self, encoders: Sequence[Any], ids: Sequence[torch.Tensor]) -> TextStates | None:
        from ..model.text import TextStates

        return TextStates(self.encode_t5(encoders[-1], ids[-1]))

    def conditioning_tokens(self, max_token_length: int) -> int:
        return max(self.max_sequence_lengths.values())

    # --- the training step --------------------------------------------------------------------------------
    def flow_shift(self, model: BaseModel) -> Callable[..., Any]:
        """How the training sigmas are shifted toward noise when ``train.flow_shift`` is unset."""
        raise NotImplementedError

    def objective(self, model: BaseModel, train: TrainConfig) -> Objective:
        """Rectified flow: logit-normal sigmas (``train.timestep_sampling``), shifted by ``train.flow_shift``
        or the model's own shift, the velocity target, SD3's loss weighting (``train.loss_weighting``)."""
        from ..model.losses import FlowObjective, static_shift

        sampling = {"auto": "logit_normal", "uniform": "none"}.get(train.timestep_sampling, train.timestep_sampling)
        shift = static_shift(train.flow_shift) if train.flow_shift else self.flow_shift(model)
        return FlowObjective(sampling, train.logit_mean, train.logit_std, shift, train.loss_weighting,
                             train.noise_offset)

    # --- LoRA ------------------------------------------------------------------------------------------------
    def original(self, path: str, denoiser_config: Mapping[str, Any]) -> Original | None:
        """Where the diffusers module ``path`` sits in the original layout (None: it has no place there)."""
        raise NotImplementedError

    def kohya_module(self, path: str, denoiser_config: Mapping[str, Any]) -> str | None:
        """The original module a kohya name is made of; None when the module has none or its halves are swapped
        there (a LoRA on it cannot be written by name)."""
        found = self.original(path, denoiser_config)
        return None if found is None or found[2] else found[0]

    def lora_targets(self, model: BaseModel, lora: LoraConfig) -> list[LoraTarget]:
        """The linear layers of the transformer blocks that kohya's and diffusers' trainers adapt (or
        ``lora.unet_targets`` anywhere in the transformer), in the chosen ``lora.blocks``; with the text encoder,
        ``lora.text_encoder_targets`` on the chosen CLIP encoders (T5 stays frozen)."""
        import torch

        names = list(lora.unet_targets) or self.default_targets
        config = dict(model.denoiser.config)
        paths = [path for path, module in model.denoiser.named_modules()
                 if path and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and matches(path, names)]
        if not lora.unet_targets:  # the blocks' layers a kohya file can name
            paths = [p for p in paths if self.block_name(p) is not None and self.kohya_module(p, config) is not None]
        if lora.blocks:
            paths = self.select_blocks(paths, lora.blocks)
        if not paths:
            raise ConfigError(f"lora.unet_targets: {names} names no linear layer of this {self.title} transformer; "
                              "leave it empty for the family's own list")
        targets = [LoraTarget(self.denoiser, model.denoiser, paths)]
        if lora.train_text_encoder:
            chosen = self.text_selection(lora.text_encoders) or self.text_parts
            targets += [LoraTarget(part, m, list(lora.text_encoder_targets)) for part, m in model.parts()
                        if part in chosen]
        return targets

    def block_name(self, path: str) -> str | None:
        """``double.3`` for ``transformer_blocks.3.attn.to_q`` (the family's names of its block lists)."""
        for short, container in self.block_lists.items():
            match = re.match(rf"^{re.escape(container)}\.(\d+)(\.|$)", path)
            if match:
                return f"{short}.{match.group(1)}"
        return None

    def _normalise(self, selector: str) -> str:
        head, dot, rest = selector.strip().partition(".")
        head = self.block_aliases.get(head, head)
        return head + dot + rest

    def check_blocks(self, selectors: Sequence[str], field: str = "lora.blocks") -> None:
        pattern = re.compile(rf"^({'|'.join(self.block_lists)})(\.\d+)?$")
        for raw in selectors:
            if not pattern.match(self._normalise(raw)):
                names = " or ".join(f"{short}.N" for short in self.block_lists)
                raise ConfigError(f"{field}: '{raw}' is not a block of a {self.title} transformer; use {names} "
                                  f"(e.g. {next(iter(self.block_lists))}.0), or {' / '.join(self.block_lists)} "
                                  "for all of that kind")

    def select_blocks(self, paths: Sequence[str], selectors: Sequence[str], field: str = "lora.blocks",
                      what: str = "this model's transformer") -> list[str]:
        self.check_blocks(selectors, field)
        picked: set[str] = set()
        for raw in selectors:
            selector = self._normalise(raw)
            found = [p for p in paths if (b := self.block_name(p)) is not None
                     and (b == selector or b.startswith(selector + "."))]
            if not found:
                known = sorted({b for b in map(self.block_name, paths) if b},
                               key=lambda b: (b.split(".")[0], int(b.split(".")[1])))
                shown = f"{known[0]} ... {known[-1]}" if len(known) > 8 else ", ".join(known) or "none"
                raise ConfigError(f"{field}: '{raw}' names no module of {what}; its blocks are: {shown}")
            picked.update(found)
        return [p for p in paths if p in picked]

    # --- adapter files ------------------------------------------------------------------------------------
    def kohya_prefix(self, part: str) -> str:
        return {self.denoiser: "lora_unet_", **self.kohya_text_prefixes}[part]

    def kohya_names(self, modules: Mapping[str, Sequence[str]], denoiser_config: Any) -> dict[tuple[str, str], str]:
        """sd-scripts' names: ``lora_unet_`` and the original module (``double_blocks_0_img_attn_qkv``) for the
        transformer, modules fused there listed in their order in it; ``lora_te1_``... for the CLIP encoders."""
        from ..model.text import conventional_text_path

        config = dict(denoiser_config or {})
        names: dict[tuple[str, str], str] = {}
        for part, paths in modules.items():
            if part not in self.parts:
                raise FormatError(f"no kohya name for adapter part '{part}'")
            prefix = self.kohya_prefix(part)
            if part != self.denoiser:
                names.update({(part, p): prefix + conventional_text_path(p).replace(".", "_") for p in paths})
                continue
            placed = [(found, p) for p in paths if (found := self.original(p, config)) is not None and not found[2]]
            for (original, _, _), path in sorted(placed):
                names[(part, path)] = prefix + original.replace(".", "_")
        return names

    def metadata(self, kind: str) -> dict[str, str]:
        raise NotImplementedError

    # --- single files ---------------------------------------------------------------------------------------
    def original_parameter(self, key: str) -> str | None:
        """The original name of a parameter outside the linear layers (norm scales, position tables), or None."""
        raise NotImplementedError

    def load_single_file(self, path: Path, config_source: str, kind: str, dtype: Any = None) -> Any | None:
        """A transformer-only file (or one holding only the transformer under ``model.diffusion_model.``), in the
        original layout or with diffusers' names, beside the text encoders, tokenizers, VAE and scheduler of the
        diffusers folder in ``model.config``. Read by this family's own map of the original layout, at any
        width (diffusers' converters assume FLUX.1's), every part straight into ``dtype`` (as stored when None)."""
        folder = Path(config_source).expanduser() if config_source else None
        if folder is None or not (folder / "model_index.json").is_file():
            raise ModelError(
                f"model '{path}': a {self.title} single file holds the transformer; the text encoders and VAE come "
                f"from a local diffusers folder of the same model: set {setting('model.config', '/path/to/folder')}")
        from .loading import stored_dtypes

        try:
            transformer = self._transformer_from_file(path, folder / "transformer", dtype)
            dtypes = {"default": dtype} if dtype is not None else stored_dtypes(folder)
            return self.pipeline_class(kind).from_pretrained(str(folder), transformer=transformer, dtype=dtypes)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelError(f"model '{path}': cannot load this {self.title} file with the parts of {folder} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e

    def _transformer_from_file(self, path: Path, config_folder: Path, dtype: Any = None) -> Any:
        import diffusers
        from accelerate import init_empty_weights
        from safetensors import safe_open

        from .original_layout import diffusers_state

        cls = getattr(diffusers, self.transformer_class)
        with init_empty_weights():
            model = cls.from_config(cls.load_config(str(config_folder)))
        expected = model.state_dict()
        prefix = "model.diffusion_model."
        tensors: dict[str, Any] = {}
        with safe_open(str(path), framework="pt") as f:  # one tensor at a time, each straight into ``dtype``
            for key in f.keys():
                tensor = f.get_tensor(key)
                tensors[key.removeprefix(prefix)] = tensor if dtype is None else tensor.to(dtype)
        if not any(k.startswith("transformer_blocks.") for k in tensors):  # the original layout
            config = dict(model.config)
            tensors = diffusers_state(tensors, expected, lambda p: self.original(p, config), self.original_parameter)
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ModelError(f"model '{path}': no {missing[:3]} ({len(missing)} weights missing) for the transformer "
                             f"of {config_folder.parent}; is it the same model?")
        model.load_state_dict({k: tensors[k] for k in expected}, strict=True, assign=True)
        return model.eval()
