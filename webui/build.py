"""Assemble the four tabs into one Gradio Blocks app."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from stylelora.core.errors import StyleloraError
from stylelora.core.logs import quiet_libraries
from stylelora.services.workspace import Workspace

from . import dataset_tab, export_tab, preview_tab, train_tab
from .context import Context

CSS = """
#train-progress b { text-transform: capitalize; }
/* small previews (builtin:tiny renders 64 px) are scaled up to the frame, without blur */
#base-image img, #lora-image img, #sweep-image img, #samples img { image-rendering: pixelated; }
#base-image img, #lora-image img { width: 100%; height: 100%; object-fit: contain; }
#sweep-image img { min-height: 240px; object-fit: contain; }
"""
# A strength typed into the slider's number box regenerates on Enter, as letting go of the slider does
# (the box sends "release" when it loses focus).
HEAD = """
<script>
document.addEventListener("keydown", (e) => {
  const box = "#strength input[type=number], [id^=strength-] input[type=number]";  // and the per-block ones
  if (e.key === "Enter" && e.target.matches && e.target.matches(box)) e.target.blur();
});
</script>
"""


def build_app(root: str | Path = ".", ctx: Context | None = None) -> tuple[gr.Blocks, Context]:
    """The app over the datasets/ and outputs/ folders of ``root``; returns it and its shared context.
    A training queue saved by an earlier app in the same outputs/ starts again."""
    quiet_libraries()  # no diffusers progress bars or optional-package warnings in the server log
    ctx = ctx or Context(Workspace(root))
    with gr.Blocks(title="stylelora") as demo:
        gr.Markdown("# stylelora\nCollect images, train a style LoRA, preview it with a strength slider, export it.")
        with gr.Tabs():
            data = dataset_tab.build(ctx)
            train = train_tab.build(ctx)
            preview_tab.build(ctx)
            export_tab.build(ctx)
        gr.api(train["train_toml"], api_name="train_toml", concurrency_limit=None)  # scripting: a config as TOML
        form = train["form"]
        # Cross-tab wiring: the dataset created, added or opened last is the Train form's dataset, and the dataset
        # check uses the resolution the Train form trains at.
        create_btn, create, new_name, status, images = data["create"]
        create_btn.click(create, new_name, [data["dataset"], status, images, form.widgets["data.path"]],
                         api_name="create_dataset", show_progress_on=status)
        use_btn, use_folder, outside, _ = data["use_folder"]
        use_btn.click(use_folder, outside, [data["dataset"], status, form.widgets["data.path"]], api_name="use_folder",
                      show_progress_on=status)
        data["dataset"].change(lambda name: form_dataset(ctx, name), data["dataset"], form.widgets["data.path"],
                               api_name=False, show_progress="hidden")
        check_btn, check, check_outputs = data["check"]
        check_btn.click(check, [data["dataset"], form.widgets["data.resolution"]], check_outputs,
                        api_name="check_data", show_progress_on=check_outputs[0])
        show, dataset, images = data["show"]
        data_path = form.widgets["data.path"]
        # A reopened page's Dataset tab shows the dataset of the settings the Train form shows (the last run's),
        # so the two agree, and picking another dataset there moves the form to it.
        demo.load(lambda name: data["refresh"](form_pick(ctx) or name), dataset, dataset, api_name=False).then(
            show, dataset, images, api_name=False)
        demo.load(lambda: gr.update(choices=ctx.dataset_choices()), None, data_path, api_name=False)
        # A reopened browser shows the running (or last) training with its settings, and keeps following it.
        demo.load(train["running_config"], None, form.components, api_name=False)
        demo.load(train["queue_outputs"], None, [train["queue_table"], train["queue_item"]], api_name=False)
        demo.load(train["follow"], None, train["outputs"], api_name="watch", concurrency_limit=None)
    ctx.job.resume_queue()
    return demo, ctx


def form_pick(ctx: Context) -> str | None:
    """The Dataset tab's name for the dataset of the run a reopened page shows (None without one)."""
    config = ctx.job.config
    return ctx.workspace.dataset_name(config.data.path) if config is not None else None


def form_dataset(ctx: Context, name: str | None) -> dict:
    """The Train form's dataset field showing the dataset the Dataset tab opened (unchanged for an unknown one)."""
    ws = ctx.workspace
    try:
        return gr.update(choices=ctx.dataset_choices(), value=ws.display(ws.open_dataset(name or "")))
    except StyleloraError:
        return gr.update()
