"""Optimizers and learning-rate schedules, chosen by name in the config."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from typing import TYPE_CHECKING, Any

import torch

from .config import TrainConfig
from .errors import ConfigError

if TYPE_CHECKING:
    from .models import BaseModel

log = logging.getLogger(__name__)


def check_optimizer(train: TrainConfig, device: torch.device) -> None:
    """Fail before any model is loaded when the optimizer cannot run here."""
    if train.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise ConfigError(
                "train.optimizer: 'adamw8bit' uses bitsandbytes, which needs a CUDA GPU, and this run is on "
                f"the {device.type.upper()}; use train.optimizer=adamw (or adafactor to save memory)"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "train.optimizer: 'adamw8bit' needs the bitsandbytes package; install it with "
                "'pip install bitsandbytes' or use train.optimizer=adamw"
            )


def param_groups(model: BaseModel, train: TrainConfig) -> list[dict[str, Any]]:
    """The trainable weights by learning rate: the UNet's at ``train.lr``, then each text encoder that trains
    at ``train.text_encoder_lr`` (SDXL's second at ``train.text_encoder_2_lr``), unset meaning the one
    before. The order is the one checkpoints save."""
    te_lr = train.text_encoder_lr or train.lr
    lrs = {"unet": train.lr, "text_encoder": te_lr, "text_encoder_2": train.text_encoder_2_lr or te_lr}
    groups = []
    for part, module in model.parts():
        params = [p for p in module.parameters() if p.requires_grad]
        if params or part == "unet":
            groups.append({"params": params, "lr": lrs[part]})
    return groups


def build_optimizer(groups: list[dict[str, Any]], train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer`` over parameter ``groups`` (each with its own lr)."""
    check_optimizer(train, device)
    betas = (train.adam_beta1, train.adam_beta2)
    name = train.optimizer
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas, eps=train.adam_epsilon, weight_decay=train.weight_decay)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=betas, eps=train.adam_epsilon, weight_decay=train.weight_decay)
    if name == "prodigy":
        if len({g["lr"] for g in groups}) > 1:
            raise ConfigError(
                "train.text_encoder_lr: Prodigy needs one learning rate for the UNet and the text encoder; "
                "unset train.text_encoder_lr"
            )
        if train.lr < 0.1:
            log.warning("Prodigy finds the step size itself and expects train.lr=1 (got %g); training will be slow",
                        train.lr)
        from prodigyopt import Prodigy

        with contextlib.redirect_stdout(io.StringIO()):  # Prodigy prints a note; the library never prints
            return Prodigy(groups, betas=betas, eps=train.adam_epsilon, weight_decay=train.weight_decay,
                           safeguard_warmup=train.lr_warmup_steps > 0, use_bias_correction=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed, scheduled learning rate, as the other optimizers have (not Adafactor's relative step).
        return Adafactor(groups, lr=train.lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=train.weight_decay)
    raise ConfigError(f"train.optimizer: unknown optimizer {name!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> Any:
    """diffusers' schedule named by ``train.lr_scheduler``, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.lr_warmup_steps,
        num_training_steps=train.steps,
        num_cycles=train.lr_scheduler_cycles,
        power=train.lr_scheduler_power,
    )
