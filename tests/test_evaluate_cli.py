"""Issue 21 from the command line: ``stylelora evaluate`` prints the table and names the best checkpoint,
``export --checkpoint best|N`` writes that checkpoint's adapter (verified), a 2x2 ``sweep`` runs through the queue
and ends with the comparison table, ``compare`` lines runs up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_dataset, run_cli, tiny_config
from stylelora.training.loop import train

SMALL_EVAL = {"data.trigger_word": "zq", "eval.steps": 2, "eval.style_prompts": 2, "eval.prompts": ["a lighthouse"],
              "eval.seeds": 2, "train.log_with": "tensorboard"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with three scorable checkpoints: step saves at 2 and 4, the final adapter at 6."""
    root = tmp_path_factory.mktemp("evaluate")
    data = make_dataset(root / "data")
    out = root / "example"
    train(tiny_config(data, out, **{"train.steps": 6, "train.save_every": 2, **SMALL_EVAL}))
    return out


def test_evaluate_prints_the_table_and_export_writes_the_best(run: Path, tmp_path: Path) -> None:
    early = run_cli("export", str(run), "--checkpoint", "best", "--format", "kohya",
                    "--out", str(tmp_path / "x.safetensors"))
    assert early.returncode == 1 and "not been evaluated" in early.stderr and "Traceback" not in early.stderr

    done = run_cli("evaluate", str(run), timeout=900)  # renders 3 checkpoints: slow on a busy machine
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["checkpoint", "step", "style"] and lines[1].startswith("base")
    assert [line.split()[0] for line in lines[2:5]] == ["step-000002", "step-000004", "step-000006"]
    best = lines[-1].split()[1]
    assert lines[-1].startswith("best: step-") and f"{best} *" in done.stdout
    assert "scored step-000004" in done.stderr  # progress, per checkpoint
    assert (run / "eval" / "scores.json").is_file() and (run / "logs" / "hparams").is_dir()

    as_json = run_cli("evaluate", str(run), "--checkpoints", "step-000002,4", "--json", timeout=900)
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert [r["checkpoint"] for r in rows] == ["step-000002", "step-000004", "step-000006"]
    assert [r["checkpoint"] for r in rows if r["best"]] == [best]
    assert set(rows[0]["scores"]) >= {"style", "content", "copying", "leak", "variety"} and rows[0]["step"] == 2

    out = tmp_path / "best.safetensors"
    exported = run_cli("export", str(run), "--checkpoint", "best", "--format", "kohya", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert f"checkpoint {best} (best)" in exported.stderr and "verified" in exported.stdout
    step = int(best.removeprefix("step-"))
    saved = run / (f"example-step{step:08d}.safetensors" if step != 6 else "example.safetensors")
    written, expected = load_file(out), load_file(saved)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)

    four = run_cli("export", str(run), "--checkpoint", "4", "--format", "diffusers", "--out", str(tmp_path / "four"))
    assert four.returncode == 0, four.stderr
    assert (tmp_path / "four" / "pytorch_lora_weights.safetensors").is_file()
    wrong = run_cli("export", str(run), "--checkpoint", "5", "--format", "kohya",
                    "--out", str(tmp_path / "y.safetensors"))
    assert wrong.returncode == 1 and "step-000002, step-000004, step-000006" in wrong.stderr


