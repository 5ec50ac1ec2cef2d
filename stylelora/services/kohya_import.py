"""Import a kohya config: a kohya_ss GUI JSON, or an sd-scripts ``--config_file`` TOML with its
``--dataset_config`` TOML, becomes a stylelora Config that ``stylelora train`` runs (``is_kohya_file`` tells
one from a stylelora config; ``kohya_keys`` holds what the keys mean).

Every key is accounted for: mapped onto a config field, left out because it is empty or off, or
listed as not imported with the reason (:class:`ImportReport`). Values are read leniently, as
kohya_ss writes them (numbers as strings, ``"512,512"`` resolutions, ``"k=v k=v"`` argument lists).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.errors import ConfigError
from ..core.fileio import read_user_text
from .kohya_keys import (
    DEFAULTS,
    KOHYA_NETWORK_TYPES,
    LYCORIS_ALGOS,
    NETWORK_MODULES,
    NOT_IMPORTED,
    ONLY_WITH,
    OPTIMIZERS,
    PRECISIONS,
    SAVE_PRECISIONS,
    SCHEDULERS,
    SECRETS,
    as_args,
    as_flag,
    as_integer,
    as_number,
    as_resolution,
    is_empty,
    read_file,
    show_value,
)


@dataclass
class ImportReport:
    """The imported config and an account of every key: mapped, empty, or not imported (with why)."""

    source: list[Path]
    config: Config
    mapped: list[tuple[str, str, Any]] = field(default_factory=list)  # (kohya key, dotted field, value)
    unsupported: list[tuple[str, Any, str]] = field(default_factory=list)  # (kohya key, value, reason)
    empty: list[str] = field(default_factory=list)  # keys left empty, 0 or off: nothing to import
    notes: list[str] = field(default_factory=list)  # things the user should check

    def unsupported_keys(self) -> list[str]:
        return [key for key, _, _ in self.unsupported]

    def to_text(self) -> str:
        lines = [f"imported {len(self.mapped)} setting(s) from {', '.join(str(p) for p in self.source)}"]
        lines += [f"  {key} -> {dotted} = {show_value(value)}" for key, dotted, value in self.mapped]
        if self.unsupported:
            lines.append(f"not imported ({len(self.unsupported)}):")
            lines += [f"  {key} = {show_value(value)}: {reason}" for key, value, reason in self.unsupported]
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
        head += [f"# check: {note}" for note in self.notes]
        return "\n".join(head) + "\n\n" + self.config.to_toml()


# --- the import -----------------------------------------------------------------------------------------


class _Importer:
    def __init__(self, settings: dict[str, Any], base: Path):
        self.settings, self.base = settings, base
        self.values: dict[str, Any] = {}
        self.report = ImportReport([], Config())
        self.used: set[str] = set()

    def set(self, key: str, dotted: str, value: Any) -> None:
        self.values[dotted] = value
        self.report.mapped.append((key, dotted, value))
        self.used.add(key)

    def skip(self, key: str, reason: str) -> None:
        value = "(hidden)" if key in SECRETS else self.settings.get(key)
        self.report.unsupported.append((key, value, reason))
        self.used.add(key)

    def given(self, key: str) -> bool:
        """The key is present with a value that means something (not empty, 0 or off)."""
        return key in self.settings and not is_empty(self.settings[key])

    def get(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)

    def path(self, value: str) -> str:
        """A path from the config, relative ones taken from the config file's folder; a Windows path on
        another system is kept as written, with a note."""
        text = str(value).strip()
        if re.match(r"^[A-Za-z]:[\\/]", text) and not Path(text).exists():
            self.report.notes.append(f"{text!r} is a Windows path from another machine; set the folder that "
                                     "holds the data here (--data, --set data.reg_path=..., --output)")
            return text
        p = Path(text).expanduser()
        if p.is_absolute():
            return str(p)
        # relative paths: beside the config file when they are there, else from where the command runs
        beside = self.base / p
        return str((beside if beside.exists() or not p.exists() else p).resolve())


def _simple(k: _Importer) -> None:
    """Keys that map one to one onto a config field."""
    table: list[tuple[str, str, Callable[[Any, str], Any]]] = [
        ("train_batch_size", "train.batch_size", as_integer),
        ("gradient_accumulation_steps", "train.gradient_accumulation_steps", as_integer),
        ("lr_scheduler_num_cycles", "train.lr_scheduler_cycles", as_integer),
        ("lr_scheduler_power", "train.lr_scheduler_power", as_number),
        ("max_grad_norm", "train.max_grad_norm", as_number),
        ("min_snr_gamma", "train.min_snr_gamma", as_number),
        ("seed", "train.seed", as_integer),
        ("save_every_n_steps", "train.save_every", as_integer),
        ("save_every_n_epochs", "train.save_every_epochs", as_integer),
        ("sample_every_n_steps", "sample.every", as_integer),
        ("keep_tokens", "data.keep_tags", as_integer),
        ("caption_dropout_rate", "data.caption_dropout", as_number),
        ("prior_loss_weight", "data.prior_loss_weight", as_number),
        ("bucket_reso_steps", "data.bucket_step", as_integer),
        ("network_dropout", "lora.dropout", as_number),
    ]
    for key, dotted, read in table:
        if k.given(key):
            k.set(key, dotted, read(k.get(key), key))
    flags = [("shuffle_caption", "data.shuffle_tags"), ("flip_aug", "data.random_flip"),
             ("bucket_no_upscale", "data.bucket_no_upscale"),
             ("gradient_checkpointing", "train.gradient_checkpointing"),
             ("zero_terminal_snr", "train.zero_terminal_snr"), ("cache_text_encoder_outputs", "cache.text_encoder")]
    for key, dotted in flags:
        if key in k.settings and k.get(key) != "":
            k.set(key, dotted, as_flag(k.get(key)))
    if "enable_bucket" in k.settings:
        k.set("enable_bucket", "data.buckets", as_flag(k.get("enable_bucket")))
    if "random_crop" in k.settings:
        k.set("random_crop", "data.center_crop", not as_flag(k.get("random_crop")))
    if k.given("caption_extension"):
        ext = str(k.get("caption_extension")).strip()
        k.set("caption_extension", "data.caption_extension", ext if ext.startswith(".") else "." + ext)


def _model(k: _Importer) -> None:
    if k.given("pretrained_model_name_or_path"):
        name = str(k.get("pretrained_model_name_or_path")).strip()
        looks_local = Path(name).suffix or name.startswith((".", "/", "~")) or re.match(r"^[A-Za-z]:", name)
        k.set("pretrained_model_name_or_path", "model.name", k.path(name) if looks_local else name)
    if as_flag(k.get("v_parameterization")):
        k.set("v_parameterization", "model.prediction_type", "v_prediction")
    for key in ("v2", "sdxl"):
        if key in k.settings:
            k.used.add(key)  # the kind of model is read from the model itself
    if as_flag(k.get("sdxl")):
        k.report.notes.append("an SDXL config: stylelora reads the model's kind from the model itself")
    if k.given("clip_skip"):
        k.set("clip_skip", "model.clip_skip", max(1, as_integer(k.get("clip_skip"), "clip_skip")))
    if k.given("max_token_length"):
        length = as_integer(k.get("max_token_length"), "max_token_length")
        if length not in (75, 150, 225):
            raise ConfigError(f"max_token_length: must be 75, 150 or 225, got {length}")
        k.set("max_token_length", "data.max_token_length", length)


def _data(k: _Importer) -> None:
    if k.given("train_data_dir"):
        k.set("train_data_dir", "data.path", k.path(k.get("train_data_dir")))
    if k.given("reg_data_dir"):
        k.set("reg_data_dir", "data.reg_path", k.path(k.get("reg_data_dir")))
    for key in ("resolution", "max_resolution"):
        if k.given(key):
            _set_resolution(k, key, k.get(key))
    if as_flag(k.get("cache_latents_to_disk")):
        k.set("cache_latents_to_disk", "cache.latents", "disk")
        k.used.add("cache_latents")
    elif "cache_latents" in k.settings:
        k.set("cache_latents", "cache.latents", "memory" if as_flag(k.get("cache_latents")) else "off")
        k.used.add("cache_latents_to_disk")


def _set_resolution(k: _Importer, key: str, value: Any) -> None:
    w, h = as_resolution(value, key)
    side = w if w == h else int(round(math.sqrt(w * h) / 8) * 8)
    if w != h:
        k.report.notes.append(f"{key} {w}x{h}: stylelora trains at one area ({side}x{side} here) with aspect "
                              "buckets, so each image keeps its own shape")
    k.set(key, "data.resolution", side)


def _network(k: _Importer) -> None:
    args = as_args(k.get("network_args"))
    kind = _network_kind(k, args)
    if kind is not None:
        key = "LoRA_type" if k.given("LoRA_type") else "network_module"
        k.set(key, "lora.type", kind)
    if k.given("network_dim"):
        k.set("network_dim", "lora.rank", as_integer(k.get("network_dim"), "network_dim"))
    if k.given("network_alpha"):
        k.set("network_alpha", "lora.alpha", as_number(k.get("network_alpha"), "network_alpha"))
    _conv_settings(k, args, convs=kind in ("locon", "loha", "lokr"))
    label = "network_args factor" if "factor" in args else "factor"
    factor = args.pop("factor", None) or k.get("factor")
    if kind == "lokr" and factor not in (None, ""):
        k.set(label, "lora.lokr_factor", as_integer(factor, "factor"))
    elif "factor" in k.settings:
        k.used.add("factor")
    if as_flag(args.pop("dora_wd", False)):
        k.report.unsupported.append(("network_args dora_wd", True, "DoRA on LyCORIS networks is not implemented; "
                                     "for LoRA use lora.dora=true"))
    args.pop("algo", None)
    for name, value in args.items():
        k.report.unsupported.append((f"network_args {name}", value, NOT_IMPORTED.get(name) or "not implemented"))
    if "network_args" in k.settings:
        k.used.add("network_args")


def _network_kind(k: _Importer, args: dict[str, Any]) -> str | None:
    """``lora.type`` from kohya_ss's ``LoRA_type`` or sd-scripts' ``network_module`` (+ ``algo``); None when
    neither is given or the network is one we do not train (reported)."""
    kind = None
    if k.given("LoRA_type"):
        kind = KOHYA_NETWORK_TYPES.get(str(k.get("LoRA_type")).strip().lower())
        if kind is None:
            k.skip("LoRA_type", "this network type is not implemented; trained as plain LoRA (lora.type=lora)")
    if k.given("network_module"):
        module = str(k.get("network_module")).strip()
        kind = LYCORIS_ALGOS.get(args.get("algo", "lora").lower()) if module == "lycoris.kohya" else (
            NETWORK_MODULES.get(module))
        if kind == "lora" and "conv_dim" in args:
            kind = "locon"
        if kind is None:
            k.skip("network_module", f"{module} {args.get('algo', '')} is not implemented; trained as plain "
                   "LoRA (lora.type=lora)".replace("  ", " "))
    return kind


def _conv_settings(k: _Importer, args: dict[str, Any], convs: bool) -> None:
    """``conv_dim``/``conv_alpha`` (top-level or in ``network_args``): the conv rank and alpha when the
    network trains convs (``convs``), else accounted for."""
    for key, dotted, read in (("conv_dim", "lora.conv_rank", as_integer), ("conv_alpha", "lora.conv_alpha", as_number)):
        label = f"network_args {key}" if key in args else key
        value = args.pop(key) if key in args else k.get(key)
        if is_empty(value):
            continue
        if convs:
            k.set(label, dotted, read(value, key))
        elif label == key:
            k.used.add(key)  # kohya_ss keeps conv_dim in every config but passes it only to LoCon/LoHa/LoKr
        else:
            k.report.unsupported.append((label, value, "conv_dim is used by LoCon, LoHa and LoKr; this config "
                                         "trains plain LoRA"))


def _learning_rates(k: _Importer) -> None:
    base = as_number(k.get("learning_rate"), "learning_rate") if k.given("learning_rate") else None
    unet = as_number(k.get("unet_lr"), "unet_lr") if k.given("unet_lr") else None
    te = as_number(k.get("text_encoder_lr"), "text_encoder_lr") if k.given("text_encoder_lr") else None
    for key in ("learning_rate", "unet_lr", "text_encoder_lr", "learning_rate_te", "learning_rate_te1",
                "learning_rate_te2"):
        if key in k.settings:
            k.used.add(key)
    lr = unet or base
    if lr:
        k.set("unet_lr" if unet else "learning_rate", "train.lr", lr)
    # kohya_ss: a text-encoder rate of 0 with a UNet rate means the UNet alone; sd-scripts trains both
    # unless network_train_unet_only is set.
    gui_unet_only = "text_encoder_lr" in k.settings and te is None and unet is not None
    unet_only = as_flag(k.get("network_train_unet_only")) or gui_unet_only
    if "network_train_unet_only" in k.settings:
        k.used.add("network_train_unet_only")
    k.set("network_train_unet_only" if "network_train_unet_only" in k.settings else "text_encoder_lr",
          "lora.train_text_encoder", not unet_only)
    if te and not unet_only and te != lr:
        k.set("text_encoder_lr", "train.text_encoder_lr", te)


def _optimizer(k: _Importer) -> None:
    key = "optimizer_type" if k.given("optimizer_type") else "optimizer"
    name = str(k.get(key) or ("AdamW8bit" if as_flag(k.get("use_8bit_adam")) else "")).strip()
    if name:
        plain = name.rsplit(".", 1)[-1].lower().replace("_", "")
        if plain in OPTIMIZERS:
            k.set(key, "train.optimizer", OPTIMIZERS[plain])
            if plain in ("lion8bit", "pagedlion8bit", "pagedadamw8bit", "ademamix8bit"):
                k.report.notes.append(f"{name}: trained with {OPTIMIZERS[plain]} (no 8-bit/paged variant here)")
        else:
            k.skip(key, f"{name} is not available; adamw is used (stylelora has adamw, adamw8bit, prodigy, "
                   "adafactor, lion, came, ademamix, schedulefree_adamw)")
    for flag in ("use_8bit_adam", "use_lion_optimizer"):
        if flag in k.settings:
            k.used.add(flag)
    args = as_args(k.get("optimizer_args"))
    if "optimizer_args" in k.settings:
        k.used.add("optimizer_args")
    owned = {"weight_decay": "train.weight_decay", "eps": "train.adam_epsilon"}
    for name_, dotted in owned.items():
        if name_ in args:
            k.set(f"optimizer_args {name_}", dotted, as_number(args.pop(name_), name_))
    if "betas" in args and k.values.get("train.optimizer", "adamw") in ("adamw", "adamw8bit"):
        betas = [as_number(b, "betas") for b in args.pop("betas").split(",")]
        k.set("optimizer_args betas", "train.adam_beta1", betas[0])
        if len(betas) > 1:
            k.set("optimizer_args betas", "train.adam_beta2", betas[1])
    if args:
        k.set("optimizer_args", "train.optimizer_args", [f"{a}={v}" for a, v in args.items()])


def _schedule(k: _Importer, steps: int | None) -> None:
    if k.given("lr_scheduler"):
        name = str(k.get("lr_scheduler")).strip()
        if name in SCHEDULERS:
            k.set("lr_scheduler", "train.lr_scheduler", name)
        else:
            k.skip("lr_scheduler", f"the '{name}' schedule is not implemented; constant is used")
    warmup, key = None, None
    if k.given("lr_warmup_steps"):
        key, value = "lr_warmup_steps", as_number(k.get("lr_warmup_steps"), "lr_warmup_steps")
        warmup = ("ratio", value) if value < 1 else ("steps", value)
    elif k.given("lr_warmup"):  # kohya_ss GUI: percent of the total steps
        key, warmup = "lr_warmup", ("ratio", as_number(k.get("lr_warmup"), "lr_warmup") / 100)
    for name in ("lr_warmup", "lr_warmup_steps"):
        if name in k.settings and name != key:
            k.used.add(name)
    if warmup is None or key is None:
        return
    if warmup[0] == "steps":
        k.set(key, "train.lr_warmup_steps", int(warmup[1]))
    elif steps is not None:
        k.set(key, "train.lr_warmup_steps", int(round(warmup[1] * steps)))
    else:
        k.skip(key, f"a warmup of {warmup[1]:.0%} of a run whose length depends on a dataset that is not here; "
               "set train.lr_warmup_steps")


def _length(k: _Importer) -> None:
    """Steps or epochs, as sd-scripts decides: max_train_epochs wins over max_train_steps; the GUI's
    'epoch' counts when no step count is given."""
    for key in ("max_train_steps", "max_train_epochs", "epoch"):
        if key in k.settings:
            k.used.add(key)
    if k.given("max_train_epochs"):
        k.set("max_train_epochs", "train.epochs", as_integer(k.get("max_train_epochs"), "max_train_epochs"))
    elif k.given("max_train_steps"):
        k.set("max_train_steps", "train.steps", as_integer(k.get("max_train_steps"), "max_train_steps"))
    elif k.given("epoch"):
        k.set("epoch", "train.epochs", as_integer(k.get("epoch"), "epoch"))
    else:
        k.report.notes.append("no length given: sd-scripts would train 1600 steps, and so does this config")
        k.values["train.steps"] = 1600


def _precision(k: _Importer) -> None:
    if str(k.get("mixed_precision") or "").strip():
        value = str(k.get("mixed_precision")).strip().lower()
        if value in PRECISIONS:
            k.set("mixed_precision", "train.mixed_precision", PRECISIONS[value])
        else:
            k.skip("mixed_precision", f"'{value}' is not available; auto picks bf16/fp16 on GPUs")
    if k.given("save_precision"):
        value = str(k.get("save_precision")).strip().lower()
        if value in SAVE_PRECISIONS:
            k.set("save_precision", "export.precision", SAVE_PRECISIONS[value])
        else:
            k.skip("save_precision", f"'{value}' is not available; adapters are saved in fp16")
    attention = [key for key in ("xformers", "sdpa", "mem_eff_attn") if key in k.settings]
    for key in attention:
        k.used.add(key)
    if any(k.given(key) and str(k.get(key)).lower() not in ("none",) for key in attention):
        which = next(key for key in attention if k.given(key))
        k.set(which, "train.attention", "sdpa")
        if which != "sdpa":
            k.report.notes.append(f"{which}: PyTorch's scaled-dot-product attention (train.attention=sdpa) is used; "
                                  "it needs no xformers")


def _noise(k: _Importer) -> None:
    kind = str(k.get("noise_offset_type") or "Original")
    if "noise_offset_type" in k.settings:
        k.used.add("noise_offset_type")
    if k.given("noise_offset"):
        if kind.lower() == "original":
            k.set("noise_offset", "train.noise_offset", as_number(k.get("noise_offset"), "noise_offset"))
        else:
            k.used.add("noise_offset")  # kohya_ss passes it only with the Original type
    if kind.lower() == "multires" and k.given("multires_noise_iterations"):
        k.skip("noise_offset_type", NOT_IMPORTED["multires_noise_iterations"])
    if k.given("loss_type") and str(k.get("loss_type")).lower() != "l2":
        k.skip("loss_type", "only the L2 (MSE) loss is implemented")
    elif "loss_type" in k.settings:
        k.used.add("loss_type")


def _saving(k: _Importer) -> None:
    out, name = k.get("output_dir"), k.get("output_name")
    if not is_empty(name):
        k.set("output_name", "export.name", str(name).strip())
    if not is_empty(out):
        folder = Path(k.path(out)) / str(name).strip() if not is_empty(name) else Path(k.path(out))
        k.set("output_dir", "train.output_dir", str(folder))
    keep = [key for key in ("save_last_n_steps_state", "save_last_n_epochs_state") if k.given(key)]
    if keep:
        k.set(keep[0], "train.keep_checkpoints", as_integer(k.get(keep[0]), keep[0]))
    if "log_with" in k.settings:
        value = str(k.get("log_with") or "").strip().lower()
        if value in ("tensorboard", "wandb", "mlflow"):
            k.set("log_with", "train.log_with", value)
        elif value == "all":
            k.set("log_with", "train.log_with", "tensorboard")
            k.report.notes.append("log_with all: only TensorBoard is used (train.log_with takes one tracker)")
        elif value:
            k.skip("log_with", f"the '{value}' tracker is not available")
        else:
            k.used.add("log_with")
    if k.given("use_wandb"):
        k.set("use_wandb", "train.log_with", "wandb")


def _samples(k: _Importer) -> None:
    if not k.given("sample_prompts"):
        return
    text = str(k.get("sample_prompts"))
    candidate = Path(k.path(text)) if "\n" not in text and len(text) < 400 else None
    if candidate is not None and candidate.suffix.lower() in (".txt", ".toml", ".json"):
        try:
            text = read_user_text(candidate, "prompt file")
        except ConfigError as e:  # the rest of the config still imports
            k.skip("sample_prompts", f"{e}; set sample.prompts")
            return
        if candidate.suffix.lower() != ".txt":
            k.skip("sample_prompts", "prompt files in TOML or JSON are not read; use a .txt, one prompt a line")
            return
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
    k.set("sample_prompts", "sample.prompts", prompts)
    for flag, dotted, read in (("n", "sample.negative_prompt", str), ("s", "sample.steps", int),
                               ("l", "sample.guidance", float), ("d", "sample.seed", int)):
        if flag in options:
            k.set(f"sample_prompts --{flag}", dotted, read(options.pop(flag)))
    for flag, value in options.items():
        k.report.unsupported.append((f"sample_prompts --{flag}", value, "per-prompt sizes and samplers are not "
                                     "implemented; samples use the training resolution"))


def _dataset_config(k: _Importer, dataset: dict[str, Any], source: Path) -> None:
    """sd-scripts' --dataset_config: [general], [[datasets]] and their [[datasets.subsets]]."""
    general = dict(dataset.get("general", {}))
    datasets = dataset.get("datasets", [])
    if not datasets:
        raise ConfigError(f"{source}: no [[datasets]] table; this does not look like an sd-scripts dataset config")
    if len(datasets) > 1:
        k.report.unsupported.append(("datasets", f"{len(datasets)} datasets", "one dataset per run: the first is "
                                     "imported"))
    first = datasets[0]
    subsets = first.get("subsets", [])
    train = [s for s in subsets if not s.get("is_reg")]
    reg = [s for s in subsets if s.get("is_reg")]
    scope = {**general, **{key: v for key, v in first.items() if key != "subsets"}}
    if not train:
        raise ConfigError(f"{source}: no training subset (every subset has is_reg = true)")
    _subset(k, {**scope, **train[0]}, len(train), source)
    if reg:
        reg_subset = {**scope, **reg[0]}
        k.set("subsets.image_dir (is_reg)", "data.reg_path", k.path(reg_subset["image_dir"]))
        if reg_subset.get("class_tokens"):
            k.set("subsets.class_tokens (is_reg)", "data.reg_caption", str(reg_subset["class_tokens"]))
        if len(reg) > 1:
            k.report.unsupported.append(("subsets (is_reg)", len(reg), "one regularisation folder: the first is used"))
    if "batch_size" in scope:  # the dataset config's batch size wins over --train_batch_size, as in sd-scripts
        k.settings["train_batch_size"] = scope["batch_size"]


