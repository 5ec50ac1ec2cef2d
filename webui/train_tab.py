"""Train tab: the config form, presets, TOML in and out, Start/Stop, progress, loss plot, samples, log.

The training runs in the context's TrainingJob (a worker thread). ``train`` starts it and then
follows its events, like ``watch``, which the page runs on load: a reopened browser shows the run.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import pandas as pd

from stylelora import events
from stylelora.config import Config
from stylelora.jobs import Snapshot
from stylelora.models import KIND_NAMES, KIND_PRESETS, peek_model

from .context import Context, user_errors
from .form import ConfigForm

LOG_LINES = 300
DEFAULT_PRESET = "cpu-demo"  # what the form shows first: a run that finishes in seconds on a CPU


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _log_line(e: events.Event) -> str | None:
    if isinstance(e, events.Started):
        return (f"started: {e.num_images} images on {e.device}, steps {e.start_step}->{e.total_steps}, "
                f"run folder {e.output_dir}")
    if isinstance(e, events.Message):
        return f"{e.level}: {e.text}"
    if isinstance(e, events.SampleSaved):
        return f"step {e.step}: {len(e.paths)} sample(s) saved"
    if isinstance(e, events.CheckpointSaved):
        return f"step {e.step}: checkpoint {e.path}"
    if isinstance(e, events.AdapterSaved):
        return f"step {e.step}: adapter " + ", ".join(str(p) for p in e.paths)
    if isinstance(e, events.Finished):
        return f"{'stopped' if e.stopped_early else 'finished'} at step {e.step}: {e.output_dir}"
    return None


E = TypeVar("E", bound=events.Event)


def _first(snap: Snapshot, kind: type[E]) -> E | None:
    return next((e for e in snap.events if isinstance(e, kind)), None)


def _last(snap: Snapshot, kind: type[E]) -> E | None:
    return next((e for e in reversed(snap.events) if isinstance(e, kind)), None)


def _position(snap: Snapshot) -> tuple[int, int]:
    """(step, total steps) of the job: from its last progress, else from its start, else (0, 0)."""
    last, started = _last(snap, events.Progress), _first(snap, events.Started)
    if last:
        return last.step, last.total_steps
    return (started.start_step, started.total_steps) if started else (0, 0)


def _status_text(snap: Snapshot) -> str:
    last = _last(snap, events.Progress)
    if snap.status == "idle":
        text = "no training yet: pick a preset or fill the form, then Start"
    elif last:
        eta = _clock(last.eta_s) if snap.status == "running" else "0:00"
        text = (f"step {last.step}/{last.total_steps} · loss {last.loss:.4f} · {last.images_per_s:.2f} images/s · "
                f"elapsed {_clock(last.elapsed_s)} · ETA {eta}")
    else:
        text = "loading the model and data…" if snap.status == "running" else ""
    return text + (f" — {snap.error}" if snap.error else "")


def _log(snap: Snapshot) -> list[str]:
    """The last LOG_LINES lines of the run log."""
    return [line for e in snap.events if (line := _log_line(e))][-LOG_LINES:]


def render(snap: Snapshot) -> tuple[str, pd.DataFrame, list[tuple[str, str]], str]:
    """(progress HTML, loss table, samples, log) of a job snapshot."""
    step, total = _position(snap)
    pct = 100.0 * step / total if total else 0.0
    progress_html = (
        f'<div id="train-progress" data-status="{snap.status}" data-step="{step}">'
        f'<div style="display:flex;justify-content:space-between"><b>{snap.status}</b>'
        f'<span>{html.escape(_status_text(snap))}</span></div>'
        f'<div style="background:var(--neutral-200,#ddd);border-radius:4px;height:12px;margin-top:4px">'
        f'<div style="width:{pct:.1f}%;height:12px;border-radius:4px;background:var(--color-accent,#f97316)">'
        f"</div></div></div>"
    )
    progress = [e for e in snap.events if isinstance(e, events.Progress)]
    losses = pd.DataFrame({"step": [p.step for p in progress], "loss": [p.loss for p in progress]})
    samples = [(str(path), f"step {e.step}: {prompt}") for e in snap.events if isinstance(e, events.SampleSaved)
               for path, prompt in zip(e.paths, e.prompts, strict=False)]
    return progress_html, losses, samples[::-1], "\n".join(_log(snap))


def summary(snap: Snapshot) -> dict[str, Any]:
    """The job as plain JSON (what the ``train_toml`` API streams)."""
    last, started, finished = _last(snap, events.Progress), _first(snap, events.Started), _first(snap, events.Finished)
    return {
        "status": snap.status,
        "step": last.step if last else 0,
        "total_steps": _position(snap)[1],
        "loss": last.loss if last else None,
        "output_dir": str(started.output_dir) if started else "",
        "adapters": [str(p) for p in finished.adapter_paths] if finished else [],
        "error": snap.error,
        "log": _log(snap),
    }


def follow(ctx: Context, run_id: int | None = None, interval: float = 0.5):
    """Yield renders of the job until its run ends (or is replaced); at most one per ``interval``."""
    snap = ctx.job.snapshot()
    run_id = snap.run_id if run_id is None else run_id
    yield render(snap)
    seen = len(snap.events)
    while snap.status == "running" and snap.run_id == run_id:
        time.sleep(interval)  # batch the events of fast steps into one update
        snap = ctx.job.wait(seen, run_id, timeout=10.0)
        if len(snap.events) != seen or snap.status != "running":
            seen = len(snap.events)
            yield render(snap)


def build(ctx: Context) -> dict[str, Any]:
    ws = ctx.workspace

    def preset_config(name: str) -> Config:
        return Config.load(ctx.presets / f"{Path(name).name}.toml")

    initial = preset_config(DEFAULT_PRESET) if DEFAULT_PRESET in ctx.preset_names() else Config()

    def detect(model_name: str | None, resolution: float | None):
        """The model's detected kind and native resolution under the form, and the offer of its preset."""
        facts = peek_model(model_name) if model_name else None
        if facts is None:
            return "Model: its kind and resolution are known once it loads.", gr.update(visible=False)
        text = f"Model: **{facts.describe()}**"
        if resolution and int(resolution) < facts.native_resolution * 3 // 4:
            text += f"; data.resolution {int(resolution)} is far below it"
        preset = KIND_PRESETS.get(facts.kind)
        if preset not in ctx.preset_names():
            return text, gr.update(visible=False)
        text += f". The {preset} preset is made for it"
        return text, gr.update(visible=True, value=f"Use the {KIND_NAMES[facts.kind]} preset ({preset})")

    with gr.Tab("Train", id="train"):
        with gr.Row(equal_height=True):
            preset = gr.Dropdown(ctx.preset_names(), value=DEFAULT_PRESET, label="Preset", scale=3)
            load_preset_btn = gr.Button("Load preset", scale=1)
            toml_in = gr.UploadButton("Load a TOML…", file_types=[".toml"], type="filepath", scale=1)
            save_btn = gr.Button("Save as TOML", scale=1)
        toml_out = gr.File(label="Config", interactive=False, visible=False)
        form = ConfigForm(initial, ctx.dataset_choices())
        shown_facts, offer = detect(initial.model.name, initial.data.resolution)
        with gr.Row(equal_height=True):
            model_facts = gr.Markdown(shown_facts, elem_id="model-facts")
            kind_preset_btn = gr.Button(offer.get("value", "Use the preset for this model"), elem_id="kind-preset",
                                        visible=offer.get("visible", False), scale=0)
        with gr.Row():
            start_btn = gr.Button("Start training", variant="primary", elem_id="start-training")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-training")
        progress = gr.HTML(elem_id="train-status")
        with gr.Row():
            plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=260, label="Loss")
            samples = gr.Gallery(label="Samples", columns=3, height=260)
        log = gr.Textbox(label="Run log", lines=8, max_lines=16, autoscroll=True, interactive=False)

    @user_errors
    def load_preset(name: str) -> list[Any]:
        return _shown(preset_config(name))

    def _shown(config: Config) -> list[Any]:
        values = form.values(config)
        i = form.names.index("data.path")
        values[i] = ws.display(values[i]) if Path(values[i]).is_absolute() else values[i]
        return values

    @user_errors
    def load_toml(path: str | None) -> list[Any]:
        if not path:
            return [gr.update() for _ in form.names]
        return _shown(Config.load(path))

    @user_errors
    def save_toml(*values: Any):
        config = form.to_config(list(values))
        # Saved configs live in outputs/configs/ (the app writes nowhere else), named after the dataset.
        path = ws.outputs / "configs" / f"{Path(config.data.path).name or 'config'}.toml"
        config.save(path)
        return gr.update(value=str(path), visible=True)

    @user_errors
    def train(*values: Any):
        run_id = ctx.job.start(ws.run_config(form.to_config(list(values))))
        yield from follow(ctx, run_id)

    @user_errors
    def train_toml(toml_text: str) -> Iterator[dict]:
        """Train the config given as TOML text; yields {status, step, total_steps, loss, output_dir, log}."""
        run_id = ctx.job.start(ws.run_config(Config.from_toml(toml_text, "config")))
        for _ in follow(ctx, run_id):
            yield summary(ctx.job.snapshot())

    def stop() -> str:
        return "stopping after the current step" if ctx.job.stop() else "no training is running"

    @user_errors
    def use_kind_preset(model_name: str, data_path: str) -> list[Any]:
        """The preset made for the chosen model's kind, keeping the chosen model and dataset."""
        facts = peek_model(model_name)
        if facts is None or facts.kind not in KIND_PRESETS:
            raise gr.Error(f"no preset for {model_name}", print_exception=False)
        config = preset_config(KIND_PRESETS[facts.kind]).with_overrides({"model.name": model_name})
        values = _shown(config)
        values[form.names.index("data.path")] = data_path
        return values

    outputs = [progress, plot, samples, log]
    load_preset_btn.click(load_preset, preset, form.components, api_name="load_preset")
    toml_in.upload(load_toml, toml_in, form.components, api_name="load_toml")
    save_btn.click(save_toml, form.components, toml_out, api_name="save_toml")
    start_btn.click(train, form.components, outputs, api_name="train", concurrency_limit=None)
    stop_btn.click(stop, None, log, api_name="stop", concurrency_limit=None)
    model_name, resolution = form.widgets["model.name"], form.widgets["data.resolution"]
    model_name.change(detect, [model_name, resolution], [model_facts, kind_preset_btn], api_name="model_facts")
    resolution.change(detect, [model_name, resolution], [model_facts, kind_preset_btn], api_name=False)
    kind_preset_btn.click(use_kind_preset, [model_name, form.widgets["data.path"]], form.components,
                          api_name="use_kind_preset")
    return {"form": form, "outputs": outputs, "follow": lambda: (yield from follow(ctx)), "train_toml": train_toml}
