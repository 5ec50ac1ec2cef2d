"""train(config, on_event, stop) -> RunResult: the LoRA training loop, read top to bottom."""

from __future__ import annotations

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
from .captions import with_trigger
from .config import Config, next_free_run_dir
from .dataset import CaptionedImages, Item
from .doctor import training_items
from .ema import LoraEMA
from .errors import ConfigError, DiskFullError, TrainingError, check_data, continue_run, setting
from .failures import RunTracker, disk_full_advice, is_out_of_memory, out_of_memory_advice, where_to_resume
from .metrics import MetricsLog
from .models import KIND_NAMES, KIND_PRESETS, BaseModel, load_base_model, prepare_for_training
from .text import encode_text
from .validation import Validator, split_holdout

log = logging.getLogger(__name__)

EventHandler = events.EventHandler
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
                f"train.output_dir: '{out}' already holds a run; continue it with "
                f"{continue_run(out / 'config.toml')}, or give {setting('train.output_dir')} a new folder"
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


def _new_accelerator(**kwargs: Any) -> Any:
    """An Accelerator with this run's settings. accelerate keeps its state process-wide, so a second run in
    the same process (the GUI, tests) with another precision or device needs that state reset first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if os.environ.get("WORLD_SIZE", "1") == "1":  # never under a multi-process launcher
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(**kwargs)


def _accelerator(config: Config, out: Path) -> Any:
    """The run's Accelerator (device, precision, accumulation, TensorBoard under ``logs/``), after the
    checks that fail before any model is loaded: a missing GPU, a multi-process launch, the optimizer."""
    cfg = config.train
    _refuse_multi_process(int(os.environ.get("WORLD_SIZE", "1") or 1))  # before accelerate sets up a process group
    accelerator = _new_accelerator(
        mixed_precision=_mixed_precision(config),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cfg.device == "cpu",
        log_with="tensorboard",
        project_dir=str(out / "logs"),
    )
    if cfg.device == "cuda" and accelerator.device.type != "cuda":
        raise ConfigError("train.device: 'cuda' was asked for but no CUDA GPU is available")
    _refuse_multi_process(accelerator.num_processes)
    optim.check_optimizer(cfg, accelerator.device)
    return accelerator


def _refuse_multi_process(processes: int) -> None:
    if processes > 1:  # said plainly rather than training the same batches on every GPU
        raise ConfigError(
            f"train.device: {processes} processes were launched, but this version trains on "
            "one GPU (or the CPU) per run: the batch source does not shard data across processes yet. "
            "Run 'stylelora train' without 'accelerate launch'."
        )


def _training_data(config: Config, model: BaseModel | None, emit: EventHandler) -> tuple[TrainingSet, list[Item]]:
    """The usable images as the training set, and a seeded few held out for the validation loss."""
    # Batch size 1 here: whether an epoch fills a batch depends on folder repeats and regularisation
    # images, which the training set counts (it raises the same "cannot fill one batch" error).
    items, report = training_items(config.data, 1, model=config.model.name,
                                   tokenizer=model.tokenizer if model is not None else None,
                                   token_limit=model.token_limit if model is not None else None)
    for line in report.skipped_lines():  # one line per unusable image; check-data explains the rest
        emit(events.Message(line))
    if report.counts["warnings"]:
        emit(events.Message(f"{report.counts['warnings']} warnings about the dataset (its images are used); "
                            f"{check_data(config.data.path)} lists them"))
    items, held_out = split_holdout(items, config.train.validation_images, config.train.seed)
    return TrainingSet.from_config(config, items), held_out


def _base_model(config: Config, model: BaseModel | None) -> BaseModel:
    if model is None:
        m = config.model
        model = load_base_model(m.name, m.config, m.prediction_type, m.kind)
    return model


def _model_notes(config: Config, model: BaseModel) -> list[events.Message]:
    """What the run learned about its base model: the detected kind and resolution, and a warning when it
    trains far below the size an SDXL or SD2-768-v model was made for."""
    native, resolution = model.native_resolution, config.data.resolution
    notes = [events.Message(f"base model: {KIND_NAMES[model.kind]}, {model.prediction_type} prediction, "
                            f"{native} px native; training at {resolution} px")]
    if model.kind in ("sdxl", "sd2-v") and resolution < native * 3 // 4:
        notes.append(events.Message(
            f"data.resolution {resolution} is far below this model's {native} px: it learns worse at a small "
            f"size; set data.resolution={native} (presets/{KIND_PRESETS[model.kind]}.toml does)", level="warning"))
    return notes


def _noise_scheduler(config: Config, model: BaseModel) -> Any:
    """The schedule the loop adds noise with; zero-terminal SNR rescales the sampling scheduler too."""
    cfg = config.train
    scheduler = losses.training_scheduler(model.pipeline.scheduler.config, model.prediction_type,
                                          cfg.zero_terminal_snr)
    if cfg.zero_terminal_snr:  # samples must start from pure noise too
        from diffusers import DDIMScheduler

        model.pipeline.scheduler = DDIMScheduler.from_config(
            model.pipeline.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return scheduler


def _validator(config: Config, held_out: list[Item], model: BaseModel, noise_scheduler: Any,
               device: torch.device, weight_dtype: torch.dtype) -> Validator | None:
    """Scores the held-out images (centre crop, no flip) at fixed noise; None when none are held out."""
    if not held_out:
        return None
    seed = config.train.seed
    validation_data = CaptionedImages(held_out, replace(config.data, center_crop=True, random_flip=False))
    examples = [validation_data.example(i, seed, 0) for i in range(len(validation_data.items))]
    return Validator(examples, model, noise_scheduler, device, weight_dtype, seed)


def _prepare(accelerator: Any, model: BaseModel, optimizer: Any) -> tuple[Any, list[Any], Any]:
    """(unet, text encoders, optimizer) wrapped by accelerate. Only modules with trainable weights are
    prepared: DDP refuses a fully frozen module."""
    encoders = model.text_encoders
    training = [i for i, encoder in enumerate(encoders) if any(p.requires_grad for p in encoder.parameters())]
    unet, *prepared, optimizer = accelerator.prepare(model.unet, *(encoders[i] for i in training), optimizer)
    for i, encoder in zip(training, prepared, strict=True):
        encoders[i] = encoder
    return unet, encoders, optimizer


class _Clock:
    """Seconds trained across resumes, and this session's pace (steps per second) for speed and ETA."""

    def __init__(self, step: int, seconds_before: float) -> None:
        self.start_step, self.before, self.started = step, seconds_before, time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def pace(self, step: int, total: int) -> tuple[float, float, float]:
        """(seconds trained, steps per second, seconds left) at ``step`` of ``total``."""
        elapsed = self.elapsed()
        rate = (step - self.start_step) / (elapsed - self.before) if elapsed > self.before else 0.0
        return elapsed, rate, (total - step) / rate if rate > 0 else math.inf


