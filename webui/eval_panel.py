"""The Train tab's Evaluation panel (which checkpoint is the style), the Runs panel's comparison of runs, and the
queue's sweep: thin shells over ``stylelora.evaluation`` and ``services.sweep``.

The panel shows the run picked under Runs: its scores per checkpoint as a plot and a table, the best checkpoint
(by the stated rule), the evaluation images as a grid (one row per prompt, base first, then the checkpoints),
and exports the checkpoint picked below them. "Evaluate this run" scores a run through the app's Previewer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from stylelora.adapters.convert import export as export_adapter
from stylelora.core.errors import ConfigError
from stylelora.evaluation.checkpoints import run_checkpoints, run_config
from stylelora.evaluation.compare import compare_runs, comparison
from stylelora.evaluation.evalset import EVAL_DIR, EvalSet
from stylelora.evaluation.runner import RunScores, chosen_checkpoint, evaluate_run
from stylelora.evaluation.scores import COLUMNS, MEANINGS, CheckpointScores
from stylelora.services.sweep import parse_grid, sweep_configs, sweep_folder

from .context import Context, user_errors
from .form import ConfigForm

PLOTTED = ("style", "content", "copying", "leak", "variety")
GRID_CHECKPOINTS = 8  # at most this many checkpoints in the image grid (spread over the run)
TABLE_HEADERS = ["checkpoint", "step", *COLUMNS]


def legend() -> str:
    return "\n".join(f"- **{name}**: {text}" for name, text in MEANINGS.items())


def _table(scores: RunScores) -> pd.DataFrame:
    rows = [[r.label + (" ★ best" if r.best else "") + (" ! copies" if r.copied else ""),
             r.step if r.label != "base" else None, *[getattr(r, c) for c in COLUMNS]]
            for r in [scores.base, *scores.checkpoints]]
    return pd.DataFrame(rows, columns=TABLE_HEADERS).round(4)


def _plot(scores: RunScores) -> pd.DataFrame:
    rows = [{"step": r.step, "score": c, "value": getattr(r, c)} for r in scores.checkpoints for c in PLOTTED
            if getattr(r, c) is not None]
    return pd.DataFrame(rows, columns=["step", "score", "value"])


def _grid(run: Path, scores: RunScores, shown) -> tuple[list[tuple[str, str]], int]:
    """(images with captions, columns): one row per prompt (its first seed), base first, then the checkpoints."""
    evalset = EvalSet.load(run / EVAL_DIR)
    if evalset is None:
        return [], 1
    rows = scores.checkpoints
    if len(rows) > GRID_CHECKPOINTS:  # evenly spread, the best always among them
        picked = {round(i * (len(rows) - 1) / (GRID_CHECKPOINTS - 1)) for i in range(GRID_CHECKPOINTS)}
        rows = [r for i, r in enumerate(rows) if i in picked or r.best]
    columns = [("base", "base")] + [(r.label, r.label + (" ★" if r.best else "")) for r in rows]
    images = []
    for prompt in evalset.prompts:
        name = EvalSet.file_name(prompt, evalset.seeds[0])
        for folder, title in columns:
            path = run / EVAL_DIR / folder / name
            if path.is_file():
                images.append((str(path), f"{title} · {prompt.kind}: {prompt.text}"))
    return images, len(columns)


def gone(run: str) -> str:
    """The line for a picked run whose folder is no longer there."""
    return (f"{run}: no such run folder (deleted or moved since the list was made); pick another run (the lists "
            "refresh when the Train tab opens)")


def _saved_labels(run: Path) -> list[str]:
    """The run's checkpoint labels, none where it has no config or has saved nothing yet."""
    if not (run / "config.toml").is_file():
        return []
    try:
        return [c.label for c in run_checkpoints(run)]
    except ConfigError:
        return []


