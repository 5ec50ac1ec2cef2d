"""train(config, on_event, stop) -> RunResult: the LoRA training loop, read top to bottom.

Under ``accelerate launch`` or ``torchrun`` every process runs ``train``: accelerate wraps the model in
DDP (NCCL on GPUs, gloo on CPUs), each process trains on its share of the batches (``BatchSource``
deals them out), and the main process alone writes the run's files and reports its events.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ..adapters.checkpoint_files import remove_stale
from ..core import events
from ..core.config import Config, foreign_path_errors, next_free_run_dir
from ..core.errors import (
    ConfigError,
    DataError,
    DiskFullError,
    TrainingError,
    check_data,
    continue_run,
    counted,
    setting,
)
from ..core.metrics import METRICS_FILE, MetricsLog
from ..data.batches import BatchSource, TrainingSet
from ..data.captions import with_trigger
from ..data.dataset import CaptionedImages, Item
from ..data.doctor import training_items
from ..families import load_base_model, load_plan
from ..model import losses
from ..model.base import BaseModel, Objective
from ..model.placement import builds_cpu_kernel, prepare_for_training, quantize_scheme
from . import checkpoint as ckpt
from . import optim, precision, trackers
from .artifacts import AdapterSaves, render_samples
from .ema import LoraEMA
from .estimate import Estimate, emit_estimate, estimate
from .failures import (
    RunTracker,
    disk_full_advice,
    is_out_of_memory,
    lost_contact_advice,
    out_of_memory_advice,
    where_to_resume,
)
from .precision import Precision
from .processes import Processes
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
    """The run folder; refuses to overwrite another run unless resuming it, and paths from another system."""
    if errors := foreign_path_errors(config):
        raise ConfigError("\n".join(errors))
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


def _new_accelerator(**kwargs: Any) -> Any:
    """An Accelerator with this run's settings. accelerate keeps its state process-wide, so a second run in
    the same process (the GUI, tests) with another precision or device needs that state reset first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if os.environ.get("WORLD_SIZE", "1") == "1":  # never under a multi-process launcher
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(**kwargs)


def _accelerator(config: Config, out: Path, precision: Precision) -> Any:
    """The run's Accelerator (device, ``precision``, accumulation, the processes of a multi-process launch,
    the tracker of train.log_with), after the checks that fail before any model is loaded: a missing GPU,
    a launch accelerate cannot join, the optimizer."""
    from accelerate.utils import InitProcessGroupKwargs

    cfg = config.train
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    try:
        accelerator = _new_accelerator(
            mixed_precision=precision.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            # without a GPU, "auto" is the CPU; saying so lets accelerate join several CPU processes over gloo
            cpu=cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()),
            log_with=trackers.check(cfg.log_with),
            project_dir=str(out / "logs"),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.process_timeout))],
        )
    except (ValueError, RuntimeError) as e:
        if launched == 1:
            raise
        raise ConfigError(f"train.device: the {launched} processes of this launch could not join ({e}). Start them "
                          "with 'accelerate launch' or 'torchrun' (the README shows how).") from None
    if cfg.device == "cuda" and accelerator.device.type != "cuda":
        raise ConfigError("train.device: 'cuda' was asked for but no CUDA GPU is available")
    if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP"):  # the LoRA is read and saved unsharded
        raise ConfigError(
            f"train.device: this launch uses {accelerator.distributed_type.name}, which stylelora does not support; "
            "launch plain data-parallel processes (accelerate launch --multi_gpu, or an accelerate config with "
            "distributed_type: MULTI_GPU). The README says why and what saves memory instead."
        )
    if accelerator.num_processes != launched:  # never train the same batches twice, each process alone
        raise ConfigError(
            f"train.device: {launched} processes were launched, but accelerate joined {accelerator.num_processes} "
            f"of them on '{accelerator.device.type}'. Launch one process per GPU, or add --set train.device=cpu "
            "to train in several CPU processes."
        )
    optim.check_optimizer(cfg, accelerator.device)
    return accelerator


