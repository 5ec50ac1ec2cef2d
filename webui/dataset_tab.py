"""Dataset tab: create or pick a dataset, upload images or a zip, edit captions, trigger word, check,
caption images with a captioner (a preview first), and edit all captions at once (with undo)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from stylelora.core.config import Config, DataConfig
from stylelora.core.errors import StyleloraError
from stylelora.data import doctor
from stylelora.services import collect

from . import caption_panels
from .context import Context, Failed, errors_on_page, user_errors
from .words import CHECK_BUTTON, USE_FOLDER_BUTTON

ACCEPTED = list(collect.UPLOAD_SUFFIXES)
Shown = tuple[str, str, str]  # what the caption editor shows: (dataset, image, caption as shown)


def kept_edit(folder: Callable[[str], Path], typed: str | None, shown: Shown | None) -> str:
    """Save what was typed in the caption editor before it shows something else, and say so ('' when nothing was
    typed). A caption that changed on disk meanwhile refuses the move (DataError), so nothing is lost."""
    typed = (typed or "").strip()
    if shown is None:
        return f"the text typed with no image picked was not saved: “{typed}”" if typed else ""
    name, image, caption = shown
    try:
        where = folder(name)
    except gr.Error:  # the dataset is gone: nothing to save into
        return f"dataset '{name}' is gone; your edit of {image} was not saved: “{typed}”"
    if collect.save_if_edited(where, image, typed, caption) is None:
        return ""
    return f"saved your edit of the caption of {image} in dataset '{name}'"


def build(ctx: Context) -> dict[str, Any]:
    ws = ctx.workspace

    def folder(name: str) -> Path:
        path = ws.open_dataset(name)
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
        return ws.dataset_names()

    @user_errors
    def create(name: str):
        made = collect.create_dataset(ws.datasets, name)
        return (gr.update(choices=names(), value=made.name), f"dataset folder: `{ws.display(made)}` (the Train tab's "
                "dataset now)",
                gallery(made.name), gr.update(choices=ctx.dataset_choices(), value=ws.display(made)))

    @user_errors
    def use_folder(path: str):
        """Add a dataset folder from elsewhere on this machine and open it (the Train tab trains from it)."""
        added = ctx.add_folder(path)
        name = str(added) if added in ws.added else added.name
        return (gr.update(choices=names(), value=name), f"dataset folder: `{ws.display(added)}` (the Train tab's "
                "dataset now)", gr.update(choices=ctx.dataset_choices(), value=ws.display(added)))

    # The caption editor remembers what it shows: (dataset, image, caption as shown). A save goes to that
    # dataset and image only, and only while the caption on disk is still the one shown.
    def editor(name: str, image: str) -> tuple[str, str, tuple[str, str, str] | None]:
        """(image, caption, what the editor shows) for ``image`` of dataset ``name`` as it is on disk now."""
        if not name or not image:
            return "", "", None
        try:
            caption = collect.caption_of(folder(name), image)
        except (gr.Error, StyleloraError):  # the image or dataset is gone: the editor empties
            return "", "", None
        return image, caption, (name, image, caption)

    def keep_edit(typed: str | None, shown: tuple[str, str, str] | None) -> str:
        return kept_edit(folder, typed, shown)

    def reloaded(name: str, shown: tuple[str, str, str] | None) -> tuple[str, str, tuple[str, str, str] | None]:
        """The editor after the captions may have changed (an upload, a trigger word): the shown image again."""
        if not shown or shown[0] != name:
            return "", "", None
        return editor(name, shown[1])

    @user_errors
    def upload(name: str, files: list[str] | None, replace_captions: bool = False):
        if not files:
            raise gr.Error("choose images, captions or a zip to upload first", print_exception=False)
        target = folder(name)
        report = collect.add_files(target, [(f, Path(f).name) for f in files], replace_captions=bool(replace_captions))
        return report.to_text(), gallery(name)

    @user_errors
    def select(name: str, typed: str, shown: tuple[str, str, str] | None, evt: gr.SelectData):
        """Open the clicked image in the editor; an edit of the image it showed is saved first."""
        note = keep_edit(typed, shown)
        items = collect.images(folder(name))
        if evt.index is None or evt.index >= len(items):
            return "", "", None, note
        return *editor(name, collect.relative_name(folder(name), items[evt.index][0])), note

    @user_errors
    def leave(typed: str, shown: tuple[str, str, str] | None):
        """Another dataset was picked: the editor empties, after saving an edit of the image it showed."""
        return "", "", None, keep_edit(typed, shown)

    @errors_on_page(Failed("not saved: {}"), gr.update())
    def save_caption(name: str, image: str, caption: str, shown: tuple[str, str, str] | None = None):
        if not image:
            raise gr.Error("click an image in the gallery first", print_exception=False)
        if shown is not None and (shown[0], shown[1]) != (name, image):
            raise gr.Error(f"the editor shows {shown[1]} of dataset '{shown[0]}', not {image} of '{name}'; click "
                           "the image in the gallery again", print_exception=False)
        collect.save_caption(folder(name), image, caption, shown=shown[2] if shown else None)
        return f"saved the caption of {image} in dataset '{name}'", gallery(name)

    @user_errors
    def trigger(name: str, word: str):
        changed = collect.add_trigger_word(folder(name), word)
        return f"added '{word.strip()}' to {changed} caption(s) in dataset '{name}'", gallery(name)

    @user_errors
    def check(name: str, resolution: float):
        # the Train tab's resolution, checked as training checks it (an emptied box: the default)
        resolution = DataConfig.resolution if resolution is None else int(resolution)
        Config().with_overrides({"data.resolution": resolution})
        report = doctor.check_dataset(folder(name), resolution=resolution)
        rows = [[ws.display(f.path), f.level, f.problem, f.action] for f in report.findings]
        verdict = "ready to train" if report.can_train else "not ready to train"
        return (f"**{verdict}**: {len(report.usable)} usable image(s), checked at {resolution} px (the Train tab's "
                "resolution)", rows, report.to_text())

    with gr.Tab("Dataset", id="dataset"):
        with gr.Row():
            dataset = gr.Dropdown(names(), value="example" if "example" in names() else None,
                                  label="Dataset", info="A folder under datasets/, or one added from this computer",
                                  scale=2, elem_id="dataset-pick",
                                  allow_custom_value=True)  # names are checked by Workspace.open_dataset
            new_name = gr.Textbox(label="New dataset", placeholder="my-style", scale=2)
            create_btn = gr.Button("Create", scale=1)
        with gr.Row(equal_height=True):
            outside = gr.Textbox(label="Folder on this computer", scale=4, elem_id="outside-folder",
                                 placeholder="/home/me/kohya/img",
                                 info="A folder of images (or of kohya's 10_name folders) outside datasets/: the "
                                 "app shows it, edits its captions and trains from it, and serves its images to "
                                 "this browser only")
            outside_btn = gr.Button(USE_FOLDER_BUTTON, scale=1, elem_id="use-folder")
        with gr.Row():
            files = gr.File(label="Images, .txt captions or a .zip", file_count="multiple", file_types=ACCEPTED,
                            elem_id="upload-files")
            with gr.Column():
                upload_btn = gr.Button("Add files to the dataset", variant="primary", elem_id="upload")
                replace = gr.Checkbox(False, label="Uploaded captions replace different existing ones",
                                      info="Off: an image's caption is kept, and the result says which were not used")
                status = gr.Textbox(label="Result", lines=4, interactive=False, elem_id="upload-result")
        images = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=360,
                            elem_id="dataset-images", allow_preview=False)
        with gr.Row():
            image_name = gr.Textbox(label="Image", interactive=False, scale=1, elem_id="caption-image")
            caption = gr.Textbox(label="Caption", scale=4, elem_id="caption-text")
            save_btn = gr.Button("Save caption", scale=1, elem_id="save-caption")
        caption_status = gr.Textbox(show_label=False, interactive=False, elem_id="caption-result",
                                    placeholder="Click another image or dataset, and an edit is saved first")
        shown = gr.State(None)  # (dataset, image, caption) the editor shows; not part of the API
        with gr.Row():
            trigger_word = gr.Textbox(label="Trigger word", info="Put in front of every caption", scale=3)
            trigger_btn = gr.Button("Add to every caption", scale=1, elem_id="add-trigger")
        check_btn = gr.Button(CHECK_BUTTON, elem_id="check-data")
        report = gr.Markdown(elem_id="dataset-check-verdict")
        findings = gr.Dataframe(headers=["file", "level", "problem", "what to do"], interactive=False, wrap=True,
                                column_widths=["18%", "8%", "37%", "37%"], elem_id="findings")
        with gr.Accordion("Full report", open=False):
            full_report = gr.Textbox(show_label=False, lines=12, interactive=False)
        caption_panels.build(ctx, folder, gallery, dataset, images)

    editor_fields = [image_name, caption, shown]
    dataset.change(gallery, dataset, images, api_name="list_images")
    # never edit the old one's image; an edit of it is saved first, and the caption line says so
    dataset.change(leave, [caption, shown], [*editor_fields, caption_status], api_name=False,
                   show_progress_on=caption_status)
    # After an upload the picker empties (a second click must not add the same files again), and the editor
    # shows the caption as it is now; so it does after a save and after "Add to every caption".
    # Progress and errors show on the result line, never over the gallery (it stays clickable).
    # An upload and "Add to every caption" reload the editor from disk: an edit in it is saved first.
    kept = {"fn": user_errors(keep_edit), "inputs": [caption, shown], "outputs": caption_status, "api_name": False,
            "show_progress_on": caption_status}
    upload_btn.click(**kept).success(upload, [dataset, files, replace], [status, images], api_name="upload",
                                     show_progress_on=status).success(
        lambda name, now: (None, *reloaded(name, now)), [dataset, shown], [files, *editor_fields], api_name=False)
    images.select(select, [dataset, caption, shown], [*editor_fields, caption_status], api_name=False,
                  show_progress_on=caption_status).success(
        lambda name, note: gallery(name) if note.startswith("saved") else gr.update(), [dataset, caption_status],
        images, api_name=False)
    # The caption's result and errors show on its own line, beside the editor (not on the upload's result).
    save_btn.click(save_caption, [dataset, image_name, caption, shown], [caption_status, images],
                   show_progress_on=caption_status, api_name="save_caption").success(
        editor, [dataset, image_name], editor_fields, api_name=False)
    trigger_btn.click(**kept).success(trigger, [dataset, trigger_word], [status, images], api_name="add_trigger",
                                      show_progress_on=status).then(
        reloaded, [dataset, shown], editor_fields, api_name=False)
    return {"dataset": dataset, "create": (create_btn, create, new_name, status, images),
            "use_folder": (outside_btn, use_folder, outside, status),
            "show": (gallery, dataset, images), "refresh": refresh,
            "check": (check_btn, check, [report, findings, full_report])}
