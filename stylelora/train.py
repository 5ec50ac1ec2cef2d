"""train(config, on_event, stop) -> RunResult: the LoRA training loop, read top to bottom."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import events
from .batches import BatchSource, TrainingSet
from .config import Config
from .doctor import training_items
from .errors import ConfigError, DiskFullError, TrainingError
from .failures import (
    RunTracker,
    disk_full_advice,
    is_out_of_memory,
    mismatched_checkpoint,
    out_of_memory_advice,
    where_to_resume,
)
from .formats import Adapter, ModelLayout, save_diffusers, save_kohya
from .metadata import kohya_metadata
from .models import BaseModel, add_lora, load_base_model, lora_alphas, lora_state, set_lora_state

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
        n = 2
        while (out.with_name(f"{out.name}-{n}") / "config.toml").is_file():
            n += 1
        out = out.with_name(f"{out.name}-{n}")
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
        found = ckpt.list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"train.resume: '{resume}' is not a checkpoint folder (no state.json inside)")
    return path


def export_adapter(
    model: BaseModel, config: Config, out: Path, step: int, num_images: int, items: list | None = None
) -> list[Path]:
    """Write the run's adapter in kohya and diffusers formats, each re-read and verified.

    Alphas are read from the injected peft layers, so LoCon's conv alpha comes out as trained.
    DoRA has no kohya form that loads right everywhere, so a DoRA run writes the diffusers file only.
    """
    metadata = kohya_metadata(config, model, step, num_images, items)
    adapter = Adapter.from_module_alphas(lora_state(model), lora_alphas(model), metadata)
    layout = ModelLayout.of(model)
    paths = []
    if adapter.is_dora:
        log.warning("DoRA adapter: writing the diffusers format only (no kohya file; see stylelora export)")
    else:
        paths.append(save_kohya(out / f"{config.run_name}.safetensors", adapter, layout, config.export.precision))
    paths.append(save_diffusers(out / "diffusers", adapter, layout, config.export.precision))
    return paths


def render_samples(model: BaseModel, config: Config, out: Path, step: int) -> list[Path]:
    from .fileio import atomic_path

    paths = []
    unet_mode = model.unet.training
    model.unet.eval()
    for i, prompt in enumerate(config.sample.prompts):
        image = model.pipeline(
            prompt,
            negative_prompt=config.sample.negative_prompt or None,
            num_inference_steps=config.sample.steps,
            guidance_scale=config.sample.guidance,
            height=config.data.resolution,
            width=config.data.resolution,
            generator=torch.Generator().manual_seed(config.sample.seed + i),
        ).images[0]
        path = out / "samples" / f"step-{step:06d}-{i:02d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    model.unet.train(unet_mode)
    return paths


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
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    emit = on_event
    out = resolve_output_dir(config)
    resume_from = _find_resume(config, out)
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(config),
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        cpu=config.train.device == "cpu",
        log_with="tensorboard",
        project_dir=str(out / "logs"),
    )
    if config.train.device == "cuda" and accelerator.device.type != "cuda":
        raise ConfigError("train.device: 'cuda' was asked for but no CUDA GPU is available")
    torch.manual_seed(config.train.seed)

    # --- model, data, optimizer ---
    # Batch size 1 here: whether an epoch fills a batch depends on folder repeats and regularisation
    # images, which the training set counts (it raises the same "cannot fill one batch" error).
    items, report = training_items(config.data, 1, model=config.model.name,
                                   tokenizer=model.tokenizer if model is not None else None)
    for line in report.skipped_lines():  # one line per unusable image; check-data explains the rest
        emit(events.Message(line))
    if report.counts["warnings"]:
        emit(events.Message(f"{report.counts['warnings']} warnings about the dataset (its images are used); "
                            f"'stylelora check-data {config.data.path}' lists them"))
    data = TrainingSet.from_config(config, items)
    if model is None:
        model = load_base_model(config.model.name, config.model.config, config.model.prediction_type)
    if model.kind == "sdxl":  # the loop feeds no SDXL added conditioning (pooled text, time ids) yet
        raise ConfigError(
            f"model.name: '{config.model.name}' is an SDXL model; this version trains SD1.x/SD2.x only "
            "(SDXL adapters from other trainers can be exported, merged and resized)"
        )
    params = add_lora(model, config.lora)
    unet, vae, text_encoder = model.unet, model.vae, model.text_encoder
    noise_scheduler = DDPMScheduler.from_config(model.pipeline.scheduler.config)
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

    te_lr = config.train.text_encoder_lr or config.train.lr
    unet_params = [p for n, p in unet.named_parameters() if p.requires_grad]
    te_params = [p for n, p in text_encoder.named_parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": config.train.lr}]
    if te_params:
        groups.append({"params": te_params, "lr": te_lr})
    optimizer = torch.optim.AdamW(
        groups,
        betas=(config.train.adam_beta1, config.train.adam_beta2),
        eps=config.train.adam_epsilon,
        weight_decay=config.train.weight_decay,
    )
    lr_scheduler = get_scheduler(
        config.train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.train.lr_warmup_steps,
        num_training_steps=config.train.steps,
    )
    # Only modules with trainable weights are prepared: DDP refuses a fully frozen module.
    if config.lora.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    noise_rng = torch.Generator().manual_seed(config.train.seed)
    source = BatchSource(data, config, model)

    # --- resume ---
    step = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from)
        try:
            set_lora_state(model, state.lora)
            optimizer.load_state_dict(state.optimizer)
        except (RuntimeError, ValueError) as e:  # shapes or parameter groups differ from this config's
            raise ConfigError(mismatched_checkpoint(resume_from, out, e)) from e
        lr_scheduler.load_state_dict(state.lr_scheduler)
        noise_rng.set_state(state.rng["noise"])
        step = state.step
        source.load_state(state.extra.get("data") or {"epoch": state.epoch, "batch": state.batch})
        emit(events.Message(f"resumed from {resume_from} at step {step}"))
    elif config.train.resume == "auto":
        emit(events.Message(f"no checkpoint in {out}; starting from step 0"))

    out.mkdir(parents=True, exist_ok=True)
    config.with_overrides({"train.output_dir": str(out), "train.resume": ""}).save(out / "config.toml")
    accelerator.init_trackers("stylelora")
    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, step)
    emit(events.Started(config.train.steps, step, data.num_images, str(accelerator.device), out))
    for note in source.notes:
        emit(events.Message(note))

    def save_checkpoint_now() -> None:
        folder = ckpt.checkpoint_dir(out, step)
        ckpt.save_checkpoint(
            folder,
            ckpt.TrainingState(
                step=step,
                epoch=source.epoch,
                batch=source.batch,
                lora=lora_state(model),
                optimizer=optimizer.state_dict(),
                lr_scheduler=lr_scheduler.state_dict(),
                rng={"noise": noise_rng.get_state()},
                extra={"data": source.state()},
            ),
        )
        ckpt.prune_checkpoints(out, config.train.keep_checkpoints)
        emit(events.CheckpointSaved(step, folder))

    # --- the loop: one iteration is one optimizer step of `accumulation` micro-batches ---
    losses: list[float] = []
    started, start_step, stopped = time.perf_counter(), step, False
    while step < config.train.steps:
        if _stop_requested(stop):
            stopped = True
            break
        step_loss = 0.0
        images = 0
        for _ in range(config.train.gradient_accumulation_steps):
            batch = source.next_batch()
            latents = batch.latents
            with accelerator.accumulate(unet, text_encoder), accelerator.autocast():
                noise = torch.randn(latents.shape, generator=noise_rng).to(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=noise_rng
                ).to(accelerator.device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_states = batch.encoder_states
                if encoder_states is None:  # the text encoder trains: run it here, with gradients
                    encoder_states = text_encoder(batch.input_ids)[0]
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                pred = unet(noisy, timesteps, encoder_states).sample
                per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                loss = (per_example * batch.loss_weights).mean()  # prior_loss_weight on regularisation images
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {step + 1}; the last saved checkpoint "
                        "is kept. Lower the learning rate, use fp32 or bf16 instead of fp16, or check "
                        "the data for broken images."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.item() / config.train.gradient_accumulation_steps
            images += len(batch)
        step += 1
        losses.append(step_loss)

        elapsed = time.perf_counter() - started
        rate = (step - start_step) / elapsed if elapsed > 0 else 0.0
        lr = lr_scheduler.get_last_lr()[0]
        progress = events.Progress(
            step=step,
            total_steps=config.train.steps,
            loss=step_loss,
            lr=lr,
            images_per_s=images * rate,
            elapsed_s=elapsed,
            eta_s=(config.train.steps - step) / rate if rate > 0 else math.inf,
        )
        emit(progress)
        if step % config.train.log_every == 0 or step == config.train.steps:
            record = {
                "step": step, "loss": step_loss, "lr": lr,
                "images_per_s": progress.images_per_s, "seconds": elapsed,
            }
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            accelerator.log({"loss": step_loss, "lr": lr}, step=step)
        if config.sample.every and config.sample.prompts and step % config.sample.every == 0:
            emit(events.SampleSaved(step, render_samples(model, config, out, step), list(config.sample.prompts)))
        if config.train.save_every and step % config.train.save_every == 0 and step < config.train.steps:
            save_checkpoint_now()

    # --- final save (also after a stop request) ---
    save_checkpoint_now()
    paths = export_adapter(model, config, out, step, data.num_images, data.items)
    emit(events.AdapterSaved(step, paths))
    accelerator.end_training()
    if stopped:
        resume_cmd = f"stylelora train {out / 'config.toml'} --resume auto"
        emit(events.Message(f"stopped at step {step}; continue with: {resume_cmd}"))
    emit(events.Finished(step, stopped, out, paths))
    return RunResult(out, step, stopped, paths, losses)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log matches the resumed run."""
    if not path.is_file():
        return
    from .fileio import write_text

    kept = [
        line for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    write_text(path, "".join(line + "\n" for line in kept))
