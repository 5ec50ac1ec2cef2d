"""kohya config files and what their keys mean to stylelora: reading a file (JSON or TOML), the value
tables (network types, optimizers, schedulers, precisions), the keys not imported and why, kohya's
defaults, readers for values as kohya_ss writes them (numbers as strings, ``"512,512"`` resolutions,
``"k=v k=v"`` argument lists), and the report that accounts for every key of an import."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path, PureWindowsPath
from typing import Any

from ..core.config import Config
from ..core.errors import ConfigError, counted
from ..core.fileio import foreign_path, read_user_text

KOHYA_NETWORK_TYPES = {  # kohya_ss GUI "LoRA_type" -> lora.type
    "standard": "lora", "kohya locon": "locon", "locon": "locon", "lycoris/locon": "locon",
    "lycoris/loha": "loha", "kohya loha": "loha", "lycoris/lokr": "lokr", "kohya lokr": "lokr",
}
LYCORIS_ALGOS = {"lora": "lora", "locon": "locon", "loha": "loha", "lokr": "lokr"}
NETWORK_MODULES = {"networks.lora": "lora", "networks.loha": "loha", "networks.lokr": "lokr"}
OPTIMIZERS = {  # kohya's optimizer names (lower case, module path dropped) -> train.optimizer
    "adamw": "adamw", "adamw8bit": "adamw8bit", "pagedadamw8bit": "adamw8bit", "prodigy": "prodigy",
    "adafactor": "adafactor", "lion": "lion", "lion8bit": "lion", "pagedlion8bit": "lion", "came": "came",
    "ademamix": "ademamix", "ademamix8bit": "ademamix", "adamwschedulefree": "schedulefree_adamw",
    "schedulefreeadamw": "schedulefree_adamw",
}
SCHEDULERS = {"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"}
PRECISIONS = {"no": "no", "fp16": "fp16", "bf16": "bf16"}
SAVE_PRECISIONS = {"fp16": "fp16", "bf16": "bf16", "float": "fp32", "fp32": "fp32"}

# kohya_ss's tabs for other model families: checkbox -> (the tab, its keys), which act only with the box ticked
MODEL_TABS: dict[str, tuple[str, list[str]]] = {
    "flux1_checkbox": ("FLUX.1", [
        "ae", "clip_l", "t5xxl", "t5xxl_lr", "discrete_flow_shift", "model_prediction_type", "timestep_sampling",
        "split_mode", "train_blocks", "t5xxl_max_token_length", "enable_all_linear", "guidance_scale",
        "apply_t5_attn_mask", "split_qkv", "train_t5xxl", "cpu_offload_checkpointing", "blocks_to_swap",
        "single_blocks_to_swap", "double_blocks_to_swap", "show_timesteps", "show_timesteps_resolution",
        "img_attn_dim", "img_mlp_dim", "img_mod_dim", "single_dim", "txt_attn_dim", "txt_mlp_dim", "txt_mod_dim",
        "single_mod_dim", "in_dims", "train_double_block_indices", "train_single_block_indices",
        "flux1_cache_text_encoder_outputs", "flux1_cache_text_encoder_outputs_to_disk", "fp8_base_unet",
        "model_type"]),
    "sd3_checkbox": ("SD3", [
        "sd3_cache_text_encoder_outputs", "sd3_cache_text_encoder_outputs_to_disk", "sd3_fused_backward_pass",
        "clip_g", "clip_g_dropout_rate", "sd3_clip_l", "sd3_clip_l_dropout_rate", "sd3_disable_mmap_load_safetensors",
        "sd3_enable_scaled_pos_embed", "logit_mean", "logit_std", "mode_scale", "pos_emb_random_crop_rate",
        "save_clip", "save_t5xxl", "sd3_t5_dropout_rate", "sd3_t5xxl", "t5xxl_device", "t5xxl_dtype",
        "sd3_text_encoder_batch_size", "weighting_scheme"]),
    "hunyuan_image_checkbox": ("HunyuanImage", [
        "hunyuan_image_cache_text_encoder_outputs", "hunyuan_image_cache_text_encoder_outputs_to_disk",
        "hunyuan_text_encoder", "hunyuan_byt5", "hunyuan_vae", "hunyuan_discrete_flow_shift",
        "hunyuan_model_prediction_type", "hunyuan_timestep_sampling", "hunyuan_sigmoid_scale", "hunyuan_attn_mode",
        "hunyuan_split_attn", "hunyuan_fp8_scaled", "hunyuan_fp8_vl", "hunyuan_text_encoder_cpu",
        "hunyuan_vae_chunk_size"]),
    "anima_checkbox": ("Anima", [
        "anima_cache_text_encoder_outputs", "anima_cache_text_encoder_outputs_to_disk", "anima_qwen3", "anima_vae",
        "anima_llm_adapter_path", "anima_t5_tokenizer_path", "anima_discrete_flow_shift", "anima_timestep_sampling",
        "anima_sigmoid_scale", "anima_qwen3_max_token_length", "anima_t5_max_token_length", "anima_attn_mode",
        "anima_split_attn", "anima_vae_chunk_size", "anima_vae_disable_cache", "anima_unsloth_offload_checkpointing",
        "anima_qwen_image_vae_2d", "anima_compile", "anima_torch_compile", "anima_compile_backend",
        "anima_compile_mode", "anima_compile_dynamic", "anima_compile_fullgraph", "anima_compile_cache_size_limit"]),
    "lumina_checkbox": ("Lumina Image 2.0", [
        "lumina_cache_text_encoder_outputs", "lumina_cache_text_encoder_outputs_to_disk", "lumina_gemma2",
        "lumina_ae", "lumina_discrete_flow_shift", "lumina_model_prediction_type", "lumina_timestep_sampling",
        "lumina_sigmoid_scale", "lumina_gemma2_max_token_length", "lumina_system_prompt", "lumina_use_flash_attn",
        "lumina_use_sage_attn"]),
}
NO_HALF_VAE = ("nothing to set: a VAE that overflows in fp16 (SDXL's own) encodes in fp32 in an fp16 run, as "
               "no_half_vae asks; other VAEs run in train.mixed_precision")

# Keys with nothing to import, and why: the reason is shown when such a key is set.
NOT_IMPORTED: dict[str, str] = {
    **dict.fromkeys(
        ["model_list", "save_as_bool", "num_cpu_threads_per_process", "multi_gpu", "gpu_ids", "main_process_port",
         "num_machines", "num_processes", "dynamo_backend", "dynamo_mode", "dynamo_use_dynamic",
         "dynamo_use_fullgraph", "extra_accelerate_launch_args", "additional_parameters", "log_config",
         "skip_cache_check", "async_upload"],
        "a kohya_ss GUI or launcher setting; it changes nothing in the trained adapter"),
    **dict.fromkeys(["sdxl_checkbox", *MODEL_TABS], "the kohya_ss tab of a model family; stylelora reads the "
                    "model's kind from the model itself"),
    **{key: f"a setting of kohya_ss's {tab} tab; this import does not read it" for checkbox, (tab, keys)
       in MODEL_TABS.items() for key in keys},
    **dict.fromkeys(
        ["max_data_loader_n_workers", "persistent_data_loader_workers", "vae_batch_size", "lowram", "highvram",
         "lowvram", "disable_mmap_load_safetensors", "mem_eff_save"],
        "a loader or memory setting of sd-scripts; stylelora feeds data its own way (see train.attention, "
        "train.gradient_checkpointing and cache.*)"),
    **dict.fromkeys(
        ["huggingface_repo_id", "huggingface_token", "huggingface_repo_type", "huggingface_repo_visibility",
         "huggingface_path_in_repo", "resume_from_huggingface", "save_state_to_huggingface"],
        "uploading to the Hugging Face hub is not done by stylelora"),
    **dict.fromkeys(["wandb_api_key", "huggingface_token"], "a secret: never copied into a config file; set it in "
                    "the environment (WANDB_API_KEY) instead"),
    **dict.fromkeys(["metadata_author", "metadata_description", "metadata_license", "metadata_tags",
                     "metadata_title", "training_comment"], "stylelora writes its own adapter metadata (the "
                    "config, ss_* facts, modelspec); free-text fields are not carried"),
    "vae": "a separate VAE file is not supported; the base model's own VAE is used",
    "color_aug": "colour augmentation is not implemented (it also turns the latent cache off in kohya)",
    "face_crop_aug_range": "face-crop augmentation is not implemented",
    "caption_dropout_every_n_epochs": "only per-example caption dropout (data.caption_dropout) is implemented",
    "caption_tag_dropout_rate": "tag dropout is not implemented; data.caption_dropout drops whole captions",
    "caption_prefix": "no caption prefix option; put the words in data.trigger_word, or edit the captions with "
                      "'stylelora captions'",
    "caption_suffix": "no caption suffix option; edit the captions with 'stylelora captions'",
    "keep_tokens_separator": "not implemented; data.keep_tags counts tags from the start",
    "secondary_separator": "not implemented", "enable_wildcard": "caption wildcards are not implemented",
    "token_warmup_min": "token warmup is not implemented", "token_warmup_step": "token warmup is not implemented",
    "weighted_captions": "caption weighting ((word:1.2)) is not implemented",
    "full_fp16": "LoRA weights always train in fp32 here (the base model runs in train.mixed_precision)",
    "full_bf16": "LoRA weights always train in fp32 here (the base model runs in train.mixed_precision)",
    "fp8_base": "fp8 base weights are not implemented",
    "network_weights": "starting from an existing adapter is not implemented",
    "dim_from_weights": "starting from an existing adapter is not implemented",
    "network_train_text_encoder_only": "training the text encoder alone is not implemented",
    "stop_text_encoder_training": "the text encoder trains for the whole run or not at all",
    "scale_weight_norms": "max-norm regularisation is not implemented",
    "network_dropout": "", "rank_dropout": "rank dropout is not implemented; lora.dropout drops LoRA inputs",
    "module_dropout": "module dropout is not implemented",
    **dict.fromkeys(["down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                     "block_alphas", "conv_block_dims", "conv_block_alphas", "conv_dims", "conv_alphas"],
                    "block-wise ranks and learning rates are not implemented"),
    **dict.fromkeys(["loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"],
                    "LoRA+ learning-rate ratios are not implemented"),
    "adaptive_noise_scale": "adaptive noise scale is not implemented; train.noise_offset is",
    "multires_noise_iterations": "multi-resolution noise is not implemented; train.noise_offset is",
    "multires_noise_discount": "multi-resolution noise is not implemented; train.noise_offset is",
    "noise_offset_random_strength": "a random noise-offset strength is not implemented",
    "ip_noise_gamma": "input-perturbation noise is not implemented", "ip_noise_gamma_random_strength": "",
    "debiased_estimation_loss": "debiased estimation is not implemented; train.min_snr_gamma weights the loss",
    "scale_v_pred_loss_like_noise_pred": "not implemented", "v_pred_like_loss": "not implemented",
    "huber_c": "", "huber_schedule": "", "huber_scale": "",
    "min_timestep": "the timestep range is not limited here", "max_timestep": "the timestep range is not limited",
    "masked_loss": "masked loss is not implemented", "alpha_mask": "masked loss is not implemented",
    "logging_dir": "logs go to the run folder (logs/ and metrics.jsonl)",
    "log_prefix": "logs go to the run folder (logs/ and metrics.jsonl)",
    "log_tracker_name": "the tracker's run is named after the run folder",
    "log_tracker_config": "tracker settings come from the tracker's environment variables",
    "wandb_run_name": "the tracker's run is named after the run folder",
    "sample_sampler": "samples use the model's own scheduler; pick a sampler when previewing (stylelora generate)",
    "sample_at_first": "samples are rendered every sample.every steps or sample.every_epochs epochs, not first",
    "resume": "a kohya state folder cannot be resumed; stylelora resumes its own checkpoints (--resume auto)",
    "save_state": "stylelora always saves resumable checkpoints", "save_state_on_train_end": "",
    "save_model_as": "adapters are always .safetensors (kohya layout plus a diffusers copy)",
    "save_last_n_steps": "checkpoints are pruned by count (train.keep_checkpoints)",
    "save_last_n_epochs": "checkpoints are pruned by count (train.keep_checkpoints)",
    "no_token_padding": "captions are always padded to the text encoder's length",
    "lr_scheduler_args": "scheduler arguments beyond cycles and power are not implemented",
    "lr_scheduler_type": "custom schedulers are not implemented; choose train.lr_scheduler",
    "bucket_reso_steps": "", "min_bucket_reso": "bucket sides follow data.bucket_step around the training area",
    "max_bucket_reso": "bucket sides follow data.bucket_step around the training area",
    "train_norm": "training norm layers is not implemented", "use_tucker": "Tucker decomposition is not "
    "implemented", "use_cp": "Tucker decomposition is not implemented", "use_scalar": "not implemented",
    "rank_dropout_scale": "not implemented", "bypass_mode": "not implemented", "decompose_both": "not implemented",
    "train_on_input": "not implemented", "unit": "DyLoRA is not implemented", "constrain": "OFT is not implemented",
    "rescaled": "OFT is not implemented", "preset": "the modules adapted come from lora.unet_targets",
    "LyCORIS_preset": "the modules adapted come from lora.unet_targets (and lora.conv_rank for the convs)",
    "sdxl_cache_text_encoder_outputs": "text-encoder outputs are cached whenever the text encoder does not train "
    "(cache.text_encoder)",
    "train_inpainting": "inpainting models are not trained here", "dora_wd": "DoRA on LyCORIS networks is not "
    "implemented; for LoRA use lora.dora=true", "train_lora_ggpo": "GGPO is not implemented",
    **dict.fromkeys(["learning_rate_te", "learning_rate_te1", "learning_rate_te2"], "a text-encoder rate of "
                    "kohya's full fine-tuning scripts; the LoRA's text-encoder rate is text_encoder_lr"),
    "network_args": "", "network_module": "", "LoRA_type": "", "optimizer_args": "",
}


# Values that change nothing: sd-scripts' and kohya_ss's defaults, and keys that only act together with
# another key that is off. Such keys count as empty.
DEFAULTS: dict[str, Any] = {"max_timestep": 1000, "min_bucket_reso": 256, "max_bucket_reso": 1024, "num_machines": 1,
                            "num_processes": 1, "num_cpu_threads_per_process": 2, "save_model_as": "safetensors",
                            "loss_type": "l2", "huber_c": 0.1, "huber_scale": 1, "huber_schedule": "snr",
                            "model_list": None, "noise_offset_type": "Original", "lr_scheduler_type": "",
                            "unit": 1, "factor": -1, "train_on_input": True,
                            "dynamo_backend": "no", "dynamo_mode": "default"}
ONLY_WITH = {"multires_noise_discount": "multires_noise_iterations", "sample_sampler": "sample_prompts",
             "ggpo_sigma": "train_lora_ggpo", "ggpo_beta": "train_lora_ggpo",
             **{key: checkbox for checkbox, (_, keys) in MODEL_TABS.items() for key in keys},
             "max_data_loader_n_workers": None, "ip_noise_gamma_random_strength": "ip_noise_gamma",
             "noise_offset_random_strength": "noise_offset"}


SECRETS = ("wandb_api_key", "huggingface_token")


def at_default(key: str, value: Any) -> bool:
    """Whether ``value`` is kohya's default for ``key`` (or ``key`` changes nothing whatever its value)."""
    if key not in DEFAULTS:
        return False
    default = DEFAULTS[key]
    if default is None or str(value).strip() == str(default):
        return True
    try:
        return not isinstance(default, str) and float(value) == float(default)
    except (TypeError, ValueError):
        return False