def _every(interval: int, step: int) -> bool:
    """Whether ``step`` is one of every ``interval`` steps (0: never)."""
    return interval > 0 and step % interval == 0


class _Due:
    """Which extras of a step are due: validation and the metrics line also at the last step, a
    checkpoint never there (the final save follows the loop), samples only with prompts."""

    def __init__(self, config: Config) -> None:
        self.train, self.sample = config.train, config.sample

    def validation(self, step: int) -> bool:
        return _every(self.train.validate_every, step) or step == self.train.steps

    def metrics(self, step: int) -> bool:
        return _every(self.train.log_every, step) or step == self.train.steps

    def samples(self, step: int) -> bool:
        return bool(self.sample.prompts) and _every(self.sample.every, step)

    def checkpoint(self, step: int) -> bool:
        return _every(self.train.save_every, step) and step < self.train.steps


def _take_requests(requests: events.Requests, config: Config, data: TrainingSet, live: ckpt.LiveState, step: int,
                   clock: _Clock, emit: EventHandler, done: bool) -> None:
    """Samples and a checkpoint asked for during the run ("Sample now", "Save checkpoint now"); without
    sample prompts the first training caption is rendered. ``done``: this step already saved a checkpoint."""
    if requests.take("sample"):
        prompts = config.sample.prompts or [with_trigger(data.items[0].caption, config.data.trigger_word)]
        sampled = config.with_overrides({"sample.prompts": prompts})
        with live.averaged():
            paths = render_samples(live.model, sampled, live.run_dir, step)
        emit(events.SampleSaved(step, paths, prompts))
    if requests.take("checkpoint") and not done and step < config.train.steps:  # the last step saves anyway
        ckpt.snapshot(live, step, clock.elapsed(), config.train.keep_checkpoints, emit)


def _check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(
            f"the loss became {loss.item()} at step {step}; the last saved checkpoint is kept. Lower the "
            "learning rate, use fp32 or bf16 instead of fp16, or check the data for broken images."
        )


def train(
    config: Config,
    on_event: EventHandler | None = None,
    stop: StopSignal = None,
    model: BaseModel | None = None,
    requests: events.Requests | None = None,
) -> RunResult:
    """Train a LoRA as ``config`` says; events go to ``on_event``; ``stop`` ends it after a step, and
    ``requests`` ("sample", "checkpoint") are taken at the end of a step.

    ``model`` lets a caller pass an already loaded base model (it gets the LoRA layers injected);
    by default the model named in the config is loaded. Running out of memory or disk space, or a
    diverging loss, raises :class:`TrainingError` saying which checkpoint is intact and what to do.
    """
    tracker = RunTracker(on_event)
    try:
        return _train(config, tracker, stop, model, requests or events.Requests())
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


