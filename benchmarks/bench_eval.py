"""What evaluation costs: seconds per checkpoint, and the share of a run's time ``eval.every_save`` takes.

    python benchmarks/bench_eval.py                                   # builtin:small, 256 px, the default eval set
    python benchmarks/bench_eval.py --eval-steps 10 --style-prompts 2 --prompts 2 --threads 1   # a smaller set

It trains the same run twice on datasets/example (``train.save_every`` gives the checkpoints), once plainly and
once with ``eval.every_save = true``, then runs ``evaluate_run`` on the plain run with a fresh Previewer. It times
every scoring (the first one also renders the base model's images and embeds the training images, once per run),
counts the model loads (one per training run, one for ``evaluate_run``: scoring never loads the model again) and
prints a Markdown row for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import torch  # noqa: E402

import stylelora.evaluation.live as live_module  # noqa: E402
import stylelora.evaluation.runner as runner_module  # noqa: E402
import stylelora.preview.previewer as previewer_module  # noqa: E402
import stylelora.training.loop as loop_module  # noqa: E402
from stylelora.core.config import Config  # noqa: E402
from stylelora.evaluation.runner import evaluate_run  # noqa: E402
from stylelora.preview.previewer import Previewer  # noqa: E402
from stylelora.training.loop import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOADS: list[str] = []
SCORINGS: list[float] = []


def _count_loads() -> None:
    for module in (loop_module, previewer_module):
        real = module.load_base_model
        module.load_base_model = lambda *a, _real=real, **k: LOADS.append(a[0]) or _real(*a, **k)


def _time_scoring() -> None:
    """Every ``Evaluator.score`` call (live or after the run) is timed into SCORINGS; so is the evaluator's set-up
    (base images, training images' embeddings), added to the first scoring as it is paid there."""
    real_score, real_init = runner_module.Evaluator.score, runner_module.Evaluator.__init__

    def score(self, *a, **k):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        row = real_score(self, *a, **k)
        SCORINGS.append(time.perf_counter() - started)
        return row

    def init(self, *a, **k) -> None:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        real_init(self, *a, **k)
        SCORINGS.append(-(time.perf_counter() - started))  # negative: the set-up, reported apart

    runner_module.Evaluator.score, runner_module.Evaluator.__init__ = score, init
    assert live_module.Evaluator is runner_module.Evaluator


def timed(fn) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steadier figure."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _split(timings: list[float]) -> tuple[float, list[float]]:
    setup = -sum(t for t in timings if t < 0)
    return setup, [t for t in timings if t >= 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--eval-steps", type=int, default=20, help="denoising steps per evaluation image")
    parser.add_argument("--style-prompts", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4, help="how many of the default transfer prompts")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    _count_loads()
    _time_scoring()
    prompts = Config().eval.prompts[: args.prompts]
    base = {"model.name": args.model, "data.path": str(ROOT / "datasets" / "example"),
            "data.resolution": args.resolution,
            "data.trigger_word": "flat poster style", "lora.rank": 8, "lora.alpha": 8.0, "train.steps": args.steps,
            "train.save_every": args.save_every, "train.lr": 1e-3, "train.log_with": "none",
            "eval.steps": args.eval_steps, "eval.style_prompts": args.style_prompts, "eval.prompts": prompts,
            "eval.seeds": args.seeds}
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[bool, tuple[float, float]] = {}
        for i, every_save in enumerate((False, True, False)):  # plain twice: the first pays the warm-up too
            out = Path(tmp) / (("scored" if every_save else "plain") + str(i))
            config = Config().with_overrides({**base, "train.output_dir": str(out), "eval.every_save": every_save})
            took = timed(lambda c=config: train(c))
            runs[every_save] = min(runs.get(every_save, took), took)
        live_setup, live = _split(SCORINGS)
        assert LOADS == [args.model] * 3, LOADS  # each run loads once; scoring during training never
        SCORINGS.clear()
        previewer = Previewer(args.model)
        started = time.perf_counter()
        evaluate_run(Path(tmp) / "plain2", previewer=previewer)
        after = time.perf_counter() - started
        after_setup, later = _split(SCORINGS)
        assert previewer.base_loads == 1 and len(LOADS) == 4

    images = (args.style_prompts + 2 * len(prompts)) * args.seeds
    (wall, cpu), (wall_scored, cpu_scored) = runs[False], runs[True]
    share, cpu_share = (wall_scored - wall) / wall_scored, (cpu_scored - cpu) / cpu_scored
    print(f"{args.model}, {args.resolution} px, {args.steps} steps saved every {args.save_every}; eval set "
          f"{images} images x {args.eval_steps} steps; {torch.get_num_threads()} threads")
    print(f"  training: {wall:.1f} s plain, {wall_scored:.1f} s with eval.every_save ({share:.0%} of the run); CPU "
          f"time {cpu:.1f} s and {cpu_scored:.1f} s ({cpu_share:.0%})")
    print(f"  live scoring: set-up {live_setup:.1f} s (once), per checkpoint {', '.join(f'{t:.1f}' for t in live)} s")
    print(f"  evaluate_run: {after:.1f} s; set-up {after_setup:.1f} s, per checkpoint "
          f"{', '.join(f'{t:.1f}' for t in later)} s; model loads: {previewer.base_loads}")
    per = sum(later) / max(len(later), 1)
    command = " ".join(["python", "benchmarks/bench_eval.py", *sys.argv[1:]])
    print(f"\n| `{command}` | {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads | {args.model}, {args.resolution} px | {images} x {args.eval_steps} "
          f"steps | {per:.1f} s | {after_setup:.1f} s | {wall:.0f} s / {wall_scored:.0f} s ({share:.0%}); "
          f"CPU {cpu:.0f} s / {cpu_scored:.0f} s ({cpu_share:.0%}) | "
          f"{date.today()} |")


if __name__ == "__main__":
    main()