def base_model_version(settings: dict[str, Any]) -> str | None:
    """The base model sd-scripts would record (its ``ss_base_model_version``) for a config's ``sdxl``, ``v2`` and
    ``v_parameterization`` flags; None when the config has neither ``sdxl`` nor ``v2``."""
    if "sdxl" not in settings and "v2" not in settings:
        return None
    if as_flag(settings.get("sdxl")):
        return "sdxl_base_v1-0"
    return ("sd_v2" if as_flag(settings.get("v2")) else "sd_v1") + ("_v" if as_flag(settings.get(
        "v_parameterization")) else "")


def sample_prompt_lines(text: str) -> tuple[list[str], dict[str, str]]:
    """kohya's sample prompts, one a line with ``--n``/``--s``/``--w``/... options: (the prompts, the options,
    each as its first line gives it)."""
    prompts, options = [], {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, *rest = re.split(r"\s--(?=[a-z]+\b)", " " + line)
        prompts.append(prompt.strip())
        for opt in rest:
            flag, _, value = opt.partition(" ")
            options.setdefault(flag, value.strip())
    return prompts, options


def show_value(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class ImportReport:
    """The imported config and an account of every key: mapped, empty, or not imported (with why)."""

    source: list[Path]
    config: Config
    mapped: list[tuple[str, str, Any]] = field(default_factory=list)  # (kohya key, dotted field, value)
    unsupported: list[tuple[str, Any, str]] = field(default_factory=list)  # (kohya key, value, reason)
    read: list[tuple[str, Any, str]] = field(default_factory=list)  # (kohya key, value, why it sets nothing itself)
    empty: list[str] = field(default_factory=list)  # keys left empty, 0 or off: nothing to import
    notes: list[str] = field(default_factory=list)  # things the user should check

    def unsupported_keys(self) -> list[str]:
        return [key for key, _, _ in self.unsupported]

    def mentioned(self) -> set[str]:
        """Every key the report accounts for (``network_args factor`` counts for ``network_args``)."""
        named = [key for key, _, _ in self.mapped + self.unsupported + self.read] + self.empty
        return {key.split(" ")[0] for key in named}

    def to_text(self) -> str:
        lines = [f"imported {counted(len(self.mapped), 'setting')} from {', '.join(str(p) for p in self.source)}"]
        lines += [f"  {key} -> {dotted} = {show_value(value)}" for key, dotted, value in self.mapped]
        if self.unsupported:
            lines.append(f"not imported ({len(self.unsupported)}):")
            lines += [f"  {key} = {show_value(value)}: {reason}" for key, value, reason in self.unsupported]
        if self.read:
            lines.append(f"read, nothing of their own to set ({len(self.read)}):")
            lines += [f"  {key} = {show_value(value)}: {reason}" for key, value, reason in self.read]
        if self.notes:
            lines.append("check:")
            lines += [f"  {note}" for note in self.notes]
        if self.empty:
            lines.append(f"empty or off, nothing to import ({len(self.empty)}): {', '.join(self.empty)}")
        return "\n".join(lines)

    def to_toml(self) -> str:
        """The config as TOML, headed by comments saying where it came from and what was left out."""
        head = [f"# imported by stylelora import-kohya from {', '.join(str(p) for p in self.source)}"]
        head += [f"# not imported: {key} = {show_value(value)} ({reason})" for key, value, reason in self.unsupported]
        head += [f"# read: {key} = {show_value(value)} ({reason})" for key, value, reason in self.read]
        head += [f"# check: {note}" for note in self.notes]
        return "\n".join(head) + "\n\n" + self.config.to_toml()


# --- reading values the way kohya_ss writes them --------------------------------------------------------


def is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"", "0", "0.0", "false", "none"}
    return value is None or value is False or value == 0 or value == [] or value == {}


def as_number(value: Any, key: str) -> float:
    if isinstance(value, list) and value:  # sd-scripts takes a list for per-encoder rates
        value = value[0]
    try:
        return float(str(value).strip())
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None


def as_integer(value: Any, key: str) -> int:
    number = as_number(value, key)
    if number != int(number):
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    return int(number)


def as_flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "yes", "on"}
    return bool(value)


