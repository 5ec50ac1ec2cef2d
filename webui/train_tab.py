"""Train tab: the config form, presets, TOML in and out, Start/Stop, a queue (and sweeps), progress, loss plot,
samples, log, the runs under outputs/ (continue one, train it again into a new folder, compare runs) and the
evaluation of the picked run (``eval_panel``).

The training runs in the context's TrainingJob (a worker thread; the queue lives there too). Starting
only starts; the page then follows the job's events (``TrainingJob.follow``), as ``watch`` does when
the page loads: a reopened browser shows the run, and the form shows that run's settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from stylelora.core import events
from stylelora.core.config import Config
from stylelora.core.errors import counted
from stylelora.families import family_of, peek_model
from stylelora.services import kohya_import, kohya_keys
from stylelora.services.launch import runner_for
from stylelora.training.loop import estimate_run

from . import eval_panel
from .context import Context, Failed, errors_on_page, user_errors
from .form import ConfigForm
from .progress import QUEUE_HEADERS, first_event, queue_choices, queue_rows, render, summary
from .words import AGAIN_BUTTON, CONTINUE_BUTTON, gui_words

DEFAULT_PRESET = "cpu-demo"  # what the form shows first: a run that finishes in seconds on a CPU


def build(ctx: Context) -> dict[str, Any]:
    ws, job = ctx.workspace, ctx.job

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
        preset = facts.preset
        if preset not in ctx.preset_names():
            return text, gr.update(visible=False)
        text += f". The {preset} preset is made for it"
        return text, gr.update(visible=True, value=f"Use the {facts.display} preset ({preset})")

    def family_for(model_name: str | None) -> Any:
        """The model family of ``model_name`` as its configs tell before loading (None when they cannot)."""
        facts = peek_model(model_name) if model_name else None
        return family_of(facts.kind) if facts is not None else None

    def fields_for(model_name: str | None) -> list[Any]:
        """The form shows the fields the chosen model's family uses."""
        return form.fit_to(family_for(model_name))

    with gr.Tab("Train", id="train") as tab:
        with gr.Row(equal_height=True):
            preset = gr.Dropdown(ctx.preset_names(), value=DEFAULT_PRESET, label="Preset", scale=3)
            load_preset_btn = gr.Button("Load preset", scale=1)
            toml_in = gr.UploadButton("Load a TOML…", file_types=[".toml", ".json"], type="filepath", scale=1,
                                      elem_id="load-toml")
            save_btn = gr.Button("Save as TOML", scale=1)
        toml_out = gr.File(label="Config", interactive=False, visible=False, elem_id="saved-config")
        import_notes = gr.Markdown(elem_id="import-notes")
        form = ConfigForm(initial, ctx.dataset_choices())
        form.show_only(family_for(initial.model.name))
        shown_facts, offer = detect(initial.model.name, initial.data.resolution)
        with gr.Row(equal_height=True):
            model_facts = gr.Markdown(shown_facts, elem_id="model-facts")
            kind_preset_btn = gr.Button(offer.get("value", "Use the preset for this model"), elem_id="kind-preset",
                                        visible=offer.get("visible", False), scale=0)
        with gr.Row():
            # Several GPUs: the run goes through accelerate launch, one process per GPU (launch.ProcessRunner)
            gpus = gr.Dropdown(list(range(1, max(ctx.gpus, 1) + 1)), value=1, label="GPUs", elem_id="train-gpus",
                               visible=ctx.gpus > 1, scale=1,
                               info="one process per GPU (accelerate launch); the batch size is per GPU")
            estimate_btn = gr.Button("Estimate memory and time", elem_id="estimate", scale=2)
            start_btn = gr.Button("Start training", variant="primary", elem_id="start-training", scale=3)
            queue_btn = gr.Button("Add to queue", elem_id="add-to-queue", scale=2)
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-training", scale=1)
        estimate_out = gr.Markdown(elem_id="estimate-result")
        with gr.Row():
            sample_btn = gr.Button("Sample now", size="sm", elem_id="sample-now")
            checkpoint_btn = gr.Button("Save checkpoint now", size="sm", elem_id="checkpoint-now")
            board_btn = gr.Button("Open TensorBoard", size="sm", elem_id="open-tensorboard")
        notice = gr.Markdown(elem_id="train-notice")
        progress = gr.HTML(elem_id="train-status")
        with gr.Row():
            plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=260, label="Loss")
            samples = gr.Gallery(label="Samples", columns=3, height=260, elem_id="samples")
        log = gr.Textbox(label="Run log", lines=8, max_lines=16, autoscroll=True, interactive=False, elem_id="run-log")
        with gr.Accordion("Queue", open=True, elem_id="queue"):
            queue_table = gr.Dataframe(headers=QUEUE_HEADERS, value=queue_rows(job.queued()), interactive=False,
                                       wrap=True, elem_id="queue-table")
            queue_item = gr.Dropdown(label="Queued run", info="Pick one to move or cancel", elem_id="queue-item",
                                     allow_custom_value=True)  # the API names any id; the job checks it
            with gr.Row():
                up_btn = gr.Button("Move up", size="sm", elem_id="queue-up")
                down_btn = gr.Button("Move down", size="sm", elem_id="queue-down")
                cancel_btn = gr.Button("Cancel it", size="sm", variant="stop", elem_id="queue-cancel")
                queue_list_btn = gr.Button("Refresh", size="sm")
            sweep_queued = eval_panel.sweep_controls(ctx, form, notice)
        with gr.Accordion("Runs", open=True, elem_id="runs"):
            run_pick = gr.Dropdown(ctx.run_choices(), label="Run", elem_id="run-pick", allow_custom_value=True,
                                   info="Run folders under outputs/, newest first; the one shown above is picked")
            with gr.Row():
                settings_btn = gr.Button("Load its settings", size="sm", elem_id="run-settings")
                continue_btn = gr.Button(CONTINUE_BUTTON, size="sm", elem_id="run-continue")
                again_btn = gr.Button(AGAIN_BUTTON, size="sm", elem_id="run-again")
            eval_panel.compare_controls(ctx)
        eval_panel.build(ctx, run_pick)  # scores of the run picked under Runs

    # --- the form -------------------------------------------------------------------------------------
    def shown(config: Config, *, as_run: bool = False) -> list[Any]:
        """The form's values for ``config``; ``as_run``: a run's config, shown as settings for a new run
        (its run folder and resume cleared: the status and the runs list say where it ran)."""
        if as_run:
            config = config.with_overrides({"train.output_dir": "", "train.resume": ""})
        values = form.values(config)
        i = form.names.index("data.path")
        values[i] = ws.display(values[i]) if Path(values[i]).is_absolute() else values[i]
        return values

    @user_errors
    def load_preset(name: str) -> list[Any]:
        return shown(preset_config(name))

    @user_errors
    def load_toml(path: str | None) -> list[Any]:
        """A stylelora TOML, or a kohya_ss JSON / sd-scripts TOML converted as ``stylelora import-kohya`` does."""
        if not path:
            return [gr.update() for _ in form.names]
        if kohya_keys.is_kohya_file(path):
            return shown(ws.adopt(kohya_import.import_kohya(path).config)[0])  # runs go under outputs/
        return shown(Config.load(path))

    @user_errors
    def import_report(path: str | None) -> str:
        """What a kohya config's import left out and why (shown under the buttons); '' for our own TOML."""
        if not path or not kohya_keys.is_kohya_file(path):
            return ""
        report = kohya_import.import_kohya(path)
        lines = [f"**Imported a kohya config**: {counted(len(report.mapped), 'setting')}; check the dataset and "
                 "model paths."]
        lines += [f"- not imported: `{key}` ({reason})" for key, _, reason in report.unsupported]
        lines += [f"- check: {note}" for note in report.notes + [gui_words(n) for n in ws.adopt(report.config)[1]]]
        return "\n".join(lines)

    @user_errors
    def estimate(**values: Any) -> str:
        """The memory and time the form's run would take, and what to change when it will not fit."""
        result = estimate_run(ws.run_config(form.to_config(values)))
        return result.summary() + "".join(f"\n- {advice}" for advice in result.advice)

    @user_errors
    def save_toml(**values: Any):
        config = form.to_config(values)
        # Saved configs live in outputs/configs/ (the app writes nowhere else), named after the dataset.
        path = ws.outputs / "configs" / f"{Path(config.data.path).name or 'config'}.toml"
        config.save(path)
        return gr.update(value=str(path), visible=True)

    def running_config() -> list[Any]:
        """On page load: the settings of the run the status shows (else the form as it is)."""
        if job.config is None:
            return [gr.update() for _ in form.names]
        return shown(job.config, as_run=True)

    # --- starting, following, stopping ---------------------------------------------------------------
    def started(run_id: int) -> str:
        config = job.config
        where = ws.display(config.output_dir) if config is not None else "?"
        return f"started run {run_id} in `{where}`"

    # A refused start shows why on the notice line (not the line's last answer under an "Error" badge).
    refused = Failed("**Not started**: {}", markdown=True)

    @errors_on_page(refused)
    def start(gpus: Any = 1, **values: Any) -> str:
        """Start training the form's config on ``gpus`` GPUs (the page then follows it)."""
        return started(job.start(form.to_config(values), runner=runner_for(int(gpus or 1), ctx.gpus)))

    @errors_on_page(Failed("**Not queued**: {}", markdown=True), gr.update(), gr.update())
    def enqueue(gpus: Any = 1, **values: Any):
        if int(gpus or 1) > 1:  # a queued run trains in the app's process: one GPU
            raise gr.Error("queued runs train on one GPU: set GPUs to 1 to queue this run, or press Start to "
                           f"train it on {int(gpus)} GPUs now", print_exception=False)
        item = job.enqueue(form.to_config(values))
        return f"added run #{item} to the queue", *queue_outputs()

    @errors_on_page(refused)
    def continue_run(run: str | None) -> str:
        return started(job.start(ws.continue_config(run or "")))

    @errors_on_page(refused)
    def train_again(run: str | None) -> str:
        return started(job.start(ws.again_config(run or "")))

    def follow_job() -> Iterator[tuple[Any, ...]]:
        """Renders of the current run, then of each queued run that starts after it, until the job rests;
        the queue table and the runs list go along."""
        picked = None  # the run the runs list picked for this page: each run once, when first seen
        for snap in job.follow(across_queue=True):
            runs = gr.update(choices=ctx.run_choices())
            started = first_event(snap, events.Started)
            # the run shown above is the one picked under Runs (its Evaluation follows it): when the page first
            # sees it (a reopened page, the queue's next run) and when it ends; in between the user picks freely
            if started is not None and (snap.status != "running" or picked != snap.run_id):
                runs = gr.update(choices=runs["choices"], value=ws.display(started.output_dir))
                picked = snap.run_id
            notice = "" if snap.status != "running" else gr.update()  # "stopping…" and the like end with the run
            yield *render(snap, ws.display), queue_rows(snap.queue, snap), runs, notice

    @user_errors
    def train_toml(toml_text: str, gpus: int = 1) -> Iterator[dict]:
        """Train the config given as TOML text on ``gpus`` GPUs; yields {status, step, total_steps, loss,
        output_dir, log}."""
        run_id = job.start(Config.from_toml(toml_text, "config"), runner=runner_for(int(gpus), ctx.gpus))
        for snap in job.follow(run_id):
            yield summary(snap)

    def stop() -> str:
        if job.stop():
            return "stopping after the current step" + (" (the queue goes on with the next run)" if job.queued()
                                                        else "")
        gr.Warning("no training is running")
        return "no training is running"

    def ask(kind: str) -> str:
        if not job.request(kind):
            gr.Warning("no training is running")
            return "no training is running"
        return ("samples requested: they appear after the current step" if kind == "sample"
                else "checkpoint requested: it is saved after the current step")

    @user_errors
    def tensorboard() -> str:
        if job.config is None:
            raise gr.Error("no run yet: start a training first", print_exception=False)
        url = ctx.tensorboard.open(job.config.output_dir / "logs")
        return f"TensorBoard of `{ws.display(job.config.output_dir)}`: [{url}]({url})"

    # --- the queue and the runs ----------------------------------------------------------------------
    def queue_outputs(current: Any = None) -> tuple[Any, Any]:
        snap = job.snapshot()
        return queue_rows(snap.queue, snap), queue_choices(snap.queue, current)

    def queue_number(item: Any) -> int:
        """The queued run picked (its number; the API may send any value)."""
        if item is None or (isinstance(item, str) and not item.strip()):
            raise gr.Error("pick a queued run first", print_exception=False)
        try:
            return int(str(item).strip().removeprefix("#"))
        except ValueError:
            raise gr.Error(f"Queued run: '{item}' is not a number in the queue; pick one from the list",
                           print_exception=False) from None

    @user_errors
    def move(item: Any, offset: int):
        job.move(queue_number(item), offset)
        return queue_outputs(queue_number(item))

    @user_errors
    def cancel(item: Any):
        gone = job.cancel(queue_number(item))
        return f"cancelled run #{gone.id} ({gone.describe()})", *queue_outputs()

    def queue_list() -> pd.DataFrame:
        snap = job.snapshot()
        return queue_rows(snap.queue, snap)

    def runs(current: str | None):
        """The runs list refreshed; the pick stays (as it is now, not as this event saw it: a reopened page's
        follower picks the running run meanwhile) unless its run is gone."""
        choices = ctx.run_choices()
        if current in choices:
            return gr.update(choices=choices)
        return gr.update(choices=choices, value=choices[0] if choices else None)

    @user_errors
    def use_kind_preset(model_name: str, data_path: str) -> list[Any]:
        """The preset made for the chosen model's kind, keeping the chosen model and dataset."""
        facts = peek_model(model_name)
        if facts is None or facts.preset is None:
            raise gr.Error(f"no preset for {model_name}", print_exception=False)
        config = preset_config(facts.preset).with_overrides({"model.name": model_name})
        values = shown(config)
        values[form.names.index("data.path")] = data_path
        return values

    @user_errors
    def run_settings(run: str | None) -> list[Any]:
        return shown(ws.settings_of(run or ""), as_run=True)

    # --- wiring --------------------------------------------------------------------------------------
    outputs = [progress, plot, samples, log, queue_table, run_pick, notice]
    fields = form.by_parameter  # named API parameters (train_steps, lora_rank, ...), not param_0..param_N
    # A handler that fills the form shows its progress and errors on the notice line, not over every field.
    load_preset_btn.click(load_preset, preset, form.components, api_name="load_preset", show_progress_on=notice)
    toml_in.upload(load_toml, toml_in, form.components, api_name="load_toml", show_progress_on=notice).then(
        import_report, toml_in, import_notes, api_name="import_report")
    estimate_btn.click(estimate, inputs_kwargs=fields, outputs=estimate_out, api_name="estimate")
    save_btn.click(save_toml, inputs_kwargs=fields, outputs=toml_out, api_name="save_toml")
    # Starting is its own event, so a refused start marks only the notice line, not the plot and log.
    start_btn.click(start, inputs_kwargs={**fields, "gpus": gpus}, outputs=notice, api_name="train",
                    concurrency_limit=None).success(
        follow_job, None, outputs, api_name=False, concurrency_limit=None)
    queue_btn.click(enqueue, inputs_kwargs={**fields, "gpus": gpus}, outputs=[notice, queue_table, queue_item],
                    api_name="queue_add", concurrency_limit=None, show_progress_on=notice).success(
        follow_job, None, outputs, api_name=False, concurrency_limit=None)
    sweep_queued.success(follow_job, None, outputs, api_name=False, concurrency_limit=None)
    continue_btn.click(continue_run, run_pick, notice, api_name="continue_run", concurrency_limit=None).success(
        follow_job, None, outputs, api_name=False, concurrency_limit=None)
    again_btn.click(train_again, run_pick, notice, api_name="train_again", concurrency_limit=None).success(
        follow_job, None, outputs, api_name=False, concurrency_limit=None)
    settings_btn.click(run_settings, run_pick, form.components, api_name="run_settings", show_progress_on=notice)
    stop_btn.click(stop, None, notice, api_name="stop", concurrency_limit=None)
    sample_btn.click(lambda: ask("sample"), None, notice, api_name="sample_now", concurrency_limit=None)
    checkpoint_btn.click(lambda: ask("checkpoint"), None, notice, api_name="checkpoint_now", concurrency_limit=None)
    board_btn.click(tensorboard, None, notice, api_name="tensorboard", concurrency_limit=None)
    queue_list_btn.click(queue_list, None, queue_table, api_name="queue_list", concurrency_limit=None)
    up_btn.click(lambda item: move(item, -1), queue_item, [queue_table, queue_item], api_name="queue_up",
                 concurrency_limit=None, show_progress_on=queue_item)
    down_btn.click(lambda item: move(item, 1), queue_item, [queue_table, queue_item], api_name="queue_down",
                   concurrency_limit=None, show_progress_on=queue_item)
    cancel_btn.click(cancel, queue_item, [notice, queue_table, queue_item], api_name="queue_cancel",
                     concurrency_limit=None, show_progress_on=notice)
    model_name, resolution = form.widgets["model.name"], form.widgets["data.resolution"]
    model_name.change(detect, [model_name, resolution], [model_facts, kind_preset_btn], api_name="model_facts")
    model_name.change(fields_for, model_name, form.components, api_name=False)
    resolution.change(detect, [model_name, resolution], [model_facts, kind_preset_btn], api_name=False)
    kind_preset_btn.click(use_kind_preset, [model_name, form.widgets["data.path"]], form.components,
                          api_name="use_kind_preset", show_progress_on=notice)
    tab.select(runs, run_pick, run_pick, api_name=False)
    tab.select(lambda item: queue_outputs(item), queue_item, [queue_table, queue_item], api_name=False)
    return {"form": form, "outputs": outputs, "follow": follow_job, "train_toml": train_toml,
            "running_config": running_config, "queue_list": queue_list, "queue_table": queue_table,
            "queue_item": queue_item, "queue_outputs": queue_outputs, "runs": (runs, run_pick)}
