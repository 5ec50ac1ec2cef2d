"""Dataset tab: create or pick a dataset, upload images or a zip, edit captions, trigger word, check,
caption images with a captioner (a preview first), and edit all captions at once (with undo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from stylelora import autocaption, caption_tools, collect, doctor
from stylelora.autocaption import CaptionSettings
from stylelora.config import DataConfig

from .context import Context, user_errors
from .form import settings_from_widgets, settings_widget

ACCEPTED = list(collect.UPLOAD_SUFFIXES)
# The captioning fields the panel shows, in API order; the widgets come from CaptionSettings.
CAPTION_FIELDS = ["captioner", "mode", "prompt", "batch_size", "style_filter", "style_words", "threshold"]
CAPTIONERS = ["builtin:tiny-blip", "Salesforce/blip-image-captioning-large", "SmilingWolf/wd-swinv2-tagger-v3"]
START = CaptionSettings()
PREVIEW_CAPTIONS = 4


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

    def settings(values: list[Any]) -> CaptionSettings:
        return settings_from_widgets(CAPTION_FIELDS, values, CaptionSettings)

    def caption_rows(root: Path, changes: list[Any]) -> list[list[str]]:
        return [[str(c.image.relative_to(root)), c.before or "(none)", c.after] for c in changes]

    @user_errors
    def caption_preview(name: str, captioner: str, mode: str, prompt: str, batch_size: float, style_filter: bool,
                        style_words: str, threshold: float):
        """The first captions the captioner would write, with what each image has now; nothing is written."""
        values = [captioner, mode, prompt, batch_size, style_filter, style_words, threshold]
        root, chosen = folder(name), settings(values)
        report = autocaption.plan_captions(root, ctx.captioner(chosen.captioner), chosen, limit=PREVIEW_CAPTIONS)
        if report.changes:
            note = f"preview of the first {len(report.changes)} caption(s); nothing was written"
        else:
            note = (f"no image gets a new caption in mode '{chosen.mode}'; choose overwrite, prefix or suffix to "
                    "caption images that have one")
        if report.unchanged:
            note += f" ({report.unchanged} image(s) keep their caption in mode '{chosen.mode}')"
        return note, caption_rows(root, report.changes)

    @user_errors
    def caption_images(name: str, captioner: str, mode: str, prompt: str, batch_size: float, style_filter: bool,
                       style_words: str, threshold: float, progress: gr.Progress = gr.Progress()):
        """Caption the dataset as the panel says and write the captions (atomically; undo puts them back)."""
        values = [captioner, mode, prompt, batch_size, style_filter, style_words, threshold]
        root, chosen = folder(name), settings(values)
        report = autocaption.caption_folder(root, ctx.captioner(chosen.captioner), chosen,
                                            on_progress=lambda done, total: progress((done, total), unit="images"))
        text = report.summary() + ("; 'Undo the last edit' puts the previous captions back" if report.changes else "")
        text += "".join(f"\nskipped {line}" for line in report.skipped)
        return text, caption_rows(root, report.changes), gallery(name)

    def planned(name: str, find: str, replace: str, regex: bool, tag: str, new_tag: str, which: str):
        root = folder(name)
        if which == "text":
            return root, caption_tools.find_replace(root, find, replace, regex=regex), f"replace {find!r}"
        return root, caption_tools.replace_tag(root, tag, new_tag), f"tag {tag!r} -> {new_tag!r}"

    @user_errors
    def edit_preview(name: str, find: str, replace: str, regex: bool, tag: str, new_tag: str, which: str):
        root, changes, _ = planned(name, find, replace, regex, tag, new_tag, which)
        return f"{len(changes)} caption(s) would change; nothing was written", caption_rows(root, changes)

    @user_errors
    def edit_apply(name: str, find: str, replace: str, regex: bool, tag: str, new_tag: str, which: str):
        root, changes, label = planned(name, find, replace, regex, tag, new_tag, which)
        caption_tools.apply_changes(root, changes, label)
        return f"{len(changes)} caption(s) changed", caption_rows(root, changes), gallery(name)

    @user_errors
    def tag_table(name: str) -> list[list[Any]]:
        return [[tag, count] for tag, count in caption_tools.tag_frequency(folder(name))]

    @user_errors
    def undo(name: str):
        label, files = caption_tools.undo_last(folder(name))
        return f"undid '{label}': {files} file(s) restored", [], gallery(name)

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
        with gr.Accordion("Caption images", open=False, elem_id="caption-images"):
            shown = {"captioner": gr.Dropdown(CAPTIONERS, value=START.captioner, allow_custom_value=True,
                                              label="Captioner",
                                              info=CaptionSettings.__dataclass_fields__["captioner"].metadata["help"])}
            with gr.Row():
                shown.update({n: settings_widget(START, n) for n in ("mode", "prompt", "batch_size")})
            with gr.Row():
                shown.update({n: settings_widget(START, n) for n in ("style_filter", "threshold")})
            shown["style_words"] = settings_widget(START, "style_words")
            caption_inputs = [dataset] + [shown[n] for n in CAPTION_FIELDS]
            with gr.Row():
                preview_btn = gr.Button("Preview the first captions")
                caption_btn = gr.Button("Write captions", variant="primary")
            caption_status = gr.Textbox(label="Captioning", lines=2, interactive=False)
            caption_table = gr.Dataframe(headers=["image", "caption now", "new caption"], interactive=False,
                                         wrap=True)
        with gr.Accordion("Edit captions in bulk", open=False, elem_id="caption-tools"):
            with gr.Row():
                find = gr.Textbox(label="Find", scale=2)
                replace_with = gr.Textbox(label="Replace with", scale=2)
                regex = gr.Checkbox(label="Regular expression", info=r"Python syntax; \1 in the replacement")
            with gr.Row():
                tag = gr.Textbox(label="Tag", info="A comma-separated tag (case, _ and spaces do not matter)")
                new_tag = gr.Textbox(label="Replace the tag with", info="Empty removes the tag")
            which = gr.Radio(["text", "tag"], value="text", label="Edit",
                             info="text: find and replace; tag: remove or replace one tag")
            with gr.Row():
                edit_preview_btn = gr.Button("Preview changes")
                edit_btn = gr.Button("Apply to every caption", variant="primary")
                undo_btn = gr.Button("Undo the last edit")
                tags_btn = gr.Button("Tag frequency")
            edit_status = gr.Textbox(label="Result", interactive=False)
            edit_table = gr.Dataframe(headers=["image", "before", "after"], interactive=False, wrap=True)
            tags = gr.Dataframe(headers=["tag", "captions"], interactive=False)

    dataset.change(gallery, dataset, images, api_name="list_images")
    upload_btn.click(upload, [dataset, files], [status, images], api_name="upload")
    images.select(select, dataset, [image_name, caption], api_name=False)
    save_btn.click(save_caption, [dataset, image_name, caption], [status, images], api_name="save_caption")
    trigger_btn.click(trigger, [dataset, trigger_word], [status, images], api_name="add_trigger")
    check_btn.click(check, [dataset, check_res], [report, findings, full_report], api_name="check_data")
    preview_btn.click(caption_preview, caption_inputs, [caption_status, caption_table], api_name="caption_preview")
    caption_btn.click(caption_images, caption_inputs, [caption_status, caption_table, images],
                      api_name="caption_images")
    edit_inputs = [dataset, find, replace_with, regex, tag, new_tag, which]
    edit_preview_btn.click(edit_preview, edit_inputs, [edit_status, edit_table], api_name="captions_preview")
    edit_btn.click(edit_apply, edit_inputs, [edit_status, edit_table, images], api_name="captions_apply")
    undo_btn.click(undo, dataset, [edit_status, edit_table, images], api_name="captions_undo")
    tags_btn.click(tag_table, dataset, tags, api_name="tag_frequency")
    return {"dataset": dataset, "create": (create_btn, create, new_name, status, images),
            "show": (gallery, dataset, images), "refresh": refresh}
