"""Issue 21: the scores measure what they say (on a style set drawn in code, through a model that can learn it),
the evaluation set is fixed and written into the run, every save leaves an adapter that is scored and kept, and
eval.every_save scores during training without a second model load and without changing the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from style_model import colour_model, draw_set, plain_image, style_image

from conftest import make_dataset, tiny_config
from stylelora.core import events
from stylelora.evaluation.checkpoints import SavedCheckpoint, run_checkpoints
from stylelora.evaluation.evalset import build_evalset, pick_evenly
from stylelora.evaluation.runner import Evaluator, RunScores
from stylelora.preview.previewer import Previewer
from stylelora.training.loop import train


@pytest.fixture
def one_thread():
    """One thread: on two shared cores, OpenMP's spinning second thread costs far more than it gives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# v-prediction: a random UNet that learns little still lands near the data (epsilon's would blow the noise up);
# LoCon and a high rate: the style moves within 80 steps
STYLE_RUN = {"model.prediction_type": "v_prediction", "lora.type": "locon", "lora.rank": 16, "lora.alpha": 16.0,
             "train.lr": 4e-3, "train.batch_size": 2, "train.log_with": "none", "cache.latents": "memory",
             # 8 style and transfer images: the training set's size, so the training images can stand in for them
             "eval.style_prompts": 4, "eval.prompts": ["a lighthouse", "a bowl of fruit", "a boat", "a tree"],
             "eval.seeds": 1, "eval.steps": 8, "eval.guidance": 1.0}


def test_scores_measure_what_they_say(tmp_path: Path, one_thread: None) -> None:
    style = draw_set(tmp_path / "style", style_image)
    plain = draw_set(tmp_path / "plain", plain_image)
    styled_run, other_run = tmp_path / "styled", tmp_path / "other"
    config = tiny_config(style, styled_run, **{**STYLE_RUN, "train.steps": 80, "train.save_every": 40})
    train(config, model=colour_model("v_prediction"))
    train(tiny_config(plain, other_run, **{**STYLE_RUN, "train.steps": 60}), model=colour_model("v_prediction"))

    evaluator = Evaluator(styled_run, Previewer(colour_model("v_prediction")))
    final = run_checkpoints(styled_run)[-1]
    base = evaluator.scores.base
    full = evaluator.score(final)
    half = evaluator.score(final, scale=0.5, keep=False)
    other = run_checkpoints(other_run)[-1]
    unrelated = evaluator.score(SavedCheckpoint("unrelated", other.step, other.source), keep=False)
    print(evaluator.scores.table(), half, unrelated, sep="\n")
    assert base.style == 0 and base.content == 1 and not base.copied
    assert 0 < half.style < full.style, (half.style, full.style)
    assert full.style > 0.25
    assert unrelated.style < full.style / 2

    # normalised so that the training images themselves score 1 (they stand in for the 8 style/transfer images)
    references = [style_image(i) for i in range(8)]
    assert evaluator.score_images(references, "training images", 0).style == pytest.approx(1.0, abs=1e-4)
    # an image copied from the training set trips the copying flag; the base model's images do not
    evalset = evaluator.evalset
    images = [evaluator.previewer.base(p.text, evalset.settings(seed)) for p, seed in evalset.images]
    assert not evaluator.score_images(images, "base again", 0).copied
    images[3] = style_image(5)
    copied = evaluator.score_images(images, "a copy", 0)
    assert copied.copied and copied.copying > evaluator.copy_threshold


def test_evaluation_set_is_fixed_and_written_into_the_run(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=6)
    config = tiny_config(data, tmp_path / "run", **{"data.trigger_word": "zq", "eval.style_prompts": 3, "eval.seeds": 2,
                                                   "eval.prompts": ["a lighthouse", "a bowl of fruit"]})
    captions = [f"a picture number {i}, flat style" for i in (5, 1, 3, 0, 2, 4)]
    first, again = build_evalset(config, captions), build_evalset(config, list(reversed(captions)))
    assert first.to_dict() == again.to_dict()  # the same set whatever order the captions come in
    texts = [(p.kind, p.text) for p in first.prompts]
    assert texts == [("style", "zq, a picture number 0, flat style"), ("style", "zq, a picture number 2, flat style"),
                     ("style", "zq, a picture number 5, flat style"), ("transfer", "zq, a lighthouse"),
                     ("transfer", "zq, a bowl of fruit"), ("leak", "a lighthouse"), ("leak", "a bowl of fruit")]
    assert first.seeds == [1000, 1001] and len(first.images) == 14
    assert pick_evenly(["b", "a", "c", "d", "e"], 2) == ["a", "e"]
    # no trigger word: the leak prompts would be the transfer prompts again, so there are none
    plain = build_evalset(config.with_overrides({"data.trigger_word": ""}), captions)
    assert [p.kind for p in plain.prompts].count("leak") == 0