def test_sweep_runs_a_grid_through_the_queue_and_compares(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    config = tiny_config(data, tmp_path / "unused", **{"train.steps": 2, **SMALL_EVAL})
    config = config.with_overrides({"train.output_dir": ""})
    config.save(tmp_path / "base.toml")
    sweep = tmp_path / "sweep"
    done = run_cli("sweep", str(tmp_path / "base.toml"), "--grid", "train.lr=1e-3,2e-3", "--grid", "lora.rank=2,4",
                   "--output", str(sweep), timeout=900)
    assert done.returncode == 0, done.stderr
    runs = ["lr0.001-rank2", "lr0.001-rank4", "lr0.002-rank2", "lr0.002-rank4"]
    assert sorted(p.name for p in sweep.iterdir()) == runs
    table = done.stdout.splitlines()
    assert table[0].split()[:4] == ["run", "lora.rank", "train.lr", "best"]  # the settings in the config's order
    assert [line.split()[:4] for line in table[1:]] == [
        [name, rank, lr, "step-000002"] for name, lr, rank in
        [(runs[0], "0.001", "2"), (runs[1], "0.001", "4"), (runs[2], "0.002", "2"), (runs[3], "0.002", "4")]]
    for name in runs:  # each scored as it saved, in its own folder, and in TensorBoard's hparams view
        assert (sweep / name / "eval" / "scores.json").is_file() and (sweep / name / "logs" / "hparams").is_dir()

    compared = run_cli("compare", str(sweep), "--json")
    assert compared.returncode == 0, compared.stderr
    rows = json.loads(compared.stdout)
    assert [r["settings"] for r in rows] == [{"train.lr": lr, "lora.rank": rank} for lr in (0.001, 0.002)
                                             for rank in (2, 4)]
    assert all(r["best"] == "step-000002" and r["scores"]["style"] is not None for r in rows)


def test_mistakes_get_one_plain_line(tmp_path: Path, run: Path) -> None:
    bad_grid = run_cli("sweep", str(run / "config.toml"), "--grid", "train.lr")
    assert bad_grid.returncode == 1 and "--grid 'train.lr': expected" in bad_grid.stderr
    bad_value = run_cli("sweep", str(run / "config.toml"), "--grid", "train.lr=-1,1e-3")
    assert bad_value.returncode == 1 and "train.lr: must be > 0, got -1" in bad_value.stderr
    not_eval = run_cli("evaluate", str(run), "--set", "train.lr=1")
    assert not_eval.returncode == 1 and "eval settings only" in not_eval.stderr
    missing = run_cli("evaluate", str(tmp_path))
    assert missing.returncode == 1 and "not a run folder" in missing.stderr
    offline = run_cli("evaluate", str(run), "--set", "eval.descriptor=nobody-here/no-such-clip")
    assert offline.returncode == 1
    assert "descriptor 'nobody-here/no-such-clip': could not be downloaded" in offline.stderr
    assert "Traceback" not in offline.stderr + missing.stderr + bad_value.stderr


def test_a_clip_descriptor_adds_the_prompt_score(run: Path) -> None:
    """builtin:tiny-clip runs the CLIP path offline: its text embedding gives the prompt column."""
    from stylelora.evaluation.runner import evaluate_run

    scores = evaluate_run(run, ["step-000006"], overrides={"eval.descriptor": "builtin:tiny-clip"})
    assert scores.descriptor == "builtin:tiny-clip" and [r.label for r in scores.checkpoints] == ["step-000006"]
    assert scores.base.prompt is not None and scores.checkpoints[0].prompt is not None
    assert "prompt" in scores.table().splitlines()[0].split()


def test_a_mistyped_run_folder_is_named_as_missing(tmp_path: Path) -> None:
    """A typo in the run's path says there is no such folder, not that a folder is no run."""
    from stylelora.core.errors import ConfigError
    from stylelora.evaluation.checkpoints import run_config
    from stylelora.evaluation.compare import expand_runs

    for check in (run_config, lambda p: expand_runs([p])):
        with pytest.raises(ConfigError) as e:
            check(tmp_path / "outptus" / "mystyle")
        assert str(e.value).startswith(f"{tmp_path / 'outptus' / 'mystyle'}: no such folder")


def test_a_grid_value_or_setting_given_twice_is_refused() -> None:
    """lora.rank=4,4 made two runs that both went to rank4; a second --grid for the same setting replaced the
    first without a word. Each is one plain message saying how to write it."""
    from stylelora.core.errors import ConfigError
    from stylelora.services.sweep import parse_grid

    with pytest.raises(ConfigError, match=r"--grid 'lora.rank=4,8,4': 4 is given twice; each value makes one run"):
        parse_grid(["lora.rank=4,8,4"])
    with pytest.raises(ConfigError, match=r"--grid: lora.rank is given twice; put its values in one --grid "
                                          r"lora.rank=4,8"):
        parse_grid(["lora.rank=4", "lora.rank=8"])
    assert parse_grid(["lora.rank=4,8", "train.lr=1e-4"]) == {"lora.rank": [4, 8], "train.lr": [1e-4]}


def test_compare_says_what_each_unscored_run_needs(run: Path, tmp_path: Path) -> None:
    """A run with saves is told the command that scores it; one with nothing saved, to train first (compare said
    "score each with: stylelora evaluate RUN" to both, and evaluate then told the second to train first)."""
    import shutil

    saved = tmp_path / "saved run"
    shutil.copytree(run, saved, ignore=shutil.ignore_patterns("eval"))  # its checkpoints, not its scores
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run / "config.toml", empty / "config.toml")
    r = run_cli("compare", str(saved), str(empty))
    assert r.returncode == 0, r.stderr
    assert f"{saved}: not evaluated yet; score it with: stylelora evaluate '{saved}'" in r.stderr
    assert f"{empty}: no checkpoint or adapter saved in this run yet; train it first" in r.stderr


def test_a_second_evaluation_scores_only_what_was_saved_since(run: Path, tmp_path: Path) -> None:
    """Evaluate clicked twice, or run again after a run went on: the scored checkpoints are not rendered again
    (each took the whole set of images); one saved again since (a rewound run) is."""
    import os
    import shutil

    from stylelora.evaluation.runner import evaluate_run

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval"))
    first = evaluate_run(copy, overrides=SMALL_EVAL)
    images = {p: p.stat().st_mtime_ns for p in (copy / "eval").glob("step-*/*.png")}
    assert len({p.parent.name for p in images}) == 3
    again = evaluate_run(copy, overrides=SMALL_EVAL)
    for kept, scored in zip(again.checkpoints, first.checkpoints, strict=True):  # as saved: to 6 decimals
        assert kept.record() == pytest.approx(scored.record(), abs=1e-6)
    assert {p: p.stat().st_mtime_ns for p in images} == images  # nothing rendered again

    saved_again = next(copy.glob("*-step00000004.safetensors"))
    later = (copy / "eval" / "scores.json").stat().st_mtime + 5
    os.utime(saved_again, (later, later))
    evaluate_run(copy, overrides=SMALL_EVAL)
    changed = {p.parent.name for p in images if p.stat().st_mtime_ns != images[p]}
    assert changed == {"step-000004"}