def _processes(config: Config, accelerator: Any, tracker: RunTracker, out: Path,
               resume_from: Path | None) -> tuple[Processes, Path, Path | None]:
    """The run's processes; every one goes on with the main one's run folder and checkpoint, and only the
    main one reports events (the others keep track of the run for their error messages)."""
    team = Processes.of(accelerator)
    out, resume_from = team.share((out, resume_from))
    tracker.processes = team
    if not team.is_main:
        tracker.mute()
    elif config.train.resume == "auto":
        remove_stale(out)  # leftovers of a killed save: the main process alone deletes
    return team, out, resume_from


def _learning_rate_scale(config: Config, team: Processes, emit: EventHandler) -> float:
    """``train.scale_lr``: the rates times the process count, said aloud; 1 otherwise."""
    cfg = config.train
    if team.count > 1 and cfg.scale_lr:
        emit(events.Message(f"train.scale_lr: learning rates x {team.count} processes "
                            f"(lr {cfg.lr:g} -> {cfg.lr * team.count:g})"))
        return float(team.count)
    return 1.0


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
        emit(events.Message(f"{counted(report.counts['warnings'], 'warning')} about the dataset (its images are used); "
                            f"{check_data(config.data.path)} lists them"))
    items, held_out = split_holdout(items, config.train.validation_images, config.train.seed)
    return TrainingSet.from_config(config, items), held_out


def _base_model(config: Config, model: BaseModel | None, precision: Precision) -> BaseModel:
    """The model named in the config, each frozen component loaded straight into the run's precision (no fp32
    copy of a base that trains in bf16), or ``model`` as passed in."""
    if model is None:
        m = config.model
        model = load_base_model(m.name, m.config, m.prediction_type, m.kind, dtype=precision.weight_dtype)
    model.family.check_model(model, config)  # e.g. clip skip beyond the text encoder's layers
    return model


def _model_notes(config: Config, model: BaseModel, device: torch.device) -> list[events.Message]:
    """What the run learned about its base model: the detected kind and resolution, and a warning when it trains
    far below the size a large model (SDXL, SD2-768-v) was made for."""
    native, resolution, family = model.native_resolution, config.data.resolution, model.family
    notes = [events.Message(f"base model: {family.display(model.kind)}, {model.prediction_type} prediction, "
                            f"{native} px native; training at {resolution} px")]
    scheme = quantize_scheme(config.model.quantize, model, device)
    if config.model.quantize == "auto" and scheme != "none":
        notes.append(events.Message(f"model.quantize=auto: the frozen {family.denoiser_label} and text encoders are "
                                    f"held in {scheme} on this GPU (QLoRA-style); set model.quantize=none to train "
                                    "on the unquantized weights"))
    if builds_cpu_kernel(scheme, device):
        notes.append(events.Message(f"model.quantize={scheme} on a CPU: optimum-quanto first compiles its kernel for "
                                    "4-bit weights (a minute or more, once per install; it needs a C++ compiler)"))
    if family.learns_worse_below_native(model.kind) and resolution < native * 3 // 4:
        preset = family.presets.get(model.kind)
        notes.append(events.Message(
            f"data.resolution {resolution} is far below this model's {native} px: it learns worse at a small "
            f"size; set data.resolution={native}" + (f" (presets/{preset}.toml does)" if preset else ""),
            level="warning"))
    return notes


def _validator(config: Config, held_out: list[Item], model: BaseModel, objective: Objective,
               device: torch.device, weight_dtype: torch.dtype) -> Validator | None:
    """Scores the held-out images (centre crop, no flip) at fixed noise; None when none are held out."""
    if not held_out:
        return None
    seed = config.train.seed
    validation_data = CaptionedImages(held_out, replace(config.data, center_crop=True, random_flip=False))
    examples = [validation_data.example(i, seed, 0) for i in range(len(validation_data.items))]
    return Validator(examples, model, objective, device, weight_dtype, seed, config.data.max_token_length,
                     config.model.clip_skip)