def as_args(value: Any) -> dict[str, str]:
    """``"a=1 b=x,y"`` or ``["a=1", "b=x,y"]`` -> {"a": "1", "b": "x,y"} (quotes dropped)."""
    items = shlex.split(value) if isinstance(value, str) else [str(v) for v in value or []]
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if sep:
            out[key.strip()] = val.strip().strip("\"'")
    return out


def as_resolution(value: Any, key: str) -> tuple[int, int]:
    parts = value if isinstance(value, list | tuple) else re.split(r"[,x ]+", str(value).strip())
    sides = [as_integer(p, key) for p in parts if str(p).strip()]
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2:
        raise ConfigError(f"{key}: expected a size such as 512 or '512,768', got {value!r}")
    return sides[0], sides[1]


def read_file(path: str | Path) -> dict[str, Any]:
    """A kohya_ss JSON or an sd-scripts TOML as one flat dict (sd-scripts flattens TOML sections too),
    except for a dataset config, whose ``general``/``datasets`` tables are kept."""
    p = Path(path)
    text = read_user_text(p, "kohya config")
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" or text.lstrip().startswith("{") else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'TOML'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a table of settings")
    if "datasets" in data or "general" in data:
        return data
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # [model_arguments], [training_arguments], ...: sd-scripts ignores the names
            flat.update(value)
        else:
            flat[key] = value
    return flat


