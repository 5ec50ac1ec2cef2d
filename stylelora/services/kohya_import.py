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
from pathlib import Path
from typing import Any

from .. import families
from ..core.config import Config
from ..core.errors import ConfigError, setting
from ..core.fileio import foreign_path, read_user_text
from . import kohya_keys as keys
from .kohya_keys import (
    ImportReport,
    as_args,
    as_flag,
    as_integer,
    as_number,
    as_resolution,
    at_default,
    base_model_version,
    is_empty,
    read_sources,
    sample_prompt_lines,
)

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
        value = "(hidden)" if key in keys.SECRETS else self.settings.get(key)
        self.report.unsupported.append((key, value, reason))
        self.used.add(key)

    def read(self, key: str, reason: str) -> None:
        """``key`` is read but sets nothing of its own (another key decides, or it changes nothing here): listed
        with ``reason``, or as empty when it is empty or at kohya's default. Absent keys are left alone."""
        if key not in self.settings or key in self.used:
            return
        self.used.add(key)
        value = self.settings[key]
        if is_empty(value) or at_default(key, value):
            self.report.empty.append(key)
        else:
            self.report.read.append((key, "(hidden)" if key in keys.SECRETS else value, reason))

    def unset(self, dotted: str, reason: str) -> None:
        """Take back what was mapped onto ``dotted`` (when it is not the field's default) as not imported."""
        mapped = [m for m in self.report.mapped if m[1] == dotted]
        if not mapped or self.values.get(dotted) == Config().get(dotted):
            return
        for entry in mapped:
            self.report.mapped.remove(entry)
            self.report.unsupported.append((entry[0], entry[2], reason))
        self.values.pop(dotted)

    def given(self, key: str) -> bool:
        """The key is present with a value that means something (not empty, 0 or off)."""
        return key in self.settings and not is_empty(self.settings[key])

    def get(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)

    def path(self, value: str, key: str, dotted: str) -> str:
        """A path from the config for ``dotted``, relative ones taken from the config file's folder. A path
        written on another system (``E:\\kohya\\img``) becomes the folder or file of its name beside the config
        when there is one; else it is kept as written (training refuses it) and a note names the fix."""
        text = str(value).strip()
        why = foreign_path(text)
        if why is not None and not Path(text).exists():
            name = re.split(r"[\\/]+", text.rstrip("\\/"))[-1]
            here = self.base / name
            if name and not name.endswith(":") and here.exists():
                self.report.notes.append(f"{key} '{text}' is {why} from another machine; {here}, of the same "
                                         "name beside the config, is used instead")
                return str(here.resolve())
            self.report.notes.append(f"{key} '{text}' is {why} from another machine: training refuses it until "
                                     f"{setting(dotted)} names that {'file or ' * (dotted == 'model.name')}folder "
                                     "on this machine")
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
        key = "pretrained_model_name_or_path"
        name = str(k.get(key)).strip()
        looks_local = Path(name).suffix or name.startswith((".", "/", "~")) or foreign_path(name)
        k.set(key, "model.name", k.path(name, key, "model.name") if looks_local else name)
    if as_flag(k.get("v_parameterization")):
        k.set("v_parameterization", "model.prediction_type", "v_prediction")
    kind = _model_kind(k)
    which = f" ({families.display_name(kind)} here)" if kind else ""
    for key in ("v2", "sdxl"):
        k.read(key, f"the kind of model is read from the model itself{which}")
    if k.given("clip_skip"):
        k.set("clip_skip", "model.clip_skip", max(1, as_integer(k.get("clip_skip"), "clip_skip")))
    if k.given("max_token_length"):
        length = as_integer(k.get("max_token_length"), "max_token_length")
        if length not in (75, 150, 225):
            raise ConfigError(f"max_token_length: must be 75, 150 or 225, got {length}")
        k.set("max_token_length", "data.max_token_length", length)
    if kind is not None:  # what the model's family trains without (SDXL: clip skip) is left out, with why
        for dotted, reason in families.family_of(kind).ignored_settings(kind).items():
            k.unset(dotted, reason)


def _model_kind(k: _Importer) -> str | None:
    """The kind of model the config trains: from its sdxl/v2/v_parameterization flags, the kind whose family
    records the base model sd-scripts would; without flags, from the model's own configs when it is here."""
    version = base_model_version(k.settings)
    if version is None:
        facts = families.peek_model(str(k.values.get("model.name", ""))) if "model.name" in k.values else None
        return facts.kind if facts else None
    return next((kind for kind in families.kinds()
                 if families.family_of(kind).metadata(kind).get("ss_base_model_version") == version), None)


