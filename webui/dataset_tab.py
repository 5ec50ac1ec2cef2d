"""Dataset tab: create or pick a dataset, upload images or a zip, edit captions, trigger word, check,
caption images with a captioner (a preview first), and edit all captions at once (with undo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from stylelora import collect, doctor
from stylelora.config import DataConfig

from . import caption_panels
from .context import Context, user_errors

ACCEPTED = list(collect.UPLOAD_SUFFIXES)


def build(ctx: Context) -> dict[str, Any]:
    ws = ctx.workspace

    def folder(name: str) -> Path:
        path = collect.dataset_folder(ws.datasets, name)
        if not path.is_dir():
            raise gr.Error(f"dataset '{name}' does not exist; create it first", print_exception=False)
        return path

    def refresh(name: str):
        """The dataset list as it is now on disk (on page load: others may have added datasets)."""
        return gr.update(choices=names(), value=name if name in names() else None)

    @user_errors
    def gallery(name: str) -> list[tuple[str, str]]:
        if not name:
            return []
        return [(str(p), caption or "(no caption)") for p, caption in collect.images(folder(name))]

    def names() -> list[str]:
        return collect.list_datasets(ws.datasets)

    @user_errors
    def create(name: str):
        made = collect.create_dataset(ws.datasets, name)
        return (gr.update(choices=names(), value=made.name), f"dataset folder: `{ws.display(made)}`",
                gallery(made.name), gr.update(choices=ctx.dataset_choices()))

    @user_errors
    def upload(name: str, files: list[str] | None):
        if not files:
            raise gr.Error("choose images, captions or a zip to upload first", print_exception=False)
        target = folder(name)
        report = collect.add_files(target, [(f, Path(f).name) for f in files])
        return report.to_text(), gallery(name)

    @user_errors
    def select(name: str, evt: gr.SelectData):
        items = collect.images(folder(name))
        if evt.index is None or evt.index >= len(items):
            return "", ""
        image, caption = items[evt.index]
        return image.name, caption

    @user_errors
    def save_caption(name: str, image: str, caption: str):
        if not image:
            raise gr.Error("click an image in the gallery first", print_exception=False)
        collect.save_caption(folder(name), image, caption)
        return f"saved the caption of {image}", gallery(name)

    @user_errors
    def trigger(name: str, word: str):
        changed = collect.add_trigger_word(folder(name), word)
        return f"added '{word.strip()}' to {changed} caption(s)", gallery(name)

    @user_errors
    def check(name: str, resolution: float):
        report = doctor.check_dataset(folder(name), resolution=int(resolution or DataConfig.resolution))
        rows = [[ws.display(f.path), f.level, f.problem, f.action] for f in report.findings]
        verdict = "ready to train" if report.can_train else "not ready to train"
        return f"**{verdict}**: {len(report.usable)} usable image(s)", rows, report.to_text()

    with gr.Tab("Dataset", id="dataset"):
        with gr.Row():
            dataset = gr.Dropdown(names(), value="example" if "example" in names() else None,
                                  label="Dataset", info="A folder under datasets/", scale=2,
                                  allow_custom_value=True)  # names are checked by collect.dataset_folder
            new_name = gr.Textbox(label="New dataset", placeholder="my-style", scale=2)
            create_btn = gr.Button("Create", scale=1)
        with gr.Row():
            files = gr.File(label="Images, .txt captions or a .zip", file_count="multiple", file_types=ACCEPTED)
            with gr.Column():
                upload_btn = gr.Button("Add files to the dataset", variant="primary")
                status = gr.Textbox(label="Result", lines=4, interactive=False)
        images = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=360,
                            allow_preview=False)
        with gr.Row():
            image_name = gr.Textbox(label="Image", interactive=False, scale=1)
            caption = gr.Textbox(label="Caption", scale=4)
            save_btn = gr.Button("Save caption", scale=1)
        with gr.Row():
            trigger_word = gr.Textbox(label="Trigger word", info="Put in front of every caption", scale=3)
            trigger_btn = gr.Button("Add to every caption", scale=1)
        with gr.Row():
            check_res = gr.Number(DataConfig.resolution, label="Training resolution", precision=0, scale=1)
            check_btn = gr.Button("Check the dataset", scale=1)
        report = gr.Markdown()
        findings = gr.Dataframe(headers=["file", "level", "problem", "what to do"], interactive=False, wrap=True)
        with gr.Accordion("Full report", open=False):
            full_report = gr.Textbox(show_label=False, lines=12, interactive=False)
        caption_panels.build(ctx, folder, gallery, dataset, images)

    dataset.change(gallery, dataset, images, api_name="list_images")
    upload_btn.click(upload, [dataset, files], [status, images], api_name="upload")
    images.select(select, dataset, [image_name, caption], api_name=False)
    save_btn.click(save_caption, [dataset, image_name, caption], [status, images], api_name="save_caption")
    trigger_btn.click(trigger, [dataset, trigger_word], [status, images], api_name="add_trigger")
    check_btn.click(check, [dataset, check_res], [report, findings, full_report], api_name="check_data")
    return {"dataset": dataset, "create": (create_btn, create, new_name, status, images),
            "show": (gallery, dataset, images), "refresh": refresh}
