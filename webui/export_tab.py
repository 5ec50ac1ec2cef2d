"""Export tab: write a run's adapter as kohya (A1111/ComfyUI) or diffusers, verified; merge into the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from stylelora.convert import export as export_adapter
from stylelora.formats import DIFFUSERS_WEIGHT_NAME
from stylelora.merge import merge as merge_adapter

from .context import Context, user_errors

FORMATS = [("kohya (AUTOMATIC1111, ComfyUI)", "kohya"), ("diffusers (pipe.load_lora_weights)", "diffusers")]


def build(ctx: Context) -> dict[str, Any]:
    ws = ctx.workspace

    def picked(choice: str | None) -> str:
        if not choice:
            raise gr.Error("pick a run or an adapter to export (train one first)", print_exception=False)
        return choice

    @user_errors
    def export(choice: str | None, fmt: str, precision: str):
        source = picked(choice)
        report = export_adapter(ws.inside(source, [ws.outputs]), fmt, ws.export_target(source, fmt, precision),
                                precision=precision)
        path = Path(report.path)
        download = path if path.is_file() else path / DIFFUSERS_WEIGHT_NAME
        verdict = "verified: reloaded and compared every tensor" if report.verified else "NOT verified"
        text = f"**{verdict}**\n\n`{ws.display(path)}` — {report.num_tensors} tensors\n\n{report.summary}"
        return text, str(download) if download.is_file() else None

    @user_errors
    def merge(model: str, choice: str | None, scale: float):
        adapter, out = ws.merge_target(picked(choice), float(scale))
        path = merge_adapter(model or "builtin:tiny", adapter, float(scale), out)
        return f"merged model written to `{ws.display(path)}`"

    def refresh(current: str | None):
        choices = ctx.run_choices() + ctx.adapter_choices()
        return gr.update(choices=choices, value=current if current in choices else (choices[0] if choices else None))

    with gr.Tab("Export", id="export") as tab:
        source = gr.Dropdown(ctx.run_choices() + ctx.adapter_choices(), label="Run or adapter",
                             info="Runs and adapter files under outputs/", allow_custom_value=True)
        with gr.Row():
            fmt = gr.Radio(FORMATS, value="kohya", label="Format")
            precision = gr.Dropdown(["fp16", "bf16", "fp32"], value="fp16", label="Precision")
            export_btn = gr.Button("Export", variant="primary")
        report = gr.Markdown()
        download = gr.File(label="Download", interactive=False)
        with gr.Accordion("Merge into the base model", open=False):
            with gr.Row():
                merge_model = gr.Textbox("builtin:tiny", label="Base model")
                merge_scale = gr.Number(1.0, label="Strength")
                merge_btn = gr.Button("Merge")
            merge_report = gr.Markdown()

    export_btn.click(export, [source, fmt, precision], [report, download], api_name="export")
    merge_btn.click(merge, [merge_model, source, merge_scale], merge_report, api_name="merge")
    tab.select(refresh, source, source, api_name=False)
    return {}