def _data(k: _Importer) -> None:
    for key, dotted in (("train_data_dir", "data.path"), ("reg_data_dir", "data.reg_path")):
        if dotted in k.values:  # set by a dataset config, which sd-scripts reads instead of these flags
            k.read(key, "sd-scripts ignores it when a dataset config is given; the subsets' image_dir is used")
    if k.given("train_data_dir") and "train_data_dir" not in k.used:
        k.set("train_data_dir", "data.path", k.path(k.get("train_data_dir"), "train_data_dir", "data.path"))
    if k.given("reg_data_dir") and "reg_data_dir" not in k.used:
        k.set("reg_data_dir", "data.reg_path", k.path(k.get("reg_data_dir"), "reg_data_dir", "data.reg_path"))
    for key in ("resolution", "max_resolution"):
        if k.given(key):
            _set_resolution(k, key, k.get(key))
    if as_flag(k.get("cache_latents_to_disk")):
        k.set("cache_latents_to_disk", "cache.latents", "disk")
        k.read("cache_latents", "cache_latents_to_disk keeps the latents on disk (cache.latents=disk)")
    elif "cache_latents" in k.settings:
        k.set("cache_latents", "cache.latents", "memory" if as_flag(k.get("cache_latents")) else "off")
        k.read("cache_latents_to_disk", "off")


def _set_resolution(k: _Importer, key: str, value: Any) -> None:
    w, h = as_resolution(value, key)
    side = w if w == h else int(round(math.sqrt(w * h) / 8) * 8)
    if w != h:
        k.report.notes.append(f"{key} {w}x{h}: stylelora trains at one area ({side}x{side} here) with aspect "
                              "buckets, so each image keeps its own shape")
    k.set(key, "data.resolution", side)


def _network(k: _Importer) -> None:
    args = as_args(k.get("network_args"))
    if args:
        k.used.add("network_args")  # each of its arguments is listed on its own
    else:
        k.read("network_args", "")
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
    else:
        k.read("factor", f"only LoKr splits by a factor; this config trains {kind or 'lora'}")
    if as_flag(args.pop("dora_wd", False)):
        k.report.unsupported.append(("network_args dora_wd", True, "DoRA on LyCORIS networks is not implemented; "
                                     "for LoRA use lora.dora=true"))
    args.pop("algo", None)
    for name, value in args.items():
        reason = keys.NOT_IMPORTED.get(name) or "not implemented"
        k.report.unsupported.append((f"network_args {name}", value, reason))
    if kind in (None, "lora"):
        k.read("LyCORIS_preset", "only LyCORIS networks take a preset; this config trains plain LoRA")


def _network_kind(k: _Importer, args: dict[str, Any]) -> str | None:
    """``lora.type`` from kohya_ss's ``LoRA_type`` or sd-scripts' ``network_module`` (+ ``algo``); None when
    neither is given or the network is one we do not train (reported)."""
    kind = None
    if k.given("LoRA_type"):
        kind = keys.KOHYA_NETWORK_TYPES.get(str(k.get("LoRA_type")).strip().lower())
        if kind is None:
            k.skip("LoRA_type", "this network type is not implemented; trained as plain LoRA (lora.type=lora)")
    if k.given("network_module"):
        module = str(k.get("network_module")).strip()
        kind = keys.LYCORIS_ALGOS.get(args.get("algo", "lora").lower()) if module == "lycoris.kohya" else (
            keys.NETWORK_MODULES.get(module))
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
        elif label == key:  # kohya_ss keeps conv_dim in every config
            k.read(key, "kohya_ss passes conv_dim and conv_alpha only to LoCon, LoHa and LoKr; this config trains "
                   "plain LoRA")
        else:
            k.report.unsupported.append((label, value, "conv_dim is used by LoCon, LoHa and LoKr; this config "
                                         "trains plain LoRA"))


