"""What the app calls each config field and where the Train form shows it: one line per field.

A field added to ``stylelora.config`` needs one line here (tests/test_webui.py fails without it): its
label, in words a user knows, and its group. Within a group, fields appear in this order, the ones
people change most first. The dotted key and the field's help text go in the widget's info line.
"""

from __future__ import annotations

BASIC_GROUP = "Basic"
DATA = "Data & captions"
NETWORK = "Network"
OPTIMIZER = "Optimizer & schedule"
MEMORY = "Precision & memory"
SAMPLES = "Samples & validation"
SAVING = "Saving"
MODEL = "Base model"
ADVANCED_GROUPS = [DATA, NETWORK, OPTIMIZER, MEMORY, SAMPLES, SAVING, MODEL]  # the Advanced panel, in order

FIELDS: dict[str, tuple[str, str]] = {
    # Basic (laid out by form.BASIC_ROWS)
    "model.name": ("Base model", BASIC_GROUP),
    "data.path": ("Dataset", BASIC_GROUP),
    "train.steps": ("Steps", BASIC_GROUP),
    "lora.rank": ("Rank (network dim)", BASIC_GROUP),
    "train.lr": ("Learning rate", BASIC_GROUP),
    "data.resolution": ("Resolution", BASIC_GROUP),
    "lora.train_text_encoder": ("Train the text encoder too", BASIC_GROUP),
    # Data & captions
    "data.trigger_word": ("Trigger word", DATA),
    "data.repeats": ("Repeats per epoch", DATA),
    "data.random_flip": ("Random horizontal flip", DATA),
    "data.buckets": ("Aspect-ratio buckets", DATA),
    "data.bucket_step": ("Bucket step (px)", DATA),
    "data.bucket_no_upscale": ("Never upscale into a bucket", DATA),
    "data.center_crop": ("Centre crop", DATA),
    "data.shuffle_tags": ("Shuffle caption tags", DATA),
    "data.keep_tags": ("Tags kept in place when shuffling", DATA),
    "data.caption_dropout": ("Caption dropout", DATA),
    "data.caption_extension": ("Caption file extension", DATA),
    "data.max_token_length": ("Caption token limit (75/150/225)", DATA),
    "data.reg_path": ("Regularisation images folder", DATA),
    "data.reg_caption": ("Regularisation caption", DATA),
    "data.prior_loss_weight": ("Prior loss weight", DATA),
    # Network
    "lora.type": ("Network type (LoRA, LoCon, LoHa, LoKr)", NETWORK),
    "lora.alpha": ("Alpha (network alpha)", NETWORK),
    "lora.conv_rank": ("Conv rank (LoCon)", NETWORK),
    "lora.conv_alpha": ("Conv alpha (LoCon)", NETWORK),
    "lora.lokr_factor": ("LoKr factor", NETWORK),
    "lora.dora": ("DoRA", NETWORK),
    "lora.blocks": ("UNet blocks that get LoRA", NETWORK),
    "lora.text_encoders": ("Text encoders that get LoRA (SDXL)", NETWORK),
    "lora.dropout": ("LoRA dropout", NETWORK),
    "lora.unet_targets": ("Denoiser modules that get LoRA", NETWORK),
    "lora.text_encoder_targets": ("Text-encoder modules that get LoRA", NETWORK),
    # Optimizer & schedule
    "train.batch_size": ("Batch size", OPTIMIZER),
    "train.epochs": ("Epochs (instead of steps)", OPTIMIZER),
    "train.gradient_accumulation_steps": ("Gradient accumulation steps", OPTIMIZER),
    "train.optimizer": ("Optimizer", OPTIMIZER),
    "train.optimizer_args": ("Optimizer arguments (key=value)", OPTIMIZER),
    "train.lr_scheduler": ("Learning-rate schedule", OPTIMIZER),
    "train.lr_warmup_steps": ("Warmup steps", OPTIMIZER),
    "train.lr_warmup_ratio": ("Warmup share of the run", OPTIMIZER),
    "train.text_encoder_lr": ("Text encoder learning rate", OPTIMIZER),
    "train.text_encoder_2_lr": ("Second text encoder learning rate (SDXL)", OPTIMIZER),
    "train.seed": ("Seed", OPTIMIZER),
    "train.scale_lr": ("Scale learning rates with the process count", OPTIMIZER),
    "train.min_snr_gamma": ("Min-SNR gamma", OPTIMIZER),
    "train.noise_offset": ("Noise offset", OPTIMIZER),
    "train.zero_terminal_snr": ("Zero terminal SNR", OPTIMIZER),
    "train.timestep_sampling": ("Timestep sampling (flow models)", OPTIMIZER),
    "train.logit_mean": ("Logit-normal mean (flow models)", OPTIMIZER),
    "train.logit_std": ("Logit-normal spread (flow models)", OPTIMIZER),
    "train.flow_shift": ("Timestep shift (flow models)", OPTIMIZER),
    "train.loss_weighting": ("Loss weighting (flow models)", OPTIMIZER),
    "train.ema": ("Average the weights (EMA)", OPTIMIZER),
    "train.ema_decay": ("EMA decay", OPTIMIZER),
    "train.lr_scheduler_cycles": ("Restarts (cosine with restarts)", OPTIMIZER),
    "train.lr_scheduler_power": ("Power (polynomial schedule)", OPTIMIZER),
    "train.weight_decay": ("Weight decay", OPTIMIZER),
    "train.max_grad_norm": ("Gradient clipping norm", OPTIMIZER),
    "train.adam_beta1": ("Adam beta1", OPTIMIZER),
    "train.adam_beta2": ("Adam beta2", OPTIMIZER),
    "train.adam_epsilon": ("Adam epsilon", OPTIMIZER),
    # Precision & memory
    "train.mixed_precision": ("Mixed precision", MEMORY),
    "train.gradient_checkpointing": ("Gradient checkpointing", MEMORY),
    "model.quantize": ("Quantize the frozen base (auto, fp8, int8, nf4)", MEMORY),
    "train.compile": ("Compile the UNet (torch.compile)", MEMORY),
    "train.channels_last": ("Channels-last memory format", MEMORY),
    "cache.latents": ("Cache latents", MEMORY),
    "cache.text_encoder": ("Cache text-encoder outputs", MEMORY),
    "cache.dir": ("Latent cache folder", MEMORY),
    "train.attention": ("Attention kernel", MEMORY),
    "train.device": ("Device", MEMORY),
    "train.process_timeout": ("Seconds before a silent process is given up", MEMORY),
    # Samples & validation
    "sample.prompts": ("Sample prompts", SAMPLES),
    "sample.every": ("Sample every N steps", SAMPLES),
    "sample.every_epochs": ("Sample every N epochs", SAMPLES),
    "sample.steps": ("Sample denoising steps", SAMPLES),
    "sample.seed": ("Sample seed", SAMPLES),
    "sample.negative_prompt": ("Sample negative prompt", SAMPLES),
    "sample.guidance": ("Sample guidance (CFG)", SAMPLES),
    "train.validation_images": ("Validation images held out", SAMPLES),
    "train.validate_every": ("Validate every N steps", SAMPLES),
    # Saving
    "train.save_every": ("Checkpoint every N steps", SAVING),
    "train.keep_checkpoints": ("Checkpoints to keep", SAVING),
    "train.save_every_epochs": ("Adapter every N epochs", SAVING),
    "export.name": ("Adapter name", SAVING),
    "export.precision": ("Adapter precision", SAVING),
    "export.bake_alpha": ("Bake alpha into the diffusers weights", SAVING),
    "train.output_dir": ("Run folder", SAVING),
    "train.resume": ("Resume from", SAVING),
    "train.log_every": ("Log metrics every N steps", SAVING),
    "train.log_with": ("Experiment tracker", SAVING),
    # Base model
    "model.kind": ("Model family", MODEL),
    "model.clip_skip": ("CLIP skip", MODEL),
    "model.prediction_type": ("Prediction type", MODEL),
    "model.config": ("Component configs folder (single-file models)", MODEL),
}


def label(dotted: str) -> str:
    """The field's label; a field without a line above shows its dotted key (and fails the test)."""
    return FIELDS.get(dotted, (dotted, ""))[0]


SECTION_GROUPS = {"model": MODEL, "data": DATA, "cache": MEMORY, "lora": NETWORK, "train": OPTIMIZER,
                  "sample": SAMPLES, "export": SAVING}


def group(dotted: str) -> str:
    """The field's group; a field without a line above goes by its config section."""
    return FIELDS[dotted][1] if dotted in FIELDS else SECTION_GROUPS.get(dotted.split(".")[0], OPTIMIZER)
