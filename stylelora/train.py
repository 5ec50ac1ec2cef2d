"""train(config, on_event, stop) -> RunResult: the LoRA training loop, read top to bottom."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import events, losses, optim
from .artifacts import export_adapter, render_samples
from .batches import BatchSource, TrainingSet
from .config import Config, next_free_run_dir
from .dataset import CaptionedImages
from .doctor import training_items
from .ema import LoraEMA
from .errors import ConfigError, DiskFullError, TrainingError
from .failures import (
    RunTracker,
    disk_full_advice,
    is_out_of_memory,
    mismatched_checkpoint,
    out_of_memory_advice,
    where_to_resume,
)
from .models import BaseModel, add_lora, load_base_model, lora_state, set_lora_state
from .validation import Validator, split_holdout

log = logging.getLogger(__name__)

EventHandler = Callable[[events.Event], None]
StopSignal = threading.Event | Callable[[], bool] | None


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    stopped_early: bool
    adapter_paths: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def _stop_requested(stop: StopSignal) -> bool:
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


def resolve_output_dir(config: Config) -> Path:
    """The run folder; refuses to overwrite another run unless resuming it."""
    out = config.output_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: '{out}' is a file; give a folder path for the run")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"train.output_dir: '{out}' cannot be created because '{blocking}' is a file")
    if out.resolve().is_relative_to(Path(config.data.path).resolve()):
        raise ConfigError(f"train.output_dir: '{out}' is inside the dataset folder, which stylelora never "
                          "writes to; choose a folder outside it")
    holds_run = (out / "config.toml").is_file()
    if holds_run and not config.train.resume:
        if config.train.output_dir:
            raise ConfigError(
                f"train.output_dir: '{out}' already holds a run; pass --resume auto to continue it, "
                "or --output with a new folder"
            )
        out = next_free_run_dir(out)
    return out


def _mixed_precision(config: Config) -> str:
    mp = config.train.mixed_precision
    if mp != "auto":
        return mp
    if config.train.device == "cpu" or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _find_resume(config: Config, out: Path) -> Path | None:
    resume = config.train.resume
    if not resume:
        return None
    if resume == "auto":
        ckpt.remove_stale(out)
        return ckpt.newest_complete(out)
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"train.resume: '{resume}' is not a checkpoint folder (no state.json inside)")
    return path  # a damaged one fails in load_checkpoint, naming what is wrong


def _new_accelerator(**kwargs: Any) -> Any:
    """An Accelerator with this run's settings. accelerate keeps its state process-wide, so a second run in
    the same process (the GUI, tests) with another precision or device needs that state reset first."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if os.environ.get("WORLD_SIZE", "1") == "1":  # never under a multi-process launcher
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(**kwargs)


