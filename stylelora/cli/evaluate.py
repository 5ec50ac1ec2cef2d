"""``stylelora evaluate``, ``compare`` and ``sweep``: which checkpoint carries the style, runs side by side, and a
grid of settings trained through the queue and compared."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..core.errors import StyleloraError
from .flags import cli_words


def _add_evaluate(sub: Any) -> None:
    e = sub.add_parser(
        "evaluate", help="score every checkpoint of a run (style, content kept, copying, leak, variety) and name "
        "the best", description="Render the run's evaluation set with each checkpoint (the base model is loaded "
        "once), score the images, print the table and the best checkpoint, and write them into the run folder "
        "(eval/scores.json). stylelora export RUN --checkpoint best writes the best one.")
    e.add_argument("run", help="a run folder (outputs/NAME)")
    e.add_argument("--checkpoints", metavar="LIST", help="only these, comma-separated: step-000100,step-000200 "
                   "(or steps: 100,200); default every checkpoint the run saved")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change an eval setting for this evaluation, e.g. --set eval.descriptor=clip")
    e.add_argument("--json", action="store_true", help="print one JSON object per checkpoint instead of the table")
    e.set_defaults(func=cmd_evaluate)


def _add_compare(sub: Any) -> None:
    c = sub.add_parser("compare", help="runs side by side: each run's best checkpoint and its scores",
                       description="Compare evaluated runs (a folder of runs, such as a sweep's, stands for each "
                       "run in it): the settings that differ, each run's best checkpoint and its scores.")
    c.add_argument("runs", nargs="+", help="run folders, or a folder that holds runs")
    c.add_argument("--json", action="store_true", help="print one JSON object per run instead of the table")
    c.set_defaults(func=cmd_compare)


def _add_sweep(sub: Any) -> None:
    s = sub.add_parser(
        "sweep", help="train one run per combination of settings through the queue, score them, compare them",
        description="Queue one run per combination of the --grid values (each in its own folder under the "
        "sweep's, scored as it saves: eval.every_save), train them one after another, then print each run's best "
        "checkpoint and its scores. Ctrl-C stops the current run and cancels the rest.")
    s.add_argument("config", help="the config every run starts from (a TOML file)")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a setting and its values, e.g. --grid train.lr=1e-4,3e-4,1e-3 (repeat for more settings)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config field for every run")
    s.add_argument("--output", metavar="DIR", help="the sweep's folder (default outputs/<dataset>-sweep)")
    s.set_defaults(func=cmd_sweep)


def _overrides(texts: list[str], only: str | None = None) -> dict[str, Any]:
    from ..core.config import parse_override

    values = dict(parse_override(text) for text in texts)
    wrong = [k for k in values if only and not k.startswith(only)]
    if wrong:
        raise StyleloraError(f"--set {wrong[0]}: evaluate changes eval settings only ({only}...); the others are "
                             "the run's own")
    return values


def _scored(event: Any) -> None:
    from ..core import events

    if isinstance(event, events.Evaluated):
        style = event.scores.get("eval/style")
        shown = f"style {style:.2f}" if style is not None else "style -"
        print(f"scored {event.label}: {shown}" + (f"; best so far {event.best}" if event.best else ""),
              file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.runner import evaluate_run

    wanted = [c for c in (args.checkpoints or "").split(",") if c.strip()]
    scores = evaluate_run(args.run, wanted or None, overrides=_overrides(args.overrides, "eval."), on_event=_scored)
    _hparams(args.run, scores)
    if args.json:
        print(json.dumps([{"checkpoint": r.label, "step": r.step, "best": r.best, "copied": r.copied,
                           "scores": {k: v for k, v in r.to_dict().items() if k in _SCORES}}
                          for r in scores.checkpoints], indent=1))
    else:
        print(scores.table())
    return 0


_SCORES = ("style", "content", "copying", "leak", "variety", "prompt", "val_loss")


def _hparams(run: str, scores: Any) -> None:
    """The best checkpoint's scores in TensorBoard's hparams view, beside the run's settings."""
    from pathlib import Path

    from ..evaluation.checkpoints import run_config
    from ..training.trackers import write_hparams

    best = scores.best
    if best is not None:
        values = {f"best/{k.removeprefix('eval/')}": v for k, v in best.record().items()}
        write_hparams(Path(run).expanduser(), run_config(run), {"best/step": float(best.step), **values})


def cmd_compare(args: argparse.Namespace) -> int:
    from ..evaluation.compare import compare_runs, comparison, format_comparison

    rows = compare_runs(args.runs)
    if args.json:
        print(json.dumps(comparison(rows), indent=1))
        return 0
    print(format_comparison(rows))
    for row in (r for r in rows if r.scores is None):
        print(_not_scored(row.path), file=sys.stderr)
    return 0


def _not_scored(run: Any) -> str:
    """What to do about a run that has no scores: evaluate it, or, with nothing saved yet, train it first."""
    import shlex

    from ..evaluation.checkpoints import run_checkpoints

    try:
        run_checkpoints(run)
    except StyleloraError as e:  # nothing saved yet: the same words as evaluate's
        return str(e)
    return f"{run}: not evaluated yet; score it with: stylelora evaluate {shlex.quote(str(run))}"


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..core import events
    from ..core.config import Config
    from ..evaluation.compare import compare_runs, format_comparison
    from ..services.jobs import TrainingJob
    from ..services.sweep import parse_grid, sweep_configs, sweep_folder
    from ..training.loop import train
    from .progress import TerminalProgress

    grid = parse_grid(args.grid)
    config = Config.load(args.config).with_overrides(_overrides(args.overrides))
    folder = Path(args.output) if args.output else sweep_folder(config.output_dir.with_name(
        config.output_dir.name + "-sweep"))
    runs = sweep_configs(config, grid, folder)
    print(f"sweep of {len(runs)} runs in {folder}: {', '.join(label for label, _ in runs)}", file=sys.stderr)
    progress = TerminalProgress()

    def runner(config: Config, on_event: Any, stop: Any, requests: Any = None) -> Any:
        def both(event: Any) -> None:
            on_event(event)
            if isinstance(event, events.Finished):  # stdout is for the comparison table at the end
                progress.close()
                print(f"{Path(event.output_dir).name}: {event.step} steps", file=sys.stderr)
            else:
                progress(event)
            _scored(event)

        try:
            return train(config, both, stop, requests=requests)
        except StyleloraError as e:  # the queue goes on with the next run; say why this one ended
            progress.close()
            print(f"error ({Path(config.train.output_dir).name}): {cli_words(str(e))}", file=sys.stderr)
            raise

    job = TrainingJob(runner)
    job.enqueue_sweep([c for _, c in runs])
    try:
        while job.running or job.queued():
            job.join_all(timeout=1.0)
    except KeyboardInterrupt:
        for item in job.queued():
            job.cancel(item.id)
        job.stop()
        job.join()
        progress.close()
        print("sweep interrupted: the current run saved its checkpoint; the others were not started",
              file=sys.stderr)
        return 130
    progress.close()
    trained = [c.train.output_dir for _, c in runs if (Path(c.train.output_dir) / "config.toml").is_file()]
    if not trained:
        raise StyleloraError("no run of the sweep trained; the messages above say why")
    print(format_comparison(compare_runs(trained)))
    return 0
