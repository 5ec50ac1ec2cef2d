"""Export tab: write a run's adapter as kohya (A1111/ComfyUI) or diffusers, verified; merge into the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from stylelora.errors import StyleloraError
from stylelora.formats import DIFFUSERS_WEIGHT_NAME

from .context import Context, library, user_error

FORMATS = [("kohya (AUTOMATIC1111, ComfyUI)", "kohya"), ("diffusers (pipe.load_lora_weights)", "diffusers")]


def build(ctx: Context) -> dict[str, Any]:
    ws = ctx.workspace

    def source_path(choice: str | None) -> Path:
        if not choice:
            raise gr.Error("pick a run or an adapter to export (train one first)", print_exception=False)
        try:
            return ws.inside(choice, [ws.outputs])
        except StyleloraError as e:
            raise user_error(e) from None

    def run_folder(source: Path) -> Path:
        """The run a source belongs to (exports are written inside it)."""
        for run in ws.runs():
            if source == run.path or source.is_relative_to(run.path):
                return run.path
        return source.parent

    def export(choice: str | None, fmt: str, precision: str):
        export_adapter = library("stylelora.convert", "export")

        source = source_path(choice)
        run = run_folder(source)
        stem = source.stem if source.is_file() and source.parent == run else run.name
        out = run / "exports" / (f"{stem}-{precision}.safetensors" if fmt == "kohya" else f"diffusers-{precision}")
        try:
            report = export_adapter(source, fmt, out, precision=precision)
        except StyleloraError as e:
            raise user_error(e) from None
        path = Path(report.path)
        download = path if path.is_file() else path / DIFFUSERS_WEIGHT_NAME
        verdict = "verified: reloaded and compared every tensor" if report.verified else "NOT verified"
        text = f"**{verdict}**\n\n`{ws.display(path)}` — {report.num_tensors} tensors\n\n{report.summary}"
        return text, str(download) if download.is_file() else None

    def merge(model: str, choice: str | None, scale: float):
        merge_adapter = library("stylelora.merge", "merge")

        source = source_path(choice)
        run = run_folder(source)
        if source.is_dir():  # a run folder: merge its adapter (the kohya file comes first)
            adapters = next((r.adapters for r in ws.runs() if r.path == source), [])
            if not adapters:
                raise gr.Error(f"{ws.display(source)}: no adapter in this run yet; train it first",
                               print_exception=False)
            source = adapters[0]
        out = run / f"merged-{float(scale):g}"
        try:
            path = merge_adapter(model or "builtin:tiny", source, float(scale), out)
        except StyleloraError as e:
            raise user_error(e) from None
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
