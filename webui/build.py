"""Assemble the four tabs into one Gradio Blocks app."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from stylelora.workspace import Workspace

from . import dataset_tab, export_tab, preview_tab, train_tab
from .context import Context

CSS = "#train-progress b { text-transform: capitalize; }"


def build_app(root: str | Path = ".", ctx: Context | None = None) -> tuple[gr.Blocks, Context]:
    """The app over the datasets/ and outputs/ folders of ``root``; returns it and its shared context."""
    ctx = ctx or Context(Workspace(root))
    with gr.Blocks(title="stylelora") as demo:
        gr.Markdown("# stylelora\nCollect images, train a style LoRA, preview it with a strength slider, export it.")
        with gr.Tabs():
            data = dataset_tab.build(ctx)
            train = train_tab.build(ctx)
            preview_tab.build(ctx)
            export_tab.build(ctx)
        gr.api(train["train_toml"], api_name="train_toml", concurrency_limit=None)  # scripting: a config as TOML
        # Cross-tab wiring: a new dataset appears in the Train form's dataset picker.
        create_btn, create, new_name, status, images = data["create"]
        create_btn.click(create, new_name, [data["dataset"], status, images, train["form"].widgets["data.path"]],
                         api_name="create_dataset")
        show, dataset, images = data["show"]
        data_path = train["form"].widgets["data.path"]
        demo.load(data["refresh"], dataset, dataset, api_name=False).then(show, dataset, images, api_name=False)
        demo.load(lambda: gr.update(choices=ctx.dataset_choices()), None, data_path, api_name=False)
        # A reopened browser shows the running (or last) training and keeps following it.
        demo.load(train["follow"], None, train["outputs"], api_name="watch", concurrency_limit=None)
    return demo, ctx
