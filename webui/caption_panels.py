"""The Dataset tab's captioning panels: caption images with a captioner (a preview of the first captions,
then the whole dataset with a progress bar), and bulk caption edits (preview, apply, undo, tag frequency)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from stylelora.data import autocaption, caption_tools
from stylelora.data.autocaption import CaptionSettings

from .context import Context, Failed, errors_on_page, user_errors
from .form import settings_from_widgets, settings_widget

# The captioning fields the panel shows, in API order; the widgets come from CaptionSettings.
CAPTION_FIELDS = ["captioner", "mode", "prompt", "batch_size", "style_filter", "style_words", "threshold"]
CAPTIONERS = ["builtin:tiny-blip", "Salesforce/blip-image-captioning-large", "SmilingWolf/wd-swinv2-tagger-v3"]
START = CaptionSettings()
PREVIEW_CAPTIONS = 4

Folder = Callable[[str], Path]  # a dataset name -> its folder (the tab refuses unknown names)
Gallery = Callable[[str], Any]  # a dataset name -> the tab's refreshed gallery


def _rows(root: Path, changes: list[caption_tools.CaptionChange]) -> list[list[str]]:
    return [[str(c.image.relative_to(root)), c.before or "(none)", c.after] for c in changes]


def build(ctx: Context, folder: Folder, gallery: Gallery, dataset: gr.Dropdown, images: gr.Gallery) -> None:
    """Both panels, inside the Dataset tab (``dataset`` picks the folder, ``images`` is its gallery)."""
    _caption_panel(ctx, folder, gallery, dataset, images)
    _edit_panel(folder, gallery, dataset, images)


def _caption_panel(ctx: Context, folder: Folder, gallery: Gallery, dataset: gr.Dropdown, images: gr.Gallery) -> None:
    def planned(name: str, values: list[Any], limit: int | None = None, progress: Any = None):
        root = folder(name)
        chosen = settings_from_widgets(CAPTION_FIELDS, values, CaptionSettings)
        on_progress = None if progress is None else (lambda done, total: progress((done, total), unit="images"))
        report = autocaption.plan_captions(root, ctx.captioner(chosen.captioner), chosen, limit=limit,
                                           on_progress=on_progress)
        return root, chosen, report

    @user_errors
    def caption_preview(name: str, captioner: str, mode: str, prompt: str, batch_size: float, style_filter: bool,
                        style_words: str, threshold: float):
        """The first captions the captioner would write, with what each image has now; nothing is written."""
        values = [captioner, mode, prompt, batch_size, style_filter, style_words, threshold]
        root, chosen, report = planned(name, values, limit=PREVIEW_CAPTIONS)
        if report.changes:
            note = f"preview of the first {len(report.changes)} caption(s); nothing was written"
        else:
            note = (f"no image gets a new caption in mode '{chosen.mode}'; choose overwrite, prefix or suffix to "
                    "caption images that have one")
        if report.unchanged:
            note += f" ({report.unchanged} image(s) keep their caption in mode '{chosen.mode}')"
        return note, _rows(root, report.changes)

    @user_errors
    def caption_images(name: str, captioner: str, mode: str, prompt: str, batch_size: float, style_filter: bool,
                       style_words: str, threshold: float, progress: gr.Progress = gr.Progress()):
        """Caption the dataset as the panel says and write the captions (atomically; undo puts them back)."""
        values = [captioner, mode, prompt, batch_size, style_filter, style_words, threshold]
        root, chosen, report = planned(name, values, progress=progress)
        caption_tools.apply_changes(root, report.changes, f"caption ({chosen.mode}) with {chosen.captioner}",
                                    chosen.caption_extension)
        text = report.summary() + ("; 'Undo the last edit' puts the previous captions back" if report.changes else "")
        text += "".join(f"\nskipped {line}" for line in report.skipped)
        return text, _rows(root, report.changes), gallery(name)

    with gr.Accordion("Caption images", open=False, elem_id="caption-images"):
        shown = {"captioner": gr.Dropdown(CAPTIONERS, value=START.captioner, allow_custom_value=True,
                                          label="Captioner",
                                          info=CaptionSettings.__dataclass_fields__["captioner"].metadata["help"])}
        with gr.Row():
            shown.update({n: settings_widget(START, n) for n in ("mode", "prompt", "batch_size")})
        with gr.Row():
            shown.update({n: settings_widget(START, n) for n in ("style_filter", "threshold")})
        shown["style_words"] = settings_widget(START, "style_words")
        with gr.Row():
            preview_btn = gr.Button("Preview the first captions")
            caption_btn = gr.Button("Write captions", variant="primary")
        status = gr.Textbox(label="Captioning", lines=2, interactive=False)
        table = gr.Dataframe(headers=["image", "caption now", "new caption"], interactive=False, wrap=True)
    inputs = [dataset] + [shown[n] for n in CAPTION_FIELDS]
    preview_btn.click(caption_preview, inputs, [status, table], api_name="caption_preview")
    caption_btn.click(caption_images, inputs, [status, table, images], api_name="caption_images")


def _edit_panel(folder: Folder, gallery: Gallery, dataset: gr.Dropdown, images: gr.Gallery) -> None:
    def planned(name: str, find: str, replace: str, regex: bool, tag: str, new_tag: str, which: str):
        root = folder(name)
        if which == "text":
            return root, caption_tools.find_replace(root, find, replace, regex=regex), f"replace {find!r}"
        return root, caption_tools.replace_tag(root, tag, new_tag), f"tag {tag!r} -> {new_tag!r}"

    @user_errors
    def edit_preview(name: str, find: str, replace: str, regex: bool, tag: str, new_tag: str, which: str):
        root, changes, _ = planned(name, find, replace, regex, tag, new_tag, which)
        return f"{len(changes)} caption(s) would change; nothing was written", _rows(root, changes)

    @user_errors
    def edit_apply(name: str, find: str, replace: str, regex: bool, tag: str, new_tag: str, which: str):
        root, changes, label = planned(name, find, replace, regex, tag, new_tag, which)
        caption_tools.apply_changes(root, changes, label)
        return f"{len(changes)} caption(s) changed", _rows(root, changes), gallery(name)

    @user_errors
    def tag_table(name: str) -> list[list[Any]]:
        return [[tag, count] for tag, count in caption_tools.tag_frequency(folder(name))]

    @errors_on_page(Failed(), [], gr.update())  # "nothing to undo" replaces the last "undid …"
    def undo(name: str):
        label, files = caption_tools.undo_last(folder(name))
        return f"undid '{label}': {files} file(s) restored", [], gallery(name)

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
            preview_btn = gr.Button("Preview changes")
            apply_btn = gr.Button("Apply to every caption", variant="primary")
            undo_btn = gr.Button("Undo the last edit")
            tags_btn = gr.Button("Tag frequency")
        status = gr.Textbox(label="Result", interactive=False, elem_id="caption-edit-result")
        table = gr.Dataframe(headers=["image", "before", "after"], interactive=False, wrap=True)
        tags = gr.Dataframe(headers=["tag", "captions"], interactive=False)
    inputs = [dataset, find, replace_with, regex, tag, new_tag, which]
    preview_btn.click(edit_preview, inputs, [status, table], api_name="captions_preview")
    apply_btn.click(edit_apply, inputs, [status, table, images], api_name="captions_apply")
    undo_btn.click(undo, dataset, [status, table, images], api_name="captions_undo")
    tags_btn.click(tag_table, dataset, tags, api_name="tag_frequency")
