"""The Train tab's Evaluation and Runs panels and the Export tab's merge, scripted with gradio_client as an impolite
user drives them: runs made after the app started, a run of another family beside an SD1 one, a run deleted after
the page loaded, a merge strength no one can mean.

Each test is a fault found by walking the app on the built-in models and failed on the code before its fix.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from gui_server import launch, make_root

from conftest import make_dataset
from stylelora.core.config import Config
from stylelora.training.loop import train

EVALUATION = {"data.trigger_word": "zq", "eval.steps": 2, "eval.style_prompts": 2, "eval.prompts": ["a lighthouse"],
              "eval.seeds": 1}


def make_run(root: Path, name: str, model: str = "builtin:tiny") -> Path:
    """A 2-step run of ``model`` saving each step, under outputs/``name``."""
    data = make_dataset(root / "datasets" / f"{name}-data", n=3, size=(64, 64))
    out = root / "outputs" / name
    train(Config().with_overrides({"model.name": model, "data.path": str(data), "data.resolution": 64,
                                   "lora.rank": 2, "lora.alpha": 2.0, "train.steps": 2, "train.save_every": 1,
                                   "train.output_dir": str(out), "train.log_with": "none", **EVALUATION}))
    return out


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    root = make_root(tmp_path_factory.mktemp("panels") / "root")
    demo, ctx, url = launch(root)  # no runs yet: every run below is made after the app started
    yield Client(url, verbose=False), ctx, root
    demo.close()


def test_runs_made_after_the_app_started_are_compared_and_evaluated_through_the_api(app) -> None:
    """/compare refused every run made after start ("'outputs/sd1' is not in the list of choices: []"): the page
    refreshes the picker's choices when clicked, the API kept the ones from start. An SD1 run beside a FLUX.1 run:
    the table names each one's base model and best checkpoint."""
    client, _, root = app
    make_run(root, "sd1")
    make_run(root, "flux", "builtin:tiny-flux")
    table = client.predict(["outputs/sd1", "outputs/flux"], api_name="/compare")
    rows = {row[0]: dict(zip(table["headers"], row, strict=True)) for row in table["data"]}
    assert rows["outputs/sd1"]["model.name"] == "builtin:tiny" and rows["outputs/flux"]["model.name"] == \
        "builtin:tiny-flux"
    assert rows["outputs/flux"]["best"] == "not evaluated"
    best = client.predict("outputs/flux", api_name="/evaluate")[0]
    assert best.startswith("**Best checkpoint: step-00000")
    table = client.predict(["outputs/sd1", "outputs/flux"], api_name="/compare")
    rows = {row[0]: dict(zip(table["headers"], row, strict=True)) for row in table["data"]}
    assert rows["outputs/flux"]["best"].startswith("step-00000") and rows["outputs/flux"]["style"] is not None
    assert rows["outputs/sd1"]["best"] == "not evaluated"
    with pytest.raises(AppError, match="the app only works with files under"):  # any value, but only runs
        client.predict(["outputs/sd1", "../../etc"], api_name="/compare")


def test_a_run_deleted_after_the_page_loaded_is_named_as_gone(app) -> None:
    """A run picked, then deleted: "Show its scores" said "Nothing saved in this run yet", and Evaluate and Compare
    named the absolute folder with the CLI's advice ("give a run folder stylelora train wrote")."""
    client, _, root = app
    shutil.rmtree(make_run(root, "doomed"))
    shown = client.predict("outputs/doomed", api_name="/scores")[0]
    assert shown.startswith("outputs/doomed: no such run folder (deleted or moved") and "Nothing saved" not in shown
    for call in (lambda: client.predict("outputs/doomed", api_name="/evaluate"),
                 lambda: client.predict(["outputs/doomed", "outputs/doomed"], api_name="/compare")):
        with pytest.raises(AppError, match="outputs/doomed: no such run folder") as failed:
            call()
        assert str(root) not in str(failed.value)


def test_evaluating_a_run_with_nothing_saved_names_it_as_the_page_does(app) -> None:
    """A run started but not saved yet, evaluated twice: the message named the whole path on this machine."""
    client, _, root = app
    run = root / "outputs" / "unsaved"
    run.mkdir()
    (run / "config.toml").write_text('[model]\nname = "builtin:tiny"\n[data]\npath = "datasets/example"\n',
                                     encoding="utf-8")
    for _ in range(2):
        with pytest.raises(AppError, match="outputs/unsaved: nothing saved in this run yet; evaluate it once") as e:
            client.predict("outputs/unsaved", api_name="/evaluate")
        assert str(root) not in str(e.value)
    assert client.predict("outputs/unsaved", api_name="/scores")[0].startswith("Nothing saved in this run yet")


@pytest.mark.parametrize("strength", [1e30, -1e30, 2.5, None])
def test_a_merge_strength_no_one_can_mean_is_refused_by_the_fields_label(app, strength) -> None:
    """Merge's Strength took 1e30 and -1e30 and wrote `<run>-merged-1e+30.safetensors` (noise); an emptied field
    failed with "The upstream Gradio app has raised an exception". The Preview slider's range is the merge's."""
    client, _, root = app
    run = root / "outputs" / "merged-run"
    if not run.is_dir():
        make_run(root, "merged-run")
    with pytest.raises(AppError, match=r"Strength: (must be a number from -1 to 2|empty; give a strength from -1 "
                                       r"to 2)"):
        client.predict("builtin:tiny", "outputs/merged-run", strength, "single_file", "fp16", api_name="/merge")
    assert not (run / "merged").exists()
    done = client.predict("builtin:tiny", "outputs/merged-run", -1, "single_file", "fp16", api_name="/merge")
    assert done.startswith("merged model written to `outputs/merged-run/merged/merged-run-merged--1.safetensors`")
    shutil.rmtree(run / "merged")


def test_the_queue_refuses_a_run_folder_twice_and_a_pick_that_is_no_number(app) -> None:
    """"Add to queue" twice with the same run folder queued both, the second failing only when its turn came; a
    queued run typed as text (the picker takes any value, as the API does) failed with "The upstream Gradio app has
    raised an exception"."""
    client, ctx, _ = app
    client.predict(train_steps=300, sample_every=0, api_name="/queue_add")  # runs at once
    twin = client.predict(train_steps=2, sample_every=0, train_output_dir="outputs/twin", api_name="/queue_add")[0]
    number = int(twin.removeprefix("added run #").split()[0])
    try:
        with pytest.raises(AppError, match=rf"Run folder \(train\.output_dir\): '.*outputs/twin' is already the "
                                           rf"run folder of queued run #{number} \(example · 2 steps · builtin:tiny "
                                           "→ twin\\); give this run another folder"):
            client.predict(train_steps=2, sample_every=0, train_output_dir="outputs/twin", api_name="/queue_add")
        for typed in ("abc", "#x"):
            with pytest.raises(AppError, match=f"Queued run: '{typed}' is not a number in the queue; pick one"):
                client.predict(typed, api_name="/queue_cancel")
        with pytest.raises(AppError, match="queued run #77: not in the queue"):
            client.predict("#77", api_name="/queue_up")
        assert client.predict(f"#{number}", api_name="/queue_cancel")[0].startswith(f"cancelled run #{number}")
    finally:
        client.predict(api_name="/stop")
        ctx.job.join_all(120)
    assert client.predict(api_name="/queue_list")["data"] == []
