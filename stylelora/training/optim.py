"""Optimizers and learning-rate schedules, chosen by name in the config."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..core.config import TrainConfig
from ..core.errors import ConfigError

if TYPE_CHECKING:
    from ..model.base import BaseModel

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


# train.optimizer -> the pytorch-optimizer class (by its registry name) and the arguments stylelora sets
PYTORCH_OPTIMIZER = {"lion": "lion", "came": "came", "ademamix": "ademamix", "schedulefree_adamw": "schedulefreeadamw"}


def parse_optimizer_args(args: list[str]) -> dict[str, Any]:
    """``["betas=0.9,0.99", "d_coef=2", "foreach=false"]`` -> {"betas": (0.9, 0.99), "d_coef": 2, ...}."""
    import tomllib

    out: dict[str, Any] = {}
    for item in args:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"train.optimizer_args: {item!r} is not key=value (e.g. betas=0.9,0.99 or d_coef=2)")
        values = []
        for part in raw.split(","):
            text = part.strip()
            try:
                values.append(tomllib.loads(f"v = {text.lower() if text.lower() in ('true', 'false') else text}")["v"])
            except tomllib.TOMLDecodeError:
                values.append(text)  # a bare word: a string (e.g. a mode name)
        out[key] = tuple(values) if len(values) > 1 else values[0]
    return out


def _construct(cls: Any, groups: list[dict[str, Any]], defaults: dict[str, Any], train: TrainConfig) -> Any:
    """``cls(groups, **defaults)`` with the user's ``train.optimizer_args`` on top; a bad argument names itself."""
    import inspect

    given = parse_optimizer_args(train.optimizer_args)
    named = [n for n, p in inspect.signature(cls.__init__).parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ("self", "params")]
    unknown = sorted(set(given) - set(named))
    if unknown:  # some optimizers take **kwargs and would ignore a misspelt name
        raise ConfigError(f"train.optimizer_args: {train.optimizer} ({cls.__name__}) has no argument "
                          f"{', '.join(unknown)}; it takes {', '.join(named)}")
    kwargs = {**defaults, **given}
    try:
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.optimizer_args: {train.optimizer} ({cls.__name__}) does not accept "
                          f"{sorted(kwargs)}: {e}") from None


def param_groups(model: BaseModel, train: TrainConfig, scale: float = 1.0) -> list[dict[str, Any]]:
    """The trainable weights by learning rate: the denoiser's at ``train.lr``, then each text encoder that trains
    at ``train.text_encoder_lr`` (a second one at ``train.text_encoder_2_lr``), unset meaning the one
    before; each times ``scale`` (``train.scale_lr``). The order is the one checkpoints save."""
    te_lr = train.text_encoder_lr or train.lr
    denoiser, *text_parts = model.family.parts
    lrs = {denoiser: train.lr, **dict(zip(text_parts, [te_lr, train.text_encoder_2_lr or te_lr], strict=False))}
    groups = []
    for part, module in model.parts():
        params = [p for p in module.parameters() if p.requires_grad]
        if params or part == denoiser:
            groups.append({"params": params, "lr": lrs[part] * scale})
    return groups


def build_optimizer(groups: list[dict[str, Any]], train: TrainConfig, device: torch.device,
                    total_steps: int | None = None) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer`` over parameter ``groups`` (each with its own lr), with
    ``train.optimizer_args`` passed on; ``total_steps`` (default ``train.steps``) sizes a schedule-free warmup."""
    check_optimizer(train, device)
    adam = {"betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_epsilon,
            "weight_decay": train.weight_decay}
    name = train.optimizer
    if name == "adamw":
        # Fused: one kernel for all LoRA tensors instead of several per tensor (CUDA and CPU kernels exist).
        return _construct(torch.optim.AdamW, groups, {**adam, "fused": device.type in ("cuda", "cpu")}, train)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return _construct(bnb.optim.AdamW8bit, groups, adam, train)
    if name == "prodigy":
        return _prodigy(groups, train, adam)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed, scheduled learning rate, as the other optimizers have (not Adafactor's relative step).
        return _construct(Adafactor, groups, {"lr": train.lr, "relative_step": False, "scale_parameter": False,
                                              "warmup_init": False, "weight_decay": train.weight_decay}, train)
    if name in PYTORCH_OPTIMIZER:
        from pytorch_optimizer import load_optimizer

        defaults: dict[str, Any] = {"weight_decay": train.weight_decay}  # betas: each optimizer's own defaults
        if name == "schedulefree_adamw":
            if train.lr_scheduler != "constant":
                raise ConfigError("train.lr_scheduler: schedule-free AdamW replaces the learning-rate schedule; "
                                  "set train.lr_scheduler=constant (the schedule's warmup becomes its warmup)")
            defaults.update(betas=adam["betas"], eps=train.adam_epsilon,
                            warmup_steps=train.warmup_steps(total_steps or train.steps))
        return _construct(load_optimizer(PYTORCH_OPTIMIZER[name]), groups, defaults, train)
    raise ConfigError(f"train.optimizer: unknown optimizer {name!r}")


def _prodigy(groups: list[dict[str, Any]], train: TrainConfig, adam: dict[str, Any]) -> torch.optim.Optimizer:
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
        warms_up = train.lr_warmup_steps > 0 or train.lr_warmup_ratio > 0
        return _construct(Prodigy, groups, {**adam, "safeguard_warmup": warms_up, "use_bias_correction": True}, train)


@contextlib.contextmanager
def evaluation_weights(optimizer: Any) -> Iterator[None]:
    """Schedule-free optimizers train on one sequence of weights and evaluate on their average: switch to
    the average for samples, validation and the exported adapter, then back. Others: nothing to do."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    switch = callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))
    if switch:
        inner.eval()
    try:
        yield
    finally:
        if switch:
            inner.train()


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int | None = None) -> Any:
    """diffusers' schedule named by ``train.lr_scheduler`` over ``total_steps`` (``train.steps`` unless the
    run counts epochs), stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    total = total_steps or train.steps
    return get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=0 if train.optimizer == "schedulefree_adamw" else train.warmup_steps(total),
        num_training_steps=total,
        num_cycles=train.lr_scheduler_cycles,
        power=train.lr_scheduler_power,
    )