def _set_attention(unet: torch.nn.Module, kind: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def train(
    config: Config,
    on_event: EventHandler | None = None,
    stop: StopSignal = None,
    model: BaseModel | None = None,
) -> RunResult:
    """Train a LoRA as ``config`` says; events go to ``on_event``; ``stop`` ends it after a step.

    ``model`` lets a caller pass an already loaded base model (it gets the LoRA layers injected);
    by default the model named in the config is loaded. Running out of memory or disk space, or a
    diverging loss, raises :class:`TrainingError` saying which checkpoint is intact and what to do.
    """
    tracker = RunTracker(on_event)
    try:
        return _train(config, tracker, stop, model)
    except DiskFullError as e:
        raise TrainingError(disk_full_advice(str(e), tracker)) from e
    except TrainingError as e:
        if tracker.output_dir is None:
            raise
        raise TrainingError(f"{e}\n{where_to_resume(tracker)}") from e
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        raise TrainingError(out_of_memory_advice(config, tracker)) from e


def _train(config: Config, on_event: EventHandler, stop: StopSignal, model: BaseModel | None) -> RunResult:
    emit = on_event
    cfg = config.train
    out = resolve_output_dir(config)
    resume_from = _find_resume(config, out)
    accelerator = _new_accelerator(
        mixed_precision=_mixed_precision(config),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cfg.device == "cpu",
        log_with="tensorboard",
        project_dir=str(out / "logs"),
    )
    if cfg.device == "cuda" and accelerator.device.type != "cuda":
        raise ConfigError("train.device: 'cuda' was asked for but no CUDA GPU is available")
    processes = max(accelerator.num_processes, int(os.environ.get("WORLD_SIZE", "1") or 1))
    if processes > 1:  # said plainly rather than training the same batches on every GPU
        raise ConfigError(
            f"train.device: {processes} processes were launched, but this version trains on "
            "one GPU (or the CPU) per run: the batch source does not shard data across processes yet. "
            "Run 'stylelora train' without 'accelerate launch'."
        )
    optim.check_optimizer(cfg, accelerator.device)
    torch.manual_seed(cfg.seed)

    # --- data: the usable images, a seeded few held out for the validation loss ---
    # Batch size 1 here: whether an epoch fills a batch depends on folder repeats and regularisation
    # images, which the training set counts (it raises the same "cannot fill one batch" error).
    items, report = training_items(config.data, 1, model=config.model.name,
                                   tokenizer=model.tokenizer if model is not None else None)
    for line in report.skipped_lines():  # one line per unusable image; check-data explains the rest
        emit(events.Message(line))
    if report.counts["warnings"]:
        emit(events.Message(f"{report.counts['warnings']} warnings about the dataset (its images are used); "
                            f"'stylelora check-data {config.data.path}' lists them"))
    items, held_out = split_holdout(items, cfg.validation_images, cfg.seed)
    data = TrainingSet.from_config(config, items)

    # --- model: LoRA (or LoCon/DoRA) layers in fp32 on a frozen base in the training precision ---
    if model is None:
        model = load_base_model(config.model.name, config.model.config, config.model.prediction_type)
    if model.kind == "sdxl":  # the loop feeds no SDXL added conditioning (pooled text, time ids) yet
        raise ConfigError(
            f"model.name: '{config.model.name}' is an SDXL model; this version trains SD1.x/SD2.x only "
            "(SDXL adapters from other trainers can be exported, merged and resized)"
        )
    noise_scheduler = losses.training_scheduler(model.pipeline.scheduler.config, model.prediction_type,
                                                cfg.zero_terminal_snr)
    if cfg.zero_terminal_snr:  # samples must start from pure noise too
        from diffusers import DDIMScheduler

        model.pipeline.scheduler = DDIMScheduler.from_config(
            model.pipeline.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    params = add_lora(model, config.lora)
    unet, vae, text_encoder = model.unet, model.vae, model.text_encoder
    _set_attention(unet, cfg.attention)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.lora.train_text_encoder:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (unet, vae, text_encoder):
        module.to(accelerator.device)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)
    for p in params:  # LoRA weights train in fp32 whatever the base precision
        p.data = p.data.float()
    vae.eval()
    unet.train()
    text_encoder.train(config.lora.train_text_encoder)

    # --- optimizer, schedule, EMA, validation ---
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.lr}]
    te_params = [p for p in text_encoder.parameters() if p.requires_grad]
    if te_params:
        groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.lr})
    optimizer = optim.build_optimizer(groups, cfg, accelerator.device)
    lr_scheduler = optim.build_lr_scheduler(optimizer, cfg)
    ema = LoraEMA(params, cfg.ema_decay) if cfg.ema else None
    validator = None
    if held_out:
        validation_data = CaptionedImages(held_out, replace(config.data, center_crop=True, random_flip=False))
        examples = [validation_data.example(i, cfg.seed, 0) for i in range(len(validation_data.items))]
        validator = Validator(examples, model, noise_scheduler, accelerator.device, weight_dtype, cfg.seed)
    # Only modules with trainable weights are prepared: DDP refuses a fully frozen module.
    if config.lora.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    noise_rng = torch.Generator().manual_seed(cfg.seed)
    source = BatchSource(data, config, model)  # buckets, caches, captions, regularisation images

    # --- resume: weights, optimizer, schedule, EMA, every RNG and the data position ---
    step, elapsed_before = 0, 0.0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from)
        if state.extra.get("optimizer", type(optimizer.optimizer).__name__) != type(optimizer.optimizer).__name__:
            raise ConfigError(
                f"train.optimizer: {resume_from} was trained with {state.extra['optimizer']}, this config asks "
                f"for {cfg.optimizer}; resume with the run's own config.toml"
            )
        try:
            if ema is not None:  # the saved average, or (EMA newly turned on) the weights themselves
                set_lora_state(model, state.ema if state.ema is not None else state.lora)
                ema.reset_from_params(int(state.extra.get("ema_steps", 0)) if state.ema is not None else 0)
            set_lora_state(model, state.lora)
            optimizer.load_state_dict(state.optimizer)
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or parameter groups differ from this config's
            raise ConfigError(mismatched_checkpoint(resume_from, out, e)) from e
        lr_scheduler.load_state_dict(state.lr_scheduler)
        ckpt.restore_rng(noise_rng, state.rng)
        step = state.step
        source.load_state(state.extra.get("data") or {"epoch": state.epoch, "batch": state.batch})
        elapsed_before = float(state.extra.get("elapsed_s", 0.0))
        emit(events.Message(f"resumed from {resume_from} at step {step}"))
        discarded = ckpt.discard_after(out, step)
        if discarded:
            emit(events.Message(f"rewound to step {step}: removed the later checkpoints "
                                + ", ".join(p.name for p in discarded), level="warning"))
    elif cfg.resume == "auto":
        emit(events.Message(f"no checkpoint in {out}; starting from step 0"))

    out.mkdir(parents=True, exist_ok=True)
    config.with_overrides({"train.output_dir": str(out), "train.resume": ""}).save(out / "config.toml")
    accelerator.init_trackers("stylelora")
    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, step)
    emit(events.Started(cfg.steps, step, data.num_images, str(accelerator.device), out))
    for note in source.notes:
        emit(events.Message(note))
    averaged = ema.applied if ema is not None else contextlib.nullcontext

    def save_checkpoint_now() -> None:
        folder = ckpt.checkpoint_dir(out, step)
        if resume_from is not None and folder.resolve() == resume_from.resolve():
            return  # no step since resuming from this very folder: it already holds this state
        ema_state = None
        if ema is not None:
            with ema.applied():
                ema_state = lora_state(model)
        ckpt.save_checkpoint(
            folder,
            ckpt.TrainingState(
                step=step,
                epoch=source.epoch,
                batch=source.batch,
                lora=lora_state(model),
                optimizer=optimizer.state_dict(),
                lr_scheduler=lr_scheduler.state_dict(),
                rng=ckpt.capture_rng(noise_rng),
                extra={"optimizer": type(optimizer.optimizer).__name__, "elapsed_s": elapsed,
                       "ema_steps": ema.steps if ema is not None else 0, "data": source.state()},
                ema=ema_state,
            ),
        )
        ckpt.prune_checkpoints(out, cfg.keep_checkpoints)
        emit(events.CheckpointSaved(step, folder))

    # --- the loop: one iteration is one optimizer step of `accumulation` micro-batches ---
    losses_seen: list[float] = []
    started, start_step, stopped = time.perf_counter(), step, False
    elapsed = elapsed_before
    while step < cfg.steps:
        if _stop_requested(stop):
            stopped = True
            break
        step_loss = 0.0
        images = 0
        for _ in range(cfg.gradient_accumulation_steps):
            batch = source.next_batch()  # latents (cached or encoded), text inputs, per-example loss weights
            latents = batch.latents
            with accelerator.accumulate(unet, text_encoder), accelerator.autocast():
                noise = losses.sample_noise(latents.shape, noise_rng, cfg.noise_offset).to(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=noise_rng
                ).to(accelerator.device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_states = batch.encoder_states
                if encoder_states is None:  # the text encoder trains: run it here, with gradients
                    encoder_states = text_encoder(batch.input_ids)[0]
                target = losses.training_target(noise_scheduler, latents, noise, timesteps)
                pred = unet(noisy, timesteps, encoder_states).sample
                weights = batch.loss_weights * losses.min_snr_weights(noise_scheduler, timesteps, cfg.min_snr_gamma)
                loss = (losses.per_example_mse(pred, target) * weights).mean()
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {step + 1}; the last saved checkpoint "
                        "is kept. Lower the learning rate, use fp32 or bf16 instead of fp16, or check "
                        "the data for broken images."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    lr_scheduler.step()
                    if ema is not None:
                        ema.update()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.item() / cfg.gradient_accumulation_steps
            images += len(batch)
        step += 1
        losses_seen.append(step_loss)

        elapsed = elapsed_before + time.perf_counter() - started
        rate = (step - start_step) / (elapsed - elapsed_before) if elapsed > elapsed_before else 0.0
        lr = lr_scheduler.get_last_lr()[0]
        progress = events.Progress(
            step=step,
            total_steps=cfg.steps,
            loss=step_loss,
            lr=lr,
            images_per_s=images * rate,
            elapsed_s=elapsed,
            eta_s=(cfg.steps - step) / rate if rate > 0 else math.inf,
        )
        emit(progress)
        record: dict[str, float] = {}
        if validator is not None and ((cfg.validate_every and step % cfg.validate_every == 0) or step == cfg.steps):
            with averaged():
                record["val_loss"] = validator.loss(accelerator.autocast)
            emit(events.Validation(step, record["val_loss"]))
        if step % cfg.log_every == 0 or step == cfg.steps or record:
            record = {"step": step, "loss": step_loss, "lr": lr, "images_per_s": progress.images_per_s,
                      "seconds": elapsed, **record}
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            accelerator.log({k: v for k, v in record.items() if k in ("loss", "lr", "val_loss")}, step=step)
        if config.sample.every and config.sample.prompts and step % config.sample.every == 0:
            with averaged():
                paths = render_samples(model, config, out, step)
            emit(events.SampleSaved(step, paths, list(config.sample.prompts)))
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_checkpoint_now()

    # --- final save (also after a stop request); the export uses the EMA weights when EMA is on ---
    save_checkpoint_now()
    with averaged():
        paths = export_adapter(model, config, out, step, data.num_images, data.items)
    emit(events.AdapterSaved(step, paths))
    accelerator.end_training()
    if stopped:
        resume_cmd = f"stylelora train {out / 'config.toml'} --resume auto"
        emit(events.Message(f"stopped at step {step} of {cfg.steps}; continue with: {resume_cmd}"))
    emit(events.Finished(step, stopped, out, paths))
    return RunResult(out, step, stopped, paths, losses_seen)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log matches the resumed run.

    A kill can cut the last line short; such a line is dropped too."""
    if not path.is_file():
        return
    from .fileio import write_text

    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))