def _train(config: Config, emit: EventHandler, stop: StopSignal, model: BaseModel | None,
           requests: events.Requests) -> RunResult:
    cfg = config.train
    out = resolve_output_dir(config)
    resume_from = ckpt.find_resume(cfg.resume, out)
    accelerator = _accelerator(config, out)
    torch.manual_seed(cfg.seed)
    data, held_out = _training_data(config, model, emit)

    # --- model: LoRA (or LoCon/DoRA) layers in fp32 on a frozen base in the training precision ---
    model = _base_model(config, model)
    noise_scheduler = _noise_scheduler(config, model)
    params, weight_dtype = prepare_for_training(model, config, accelerator.device, accelerator.mixed_precision)

    # --- optimizer, schedule, EMA, validation ---
    optimizer = optim.build_optimizer(optim.param_groups(model, cfg), cfg, accelerator.device)
    lr_scheduler = optim.build_lr_scheduler(optimizer, cfg)
    ema = LoraEMA(params, cfg.ema_decay) if cfg.ema else None
    validator = _validator(config, held_out, model, noise_scheduler, accelerator.device, weight_dtype)
    unet, text_encoders, optimizer = _prepare(accelerator, model, optimizer)
    noise_rng = torch.Generator().manual_seed(cfg.seed)
    source = BatchSource(data, config, model)  # buckets, caches, captions, regularisation images
    live = ckpt.LiveState(out, model, optimizer, lr_scheduler, noise_rng, source, ema)

    # --- resume: weights, optimizer, schedule, EMA, every RNG and the data position ---
    step, seconds_before = ckpt.restore(live, resume_from, cfg, emit)
    out.mkdir(parents=True, exist_ok=True)
    config.with_overrides({"train.output_dir": str(out), "train.resume": ""}).save(out / "config.toml")
    accelerator.init_trackers("stylelora")
    metrics = MetricsLog(out / "metrics.jsonl", step, accelerator.log)
    emit(events.Started(cfg.steps, step, data.num_images, str(accelerator.device), out))
    for message in _model_notes(config, model) + [events.Message(note) for note in source.notes]:
        emit(message)

    # --- the loop: one iteration is one optimizer step of `accumulation` micro-batches ---
    losses_seen: list[float] = []
    clock, due, stopped = _Clock(step, seconds_before), _Due(config), False
    while step < cfg.steps:
        if _stop_requested(stop):
            stopped = True
            break
        step_loss = 0.0
        images = 0
        for _ in range(cfg.gradient_accumulation_steps):
            batch = source.next_batch()  # latents (cached or encoded), text, SDXL time ids, loss weights
            latents = batch.latents
            with accelerator.accumulate(unet, *text_encoders), accelerator.autocast():
                noise = losses.sample_noise(latents.shape, noise_rng, cfg.noise_offset).to(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=noise_rng
                ).to(accelerator.device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                text = batch.text
                if text is None:  # a text encoder trains: run them here, with gradients
                    text = encode_text(text_encoders, batch.input_ids)
                target = losses.training_target(noise_scheduler, latents, noise, timesteps)
                conditions = text.added_conditions(batch.time_ids)  # SDXL: pooled text and time ids
                pred = unet(noisy, timesteps, text.states, added_cond_kwargs=conditions).sample
                weights = batch.loss_weights * losses.min_snr_weights(noise_scheduler, timesteps, cfg.min_snr_gamma)
                loss = (losses.per_example_mse(pred, target) * weights).mean()
                _check_finite(loss, step + 1)
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

        elapsed, rate, eta = clock.pace(step, cfg.steps)
        lr = lr_scheduler.get_last_lr()[0]
        emit(events.Progress(step, cfg.steps, step_loss, lr, images * rate, elapsed, eta))
        record = {"step": step, "loss": step_loss, "lr": lr, "images_per_s": images * rate, "seconds": elapsed}
        if validator is not None and due.validation(step):
            with live.averaged():
                record["val_loss"] = validator.loss(accelerator.autocast)
            emit(events.Validation(step, record["val_loss"]))
        if due.metrics(step) or "val_loss" in record:
            metrics.write(record)
        if due.samples(step):
            with live.averaged():
                paths = render_samples(model, config, out, step)
            emit(events.SampleSaved(step, paths, list(config.sample.prompts)))
        if due.checkpoint(step):
            ckpt.snapshot(live, step, clock.elapsed(), cfg.keep_checkpoints, emit)
        _take_requests(requests, config, data, live, step, clock, emit, done=due.checkpoint(step))

    # --- final save (also after a stop request); the export uses the EMA weights when EMA is on ---
    ckpt.snapshot(live, step, clock.elapsed(), cfg.keep_checkpoints, emit)
    with live.averaged():
        paths = export_adapter(model, config, out, step, data.num_images, data.items)
    emit(events.AdapterSaved(step, paths))
    accelerator.end_training()
    if stopped:
        advice = continue_run(out / "config.toml")
        emit(events.Message(f"stopped at step {step} of {cfg.steps}; continue with: {advice}"))
    emit(events.Finished(step, stopped, out, paths))
    return RunResult(out, step, stopped, paths, losses_seen)
