"""The app scripted with gradio_client, on builtin:tiny: upload -> check -> train -> preview -> export -> merge.

Also: the form is made from the config fields, a GUI run writes the config.toml the CLI replays,
a second Start while training is refused, and a reopened page sees the run.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gui_server import launch, make_root
from PIL import Image

from conftest import draw_image
from stylelora.core import events
from stylelora.core.config import Config, all_fields
from stylelora.training.loop import train

TINY_RUN = """
[model]
name = "builtin:tiny"
[data]
path = "datasets/mine"
resolution = 64
[lora]
rank = 4
alpha = 4.0
[train]
steps = 5
lr = 0.01
"""


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    root = make_root(tmp_path_factory.mktemp("gui") / "root")
    demo, ctx, url = launch(root)
    yield Client(url, verbose=False), ctx, root
    demo.close()


def _pixels(image: str | dict) -> np.ndarray:
    path = image["path"] if isinstance(image, dict) else image
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_form_has_a_widget_for_every_config_field(app) -> None:
    from webui.form import BASIC

    client, ctx, _ = app
    values = client.predict("cpu-demo", api_name="/load_preset")
    assert len(values) == len(all_fields())
    preset = Config.load(ctx.presets / "cpu-demo.toml")
    shown = dict(zip(BASIC, values[: len(BASIC)], strict=True))
    assert shown["model.name"] == "builtin:tiny" and shown["train.steps"] == preset.train.steps
    assert shown["data.path"] == "datasets/example"

    # Save as TOML writes the form's config; loading that file fills the form with the same values
    saved = client.predict(*values, api_name="/save_toml")
    saved_path = saved["value"]  # an update that also shows the (hidden until now) download box
    assert Config.load(saved_path).to_dict() == Config.load(ctx.presets / "cpu-demo.toml").to_dict()
    assert client.predict(handle_file(saved_path), api_name="/load_toml") == values

    # a bad value is refused by name, before anything starts
    steps = BASIC.index("train.steps")
    bad = list(values)
    bad[steps] = 0
    with pytest.raises(AppError, match=r"Steps \(train.steps\): must be >= 1, got 0"):  # the form's words
        client.predict(*bad, api_name="/train")
    # /train takes the fields by name (the form's defaults fill the rest): no param_0..param_N
    parameters = [p["parameter_name"] for p in client.view_api(return_format="dict", print_info=False)
                  ["named_endpoints"]["/train"]["parameters"]]
    assert parameters[:3] == ["model_name", "data_path", "train_steps"] and len(parameters) == len(all_fields()) + 1
    assert parameters[-1] == "gpus"  # how many GPUs train the run (shown with more than one)
    assert not [p for p in parameters if p.startswith("param_")]


def test_the_form_shows_the_models_kind_and_offers_its_preset(app) -> None:
    from webui.form import BASIC

    client, _, _ = app
    # (the API returns the text; the page also shows a "Use the SDXL preset (sdxl-style)" button beside it)
    assert client.predict("builtin:tiny-sdxl", 32, api_name="/model_facts") == (
        "Model: **SDXL, 64 px native**; data.resolution 32 is far below it. The sdxl-style preset is made for it")
    assert client.predict("builtin:tiny", 64, api_name="/model_facts") == "Model: **SD1.x, 64 px native**"
    values = client.predict("builtin:tiny-sdxl", "datasets/mine", api_name="/use_kind_preset")
    shown = dict(zip(BASIC, values[: len(BASIC)], strict=True))
    assert shown["model.name"] == "builtin:tiny-sdxl" and shown["data.path"] == "datasets/mine"
    assert shown["data.resolution"] == 1024  # the SDXL preset's side, with the chosen model and dataset kept


def test_upload_check_train_preview_export(app, tmp_path: Path) -> None:
    client, ctx, root = app
    # --- upload: two images, and a zip with two more and a caption ---
    client.predict("mine", api_name="/create_dataset")
    images = [draw_image(tmp_path / f"up{i}.png", (64, 64), seed=i) for i in range(2)]
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(2, 4):
            buf = io.BytesIO()
            Image.open(draw_image(tmp_path / f"z{i}.png", (64, 64), seed=i)).save(buf, "PNG")
            z.writestr(f"folder/z{i}.png", buf.getvalue())
        z.writestr("folder/z2.txt", "a zipped picture")
    result, gallery = client.predict("mine", [handle_file(p) for p in [*images, archive]], api_name="/upload")
    assert result.startswith("added 5 file(s)")
    assert len(gallery) == 4
    assert sorted(p.name for p in (root / "datasets/mine").glob("*.png")) == ["up0.png", "up1.png", "z2.png", "z3.png"]
    client.predict("mine", "up0.png", "a first picture", api_name="/save_caption")
    client.predict("mine", "zzstyle", api_name="/add_trigger")
    assert (root / "datasets/mine/up0.txt").read_text().strip() == "zzstyle, a first picture"

    # --- check ---
    verdict, findings, full = client.predict("mine", 64, api_name="/check_data")
    assert verdict == "**ready to train**: 4 usable image(s), checked at 64 px (the Train tab's resolution)"
    assert "datasets/mine" in full

    # --- train 5 steps, streaming progress ---
    job = client.submit(TINY_RUN, api_name="/train_toml")
    updates = list(job)
    final = updates[-1]
    assert final["status"] == "finished", final["error"]
    assert final["step"] == 5 and final["total_steps"] == 5
    run = Path(final["output_dir"])
    assert run == root / "outputs" / "mine"
    assert (run / "mine.safetensors").is_file() and (run / "diffusers/pytorch_lora_weights.safetensors").is_file()
    # the run's config.toml is what `stylelora train config.toml` replays
    replay = Config.load(run / "config.toml")
    assert replay.data.path == str(root / "datasets/mine") and replay.train.steps == 5

    # --- preview: strength 0 is the base image; strength 1 differs ---
    adapter = "outputs/mine/mine.safetensors"
    common = ["builtin:tiny", adapter, None, "a small house", "", 7, 4]
    base0, lora0 = client.predict(*common, 0.0, api_name="/preview")
    base1, lora1 = client.predict(*common, 1.0, api_name="/preview")
    assert np.array_equal(_pixels(base0), _pixels(lora0))
    assert np.array_equal(_pixels(base0), _pixels(base1))
    assert np.abs(_pixels(lora1) - _pixels(base1)).mean() > 0.5
    # per-block strength: every UNet group at 0 is the base image (this adapter is on the UNet only)
    _, zeroed = client.predict(*common, 1.0, 0.0, 0.0, 0.0, api_name="/preview")
    _, mid_off = client.predict(*common, 1.0, 1.0, 0.0, 1.0, api_name="/preview")
    assert np.array_equal(_pixels(zeroed), _pixels(base1))
    assert not np.array_equal(_pixels(mid_off), _pixels(base1)) and not np.array_equal(_pixels(mid_off), _pixels(lora1))
    strip = client.predict(*common, "0, 1", api_name="/sweep")
    assert Image.open(strip["path"] if isinstance(strip, dict) else strip).width >= 2 * 64

    # --- export both formats, verified, downloadable under the run's name ---
    for fmt, name in [("kohya", "mine-fp16.safetensors"), ("diffusers", "mine-diffusers-fp16.safetensors")]:
        text, download = client.predict("outputs/mine", fmt, "fp16", api_name="/export")
        assert "verified" in text and "NOT verified" not in text
        path = download["path"] if isinstance(download, dict) else download
        assert Path(path).name == name and Path(path).stat().st_size > 1000
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["mine-diffusers-fp16.safetensors",
                                                                    "mine-fp16.safetensors"]
    # merge into the base: one checkpoint file (A1111, ComfyUI), or a diffusers model folder, inside the run
    assert "outputs/mine/merged/mine-merged-1.safetensors" in client.predict("builtin:tiny", "outputs/mine", 1.0,
                                                                             api_name="/merge")
    assert "outputs/mine/merged-1" in client.predict("builtin:tiny", "outputs/mine", 1.0, "diffusers",
                                                     api_name="/merge")
    assert (run / "merged-1" / "model_index.json").is_file()
    # an emptied Base model box is named, not quietly taken for builtin:tiny
    with pytest.raises(AppError, match="Base model: empty; give the model to merge into"):
        client.predict(" ", "outputs/mine", 1.0, api_name="/merge")
    # the single file is the merged model: diffusers' single-file loader reads the same weights (in fp16)
    from stylelora.families import load_base_model

    single = load_base_model(str(run / "merged" / "mine-merged-1.safetensors"), str(run / "merged-1")).unet.state_dict()
    folder = load_base_model(str(run / "merged-1")).unet.state_dict()
    base = load_base_model("builtin:tiny").unet.state_dict()
    assert single.keys() == folder.keys()
    assert all(torch.allclose(single[k].float(), folder[k].float(), atol=1e-2, rtol=1e-2) for k in folder)
    assert any(not torch.allclose(folder[k], base[k]) for k in folder)  # and the LoRA is baked in

    # --- the GUI run's config.toml is what `stylelora train config.toml` replays: same losses ---
    replayed = train(Config.load(run / "config.toml").with_overrides({"train.output_dir": str(tmp_path / "replay")}))
    gui_losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert replayed.losses == pytest.approx(gui_losses, rel=1e-4)


def test_second_start_is_refused_and_a_new_page_sees_the_run(app) -> None:
    client, ctx, root = app
    long_run = TINY_RUN.replace("steps = 5", "steps = 400").replace("datasets/mine", "datasets/example")
    job = client.submit(long_run, api_name="/train_toml")
    for update in job:
        if update["step"] >= 1:
            break
    with pytest.raises(AppError, match="already running"):
        client.predict(TINY_RUN, api_name="/train_toml")
    job.cancel()  # the browser that started it goes away: the training goes on
    # a new browser (a new client session) attaches to the running job and sees its progress
    watcher = Client(client.src, verbose=False).submit(api_name="/watch")
    first = next(iter(watcher))
    assert 'data-status="running"' in first[0]
    assert client.predict(api_name="/stop") == "stopping after the current step"
    ctx.job.join(60)
    snap = ctx.job.snapshot()
    assert snap.status == "stopped"
    assert (root / "outputs" / "example" / "example.safetensors").is_file()  # a stop still saves the adapter


def test_queue_runs_requests_and_runs_list_through_the_api(app) -> None:
    import re
    import urllib.request

    client, ctx, root = app
    long_run = TINY_RUN.replace("steps = 5", "steps = 400").replace("datasets/mine", "datasets/example")
    long_run = long_run.replace("[train]", '[train]\noutput_dir = "outputs/long"')
    job = client.submit(long_run, api_name="/train_toml")
    for update in job:
        if update["step"] >= 1:
            break
    # during a run: samples and a checkpoint on request, TensorBoard on its logs
    assert client.predict(api_name="/sample_now").startswith("samples requested")
    assert client.predict(api_name="/checkpoint_now").startswith("checkpoint requested")
    url = re.search(r"\((http://127\.0\.0\.1:\d+/)\)", client.predict(api_name="/tensorboard"))[1]
    with urllib.request.urlopen(url, timeout=30) as page:
        assert page.status == 200

    # two runs queued by named parameters (the form's defaults fill the rest); the second moves up, then goes
    client.predict(train_steps=2, sample_every=0, api_name="/queue_add")
    client.predict(train_steps=3, sample_every=0, api_name="/queue_add")
    table = client.predict(api_name="/queue_list")
    waiting = [row for row in table["data"] if row[0] != "▶"]
    assert [row[1] for row in waiting] == ["example · 2 steps · builtin:tiny", "example · 3 steps · builtin:tiny"]
    first, second = (int(row[0]) for row in waiting)
    client.predict(second, api_name="/queue_up")
    assert [int(r[0]) for r in client.predict(api_name="/queue_list")["data"] if r[0] != "▶"] == [second, first]
    client.predict(first, api_name="/queue_cancel")
    with pytest.raises(AppError, match=f"queued run #{first}: not in the queue"):
        client.predict(first, api_name="/queue_cancel")
    client.predict(api_name="/stop")  # the long run stops; the queued 3-step run starts by itself
    ctx.job.join_all(300)
    snap = ctx.job.snapshot()
    assert snap.status == "finished" and ctx.job.config.train.steps == 3
    stopped = ctx.job.snapshot(snap.run_id - 1).events  # the long run's events, kept after the next one started
    asked = [e for e in stopped if isinstance(e, events.SampleSaved)]
    assert asked and asked[0].paths[0].is_file()  # "Sample now" rendered the first caption (no sample.prompts)
    assert len([e for e in stopped if isinstance(e, events.CheckpointSaved)]) == 2  # asked for, and at the stop
    # a run started on a taken run folder is refused in the form's words, with the way out
    with pytest.raises(AppError, match="already holds a run; continue it with “Continue this run” on run 'long'"):
        client.predict(long_run, api_name="/train_toml")

    # the runs list: continue the stopped run to its end, train it again into a new folder
    done = client.predict("outputs/long", api_name="/continue_run")
    assert done.startswith("started run") and "outputs/long" in done
    client.predict(api_name="/stop")  # 400 steps is long; a stop after resuming proves it continued
    ctx.job.join_all(120)
    log = "\n".join(e.text for e in ctx.job.snapshot().events if isinstance(e, events.Message))
    assert "resumed from" in log and "long/checkpoints/step-" in log
    again = client.predict("outputs/long", api_name="/train_again")
    assert "outputs/long-2" in again
    client.predict(api_name="/stop")
    ctx.job.join_all(120)
    assert Config.load(root / "outputs" / "long-2" / "config.toml").train.steps == 400


def test_the_server_log_has_no_progress_bars(app, capfd) -> None:
    client, ctx, root = app
    with_samples = TINY_RUN.replace("steps = 5", "steps = 2").replace("datasets/mine", "datasets/example")
    final = client.predict(with_samples + '\n[sample]\nprompts = ["a cup"]\nevery = 1\nsteps = 3\n',
                           api_name="/train_toml")
    assert final["status"] == "finished" and len(list(Path(final["output_dir"]).glob("samples/*.png"))) == 2
    out, err = capfd.readouterr()
    assert "it/s]" not in out + err and "s/it]" not in out + err  # no diffusers bar per sample
    assert "torchvision" not in out + err