def _learning_rates(k: _Importer) -> None:
    base = as_number(k.get("learning_rate"), "learning_rate") if k.given("learning_rate") else None
    unet = as_number(k.get("unet_lr"), "unet_lr") if k.given("unet_lr") else None
    te = as_number(k.get("text_encoder_lr"), "text_encoder_lr") if k.given("text_encoder_lr") else None
    lr = unet or base
    if lr:
        k.set("unet_lr" if unet else "learning_rate", "train.lr", lr)
    # kohya_ss: a text-encoder rate of 0 with a UNet rate means the UNet alone; sd-scripts trains both
    # unless network_train_unet_only is set.
    gui_unet_only = "text_encoder_lr" in k.settings and te is None and unet is not None
    unet_only = as_flag(k.get("network_train_unet_only")) or gui_unet_only
    switch = next((key for key in ("network_train_unet_only", "text_encoder_lr") if key in k.settings),
                  "network_train_unet_only (not set: sd-scripts trains both)")
    k.set(switch, "lora.train_text_encoder", not unet_only)
    # sd-scripts: a rate left empty is learning_rate's
    te_rate, te_key = (te, "text_encoder_lr") if te else (base, "learning_rate")
    if te_rate and not unet_only and te_rate != lr:
        k.set(te_key, "train.text_encoder_lr", te_rate)
    te_said = "the text encoder does not train" if unet_only else "text_encoder_lr sets the text encoder's"
    k.read("learning_rate", f"unet_lr sets the UNet's rate and {te_said}; kohya uses learning_rate only for a "
           "rate left empty")
    k.read("text_encoder_lr", "the text encoder does not train" if unet_only else "the same rate as the UNet's")
    k.read("network_train_unet_only", "text_encoder_lr 0 trains the UNet alone")


def _optimizer(k: _Importer) -> None:
    key = next((name for name in ("optimizer_type", "optimizer") if k.given(name)), None)
    name = str(k.get(key)).strip() if key else ""
    for flag, implied in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if not name and as_flag(k.get(flag)):
            key, name = flag, implied
    if name and key:
        plain = name.rsplit(".", 1)[-1].lower().replace("_", "")
        if plain in keys.OPTIMIZERS:
            k.set(key, "train.optimizer", keys.OPTIMIZERS[plain])
            if plain in ("lion8bit", "pagedlion8bit", "pagedadamw8bit", "ademamix8bit"):
                k.report.notes.append(f"{name}: trained with {keys.OPTIMIZERS[plain]} (no 8-bit/paged variant here)")
        else:
            k.skip(key, f"{name} is not available; adamw is used (stylelora has adamw, adamw8bit, prodigy, "
                   "adafactor, lion, came, ademamix, schedulefree_adamw)")
    for other in ("optimizer_type", "optimizer", "use_8bit_adam", "use_lion_optimizer"):
        k.read(other, f"{key} names the optimizer" if key else "no optimizer named: adamw, stylelora's default")
    args = as_args(k.get("optimizer_args"))
    if args:
        k.used.add("optimizer_args")  # each of its arguments is listed on its own
    else:
        k.read("optimizer_args", "")
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


def _schedule(k: _Importer) -> None:
    if k.given("lr_scheduler"):
        name = str(k.get("lr_scheduler")).strip()
        if name in keys.SCHEDULERS:
            k.set("lr_scheduler", "train.lr_scheduler", name)
        else:
            k.skip("lr_scheduler", f"the '{name}' schedule is not implemented; constant is used")
    # kohya_ss: lr_warmup_steps wins over the GUI's lr_warmup percentage; sd-scripts reads a value below 1 as a
    # share of the run
    if k.given("lr_warmup_steps"):
        value = as_number(k.get("lr_warmup_steps"), "lr_warmup_steps")
        ratio = value < 1
        k.set("lr_warmup_steps", "train.lr_warmup_ratio" if ratio else "train.lr_warmup_steps",
              value if ratio else int(value))
        k.read("lr_warmup", "lr_warmup_steps sets the warmup (kohya_ss uses the percentage only without it)")
    elif k.given("lr_warmup"):  # kohya_ss GUI: percent of the total steps
        k.set("lr_warmup", "train.lr_warmup_ratio", as_number(k.get("lr_warmup"), "lr_warmup") / 100)
    k.read("lr_warmup_steps", "no warmup")


def _length(k: _Importer) -> None:
    """Steps or epochs, as sd-scripts decides: max_train_epochs wins over max_train_steps; the GUI's
    'epoch' counts when no step count is given."""
    if k.given("max_train_epochs"):
        k.set("max_train_epochs", "train.epochs", as_integer(k.get("max_train_epochs"), "max_train_epochs"))
    elif k.given("max_train_steps"):
        k.set("max_train_steps", "train.steps", as_integer(k.get("max_train_steps"), "max_train_steps"))
    elif k.given("epoch"):
        k.set("epoch", "train.epochs", as_integer(k.get("epoch"), "epoch"))
    else:
        k.report.notes.append("no length given: sd-scripts would train 1600 steps, and so does this config")
        k.values["train.steps"] = 1600
    for key in ("max_train_epochs", "max_train_steps", "epoch"):
        k.read(key, "max_train_epochs, else max_train_steps, else epoch sets the length, as in sd-scripts")


