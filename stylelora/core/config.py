"""The one typed, validated Config: loads from and saves to TOML, takes ``dotted.key=value`` overrides.

Every field carries its constraints and a help text in its metadata; the CLI flags, the GUI form and
the exported adapter's metadata are all derived from these dataclasses, so there is one place to
add an option.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Literal

import tomli_w

from . import fileio
from .errors import ConfigError, setting
from .options import check_fields, coerce, option, option_like, type_hints, unknown_choice, unknown_setting

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

Precision = Literal["auto", "no", "fp16", "bf16"]
# adamw8bit is bitsandbytes'; prodigy is prodigyopt's; lion, came, ademamix and schedulefree_adamw come from
# the pytorch-optimizer package.
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion", "came", "ademamix", "schedulefree_adamw"]
LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


@dataclass
class ModelConfig:
    name: str = option(
        "builtin:tiny",
        "Base model: builtin:tiny, a diffusers folder, a .safetensors checkpoint, or a hub id.",
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = option(
        "auto", "Training target; auto reads it from the model's scheduler config."
    )
    config: str = option(
        "",
        "For a single-file checkpoint: a local diffusers folder whose configs describe it (offline use).",
    )
    clip_skip: int = option(
        1,
        "Use the text encoder's output this many layers from the end: 1 is the last layer; 2 the one before, "
        "which most anime models (NovelAI lineage) were trained with. Used in training, samples and preview.",
        ge=1, le=12,
    )
    kind: str = option(
        "auto",
        "Model family: auto tells SD1, SD2-512 (epsilon), SD2-768-v and SDXL apart from the model's structure; "
        "set it when a fine-tune is taken for the wrong one (sd2-v trains with v-prediction).",
    )
    quantize: Literal["auto", "none", "fp8", "int8", "nf4"] = option(
        "auto",
        "Keep the frozen denoiser and text-encoder weights quantized while training (QLoRA-style, through "
        "optimum-quanto): fp8 or int8 about halve their memory against bf16, nf4 (4-bit) quarters it, at some "
        "step time. The LoRA weights, samples and exported adapters are unchanged. auto: nf4 for FLUX.1 and SD3.5 "
        "on a GPU (their transformer and T5 would not fit a 24 GB card in bf16), none otherwise.",
    )


@dataclass
class DataConfig:
    path: str = option("datasets/example", "Folder of images with .txt captions or metadata.jsonl.")
    resolution: int = option(512, "Training resolution in pixels (multiple of 8).", ge=64, le=4096)
    center_crop: bool = option(True, "Centre crop to the resolution; off means a random crop.")
    random_flip: bool = option(False, "Flip images horizontally at random.")
    trigger_word: str = option("", "Word put in front of every caption.")
    repeats: int = option(1, "How many times each image is seen per epoch.", ge=1)
    caption_extension: str = option(".txt", "Extension of caption sidecar files.")
    max_token_length: Literal[75, 150, 225] = option(
        75,
        "Caption length in tokens: 75 is CLIP's window; 150 and 225 encode longer captions in 75-token "
        "chunks, as kohya does (the text-encoder states of the chunks are joined).",
    )
    buckets: bool = option(
        True, "Aspect-ratio bucketing: train each image near its own aspect ratio instead of a square crop."
    )
    bucket_step: int = option(64, "Bucket sides are multiples of this many pixels (multiple of 8).", ge=8, le=512)
    bucket_no_upscale: bool = option(False, "Never upscale an image to fit a bucket; small images get small buckets.")
    shuffle_tags: bool = option(False, "Shuffle the comma-separated tags of each caption every time it is used.")
    keep_tags: int = option(
        0, "When shuffling, keep this many leading tags in place (the trigger word always stays first).", ge=0
    )
    caption_dropout: float = option(0.0, "Chance that an example trains with an empty caption.", ge=0, le=1)
    reg_path: str = option(
        "", "Folder of regularisation (class) images for prior preservation; empty turns it off."
    )
    reg_caption: str = option("", "Caption of regularisation images that have none, e.g. 'a painting'.")
    prior_loss_weight: float = option(1.0, "Loss weight of regularisation images.", ge=0)


@dataclass
class CacheConfig:
    latents: Literal["off", "memory", "disk"] = option(
        "memory",
        "Cache VAE latents: in memory for this run, or on disk (reused by later runs on the same images and VAE).",
    )
    text_encoder: bool = option(
        True, "Cache text-encoder outputs when the text encoder is not trained and tags are not shuffled."
    )
    dir: str = option("", "Folder of the disk latent cache; empty means ~/.cache/stylelora/latents.")


@dataclass
class LoraConfig:
    type: Literal["lora", "locon", "loha", "lokr"] = option(
        "lora",
        "Network: lora; locon (LoRA on the ResNet 3x3 convs too, conv_rank defaulting to rank); loha "
        "(Hadamard product) or lokr (Kronecker product), exported in the LyCORIS layout A1111 and ComfyUI load.",
    )
    rank: int = option(16, "LoRA rank (network dim).", ge=1, le=1024)
    alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha/rank.", gt=0)
    dropout: float = option(0.0, "Dropout on the LoRA path.", ge=0, lt=1)
    train_text_encoder: bool = option(False, "Also train LoRA on the CLIP text encoder (SDXL: see lora.text_encoders).")
    text_encoders: Literal["both", "te1", "te2"] = option(
        "both", "SDXL with train_text_encoder: LoRA on both text encoders, only te1 (CLIP-L) or only te2 (OpenCLIP-G)."
    )
    unet_targets: list[str] = option(
        [], "Denoiser module names that get LoRA; empty means the model family's own list (SD's UNet: the "
        "attention projections, proj_in/proj_out and the feed-forward layers of its transformer blocks).",
    )
    text_encoder_targets: list[str] = option(
        TEXT_ENCODER_TARGETS, "Text-encoder module names that get LoRA."
    )
    conv_rank: int = option(
        0, "LoCon, as kohya's conv_dim: rank of LoRA on the UNet's 3x3 convs (ResNet conv1/conv2, down/upsamplers); "
        "it also adapts the ResNets' conv_shortcut and time_emb_proj at lora.rank. 0 leaves them alone.", ge=0, le=1024
    )
    conv_alpha: float = option(
        1.0, "LoCon: alpha of the conv LoRA (its update is scaled by conv_alpha/conv_rank).", gt=0
    )
    dora: bool = option(False, "DoRA: learn a magnitude per output as well as the LoRA direction (peft use_dora).")
    lokr_factor: int = option(
        -1, "LoKr: split each weight's sides by this factor (-1 picks the most balanced split, as LyCORIS does).",
        ge=-1,
    )
    blocks: list[str] = option(
        [],
        "UNet blocks that get LoRA, by name: down.N, mid, up.N, optionally .attn.M or .res.M (up.0.attn.1); "
        "or the B-LoRA presets for SDXL: style (up.0.attn.1) or content (up.0.attn.0). Empty: every block.",
    )


@dataclass
class TrainConfig:
    output_dir: str = option("", "Run folder; empty means outputs/<dataset folder name>.")
    steps: int = option(1000, "Optimizer steps to train (unless train.epochs is set).", ge=1)
    epochs: int = option(
        0, "Train this many passes over the dataset (images x repeats, plus regularisation images) instead of "
        "train.steps; 0 means use train.steps.", ge=0,
    )
    batch_size: int = option(1, "Images per micro-batch (of each process, when several train together).", ge=1)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", ge=1)
    lr: float = option(1e-4, "UNet learning rate.", gt=0)
    text_encoder_lr: float | None = option(
        None, "Text-encoder learning rate; unset means the UNet rate.", gt=0
    )
    text_encoder_2_lr: float | None = option(
        None, "SDXL's second text encoder (OpenCLIP-G) learning rate; unset means train.text_encoder_lr.", gt=0
    )
    lr_scheduler: LrScheduler = option("constant", "Learning-rate schedule.")
    lr_warmup_steps: int = option(0, "Warmup steps of the schedule.", ge=0)
    lr_warmup_ratio: float = option(
        0.0, "Warmup as a share of the run's steps (0.05: the first 5%), so it fits any train.steps or "
        "train.epochs; kohya's lr_warmup_steps below 1. 0 counts train.lr_warmup_steps instead.", ge=0, lt=1,
    )
    lr_scheduler_cycles: int = option(1, "Cycles (hard restarts) of cosine_with_restarts.", ge=1)
    lr_scheduler_power: float = option(1.0, "Power of the polynomial schedule (1 is linear decay).", gt=0)
    optimizer: Optimizer = option(
        "adamw",
        "adamw; adamw8bit (bitsandbytes, CUDA only); prodigy (adapts the step size: use lr=1); adafactor.",
    )
    optimizer_args: list[str] = option(
        [], "Extra optimizer arguments as key=value, as kohya's optimizer_args (e.g. betas=0.9,0.99 or d_coef=2).",
    )
    weight_decay: float = option(1e-2, "AdamW weight decay.", ge=0)
    adam_beta1: float = option(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = option(0.999, "AdamW beta2.", ge=0, lt=1)
    adam_epsilon: float = option(1e-8, "AdamW epsilon.", gt=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm; 0 turns clipping off.", ge=0)
    mixed_precision: Precision = option(
        "auto", "Precision of the frozen base weights and autocast (LoRA weights stay fp32). auto: bf16 on GPUs "
        "that have it, else fp16 on CUDA; on a CPU, bf16 where it has AMX (faster there), else no (fp32)."
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass: less memory, slower.")
    compile: Literal["off", "default", "max-autotune"] = option(
        "off",
        "torch.compile the UNet: the first step compiles (minutes), later steps may run faster; max-autotune "
        "also searches kernels (longer compile). Meant for long GPU runs; on a CPU it did not help (an SD1.5-"
        "shaped UNet on 2 cores: 140 s to compile, then steps no faster than without it).",
    )
    channels_last: bool = option(
        False, "Keep the UNet's convolution tensors in channels-last memory format (can help on GPUs)."
    )
    attention: Literal["sdpa", "default"] = option(
        "sdpa", "Attention kernel: sdpa (PyTorch scaled_dot_product_attention) or default (plain matmuls)."
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "Where to train.")
    scale_lr: bool = option(
        False, "Multiply the learning rates by the number of processes (accelerate launch, torchrun): their "
        "batches add up to an effective batch that many times larger. Off: the rates are used as given.",
    )
    process_timeout: int = option(
        1800, "Seconds a process of a multi-process run waits for the others (say, while the main one renders "
        "samples) before it ends the run as stuck.", ge=30,
    )
    min_snr_gamma: float = option(0.0, "Min-SNR loss weighting gamma (5 is usual); 0 turns it off.", ge=0)
    noise_offset: float = option(0.0, "Noise offset (0.05-0.1 helps very dark/bright images); 0 turns it off.", ge=0)
    zero_terminal_snr: bool = option(
        False, "Rescale the noise schedule to zero terminal SNR (needs model.prediction_type=v_prediction)."
    )
    timestep_sampling: Literal["auto", "logit_normal", "uniform", "mode"] = option(
        "auto", "Flow-matching models (SD3.5, FLUX.1): how training timesteps are drawn; auto is the model family's "
        "(logit-normal, as the SD3 paper and the FLUX trainers do), mode is SD3's mode sampling.",
    )
    logit_mean: float = option(0.0, "Flow-matching models: mean of the logit-normal timestep density.")
    logit_std: float = option(1.0, "Flow-matching models: spread of the logit-normal timestep density.", gt=0)
    flow_shift: float | None = option(
        None, "Flow-matching models: shift of the training timesteps toward noise (SD3.5's scheduler uses 3); "
        "unset means the model's own (FLUX.1: by resolution, as its sampler does).", gt=0,
    )
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = option(
        "none", "Flow-matching models: SD3's loss weighting over the timesteps; none weighs them alike.",
    )
    ema: bool = option(False, "Keep an exponential moving average of the LoRA weights; samples and export use it.")
    ema_decay: float = option(0.999, "EMA decay per optimizer step.", gt=0, lt=1)
    validation_images: int = option(
        0, "Images held out of training to measure a validation loss (fixed noise and timesteps).", ge=0
    )
    validate_every: int = option(0, "Validation loss every N steps (and at the end); 0 means only at the end.", ge=0)
    seed: int = option(42, "One seed for weights, data order, noise and timesteps.", ge=0)
    save_every: int = option(0, "Save a resumable checkpoint every N steps; 0 means only at the end.", ge=0)
    save_every_epochs: int = option(
        0, "Save a resumable checkpoint and an adapter file (<name>-eNNNNNN.safetensors) every N epochs; 0 is off.",
        ge=0,
    )
    keep_checkpoints: int = option(3, "How many newest checkpoints to keep.", ge=1)
    resume: str = option("", "'auto' continues from the newest checkpoint; or a checkpoint folder.")
    log_every: int = option(
        1, "Write metrics every N steps. The loss is read from the device only then, so on a GPU a larger N "
        "lets it queue the next steps without waiting (progress and metrics stay exact, reported in bursts).",
        ge=1)
    log_with: Literal["tensorboard", "wandb", "mlflow", "none"] = option(
        "tensorboard",
        "Experiment tracker (through accelerate), logging loss, lr and the run's config as hyperparameters; "
        "wandb and mlflow need their package (WANDB_MODE=offline and a file: MLFLOW_TRACKING_URI work offline).",
    )

    def warmup_steps(self, total_steps: int) -> int:
        """The schedule's warmup in a run of ``total_steps``: lr_warmup_ratio of them when set, else lr_warmup_steps."""
        return round(self.lr_warmup_ratio * total_steps) if self.lr_warmup_ratio else self.lr_warmup_steps


