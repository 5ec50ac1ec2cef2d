"""Export tab: write a run's adapter as kohya (A1111/ComfyUI) or diffusers, verified; merge into the base.

Every download is one file named after the run: ``<run>-fp16.safetensors`` (kohya),
``<run>-diffusers-fp16.safetensors`` (diffusers' keys, for ``pipe.load_lora_weights(file)``), and a merged
model as ``<run>-merged-1.safetensors`` (the single-file checkpoint A1111 and ComfyUI load) or a diffusers
folder.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from stylelora.adapters.convert import export as export_adapter
from stylelora.adapters.merge import STRENGTHS, check_strength
from stylelora.adapters.merge import merge as merge_adapter

from .context import Context, Failed, errors_on_page

FORMATS = [("kohya (AUTOMATIC1111, ComfyUI)", "kohya"), ("diffusers (pipe.load_lora_weights)", "diffusers")]
STRENGTH = "Strength"  # the merge's strength field, by its label in messages too
MERGED = [("one .safetensors checkpoint (AUTOMATIC1111, ComfyUI)", "single_file"),
          ("a diffusers folder (from_pretrained)", "diffusers")]


def build(ctx: Context) -> dict[str, Any]:
    ws = ctx.workspace

    def picked(choice: str | None) -> str:
        if not choice:
            raise gr.Error("pick a run or an adapter to export (train one first)", print_exception=False)
        return choice

    # A failed export or merge leaves its error on the page and offers no file: never the previous one's.
    @errors_on_page(Failed("**Export failed**: {}", markdown=True), None)
    def export(choice: str | None, fmt: str, precision: str):
        source = picked(choice)
        report = export_adapter(ws.inside(source, [ws.outputs]), fmt, ws.export_target(source, fmt, precision),
                                precision=precision)
        verdict = "verified: reloaded and compared every tensor" if report.verified else "NOT verified"
        summary = report.summary.replace(str(report.path), ws.display(report.path))
        text = f"**{verdict}**\n\n`{ws.display(report.path)}` — {report.num_tensors} tensors\n\n{summary}"
        return text, str(report.path)

    @errors_on_page(Failed("**Merge failed**: {}", markdown=True), None)
    def merge(model: str, choice: str | None, scale: float, layout: str = "single_file", precision: str = "fp16"):
        if not (model or "").strip():
            raise gr.Error("Base model: empty; give the model to merge into (the one the run trained on, a diffusers "
                           "folder, a .safetensors checkpoint or a hub id)")
        single = layout != "diffusers"
        scale = check_strength(scale, STRENGTH)
        adapter, out = ws.merge_target(picked(choice), scale, single_file=single)
        path = merge_adapter(model, adapter, scale, out, precision=precision)
        if single:
            return (f"merged model written to `{ws.display(path)}` ({precision}; verified: diffusers reads every "
                    "tensor back equal). It loads in AUTOMATIC1111 (models/Stable-diffusion/) and ComfyUI "
                    "(models/checkpoints/)."), str(path)
        return f"merged model written to `{ws.display(path)}` (a diffusers folder)", None

    def refresh(current: str | None):
        choices = ctx.run_choices() + ctx.adapter_choices()
        return gr.update(choices=choices, value=current if current in choices else (choices[0] if choices else None))

    with gr.Tab("Export", id="export") as tab:
        source = gr.Dropdown(ctx.run_choices() + ctx.adapter_choices(), label="Run or adapter",
                             info="Runs and adapter files under outputs/", allow_custom_value=True,
                             elem_id="export-source")
        with gr.Row():
            fmt = gr.Radio(FORMATS, value="kohya", label="Format")
            precision = gr.Dropdown(["fp16", "bf16", "fp32"], value="fp16", label="Precision")
            export_btn = gr.Button("Export", variant="primary", elem_id="export")
        report = gr.Markdown(elem_id="export-report")
        download = gr.File(label="Download", interactive=False, elem_id="export-download")
        with gr.Accordion("Merge into the base model", open=False):
            with gr.Row():
                merge_model = gr.Textbox("builtin:tiny", label="Base model")
                # no bounds on the widget: Gradio would refuse a value without naming the field; merge() says which
                merge_scale = gr.Number(1.0, label=STRENGTH, info=f"from {STRENGTHS[0]:g} to {STRENGTHS[1]:g}; 1 is "
                                        "the adapter as trained", elem_id="merge-strength")
                merge_layout = gr.Radio(MERGED, value="single_file", label="Save the merged model as")
                merge_btn = gr.Button("Merge", elem_id="merge")
            merge_report = gr.Markdown()
            merged = gr.File(label="Download the merged model", interactive=False, elem_id="merge-download")
            merged_path = gr.State(None)  # the file to offer; a State, so the API's merge returns the text alone

    export_btn.click(export, [source, fmt, precision], [report, download], api_name="export", show_progress_on=report)
    merge_btn.click(merge, [merge_model, source, merge_scale, merge_layout, precision], [merge_report, merged_path],
                    api_name="merge", show_progress_on=merge_report).then(
        lambda path: path, merged_path, merged, api_name=False)
    # The result and the download belong to what is picked: another pick empties them.
    for picker in (source, fmt, precision):
        picker.change(lambda: ("", None), None, [report, download], api_name=False, show_progress="hidden")
    for picker in (source, merge_model, merge_scale, merge_layout, precision):
        picker.change(lambda: ("", None, None), None, [merge_report, merged_path, merged], api_name=False,
                      show_progress="hidden")
    tab.select(refresh, source, source, api_name=False)
    return {}
