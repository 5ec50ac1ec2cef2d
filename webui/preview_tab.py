"""Preview tab: base beside LoRA at one seed, a strength slider that regenerates on release,
a strength sweep strip and a checkpoint x strength grid (all from ``stylelora.generate.Previewer``)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from stylelora.adapters.merge import STRENGTHS
from stylelora.core.config import Config, GenerateSettings
from stylelora.core.errors import StyleloraError

from .context import Context, user_errors
from .form import settings_from_widgets, settings_widget

DEFAULT_PROMPT = "a small house, flat style"
SETTINGS = ["negative_prompt", "seed", "steps"]  # the GenerateSettings fields the tab shows, in API order
START = GenerateSettings(steps=8)  # what the widgets show first: a preview in seconds on a CPU
STEPS_SLIDER_MAX = 100


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise gr.Error(f"strengths {text!r}: give numbers separated by commas, e.g. 0, 0.5, 1",
                       print_exception=False) from None
    if not scales or len(scales) > 12:
        raise gr.Error("strengths: give between 1 and 12 numbers", print_exception=False)
    return scales


def build(ctx: Context) -> dict[str, Any]:
    ws = ctx.workspace

    def adapter_path(choice: str | None, upload: str | None) -> str:
        """The adapter to use: an uploaded file wins over the picker (which only offers outputs/)."""
        if upload:
            return str(upload)
        if not choice:
            raise gr.Error("pick an adapter (train one first) or upload an adapter file", print_exception=False)
        return str(ws.inside(choice, [ws.outputs]))

    def attached(model: str, path: str) -> tuple[Any, str]:
        """The model's previewer with ``path`` attached (the previewer re-reads it only when it changed),
        under the name ``stylelora generate`` gives it too (the images' parameters name it)."""
        previewer = ctx.previewer(model or "builtin:tiny")
        return previewer, previewer.attach(path)

    # The handlers take the SETTINGS widgets' values as (negative, seed, steps): Gradio names the API's
    # parameters after them.
    @user_errors
    def preview(model: str, adapter: str | None, upload: str | None, prompt: str, negative: str,
                seed: float, steps: float, strength: float, in_strength: float = 1.0, mid_strength: float = 1.0,
                out_strength: float = 1.0):
        """(base image, LoRA image) at one seed; the previewer caches the base image, so moving the
        strength only renders the LoRA side. The IN/MID/OUT strengths multiply the strength per UNet
        block group (A1111's LoRA block weight)."""
        settings = settings_from_widgets(SETTINGS, [negative, seed, steps])
        path = adapter_path(adapter, upload)
        blocks = {"IN": float(in_strength), "MID": float(mid_strength), "OUT": float(out_strength)}
        with ctx.preview_lock:
            previewer, name = attached(model, path)
            return previewer.compare(prompt, settings, adapter=name, scale=float(strength), blocks=blocks)

    @user_errors
    def sweep(model: str, adapter: str | None, upload: str | None, prompt: str, negative: str,
              seed: float, steps: float, scales: str):
        settings = settings_from_widgets(SETTINGS, [negative, seed, steps])
        path = adapter_path(adapter, upload)
        with ctx.preview_lock:
            previewer, name = attached(model, path)
            return previewer.sweep(prompt, parse_scales(scales), settings, adapter=name)

    @user_errors
    def grid(model: str, adapter: str | None, prompt: str, negative: str, seed: float, steps: float, scales: str):
        """The checkpoints and final adapter of the picked adapter's run (rows) x strengths (columns)."""
        settings = settings_from_widgets(SETTINGS, [negative, seed, steps])
        run = ws.run_of(adapter_path(adapter, None))
        if run is None:
            raise gr.Error("pick an adapter of a run under outputs/ for the checkpoint grid", print_exception=False)
        with ctx.preview_lock:
            previewer = ctx.previewer(model or "builtin:tiny")
            return previewer.grid(prompt, previewer.attach_run(run.path), parse_scales(scales), settings)

    def refresh(current: str | None):
        """The adapters on disk now (newest run first); keeps the pick if it is still there."""
        choices = ctx.adapter_choices()
        return gr.update(choices=choices, value=current if current in choices else (choices[0] if choices else None))

    def model_of(choice: str | None, current: str):
        """Picking a run's adapter picks the base model it was trained on."""
        try:
            run = ws.run_of(ws.inside(choice or "", [ws.outputs]))
            name = Config.load(run.path / "config.toml").model.name if run else None
        except StyleloraError:
            name = None
        if name is None:
            return gr.update()
        return gr.update(value=name, choices=sorted({"builtin:tiny", name, current or "builtin:tiny"}))

    with gr.Tab("Preview", id="preview") as tab:
        with gr.Row():
            model = gr.Dropdown(["builtin:tiny"], value="builtin:tiny", label="Base model", allow_custom_value=True,
                                info="builtin:tiny, a diffusers folder, a .safetensors checkpoint or a hub id")
            adapter = gr.Dropdown(ctx.adapter_choices(), label="Adapter", info="Adapters of the runs under outputs/",
                                  allow_custom_value=True, elem_id="adapter")  # checked by Workspace.inside
            upload = gr.File(label="…or any adapter file", file_types=[".safetensors"], type="filepath", height=100)
            refresh_btn = gr.Button("Refresh list", scale=0)
        with gr.Row():
            prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", scale=3)
            shown = {"negative_prompt": settings_widget(START, "negative_prompt", scale=2)}
        with gr.Row():
            shown["seed"] = settings_widget(START, "seed")
            shown["steps"] = settings_widget(START, "steps", slider_max=STEPS_SLIDER_MAX)
            strength = gr.Slider(*STRENGTHS, value=1, step=0.05, label="Strength", elem_id="strength",
                                 info="0 is the base model; regenerates when you let go, or type a value and press "
                                 "Enter")
        with gr.Accordion("Per-block strength (IN / MID / OUT)", open=False):
            with gr.Row():
                groups = [gr.Slider(*STRENGTHS, value=1, step=0.05, label=f"{group} blocks",
                                    info=f"times the strength for the UNet's {where}",
                                    elem_id=f"strength-{group.lower()}")
                          for group, where in (("IN", "down blocks"), ("MID", "mid block"), ("OUT", "up blocks"))]
        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            base_image = gr.Image(label="Base model", type="pil", elem_id="base-image", format="png", height=320)
            lora_image = gr.Image(label="With LoRA", type="pil", elem_id="lora-image", format="png", height=320)
        with gr.Row():
            scales = gr.Textbox("0, 0.5, 1, 1.5", label="Strengths for the sweep and grid")
            sweep_btn = gr.Button("Strength sweep")
            grid_btn = gr.Button("Checkpoint × strength grid")
        sweep_image = gr.Image(label="Sweep / grid", type="pil", format="png", elem_id="sweep-image")

    settings = [shown[name] for name in SETTINGS]
    inputs = [model, adapter, upload, prompt, *settings]
    # Every render waits in one line, in the order asked (concurrency_id), and a slider let go while its last
    # render is still going renders again after it (trigger_mode="always_last"; Gradio's default, "once",
    # dropped it: the first render loads the model, so a block strength set meanwhile never showed).
    renders = {"concurrency_id": "preview", "concurrency_limit": 1, "trigger_mode": "always_last"}
    generate_btn.click(preview, [*inputs, strength, *groups], [base_image, lora_image], api_name="preview", **renders)
    for slider in (strength, *groups):
        slider.release(preview, [*inputs, strength, *groups], [base_image, lora_image], api_name=False, **renders)
    sweep_btn.click(sweep, [*inputs, scales], sweep_image, api_name="sweep", **renders)
    grid_btn.click(grid, [model, adapter, prompt, *settings, scales], sweep_image, api_name="grid", **renders)
    refresh_btn.click(refresh, adapter, adapter, api_name=False)
    tab.select(refresh, adapter, adapter, api_name=False)
    adapter.change(model_of, [adapter, model], model, api_name=False)
    return {}