def read_sources(source: Path, dataset_config: str | Path | None) -> tuple[dict[str, Any], dict[str, Any] | None,
                                                                             list[Path]]:
    """(training settings, dataset config or None, the files read): a dataset config given alone, or the
    one the settings name (``dataset_config``, relative to the settings' folder) or the caller gives."""
    settings = read_file(source)
    sources = [source]
    dataset = None
    if "datasets" in settings or "general" in settings:  # a dataset config given alone
        dataset, settings = settings, {}
    linked = dataset_config or (settings.get("dataset_config") or None)
    if linked and dataset is None:
        linked_path = Path(linked) if Path(linked).is_absolute() or Path(linked).exists() else source.parent / linked
        foreign = None if dataset_config else foreign_path(str(linked))
        if foreign:  # written on Windows: the file of that name beside the config, as for the other inputs
            linked_path = source.parent / PureWindowsPath(str(linked)).name
            if not linked_path.is_file():
                raise ConfigError(f"{source}: dataset_config '{linked}' is {foreign} from another machine, and "
                                  f"no {linked_path.name} is beside the config; pass --dataset-config with that file "
                                  "on this machine")
        dataset = read_file(linked_path)
        sources.append(linked_path)
    return settings, dataset, sources


CONFIG_SECTIONS = {f.name for f in fields(Config)}  # a stylelora config's tables, as Config has them


def is_kohya_file(path: str | Path) -> bool:
    """Whether ``path`` is a kohya config (a kohya_ss JSON, an sd-scripts TOML) rather than a stylelora one."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return True
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # Config.load says what is wrong with it
    return not set(data) <= CONFIG_SECTIONS or not all(isinstance(v, dict) for v in data.values())