def _prepare(accelerator: Any, model: BaseModel, optimizer: Any) -> tuple[Any, list[Any], Any]:
    """(denoiser, text encoders, optimizer) wrapped by accelerate. Only modules with trainable weights are
    prepared: DDP refuses a fully frozen module. Under several processes, DDP looks for weights without a
    gradient in the text encoders (only there, as it costs a walk of the graph every step): the last
    layers' LoRA never reaches the loss when the states come from an earlier layer (SDXL, clip skip).
    Where every weight does reach it, PyTorch warns once that the search found nothing; that is harmless
    (its static_graph alternative fails with gradient accumulation)."""
    from accelerate.utils import DistributedDataParallelKwargs

    encoders = model.text_encoders
    training = [i for i, encoder in enumerate(encoders) if any(p.requires_grad for p in encoder.parameters())]
    denoiser, optimizer = accelerator.prepare(model.denoiser, optimizer)
    accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    try:
        for i in training:
            encoders[i] = accelerator.prepare_model(encoders[i])
    finally:
        accelerator.ddp_handler = None
    return denoiser, encoders, optimizer


class _Clock:
    """Seconds trained across resumes, and the pace (steps per second) for speed and ETA. The pace is this
    session's once it has one, counted from the end of its first step (which also pays for warming up);
    until then a resumed run goes at its earlier sessions' pace, and a new run at its first step's."""

    def __init__(self, step: int, seconds_before: float) -> None:
        self.start_step, self.before, self.started = step, seconds_before, time.perf_counter()
        self.first: tuple[int, float] | None = None  # (step, time) at the end of this session's first step

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def pace(self, step: int, total: int) -> tuple[float, float, float]:
        """(seconds trained, steps per second, seconds left) at ``step`` of ``total``."""
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        first_step, first_time = self.first
        if step > first_step and now > first_time:
            rate = (step - first_step) / (now - first_time)
        elif self.start_step > 0 and self.before > 0:
            rate = self.start_step / self.before
        else:
            rate = (step - self.start_step) / (now - self.started) if now > self.started else 0.0
        return self.before + now - self.started, rate, (total - step) / rate if rate > 0 else math.inf


def _every(interval: int, step: int) -> bool:
    """Whether ``step`` is one of every ``interval`` steps (0: never)."""
    return interval > 0 and step % interval == 0


class _Due:
    """Which extras of a step are due: validation and the metrics line also at the last step, a
    checkpoint never there (the final save follows the loop), samples only with prompts, an epoch's
    checkpoint and adapter when an epoch ends (``train.save_every_epochs``). The answers are the same in
    every process; only the main one (``main``) validates, logs, renders and saves adapters, and every
    process takes part in a checkpoint (its RNG streams)."""

    def __init__(self, config: Config, team: Processes, total: int, epochs_done: int) -> None:
        self.train, self.sample, self.main = config.train, config.sample, team.is_main
        self.total, self.epochs_done, self.sample_epoch = total, epochs_done, False

    def validation(self, step: int) -> bool:
        return _every(self.train.validate_every, step) or step == self.total

    def metrics(self, step: int) -> bool:
        return _every(self.train.log_every, step) or step == self.total

    def samples(self, step: int) -> bool:
        return bool(self.sample.prompts) and (_every(self.sample.every, step) or self.sample_epoch)

    def checkpoint(self, step: int) -> bool:
        return _every(self.train.save_every, step) and step < self.total

    def epoch_end(self, step: int, epochs_done: int) -> int | None:
        """The epoch that just ended when its adapter is due (not at the last step: the final save follows)."""
        ended = epochs_done > self.epochs_done
        self.epochs_done = epochs_done
        self.sample_epoch = ended and _every(self.sample.every_epochs, epochs_done)  # sample.every_epochs
        due = ended and _every(self.train.save_every_epochs, epochs_done) and step < self.total
        return epochs_done if due else None

    def report(self, step: int) -> bool:
        """Whether the losses are read from the device at ``step``: before anything uses or saves the
        weights (an epoch's save is checked apart)."""
        return self.metrics(step) or self.validation(step) or self.samples(step) or self.checkpoint(step)


@contextlib.contextmanager
def _evaluation_weights(live: ckpt.LiveState) -> Iterator[None]:
    """The weights samples, validation and the adapter use: the EMA average when EMA is on, and a
    schedule-free optimizer's averaged weights."""
    with optim.evaluation_weights(live.optimizer), live.averaged():
        yield