def build(ctx: Context, run_pick: gr.Dropdown) -> dict[str, Any]:
    """The Evaluation panel, under the Train tab's Runs (it follows the run picked there)."""
    ws = ctx.workspace
    with gr.Accordion("Evaluation: which checkpoint is the style?", open=True, elem_id="evaluation"):
        with gr.Row():
            evaluate_btn = gr.Button("Evaluate this run", size="sm", elem_id="evaluate-run")
            refresh_btn = gr.Button("Show its scores", size="sm", elem_id="eval-refresh")
        best = gr.Markdown(elem_id="eval-best")
        plot = gr.LinePlot(x="step", y="value", color="score", title="Scores per checkpoint", height=280,
                           label="Scores", elem_id="eval-plot")
        table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True, elem_id="eval-table")
        with gr.Accordion("What the scores mean", open=False):
            gr.Markdown(legend())
        grid = gr.Gallery(label="Evaluation images: one row per prompt, the base model first, then each checkpoint",
                          columns=4, height=420, elem_id="eval-grid", object_fit="contain", preview=False)
        with gr.Row(equal_height=True):
            checkpoint = gr.Dropdown(label="Checkpoint", elem_id="eval-checkpoint", allow_custom_value=True,
                                     info="the best one is picked; any saved checkpoint of the run")
            export_btn = gr.Button("Export this checkpoint", elem_id="eval-export", scale=0)
        exported = gr.File(label="Exported adapter (kohya, fp16, verified)", interactive=False, visible=False,
                           elem_id="eval-exported")

    def run_path(run: str | None) -> Path:
        if not run:
            raise gr.Error("pick a run under Runs first", print_exception=False)
        path = ws.inside(run, [ws.outputs])
        if not path.is_dir():
            raise gr.Error(gone(run), print_exception=False)
        return path

    def outputs(run: str | None) -> tuple[Any, ...]:
        """The panel for ``run``: nothing yet when it was not scored."""
        nothing = _plot(RunScores(Path(), "", "", CheckpointScores("base", 0)))  # an empty plot, drawn as one
        if not run:
            return "", nothing, pd.DataFrame(columns=TABLE_HEADERS), [], gr.update(choices=[], value=None)
        path = ws.inside(run, [ws.outputs])
        if not path.is_dir():  # deleted since the list was made: say so, not "nothing saved yet"
            return (gone(run), nothing, pd.DataFrame(columns=TABLE_HEADERS), [], gr.update(choices=[], value=None))
        scores = RunScores.load(path)
        labels = _saved_labels(path)
        if scores is None and not labels:  # picking a run is not asking for anything: no error, a line
            return ("Nothing saved in this run yet: its checkpoints appear here once it saves one.", nothing,
                    pd.DataFrame(columns=TABLE_HEADERS), [], gr.update(choices=[], value=None))
        if scores is None:
            return ("Not evaluated yet: press “Evaluate this run”, or train with “Score each checkpoint as it is "
                    "saved” ticked (Advanced › Evaluation).", nothing, pd.DataFrame(columns=TABLE_HEADERS), [],
                    gr.update(choices=labels, value=labels[-1] if labels else None))
        top = scores.best
        text = (f"**Best checkpoint: {top.label}** (step {top.step}; style {top.style or 0:.2f}, content "
                f"{top.content if top.content is not None else float('nan'):.2f}, copying {top.copying or 0:.2f})"
                f"\n\nRule: {scores.rule}." if top else "No checkpoint scored yet.")
        images, columns = _grid(path, scores, ws.display)
        return (text, _plot(scores), _table(scores), gr.update(value=images, columns=columns),
                gr.update(choices=labels, value=top.label if top else (labels[-1] if labels else None)))

    @user_errors
    def show(run: str | None):
        return outputs(run)

    @user_errors
    def evaluate(run: str | None):
        """Score every checkpoint of the run through the app's Previewer (its base model, loaded once)."""
        path = run_path(run)
        if (path / "config.toml").is_file() and not _saved_labels(path):  # the library's line names the full path
            raise gr.Error(f"{run}: nothing saved in this run yet; evaluate it once it has saved a checkpoint",
                           print_exception=False)
        model = run_config(path).model.name
        with ctx.preview_lock:
            evaluate_run(path, previewer=ctx.previewer(model))
        return outputs(run)

    @user_errors
    def export(run: str | None, which: str | None):
        path = run_path(run)
        chosen = chosen_checkpoint(path, which or "best")
        target = ws.export_target(chosen.source.file, "kohya", "fp16")
        report = export_adapter(chosen.source.file, "kohya", target, base_model=run_config(path).model.name)
        gr.Info(f"{chosen.label}: {report.num_tensors} tensors, verified")
        return gr.update(value=str(report.path), visible=True)

    panel = [best, plot, table, grid, checkpoint]
    evaluate_btn.click(evaluate, run_pick, panel, api_name="evaluate", show_progress_on=best)
    refresh_btn.click(show, run_pick, panel, api_name="scores", show_progress_on=best)
    run_pick.change(show, run_pick, panel, api_name=False, show_progress_on=best)
    export_btn.click(export, [run_pick, checkpoint], exported, api_name="export_checkpoint")
    return {"show": (show, panel)}