def _trained(tmp_path: Path, every_save: bool, seen: list | None = None) -> Path:
    data = make_dataset(tmp_path / "data")
    out = tmp_path / ("scored" if every_save else "plain")
    config = tiny_config(data, out, **{"train.steps": 6, "train.save_every": 2, "train.keep_checkpoints": 1,
                                      "data.trigger_word": "zq", "eval.every_save": every_save, "eval.steps": 2,
                                      "eval.style_prompts": 2, "eval.prompts": ["a lighthouse"], "eval.seeds": 2,
                                      "lora.dropout": 0.1})  # dropout draws from the random stream the loop keeps
    train(config, on_event=seen.append if seen is not None else None)
    return out


def test_every_save_leaves_an_adapter_scored_in_memory_without_changing_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    import stylelora.preview.previewer as previewer_module
    import stylelora.training.loop as loop_module

    loads: list[str] = []
    for module in (loop_module, previewer_module):
        real = module.load_base_model
        monkeypatch.setattr(module, "load_base_model", lambda *a, _real=real, **k: loads.append(a[0]) or _real(*a, **k))
    seen: list = []
    scored = _trained(tmp_path, True, seen)
    assert loads == ["builtin:tiny"]  # scoring used the model in memory: no second load

    # every save left an adapter file, kept although train.keep_checkpoints pruned the checkpoints to one
    assert sorted(p.name for p in scored.glob("*.safetensors")) == [
        "scored-step00000002.safetensors", "scored-step00000004.safetensors", "scored.safetensors"]
    assert [p.name for p in (scored / "checkpoints").iterdir()] == ["step-000006"]
    assert [c.label for c in run_checkpoints(scored)] == ["step-000002", "step-000004", "step-000006"]

    # each was scored as it was saved: events, metrics.jsonl, the scores file with the best, the images
    evaluated = [e for e in seen if isinstance(e, events.Evaluated)]
    assert [e.step for e in evaluated] == [2, 4, 6] and all("eval/style" in e.scores for e in evaluated)
    lines = [json.loads(line) for line in (scored / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval/content" in r] == [2, 4, 6]
    scores = RunScores.load(scored)
    assert scores is not None and [r.label for r in scores.checkpoints] == ["step-000002", "step-000004",
                                                                            "step-000006"]
    assert scores.best is not None and evaluated[-1].best == scores.best.label
    assert len(list((scored / "eval" / "base").glob("*.png"))) == 8
    assert len(list((scored / "eval" / "step-000004").glob("*.png"))) == 8
    assert (scored / "logs" / "hparams").is_dir()  # the best checkpoint's scores in TensorBoard's hparams view

    # scoring put everything back: the same run without it trains the very same weights
    plain = _trained(tmp_path, False)
    for name in ("step00000004", ""):
        a = load_file(scored / f"scored{'-' + name if name else ''}.safetensors")
        b = load_file(plain / f"plain{'-' + name if name else ''}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (plain / "eval").exists()


def test_step_adapter_is_a_loadable_adapter(tmp_path: Path) -> None:
    """A step save's file is an ordinary kohya adapter of the run's weights at that step (alphas included)."""
    from stylelora.adapters.formats import load_adapter
    from stylelora.families import load_skeleton

    run = _trained(tmp_path, False)
    adapter = load_adapter(run / "plain-step00000002.safetensors", load_skeleton("builtin:tiny"))
    assert adapter.metadata["ss_steps"] == "2" and adapter.alpha
    deltas = [np.abs(t.float().numpy()).max() for t in adapter.state["unet"].values()]
    assert max(deltas) > 0