@dataclass(frozen=True)
class GenerateSettings:
    """Everything besides the prompt and the adapter that decides a rendered image: the one source of
    ``stylelora generate``'s flags, the Preview tab's widgets and ``Previewer.generate``'s settings.
    Validated on construction (ConfigError naming the field); hashable, so it keys the preview caches."""

    negative_prompt: str = option("", "What the image should not show.")
    seed: int = option(0, "Seed of the starting noise: the same seed gives the same image.", ge=0, le=2**63 - 1)
    steps: int | None = option(
        None, "Denoising steps; unset means the model's own (SD 20, FLUX.1 [dev] 28, [schnell] 4, SD3.5 28-40).", ge=1)
    width: int | None = option(None, "Pixels, a multiple of 8 (default: the model's native size).")
    height: int | None = option(None, "Pixels, a multiple of 8 (default: the model's native size).")
    guidance: float | None = option(
        None, "Guidance scale (classifier-free; FLUX.1 [dev]'s guidance input); unset means the model's own (SD 7.5, "
        "FLUX.1 [dev] 3.5, [schnell] 0, SD3.5 3.5-4.5).", ge=0)
    sampler: str | None = option(
        None, "The model's own scheduler by default, or a sampler by name (AUTOMATIC1111's labels work too)."
    )
    clip_skip: int = option(
        0, "Text-encoder layer from the end: 1 the last, 2 the one before; 0 means as the adapter was trained "
        "(its model.clip_skip), else 1.", ge=0, le=12,
    )

    def __post_init__(self) -> None:
        hints = type_hints(GenerateSettings)
        for f in dataclasses.fields(self):  # ints stay ints, floats become floats: equal settings hash alike
            object.__setattr__(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name))
        errors = check_fields(self, "")
        if not errors and self.guidance is not None and not math.isfinite(self.guidance):
            errors.append(f"guidance: must be a finite number, got {self.guidance}")
        if errors:
            raise ConfigError("\n".join(errors))

    def replace(self, **changes: Any) -> GenerateSettings:
        """These settings with some fields changed (``seed=7``), validated again."""
        return dataclasses.replace(self, **changes) if changes else self