@dataclass
class _Trained:
    """A step whose loss is still on the device: it is read (and the step reported) at the next report."""

    step: int
    loss: torch.Tensor
    lr: float
    images: int  # this process's
    rate: float  # steps per second
    seconds: float
    eta_s: float


def _read_steps(trained: list[_Trained], team: Processes) -> tuple[list[float], list[float]]:
    """The losses (mean over the processes) and images (sum) of ``trained``, in one device-to-host transfer
    and one all-reduce (the loop's only host sync); the first loss that is not finite (in any process, so in
    all alike) stops the run before anything is saved from its weights."""
    if not trained:
        return [], []
    values = torch.stack([t.loss.float() for t in trained]).tolist()
    summed = team.sum(values + [float(t.images) for t in trained])
    losses_read, images = [v / team.count for v in summed[: len(trained)]], summed[len(trained):]
    for t, value in zip(trained, losses_read, strict=True):
        if not math.isfinite(value):
            raise TrainingError(
                f"the loss became {value} at step {t.step}; the last saved checkpoint is kept. Lower the "
                "learning rate, use fp32 or bf16 instead of fp16, or check the data for broken images."
            )
    return losses_read, images


@dataclass
class _AtReport:
    """What the loop does at a report step once the losses are read: validation, the metrics line, samples,
    a checkpoint, an epoch's adapter file, and what a shell asked for ("Sample now", "Save checkpoint
    now"; without sample prompts the first training caption is rendered)."""

    config: Config
    live: ckpt.LiveState
    data: TrainingSet
    due: _Due
    validator: Validator | None
    metrics: MetricsLog | None
    requests: events.Requests
    clock: _Clock
    autocast: Callable[[], Any]
    emit: EventHandler
    total: int
    saves: AdapterSaves | None  # the main process's: each save's adapter file (and its scores)

    def __call__(self, step: int, epoch: int | None, record: dict[str, Any]) -> None:
        config, live, due, emit = self.config, self.live, self.due, self.emit
        if self.validator is not None and due.validation(step):  # only the main process has one
            with _evaluation_weights(live):
                record["val_loss"] = self.validator.loss(self.autocast)
            emit(events.Validation(step, record["val_loss"]))
        if self.metrics is not None and (due.metrics(step) or "val_loss" in record):  # the main process's
            self.metrics.write(record)
        asked = self.requests.take("sample")
        if (due.samples(step) and due.main) or asked:
            prompts = config.sample.prompts or [with_trigger(self.data.items[0].caption, config.data.trigger_word)]
            with _evaluation_weights(live):
                paths = render_samples(live.model, config.with_overrides({"sample.prompts": prompts}),
                                       live.run_dir, step)
            emit(events.SampleSaved(step, paths, prompts))
        asked = self.requests.take("checkpoint") and step < self.total  # the last step saves anyway
        if due.checkpoint(step) or epoch is not None or asked:
            ckpt.snapshot(live, step, self.clock.elapsed(), config.train.keep_checkpoints, emit)
            if self.saves is not None:  # every save leaves an adapter file: an epoch's (kohya's save_every_n_epochs)
                self.saves.save(step, epoch)  # or the step's, which keep_checkpoints never deletes


def _next_batch(source: BatchSource, position: dict[str, int], save: Callable[[], None]) -> Any:
    """The source's next batch. An image deleted or damaged since the run checked its dataset stops the run, saved
    first (``save``) with the data position where this step's batches start: nothing trained is lost."""
    try:
        return source.next_batch()
    except DataError as e:
        source.load_state(position)
        save()
        raise TrainingError(f"the dataset changed while the run trained: {e}. Put the image back as it was when "
                            "the run started, then continue the run") from e


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
    except RuntimeError as e:  # torch.OutOfMemoryError and lost processes' errors are RuntimeErrors
        if tracker.processes.lost_contact(e):
            raise TrainingError(lost_contact_advice(tracker)) from e
        if not is_out_of_memory(e):
            raise
        raise TrainingError(out_of_memory_advice(config, tracker)) from e


