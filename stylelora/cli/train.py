"""``stylelora train`` and ``stylelora check-data``: a run (one process, or one of an accelerate launch) and
the dataset check that reads a folder as training would."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

from ..core.config import Config, all_fields
from .flags import CHECK_FLAGS, TRAIN_FLAGS, _add_config_flags, cli_words, config_from_args
from .progress import EventStream, TerminalProgress

# accelerate launch and torchrun pass a terminal's Ctrl-C on to their processes, which got it already:
# a second signal this soon after the first is that echo, not a user asking to quit at once.
LAUNCHER_ECHO_S = 3.0


def _launched() -> bool:
    """Whether this is one of several processes that accelerate launch or torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _rank() -> int:
    """This process's rank under accelerate launch or torchrun (0, the main one, otherwise)."""
    return int(os.environ.get("RANK", "0") or 0)


def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    if args.estimate:
        from ..training.loop import estimate_run

        result = estimate_run(config)
        print(result.summary())
        return 0 if result.fits else 1
    from ..training.loop import train

    stop = threading.Event()
    first_signal = [0.0]

    def request_stop(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal means: stop now (the last checkpoint is complete on disk)
            if _launched() and time.monotonic() - first_signal[0] < LAUNCHER_ECHO_S:
                return  # the launcher passing on the Ctrl-C this process got from the terminal already
            raise KeyboardInterrupt
        first_signal[0] = time.monotonic()
        if _rank() == 0:  # the main process speaks for the run
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(send it again to quit at once)...", file=sys.stderr)
        stop.set()

    def stop_requested() -> bool:
        return stop.is_set() or (args.stop_file is not None and os.path.exists(args.stop_file))

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    progress: TerminalProgress | EventStream = EventStream() if args.json_events else TerminalProgress()
    try:
        train(config, progress, stop_requested)
    finally:
        progress.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from ..data.doctor import check_dataset

    # the same limits as training, with the same messages
    config = Config().with_overrides({dotted: getattr(args, dotted) for dotted in CHECK_FLAGS.values()})
    report = check_dataset(
        args.folder, config.data.resolution, config.train.batch_size, caption_extension=config.data.caption_extension,
        repeats=config.data.repeats, trigger_word=config.data.trigger_word, model=args.model,
        max_token_length=config.data.max_token_length,
    )
    print(cli_words(report.to_text(args.level)))
    return 0 if report.can_train else 1


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a LoRA (from a TOML config, flags, or both)")
    p.add_argument("config", nargs="?", help="a config.toml (e.g. a run's own, to replay it)")
    _add_config_flags(p, TRAIN_FLAGS, default=False)
    fields = all_fields()
    p.add_argument("--train-text-encoder", dest="lora.train_text_encoder", action="store_const",
                   const=True, help=fields["lora.train_text_encoder"].metadata["help"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config field, e.g. --set train.lr_scheduler=cosine (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--json-events", action="store_true",
                   help="report progress as one JSON object per line on stdout (for programs that follow the run)")
    p.add_argument("--stop-file", metavar="PATH",
                   help="stop after the step during which this file appears, saving as on Ctrl-C")
    p.add_argument("--estimate", action="store_true", help="print the memory and time the run would take "
                   "(and what to change if it will not fit), then exit without training")
    p.set_defaults(func=cmd_train)