@dataclass
class SampleConfig:
    prompts: list[str] = option([], "Prompts rendered during training.")
    negative_prompt: str = option_like(GenerateSettings, "negative_prompt", "Negative prompt for samples.")
    every: int = option(0, "Render samples every N steps; 0 turns it off.", ge=0)
    every_epochs: int = option(
        0, "Render samples at the end of every N epochs (kohya's sample_every_n_epochs); 0 turns it off.", ge=0
    )
    seed: int = option(1234, "Seed of the samples (the same for every step, so they compare).", ge=0)
    steps: int | None = option_like(GenerateSettings, "steps", "Denoising steps per sample.", le=200)
    guidance: float | None = option_like(GenerateSettings, "guidance")


@dataclass
class ExportConfig:
    name: str = option("", "Adapter file name; empty means the run folder's name.")
    precision: Literal["fp16", "fp32", "bf16"] = option("fp16", "Precision of saved adapters.")
    bake_alpha: bool = option(
        False, "diffusers file: fold alpha/rank into each lora_B and store alpha = rank, so loaders that read no "
        "alpha (diffusers before 0.34) apply the right strength; the kohya file keeps its alphas.")


# New subjects for the evaluation set: rendered with the trigger word (does the style transfer?) and without it
# (does it leak?). Plain, varied scenes the base model draws well, none of them a style word.
TRANSFER_PROMPTS = ["a lighthouse on a cliff", "a bowl of fruit on a table", "a city street at night",
                    "a portrait of an old man"]