def _subset(k: _Importer, subset: dict[str, Any], count: int, source: Path) -> None:
    if "metadata_file" in subset:
        raise ConfigError(f"{source}: a fine-tuning subset (metadata_file) cannot be imported; stylelora reads "
                          ".txt captions or a metadata.jsonl in the image folder")
    image_dir = Path(k.path(subset["image_dir"]))
    folders = [image_dir]
    if count > 1:
        k.report.unsupported.append(("subsets", count, "one image folder per run: the first subset is imported; "
                                     "put the others as N_name subfolders of one folder"))
    match = re.match(r"^(\d+)_(.+)$", image_dir.name)
    repeats = as_integer(subset.get("num_repeats", 1), "num_repeats")
    if match and int(match.group(1)) == repeats:
        # kohya's own layout: the parent holds N_name folders, which stylelora reads the same way
        k.set("subsets.image_dir", "data.path", str(image_dir.parent))
        k.report.notes.append(f"data.path is {image_dir.parent}: its N_name subfolders set repeats and class "
                              "words as in kohya; other subfolders there are trained too")
        folders = []
    else:
        k.set("subsets.image_dir", "data.path", str(image_dir))
        if repeats != 1:
            k.set("subsets.num_repeats", "data.repeats", repeats)
    if subset.get("class_tokens") and folders:
        k.report.unsupported.append(("subsets.class_tokens", subset["class_tokens"], "the caption of images without "
                                     "one comes from an N_words folder name; caption them (stylelora caption) or "
                                     "name the folder like 10_" + str(subset["class_tokens"])))
    for key, value in subset.items():
        if key in ("image_dir", "num_repeats", "class_tokens", "is_reg", "batch_size"):
            continue
        k.settings[key] = value  # the rest reads like the training config's keys, and wins over them