def _precision(k: _Importer) -> None:
    if str(k.get("mixed_precision") or "").strip():
        value = str(k.get("mixed_precision")).strip().lower()
        if value in keys.PRECISIONS:
            k.set("mixed_precision", "train.mixed_precision", keys.PRECISIONS[value])
        else:
            k.skip("mixed_precision", f"'{value}' is not available; auto picks bf16/fp16 on GPUs")
    if k.given("save_precision"):
        value = str(k.get("save_precision")).strip().lower()
        if value in keys.SAVE_PRECISIONS:
            k.set("save_precision", "export.precision", keys.SAVE_PRECISIONS[value])
        else:
            k.skip("save_precision", f"'{value}' is not available; adapters are saved in fp16")
    attention = [key for key in ("xformers", "sdpa", "mem_eff_attn") if key in k.settings]
    which = next((key for key in attention if k.given(key) and str(k.get(key)).lower() != "none"), None)
    if which is not None:
        k.set(which, "train.attention", "sdpa")
        if which != "sdpa":
            k.report.notes.append(f"{which}: PyTorch's scaled-dot-product attention (train.attention=sdpa) is used; "
                                  "it needs no xformers")
    for key in attention:
        k.read(key, f"{which} chose the attention (train.attention=sdpa)")
    for key in ("no_half_vae", "sdxl_no_half_vae"):
        k.read(key, keys.NO_HALF_VAE)


def _noise(k: _Importer) -> None:
    kind = str(k.get("noise_offset_type") or "Original").strip().lower()
    if k.given("noise_offset") and kind == "original":
        k.set("noise_offset", "train.noise_offset", as_number(k.get("noise_offset"), "noise_offset"))
    if kind == "multires" and k.given("multires_noise_iterations"):
        k.skip("noise_offset_type", keys.NOT_IMPORTED["multires_noise_iterations"])
    k.read("noise_offset_type", "the plain noise offset (train.noise_offset)")
    # kohya_ss passes each noise type's settings only with that type
    for key in ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength", "multires_noise_iterations",
                "multires_noise_discount"):
        needs = "Multires" if key.startswith("multires") else "Original"
        if kind != needs.lower():
            k.read(key, f"kohya_ss passes it only with noise_offset_type {needs}")
    if k.given("loss_type") and str(k.get("loss_type")).lower() != "l2":
        k.skip("loss_type", "only the L2 (MSE) loss is implemented")
    k.read("loss_type", "the L2 loss, stylelora's")


def _saving(k: _Importer) -> None:
    out, name = k.get("output_dir"), k.get("output_name")
    if not is_empty(name):
        k.set("output_name", "export.name", str(name).strip())
    if not is_empty(out) and foreign_path(str(out)) and not Path(str(out).strip()).exists():
        fallback = f"outputs/{str(name).strip()}" if not is_empty(name) else "outputs/<dataset folder name>"
        if not is_empty(name):
            k.set("output_dir", "train.output_dir", fallback)
        else:
            k.read("output_dir", f"a path from another machine: the run goes to {fallback}")
        k.report.notes.append(f"output_dir '{str(out).strip()}' is {foreign_path(str(out))} from another machine: "
                              f"the run goes to {fallback} in the folder training starts from; set "
                              f"{setting('train.output_dir')} to choose another folder")
    elif not is_empty(out):
        folder = Path(k.path(out, "output_dir", "train.output_dir"))
        k.set("output_dir", "train.output_dir", str(folder / str(name).strip() if not is_empty(name) else folder))
    keep = [key for key in ("save_last_n_steps_state", "save_last_n_epochs_state") if k.given(key)]
    if keep:
        k.set(keep[0], "train.keep_checkpoints", as_integer(k.get(keep[0]), keep[0]))
    value = str(k.get("log_with") or "").strip().lower()
    if value in ("tensorboard", "wandb", "mlflow"):
        k.set("log_with", "train.log_with", value)
    elif value == "all":
        k.set("log_with", "train.log_with", "tensorboard")
        k.report.notes.append("log_with all: only TensorBoard is used (train.log_with takes one tracker)")
    elif value:
        k.skip("log_with", f"the '{value}' tracker is not available")
    k.read("log_with", "")
    if k.given("use_wandb"):
        k.set("use_wandb", "train.log_with", "wandb")