@dataclass
class EvalConfig:
    every_save: bool = option(
        False, "Score each checkpoint as it is saved during training (main process, the model already in memory); "
        "stylelora evaluate RUN scores a finished run.",
    )
    prompts: list[str] = option(
        TRANSFER_PROMPTS, "Transfer prompts: new subjects, rendered with the trigger word (does the style carry "
        "over?) and without it (does it leak?).",
    )
    style_prompts: int = option(
        4, "How many training captions (with the trigger word) to render as style prompts, picked evenly from the "
        "sorted captions.", ge=0, le=64,
    )
    seeds: int = option(2, "Seeds per prompt; 2 or more also measure the variety across seeds.", ge=1, le=16)
    seed: int = option(1000, "The first seed of the evaluation set (the others follow it).", ge=0)
    steps: int | None = option_like(GenerateSettings, "steps", "Denoising steps per evaluation image.", le=200)
    guidance: float | None = option_like(GenerateSettings, "guidance")
    descriptor: str = option(
        "builtin", "What measures style and content: builtin (colour and texture statistics, no download), clip "
        "(openai/clip-vit-large-patch14), dinov2 (facebook/dinov2-base), csd (yuxi-liu-wired/CSD), a hub id or "
        "local folder of such a model, or builtin:tiny-clip (random, for tests).",
    )
    min_content: float = option(
        0.3, "The best checkpoint keeps at least this much content on the transfer prompts (0..1).", ge=0, le=1,
    )
    copy_threshold: float = option(
        0.0, "Copying above this flags a checkpoint (and rules it out as the best); 0 uses the descriptor's own "
        "threshold (builtin 0.95, CLIP 0.95, DINOv2 0.9, CSD 0.95).", ge=0, le=1,
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        errors = check_fields(self, "") or _cross_checks(self)
        if errors:
            raise ConfigError("\n".join(errors))

    # --- derived values -------------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        if self.train.output_dir:
            return Path(self.train.output_dir)
        return Path("outputs") / (Path(self.data.path).name or "run")

    @property
    def run_name(self) -> str:
        """The name of the run's adapter files: ``export.name``, else the run folder's name."""
        if self.export.name:
            return self.export.name
        if fileio.foreign_path(str(self.output_dir)):  # a run folder written on Windows: its last part
            return PureWindowsPath(str(self.output_dir)).name
        return self.output_dir.resolve().name

    # --- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        fileio.write_text(path, self.to_toml())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data, "")

    @classmethod
    def from_toml(cls, text: str, source: str = "config") -> Config:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            hint = ""
            if "escape" in str(e).lower() or "\\" in str(e):  # a Windows path in double quotes
                hint = ("; a backslash in double quotes starts an escape in TOML: write Windows paths in single "
                        "quotes ('E:\\data\\set') or with forward slashes (\"E:/data/set\")")
            raise ConfigError(f"{source}: not valid TOML: {e}{hint}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{p}: is a folder, not a config file; give a .toml file (a dataset folder goes "
                              f"in {setting('data.path')})")
        return cls.from_toml(fileio.read_user_text(p, "config file"), str(p))

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> Config:
        """A new Config with ``{"train.steps": 500}`` or ``["train.steps=500"]`` applied."""
        if isinstance(overrides, list):
            overrides = dict(parse_override(o) for o in overrides)
        data = dataclasses.asdict(self)
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if not key or section not in data or not isinstance(data[section], dict):
                raise ConfigError(f"{dotted}: {unknown_setting(dotted, all_fields())}")
            if key not in data[section]:
                raise ConfigError(f"{dotted}: {unknown_setting(dotted, all_fields())}")
            data[section][key] = value
        return Config.from_dict(_drop_none(data))

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)