def import_kohya(path: str | Path, dataset_config: str | Path | None = None) -> ImportReport:
    """Read a kohya_ss GUI JSON or sd-scripts TOML (and its dataset TOML) into a stylelora Config."""
    source = Path(path)
    settings, dataset, sources = _read_sources(source, dataset_config)
    k = _Importer(settings, source.parent)
    k.used.add("dataset_config")
    if dataset is not None:
        _dataset_config(k, dataset, sources[-1])
    for step in (_model, _data, _network, _learning_rates, _optimizer, _length, _precision, _noise, _saving,
                 _samples, _simple):
        step(k)
    _schedule(k, k.values.get("train.steps") if "train.epochs" not in k.values else _epoch_steps(k))
    _account_for_the_rest(k)
    try:
        config = Config().with_overrides(k.values)
    except ConfigError as e:
        raise ConfigError(f"{source}: the imported values do not make a valid config:\n{e}") from None
    report = k.report
    report.source, report.config = sources, config
    return report


def _read_sources(source: Path, dataset_config: str | Path | None) -> tuple[dict[str, Any], dict[str, Any] | None,
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
        dataset = read_file(linked_path)
        sources.append(linked_path)
    return settings, dataset, sources


def _account_for_the_rest(k: _Importer) -> None:
    """Every key no step used: empty or at kohya's default (listed as empty), or left out with the reason."""
    for key, value in k.settings.items():
        if key in k.used:
            continue
        default = key in DEFAULTS and (DEFAULTS[key] is None or str(value).strip() == str(DEFAULTS[key]))
        idle = key in ONLY_WITH and (ONLY_WITH[key] is None or not k.given(ONLY_WITH[key]))
        if is_empty(value) or default or idle or (key in NOT_IMPORTED and not NOT_IMPORTED[key]):
            k.report.empty.append(key)
        else:
            k.skip(key, NOT_IMPORTED.get(key) or "not a setting stylelora has")


def _epoch_steps(k: _Importer) -> int | None:
    """The steps ``train.epochs`` means for the dataset, when the dataset is here to count."""
    from ..core.errors import StyleloraError
    from ..data.batches import TrainingSet

    try:
        config = Config().with_overrides(k.values)
        return TrainingSet.from_config(config).total_steps(config.train)
    except StyleloraError:  # no dataset here, or it cannot be used: the warmup percent is reported instead
        return None
