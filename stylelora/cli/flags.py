"""Flags made from the config's fields, and the words a library message's fix is printed in (``cli_words``)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from ..core.config import Config, GenerateSettings, all_fields, field_type
from ..core.errors import CHECK_DATA, CONTINUE, SETTING

# flag -> dotted config field; the help text comes from the field itself.
TRAIN_FLAGS: dict[str, str] = {
    "--model": "model.name",
    "--data": "data.path",
    "--output": "train.output_dir",
    "--steps": "train.steps",
    "--rank": "lora.rank",
    "--alpha": "lora.alpha",
    "--lr": "train.lr",
    "--resolution": "data.resolution",
    "--batch-size": "train.batch_size",
    "--seed": "train.seed",
    "--save-every": "train.save_every",
    "--resume": "train.resume",
}


# check-data checks a dataset as training would read it: the same fields, defaults and limits.
CHECK_FLAGS: dict[str, str] = {
    "--resolution": "data.resolution",
    "--batch-size": "train.batch_size",
    "--caption-extension": "data.caption_extension",
    "--trigger-word": "data.trigger_word",
    "--repeats": "data.repeats",
    "--max-token-length": "data.max_token_length",
}


FLAG_OF = {dotted: flag for flag, dotted in TRAIN_FLAGS.items()}


def _continue_command(m: re.Match[str]) -> str:
    """The command that continues a run, launched as it was (several machines: each with its accelerate config)."""
    command = f"stylelora train {m['config']} --resume auto"
    if m["processes"]:
        return f"accelerate launch --multi_gpu --num_processes {m['processes']} -m {command}"
    return command


def cli_words(text: str) -> str:
    """A library message in the command line's terms: a field to set becomes its flag (``--resume auto``)
    or ``--set field=value``, and continuing a run becomes the command that does it."""
    text = CONTINUE.sub(_continue_command, text)
    text = CHECK_DATA.sub(lambda m: f"'stylelora check-data {m['folder']}'", text)

    def flag(m: re.Match[str]) -> str:
        field, value = m["field"], m["value"]
        if field == "lora.train_text_encoder":  # a switch on the command line: given, or left out
            return "without --train-text-encoder" if value == "false" else "--train-text-encoder"
        if value is None:
            return FLAG_OF.get(field, field)
        return f"{FLAG_OF[field]} {value}" if field in FLAG_OF else f"--set {field}={value}"

    return SETTING.sub(flag, text)


# generate's flags: one per GenerateSettings field (--negative-prompt for negative_prompt, ...).
GENERATE_FLAGS: dict[str, str] = {"--" + f.name.replace("_", "-"): f.name for f in dataclasses.fields(GenerateSettings)}


def _value_type(tp: Any) -> Any:
    """What argparse converts a flag's text with: the field's type without ``| None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is typing.Literal and all(isinstance(a, int) for a in typing.get_args(tp)):
        return int  # data.max_token_length: 75, 150 or 225
    return tp if tp in (int, float) else str


def _add_field_flag(p: argparse.ArgumentParser, flag: str, dest: str, f: dataclasses.Field[Any], tp: Any, *,
                    default: bool, help_suffix: str = "") -> argparse.Action:
    """One flag made from a dataclass field: its type, help text and, if ``default``, its default value."""
    return p.add_argument(flag, dest=dest, type=_value_type(tp), default=f.default if default else None,
                          metavar=flag.strip("-").upper().replace("-", "_"), help=f.metadata["help"] + help_suffix)


def _add_config_flags(p: argparse.ArgumentParser, flags: dict[str, str], *, default: bool) -> None:
    """Flags for config fields, stored under their dotted names; without ``default`` an unset flag is None
    (it then overrides nothing)."""
    fields = all_fields()
    for flag, dotted in flags.items():
        suffix = "" if default else f" [{dotted}]"
        _add_field_flag(p, flag, dotted, fields[dotted], field_type(dotted), default=default, help_suffix=suffix)


def config_from_args(args: argparse.Namespace) -> Config:
    config, started_in = _load_config(Path(args.config)) if args.config else (Config(), None)
    overrides: dict[str, Any] = {}
    for dotted in [*TRAIN_FLAGS.values(), "lora.train_text_encoder"]:
        value = getattr(args, dotted, None)
        if value is not None:
            overrides[dotted] = value
    run_folder = config.train.output_dir
    config = config.with_overrides(overrides) if overrides else config
    config = config.with_overrides(args.overrides) if args.overrides else config
    if started_in is not None and config.train.output_dir == run_folder:  # no --output took it elsewhere
        print(f"{args.config}: this run started in another folder; it goes on here, in {run_folder} (its adapter "
              f"files keep the name {config.run_name})", file=sys.stderr)
    return config


def _load_config(path: Path) -> tuple[Config, str | None]:
    """The config file ``path``, and the folder its run started in when that is not where the file is now: a run's
    own config.toml read in a copied or moved run folder is that folder's run (it continues there)."""
    from ..adapters.checkpoint_files import holds_run, run_folder_config

    config = Config.load(path)
    if path.name != "config.toml" or not holds_run(path.parent):
        return config, None
    here = run_folder_config(path.parent, config)
    moved = here.train.output_dir != config.train.output_dir
    return here, config.train.output_dir if moved else None


def _settings_flags(parser: argparse.ArgumentParser, settings_cls: type, skip: set[str]) -> None:
    """One flag per field of a settings dataclass made with ``option()``: its help, type and choices."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(settings_cls)
    for f in dataclasses.fields(settings_cls):
        if f.name in skip:
            continue
        flag, tp, text = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata["help"]
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, dest=f.name, nargs="+", metavar="WORD", help=text)
        elif typing.get_origin(tp) is typing.Literal:
            parser.add_argument(flag, dest=f.name, choices=typing.get_args(tp), help=f"{text} (default {f.default})")
        else:
            parser.add_argument(flag, dest=f.name, type=tp if tp in (int, float) else str,
                                metavar=f.name.upper(), help=f"{text} (default {f.default})")