# model.kind's values and the checks that involve them belong to the model families (stylelora.families),
# which register them here when the package is imported; the config only holds the hook.
_MODEL_KINDS: dict[str, Any] = {}


def register_model_kind(kind: str, family: Any) -> None:
    """Let ``model.kind`` take ``kind``, checked by ``family``: its ``check_config(config)`` (errors of settings
    that do not fit the kind) and ``check_blocks(selectors)`` (ConfigError for a malformed lora.blocks)."""
    _MODEL_KINDS[kind] = family


def unregister_model_kind(kind: str) -> None:
    _MODEL_KINDS.pop(kind, None)


def model_kinds() -> list[str]:
    """The values ``model.kind`` takes: auto, then every registered family's kinds."""
    return ["auto", *_MODEL_KINDS]


def next_free_run_dir(path: str | Path) -> Path:
    """``path``, or when it already holds a run (a ``config.toml``) the first of ``path-2``,
    ``path-3``, ... that does not: a new run never lands in an older run's folder."""
    path = Path(path)
    out, n = path, 2
    while (out / "config.toml").is_file():
        out = path.with_name(f"{path.name}-{n}")
        n += 1
    return out


# the fields that name a file or folder on this machine
PATH_FIELDS = ("model.name", "model.config", "data.path", "data.reg_path", "cache.dir", "train.output_dir",
               "train.resume")