def estimate_run(config: Config, model: BaseModel | None = None) -> Estimate:
    """The memory and time ``config`` would take (``stylelora train --estimate``, the app's Estimate
    button): the data is checked and the model prepared as for training; nothing is trained or written. Off a
    GPU, a model with config files (a diffusers folder, a hub id, a single file with ``model.config``) is only
    planned on the meta device: no weight is read, so estimating an SDXL run takes no memory."""
    run_precision = precision.resolve(config)
    # the output checks train makes, too
    accelerator = _accelerator(config, resolve_output_dir(config), run_precision)
    data, _ = _training_data(config, model, lambda _event: None)
    device = accelerator.device
    m = config.model
    plan = load_plan(m.name, m.config, m.prediction_type, m.kind) if model is None and device.type != "cuda" else None
    if plan is not None:
        plan.family.check_model(plan, config)
        prepare_for_training(plan, config, torch.device("meta"), accelerator.mixed_precision)
        return estimate(plan, config, device, data.total_steps(config.train), data.num_images)
    model = _base_model(config, model, run_precision)
    prepare_for_training(model, config, device, accelerator.mixed_precision)
    return estimate(model, config, device, data.total_steps(config.train), data.num_images)


def _train(config: Config, emit: RunTracker, stop: StopSignal, model: BaseModel | None,
           requests: events.Requests) -> RunResult:
    cfg = config.train
    out = resolve_output_dir(config)
    resume_from = ckpt.find_resume(cfg.resume, out)
    run_precision = precision.resolve(config)  # before the model loads: it loads in this precision
    accelerator = _accelerator(config, out, run_precision)
    team, out, resume_from = _processes(config, accelerator, emit, out, resume_from)
    emit(events.Message(run_precision.describe(), level="warning" if run_precision.warning else "info"))
    torch.manual_seed(cfg.seed)
    data, held_out = _training_data(config, model, emit)

    # --- model: LoRA (or LoCon/DoRA) layers in fp32 on a frozen base in the training precision ---
    model = _base_model(config, model, run_precision)
    family = model.family
    objective = family.objective(model, cfg)  # what the denoiser learns (noise, timesteps, target, weights)
    params, weight_dtype = prepare_for_training(model, config, accelerator.device, accelerator.mixed_precision)

    total = data.total_steps(cfg, team.count)  # train.steps, or train.epochs passes over the data

    # --- optimizer, schedule, EMA, validation ---
    lr_scale = _learning_rate_scale(config, team, emit)
    optimizer = optim.build_optimizer(optim.param_groups(model, cfg, lr_scale), cfg, accelerator.device, total)
    lr_scheduler = optim.build_lr_scheduler(optimizer, cfg, total)
    ema = LoraEMA(params, cfg.ema_decay) if cfg.ema else None
    validator = _validator(config, held_out if team.is_main else [], model, objective, accelerator.device,
                           weight_dtype)
    denoiser, text_encoders, optimizer = _prepare(accelerator, model, optimizer)
    team.seed_own_stream(cfg.seed)  # each process its own dropout
    # buckets, caches, captions, regularisation images; this process's share of the batches
    source = BatchSource(data, config, model, team.rank, team.count)
    live = ckpt.LiveState(out, model, optimizer, lr_scheduler, source, ema, team)

    # --- resume: weights, optimizer, schedule, EMA, every process's RNG and the data position ---
    step, seconds_before = ckpt.restore(live, resume_from, cfg, emit)
    metrics = None
    if team.is_main:  # the one writer of the run's files
        out.mkdir(parents=True, exist_ok=True)
        config.with_overrides({"train.output_dir": str(out), "train.resume": ""}).save(out / "config.toml")
        trackers.start(accelerator, config, out)
        metrics = MetricsLog(out / METRICS_FILE, step, accelerator.log)
    effective_batch = cfg.batch_size * team.count * cfg.gradient_accumulation_steps
    log.info("training with %d process(es): effective batch %d", team.count, effective_batch)
    emit(events.Started(total, step, data.num_images, str(accelerator.device), out, team.count, effective_batch))
    emit_estimate(model, config, accelerator.device, total - step, data.num_images, emit)
    notes = _model_notes(config, model, accelerator.device)
    for message in notes + [events.Message(note) for note in source.notes]:
        emit(message)

    # --- the loop: one iteration is one optimizer step of `accumulation` micro-batches in every process ---
    losses_seen: list[float] = []
    unreported: list[_Trained] = []  # steps whose loss is still on the device (read at the next report)
    clock, due, stopped = _Clock(step, seconds_before), _Due(config, team, total, source.epoch), False
    saves = AdapterSaves(config, model, out, data.num_images, data.items, total, lambda: _evaluation_weights(live),
                         emit, metrics) if team.is_main else None
    at_report = _AtReport(config, live, data, due, validator, metrics, requests, clock, accelerator.autocast, emit,
                          total, saves)

    def save_now(step: int, processes: int) -> None:
        """A checkpoint at ``step`` outside the schedule (one process: several would first have to agree)."""
        if processes == 1 and step > 0:
            ckpt.snapshot(live, step, clock.elapsed(), cfg.keep_checkpoints, emit)

    def report() -> events.Progress | None:
        """Progress for each step since the last report; the last one's event."""
        progress = None
        for t, loss, images_done in zip(unreported, *_read_steps(unreported, team), strict=True):
            losses_seen.append(loss)
            progress = events.Progress(t.step, total, loss, t.lr, images_done * t.rate, t.seconds, t.eta_s)
            emit(progress)
        unreported.clear()
        return progress

    while step < total:
        if team.any(_stop_requested(stop)):  # all processes stop after the same step
            stopped = True
            break
        step_loss = torch.zeros((), device=accelerator.device)
        images = 0
        position = source.state()  # where this step's batches start, which a save before it must hold
        for _ in range(cfg.gradient_accumulation_steps):
            # latents (cached or encoded), text, SDXL time ids, loss weights
            batch = _next_batch(source, position, lambda done=step: save_now(done, team.count))
            latents = batch.latents
            with accelerator.accumulate(denoiser, *text_encoders), accelerator.autocast():
                # each example's own noise and timestep, whatever its batch
                noise, timesteps = objective.draw(batch.noise_generators, latents.shape[1:])
                noise = noise.to(latents, non_blocking=True)
                timesteps = timesteps.to(accelerator.device, non_blocking=True)
                noisy = objective.noisy(latents, noise, timesteps)
                text = batch.text
                if text is None:  # a text encoder trains: run them here, with gradients
                    text = family.encode_text(text_encoders, batch.input_ids, config.model.clip_skip,
                                              batch.frozen_text)
                target = objective.target(latents, noise, timesteps)
                pred = family.predict(denoiser, noisy, timesteps, text, batch.time_ids)  # SDXL: + pooled, time ids
                weights = batch.loss_weights * objective.weights(timesteps)
                loss = (losses.per_example_mse(pred, target) * weights).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    lr_scheduler.step()
                    if ema is not None:
                        ema.update()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / cfg.gradient_accumulation_steps  # on the device: no sync per step
            images += len(batch)
        step += 1
        elapsed, rate, eta = clock.pace(step, total)
        lr = lr_scheduler.get_last_lr()[0]
        unreported.append(_Trained(step, step_loss, lr, images, rate, elapsed, eta))
        epoch = due.epoch_end(step, source.epoch)
        if not (due.report(step) or epoch is not None or requests.waiting()):
            continue
        progress = report()  # raises on a loss that is not finite, before anything uses or saves the weights
        record = {"step": step, "loss": losses_seen[-1], "lr": lr, "seconds": elapsed,
                  "images_per_s": progress.images_per_s if progress else 0.0}
        at_report(step, epoch, record)  # validation, metrics, samples, checkpoints, epoch adapters, requests
    report()

    # --- final save (also after a stop request); the export uses the EMA (or schedule-free) average ---
    ckpt.snapshot(live, step, clock.elapsed(), cfg.keep_checkpoints, emit)
    adapters = saves.save(step, final=True) if saves is not None else []
    team.wait()  # the others end with the main one, so a failed export ends the whole launch
    accelerator.end_training()  # also leaves the process group
    if stopped:
        emit(events.Message(f"stopped at step {step} of {total}; continue with: "
                            f"{continue_run(out / 'config.toml', team.count)}"))
    emit(events.Finished(step, stopped, out, adapters))
    return RunResult(out, step, stopped, adapters, losses_seen)
