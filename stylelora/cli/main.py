"""The parser of every command and ``main``: one plain message and exit 1 for a user's mistake, 2 for usage."""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from ..core.errors import ConfigError, StyleloraError
from ..core.logs import quiet_libraries
from .evaluate import _add_compare, _add_evaluate, _add_sweep
from .flags import CHECK_FLAGS, _add_config_flags, cli_words
from .tools import (
    FORCE_HELP,
    _add_caption,
    _add_captions,
    _add_generate,
    _add_import_kohya,
    cmd_export,
    cmd_merge,
    cmd_resize,
    cmd_split,
)
from .train import _add_train, _rank, cmd_check_data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylelora", description="Train, preview and export Stable Diffusion style LoRAs."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --debug is accepted after the subcommand too (stylelora train ... --debug).
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    real_add = sub.add_parser
    sub.add_parser = lambda *a, **k: real_add(*a, parents=[debug], **k)  # type: ignore[method-assign]
    _add_train(sub)

    _add_generate(sub)
    _add_caption(sub)
    _add_captions(sub)
    _add_import_kohya(sub)
    _add_evaluate(sub)
    _add_compare(sub)
    _add_sweep(sub)

    e = sub.add_parser("export", help="convert a run or adapter file to kohya or diffusers format, verified")
    e.add_argument("source", help="a run folder, an adapter .safetensors (kohya or diffusers), or a diffusers folder")
    e.add_argument("--format", choices=["kohya", "diffusers"], required=True,
                   help="kohya: one .safetensors for AUTOMATIC1111/ComfyUI; diffusers: a folder for load_lora_weights")
    e.add_argument("--out", required=True, help="kohya: FILE.safetensors; diffusers: a folder")
    e.add_argument("--precision", choices=["fp16", "fp32", "bf16"], default="fp16", help="saved precision")
    e.add_argument("--model", help="the base model, when the file does not name it (files from other trainers)")
    e.add_argument("--bake-alpha", action="store_true",
                   help="diffusers: fold alpha/rank into the weights (alpha = rank), for diffusers before 0.34")
    e.add_argument("--checkpoint", metavar="WHICH", help="a run's checkpoint instead of its final adapter: best "
                   "(the best by stylelora evaluate), a step (250) or step-000250")
    e.add_argument("--force", action="store_true", help=FORCE_HELP)
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("merge", help="bake an adapter into its base model: a diffusers folder, or one checkpoint file")
    m.add_argument("--model", required=True, help="the base model (builtin:tiny, a folder, a .safetensors, a hub id)")
    m.add_argument("--lora", required=True, help="the adapter file (kohya or diffusers)")
    m.add_argument("--scale", type=float, default=1.0, help="adapter strength baked in (default 1.0)")
    m.add_argument("--out", required=True, help="the diffusers folder to write, or FILE.safetensors for one "
                   "checkpoint in the original layout (AUTOMATIC1111, ComfyUI), verified")
    m.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="precision of a .safetensors checkpoint (a diffusers folder keeps the model's own)")
    m.add_argument("--force", action="store_true", help=FORCE_HELP + "; a folder of other files is never replaced")
    m.set_defaults(func=cmd_merge)

    r = sub.add_parser("resize", help="lower an adapter's rank by SVD and report the energy retained")
    r.add_argument("file", help="the adapter file (kohya or diffusers)")
    r.add_argument("--rank", type=int, required=True, help="the new, lower rank")
    r.add_argument("--out", required=True, help="the adapter file to write (same format as the input)")
    r.add_argument("--model", help="the base model, when the file does not name it")
    r.add_argument("--force", action="store_true", help=FORCE_HELP)
    r.set_defaults(func=cmd_resize)

    s = sub.add_parser("split", help="keep some UNet blocks of an adapter (B-LoRA style/content) in a new file",
                       description="Write the modules of the kept blocks as a new adapter, in the same format, "
                       "verified. style keeps up.0.attn.1 and content up.0.attn.0 (B-LoRA's finding for SDXL).")
    s.add_argument("file", help="the adapter file (kohya or diffusers), or a run folder")
    s.add_argument("--keep", required=True, nargs="+", metavar="BLOCK",
                   help="style, content, or blocks: down.N, mid, up.N, optionally .attn.M/.res.M (up.0.attn.1); "
                   "unet for the whole UNet; te, te1, te2 to keep text encoders")
    s.add_argument("--out", required=True, help="the adapter file to write (same format as the input)")
    s.add_argument("--model", help="the base model, when the file does not name it")
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.set_defaults(func=cmd_split)

    c = sub.add_parser(
        "check-data", help="check a dataset folder and explain every problem",
        description="Check every file of a dataset folder (the folder is only read): per file, what is wrong "
        "and what stylelora will do about it, then a summary. Exit status 0 when training can proceed "
        "(warnings allowed), 1 when it cannot.")
    c.add_argument("folder", help="the dataset folder")
    _add_config_flags(c, CHECK_FLAGS, default=True)
    c.add_argument("--model", help="count caption tokens with this model's tokenizer (else the cached CLIP "
                   "tokenizer, else an estimate)")
    c.add_argument("--level", choices=["error", "warning", "info"], default="info",
                   help="show findings of this level and worse (default: all)")
    c.set_defaults(func=cmd_check_data)
    return parser


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the current ``sys.stderr`` (which tests and embedding hosts may swap), not the one at setup."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _log_to_stderr() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)


def _command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub)command's own parser that ``argv`` names (``stylelora captions replace``: replace's)."""
    current = parser
    for token in argv:
        commands = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if commands is None:
            break
        current = commands.choices.get(token, current)
    return current


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that an unknown flag is refused by its own command's parser (its usage, not
    the top-level one) with the flag it was probably meant to be: ``--stpes: did you mean --steps?``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = _command_parser(parser, argv)
        flags = [flag for action in command._actions for flag in action.option_strings if flag.startswith("--")]
        shown = []
        for given in unknown:
            close = difflib.get_close_matches(given.split("=", 1)[0], flags, n=1, cutoff=0.6)
            shown.append(f"{given} (did you mean {close[0]}?)" if given.startswith("-") and close else given)
        command.error(f"unrecognized arguments: {' '.join(shown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    _log_to_stderr()
    if args.command != "train" or not getattr(args, "print_config", False):
        quiet_libraries()
    try:
        return int(args.func(args))
    except StyleloraError as e:
        if args.debug:
            traceback.print_exc()
        rank = _rank()
        if rank == 0:
            print(f"error: {cli_words(str(e))}", file=sys.stderr)
        elif not isinstance(e, ConfigError):  # every process checks the same config; the main one says what is wrong
            print(f"error (process {rank}): {cli_words(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command in ("train", "sweep"):
            print("interrupted; continue from the last complete checkpoint with --resume auto", file=sys.stderr)
        else:  # every file is written under a temporary name and renamed when whole (core.fileio)
            print(f"interrupted; {args.command} wrote nothing (an earlier file of the same name is as it was); "
                  "run it again to finish", file=sys.stderr)
        return 130
    except Exception:  # a bug, not a user error: show everything needed to report it
        traceback.print_exc()
        print("error: this is a bug in stylelora, not a problem with your input. Please report it with the "
              "traceback above and the command you ran.", file=sys.stderr)
        return 1