def _samples(k: _Importer) -> None:
    if k.given("sample_prompts"):
        _prompts(k, str(k.get("sample_prompts")))
    for key, dotted in (("sample_every_n_steps", "sample.every"), ("sample_every_n_epochs", "sample.every_epochs")):
        if k.given(key) and k.values.get("sample.prompts"):
            k.set(key, dotted, as_integer(k.get(key), key))
        k.read(key, "no sample prompts: kohya renders no samples without them")


def _prompts(k: _Importer, text: str) -> None:
    candidate = Path(k.path(text, "sample_prompts", "sample.prompts")) if "\n" not in text and len(text) < 400 else None
    if candidate is not None and candidate.suffix.lower() in (".txt", ".toml", ".json"):
        try:
            text = read_user_text(candidate, "prompt file")
        except ConfigError as e:  # the rest of the config still imports
            k.skip("sample_prompts", f"{e}; set sample.prompts")
            return
        if candidate.suffix.lower() != ".txt":
            k.skip("sample_prompts", "prompt files in TOML or JSON are not read; use a .txt, one prompt a line")
            return
    prompts, options = sample_prompt_lines(text)
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
        k.set("subsets.image_dir (is_reg)", "data.reg_path", k.path(reg_subset["image_dir"], "image_dir",
                                                                     "data.reg_path"))
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
    image_dir = Path(k.path(subset["image_dir"], "image_dir", "data.path"))
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
        name = f"{repeats}_{match.group(2) if match else subset['class_tokens']}"
        why = (f"its folder is named {image_dir.name}, but num_repeats is {repeats}, so the folder is read as it is "
               "and its name sets nothing" if match else "the caption of images without one comes from an N_words "
               "folder name")
        k.report.unsupported.append(("subsets.class_tokens", subset["class_tokens"], f"{why}; caption them "
                                     f"(stylelora caption) or name the folder {name} and import again"))
    for key, value in subset.items():
        if key in ("image_dir", "num_repeats", "class_tokens", "is_reg", "batch_size"):
            continue
        k.settings[key] = value  # the rest reads like the training config's keys, and wins over them


def import_kohya(path: str | Path, dataset_config: str | Path | None = None) -> ImportReport:
    """Read a kohya_ss GUI JSON or sd-scripts TOML (and its dataset TOML) into a stylelora Config."""
    source = Path(path)
    settings, dataset, sources = read_sources(source, dataset_config)
    k = _Importer(settings, source.parent)
    k.read("dataset_config", f"the dataset config, read from {sources[-1]}")
    if dataset is not None:
        _dataset_config(k, dataset, sources[-1])
    for step in (_model, _data, _network, _learning_rates, _optimizer, _length, _schedule, _precision, _noise,
                 _saving, _samples, _simple):
        step(k)
    _account_for_the_rest(k)
    try:
        config = Config().with_overrides(k.values)
    except ConfigError as e:
        raise ConfigError(f"{source}: the imported values do not make a valid config:\n{e}") from None
    report = k.report
    report.source, report.config = sources, config
    report.notes += _on_this_machine(config)
    return report


def _on_this_machine(config: Config) -> list[str]:
    """What training would refuse on this machine that the import can tell now (AdamW8bit without CUDA)."""
    import torch

    from ..training.optim import check_optimizer

    cuda = config.train.device != "cpu" and torch.cuda.is_available()
    try:
        check_optimizer(config.train, torch.device("cuda" if cuda else "cpu"))
    except ConfigError as e:
        return [f"on this machine: {e}"]
    return []


def _account_for_the_rest(k: _Importer) -> None:
    """Every key no step used: empty or at kohya's default (listed as empty), or left out with the reason."""
    for key, value in k.settings.items():
        if key in k.used:
            continue
        idle = key in keys.ONLY_WITH and (keys.ONLY_WITH[key] is None or not k.given(keys.ONLY_WITH[key]))
        nothing = key in keys.NOT_IMPORTED and not keys.NOT_IMPORTED[key]
        if is_empty(value) or at_default(key, value) or idle or nothing:
            k.report.empty.append(key)
        else:
            k.skip(key, keys.NOT_IMPORTED.get(key) or "not a setting stylelora has")