def foreign_path_errors(config: Config) -> list[str]:
    """One error per path field holding a path written on another system (``E:\\kohya\\img`` on Linux), which
    would otherwise be read, or created, as a folder of that name in the current folder."""
    return [error for dotted in PATH_FIELDS if (error := foreign_path_error(dotted, str(config.get(dotted))))]


def foreign_path_error(dotted: str, value: str) -> str | None:
    """The error for ``value`` of the path field ``dotted`` when it was written on another system; else None."""
    problem = fileio.foreign_path_problem(value)
    return f"{dotted}: {problem}; set {setting(dotted)} to a path on this machine" if problem else None


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-4`` -> ("train.lr", 0.0001); values use TOML syntax, bare words are strings."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set train.steps=500")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def all_fields() -> dict[str, dataclasses.Field[Any]]:
    """Every dotted field name of Config with its dataclass field (for CLI, GUI and docs)."""
    out: dict[str, dataclasses.Field[Any]] = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            out[f"{section.name}.{f.name}"] = f
    return out


def field_type(dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    section_cls = typing.get_type_hints(Config)[section]
    return typing.get_type_hints(section_cls)[key]


def choices(dotted: str) -> list[Any] | None:
    if dotted == "model.kind":
        return model_kinds()
    tp = field_type(dotted)
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    return None


# --- validation -----------------------------------------------------------------------------------


def _family_checks(config: Config) -> list[str]:
    """model.kind is a registered kind, its family accepts the settings, and lora.blocks names blocks the way
    that family (with auto: any family) names them."""
    kind = config.model.kind
    if kind != "auto" and kind not in _MODEL_KINDS:
        return [f"model.kind: {unknown_choice(kind, model_kinds())}"]
    families = [_MODEL_KINDS[kind]] if kind != "auto" else list({id(f): f for f in _MODEL_KINDS.values()}.values())
    errors = families[0].check_config(config) if kind != "auto" else []
    block_errors = []
    for family in families if config.lora.blocks else []:
        try:
            family.check_blocks(config.lora.blocks)
            break
        except ConfigError as e:
            block_errors.append(str(e))
    else:
        errors += block_errors[:1]  # the plainest family (SD1) comes first: what a model of unknown kind is
    return errors


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table of settings")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    errors = [
        f"{prefix}{k}: {unknown_setting(prefix + k, [prefix + n for n in names])}"
        for k in data
        if k not in names
    ]
    if errors:
        raise ConfigError("\n".join(errors))
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, tp, f"{prefix}{name}")
    if cls is Config:
        return cls(**kwargs)
    obj = cls(**kwargs)
    errors = check_fields(obj, prefix)
    if errors:
        raise ConfigError("\n".join(errors))
    return obj


def _cross_checks(config: Config) -> list[str]:
    """Errors that involve two fields (each message names the field to change)."""
    errors = []
    if not config.model.name.strip():  # else read as the current folder: "the folder has no model_index.json"
        errors.append("model.name: empty; give a base model: builtin:tiny, a diffusers folder, a .safetensors "
                      "checkpoint or a hub id")
    if config.lora.type in ("loha", "lokr") and config.lora.dora:
        errors.append(f"lora.dora: DoRA works with lora.type lora or locon, not {config.lora.type}; "
                      "set lora.dora=false")
    if config.lora.type in ("loha", "lokr") and config.lora.dropout:
        errors.append(f"lora.dropout: {config.lora.type} layers have no input dropout; set lora.dropout=0")
    errors += _family_checks(config)
    if config.train.lr_warmup_ratio and config.train.lr_warmup_steps:
        errors.append(f"train.lr_warmup_ratio: a warmup of {config.train.lr_warmup_ratio:g} of the run and of "
                      f"{config.train.lr_warmup_steps} steps were both set; set train.lr_warmup_ratio=0 to count "
                      "steps, or train.lr_warmup_steps=0 to warm up for a share of the run")
    if config.train.zero_terminal_snr and config.model.prediction_type == "epsilon":
        errors.append(
            "train.zero_terminal_snr: needs v-prediction (with zero terminal SNR the last timestep is pure "
            "noise and epsilon cannot be learned); set model.prediction_type=v_prediction"
        )
    return errors