def compare_controls(ctx: Context) -> None:
    """Inside the Runs panel: two or more runs side by side (each run's best checkpoint and its scores)."""
    ws = ctx.workspace
    with gr.Row(equal_height=True):
        # any value: the API names runs made after the page (and the app) started; compare() checks each one
        picked = gr.Dropdown(ctx.run_choices(), multiselect=True, label="Compare runs", elem_id="compare-runs",
                             info="two or more runs (a sweep's folder counts as its runs)", scale=4,
                             allow_custom_value=True)
        compare_btn = gr.Button("Compare", size="sm", elem_id="compare", scale=1)
    table = gr.Dataframe(headers=["run", "best", *PLOTTED], interactive=False, wrap=True, elem_id="compare-table")

    @user_errors
    def compare(runs: list[str] | None) -> pd.DataFrame:
        if not runs:
            raise gr.Error("pick two or more runs to compare", print_exception=False)
        paths = [ws.inside(r, [ws.outputs]) for r in runs]
        missing = [r for r, p in zip(runs, paths, strict=True) if not p.exists()]
        if missing:
            raise gr.Error(gone(missing[0]), print_exception=False)
        rows = comparison(compare_runs(paths))
        flat = [{"run": ws.display(d["run"]), **d["settings"], "best": d["best"] or "not evaluated",
                 **({c: d["scores"][c] for c in COLUMNS} if d["scores"] else {})} for d in rows]
        return pd.DataFrame(flat).round(4)

    compare_btn.click(compare, picked, table, api_name="compare")
    # the choices alone: a value sent back would undo the runs picked while this answer was on its way
    picked.focus(lambda: gr.update(choices=ctx.run_choices()), None, picked, api_name=False, show_progress="hidden")


def sweep_controls(ctx: Context, form: ConfigForm, notice: gr.Markdown) -> Any:
    """Inside the Queue panel: the form's config trained once per combination of a grid, through the queue;
    returns the button's event."""
    ws = ctx.workspace
    grid = gr.Textbox(label="Sweep: settings and their values", lines=2, elem_id="sweep-grid",
                      placeholder="train.lr=1e-4,3e-4,1e-3\nlora.rank=8,16",
                      info="one setting per line (its key, as under each form field); every combination becomes "
                      "a queued run, scored as it saves, in a folder of its own under outputs/<dataset>-sweep")
    button = gr.Button("Queue a sweep", size="sm", elem_id="queue-sweep")

    @user_errors
    def sweep(text: str, **values: Any) -> str:
        config = form.to_config(values)
        lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
        folder = sweep_folder(ws.outputs / f"{Path(config.data.path).name or 'run'}-sweep")
        runs = sweep_configs(config, parse_grid(lines), folder)
        ctx.job.enqueue_sweep([c for _, c in runs])
        return (f"queued a sweep of {len(runs)} runs into `{ws.display(folder)}`: "
                + ", ".join(label for label, _ in runs) + ". Compare them under Runs when they are done.")

    # the event, so the Train tab follows the queue once the sweep is in it
    return button.click(sweep, inputs_kwargs={"text": grid, **form.by_parameter}, outputs=notice,
                        api_name="queue_sweep", concurrency_limit=None, show_progress_on=notice)
