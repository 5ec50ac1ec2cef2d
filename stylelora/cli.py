"""The ``stylelora`` command: parses arguments into library calls and prints events. No logic here.

Exit status: 0 success, 1 a problem with the user's input (one plain message, no traceback unless
``--debug``), 2 command-line usage errors (argparse).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import types
import typing
from collections.abc import Sequence
from typing import Any

from .core.config import Config, GenerateSettings, all_fields, field_type
from .core.errors import CHECK_DATA, CONTINUE, SETTING, ConfigError, StyleloraError
from .core.logs import quiet_libraries
from .preview.samplers import sampler_names

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
# accelerate launch and torchrun pass a terminal's Ctrl-C on to their processes, which got it already:
# a second signal this soon after the first is that echo, not a user asking to quit at once.
LAUNCHER_ECHO_S = 3.0
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


def config_from_args(args: argparse.Namespace) -> Config:
    config = Config.load(args.config) if args.config else Config()
    overrides: dict[str, Any] = {}
    for dotted in [*TRAIN_FLAGS.values(), "lora.train_text_encoder"]:
        value = getattr(args, dotted, None)
        if value is not None:
            overrides[dotted] = value
    config = config.with_overrides(overrides) if overrides else config
    return config.with_overrides(args.overrides) if args.overrides else config


class TerminalProgress:
    """Renders trainer events on a terminal: a tqdm bar with loss, speed and ETA."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, event: Any) -> None:
        from tqdm import tqdm

        from .core import events

        if isinstance(event, events.Started):
            where = event.device if event.processes == 1 else f"{event.device} with {event.processes} processes"
            print(f"training on {where} (effective batch {event.effective_batch}): {event.num_images} images -> "
                  f"{event.output_dir}", file=sys.stderr)
            self.bar = tqdm(total=event.total_steps, initial=event.start_step, unit="step", dynamic_ncols=True)
        elif isinstance(event, events.Progress) and self.bar is not None:
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", img_s=f"{event.images_per_s:.2f}")
            self.bar.update(event.step - self.bar.n)
        elif isinstance(event, events.Estimated):
            self._write(event.summary if event.fits else f"warning: {event.summary}")
        elif isinstance(event, events.Message):
            self._write(cli_words(event.text))
        elif isinstance(event, events.Validation):
            self._write(f"step {event.step}: validation loss {event.loss:.5f}")
        elif isinstance(event, events.CheckpointSaved):
            self._write(f"checkpoint: {event.path}")
        elif isinstance(event, events.SampleSaved):
            self._write(f"samples at step {event.step}: {', '.join(str(p) for p in event.paths)}")
        elif isinstance(event, events.Finished):
            self.close()
            print(f"done: {event.step} steps; adapter files:", file=sys.stderr)
            for path in event.adapter_paths:
                print(f"  {path}")

    def close(self) -> None:
        """End the progress bar's line, so that a message printed after it starts on its own line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)


class EventStream:
    """Writes each event as one JSON line on stdout (``--json-events``), for a program following the run."""

    def __call__(self, event: Any) -> None:
        from .core import events

        print(json.dumps(events.to_record(event)), flush=True)

    def close(self) -> None:
        pass


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
        from .training.loop import estimate_run

        result = estimate_run(config)
        print(result.summary())
        return 0 if result.fits else 1
    from .training.loop import train

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
    from .data.doctor import check_dataset

    # the same limits as training, with the same messages
    config = Config().with_overrides({dotted: getattr(args, dotted) for dotted in CHECK_FLAGS.values()})
    report = check_dataset(
        args.folder, config.data.resolution, config.train.batch_size, caption_extension=config.data.caption_extension,
        repeats=config.data.repeats, trigger_word=config.data.trigger_word, model=args.model,
        max_token_length=config.data.max_token_length,
    )
    print(cli_words(report.to_text(args.level)))
    return 0 if report.can_train else 1


def _add_generate(sub: Any) -> None:
    g = sub.add_parser("generate", help="render images with an adapter at one or more strengths")
    g.add_argument("--model", default="builtin:tiny", help="base model: builtin:tiny, a folder, a file or a hub id")
    g.add_argument("--lora", help="adapter: a .safetensors file, a diffusers folder, a run or checkpoint folder")
    g.add_argument("--scale", type=float, nargs="+", metavar="S",
                   help="adapter strength (0 = base model, 1 = as trained; -1..2 are fine); several make a strip")
    g.add_argument("--blocks", nargs="+", metavar="GROUP=S", default=[],
                   help="per-block strength, as multipliers of --scale for the UNet's IN, MID and OUT blocks "
                   "(A1111's LoRA block weight), e.g. --blocks MID=0 OUT=0.5")
    g.add_argument("--prompt", required=True)
    hints = typing.get_type_hints(GenerateSettings)
    fields = {f.name: f for f in dataclasses.fields(GenerateSettings)}
    for flag, name in GENERATE_FLAGS.items():
        suffix = " One of: " + ", ".join(sampler_names()) if name == "sampler" else ""  # samplers.py owns the list
        _add_field_flag(g, flag, name, fields[name], hints[name], default=True, help_suffix=suffix)
    g.add_argument("--out", required=True, help="the PNG to write (it carries the parameters, as A1111's do)")
    g.set_defaults(func=cmd_generate)


def _group_strength(text: str) -> tuple[str, float]:
    group, _, value = text.partition("=")
    try:
        return group.strip(), float(value)
    except ValueError:
        raise StyleloraError(f"--blocks {text}: expected GROUP=NUMBER, e.g. MID=0 or OUT=0.5") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from .data.images import check_png_path, save_png
    from .preview.previewer import Previewer, block_scales, check_sampler, find_adapter

    # Cheap checks first, so a typo fails before the base model loads.
    settings = GenerateSettings(**{name: getattr(args, name) for name in GENERATE_FLAGS.values()})
    check_sampler(settings.sampler)
    check_png_path(args.out)
    for flag, given in (("--scale", args.scale), ("--blocks", args.blocks)):
        if given and not args.lora:
            raise StyleloraError(f"{flag}: give --lora too; without an adapter there is nothing to scale")
    groups = block_scales(dict(_group_strength(text) for text in args.blocks))
    if args.lora:
        find_adapter(args.lora)
    preview = Previewer(args.model)
    name = preview.attach(args.lora) if args.lora else None
    scales = args.scale or [1.0]
    if len(scales) > 1:
        image = preview.sweep(args.prompt, scales, settings, adapter=name, blocks=groups)
    else:
        image = preview.generate(args.prompt, settings, adapter=name, scale=scales[0], blocks=groups)
    print(save_png(image, args.out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .adapters.convert import export

    report = export(args.source, args.format, args.out, precision=args.precision, base_model=args.model,
                    bake_alpha=args.bake_alpha)
    print(report.summary)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .adapters.merge import merge

    out = merge(args.model, args.lora, args.scale, args.out, precision=args.precision)
    print(f"merged {args.lora} at scale {args.scale:g} into {args.model}: {out}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from .adapters.merge import resize

    report = resize(args.file, args.rank, args.out, base_model=args.model)
    print(report.summary)
    return 0


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


def _add_caption(sub: Any) -> None:
    from .data.autocaption import CaptionSettings

    c = sub.add_parser(
        "caption", help="write captions for a dataset's images with a captioner (BLIP, Florence-2, WD14 tagger)",
        description="Caption every image of a dataset folder. Existing captions are kept unless --mode says "
        "otherwise (overwrite, prefix, suffix); every write is atomic and 'stylelora captions undo DIR' puts "
        "the previous captions back.")
    c.add_argument("folder", help="the dataset folder")
    c.add_argument("--captioner", required=True, help=all_caption_help("captioner"))
    _settings_flags(c, CaptionSettings, skip={"captioner"})
    c.add_argument("--style-words-file", metavar="FILE", help="the style filter's words, one per line "
                   "(replaces the built-in list; --style-words does the same on the command line)")
    c.add_argument("--dry-run", action="store_true", help="show the captions that would be written; write nothing")
    c.add_argument("--limit", type=int, metavar="N", help="caption at most N images (with --dry-run: a quick preview)")
    c.set_defaults(func=cmd_caption)


def all_caption_help(name: str) -> str:
    import dataclasses

    from .data.autocaption import CaptionSettings

    return next(f.metadata["help"] for f in dataclasses.fields(CaptionSettings) if f.name == name)


def caption_settings_from_args(args: argparse.Namespace) -> Any:
    import dataclasses

    from .data.autocaption import CaptionSettings

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(CaptionSettings)
              if getattr(args, f.name, None) is not None}
    if args.style_words_file:
        try:
            lines = open(args.style_words_file, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise StyleloraError(f"--style-words-file: cannot read {args.style_words_file} "
                                 f"({e.strerror or e})") from None
        values["style_words"] = [w.strip() for w in lines if w.strip() and not w.startswith("#")]
    if args.limit is not None and args.limit < 1:
        raise StyleloraError(f"--limit: must be >= 1, got {args.limit}")
    return CaptionSettings(**values)


def cmd_caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data.autocaption import caption_folder, load_captioner, plan_captions
    from .data.caption_tools import read_captions

    settings = caption_settings_from_args(args)
    read_captions(args.folder, settings.caption_extension)  # a wrong folder fails before the captioner loads
    captioner = load_captioner(settings.captioner)
    bar = tqdm(unit="image", dynamic_ncols=True, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        if args.dry_run or args.limit:
            report = plan_captions(args.folder, captioner, settings, limit=args.limit, on_progress=progress)
        else:
            report = caption_folder(args.folder, captioner, settings, on_progress=progress)
    finally:
        bar.close()
    for change in report.changes:
        print(f"{change.image}: {change.after}")
    for line in report.skipped:
        print(f"skipped {line}", file=sys.stderr)
    if args.dry_run:
        print(f"dry run: {len(report.changes)} caption(s) would be written; nothing was changed", file=sys.stderr)
    else:
        if args.limit:
            from .data.caption_tools import apply_changes

            apply_changes(args.folder, report.changes, f"caption ({settings.mode}) with {captioner.name}",
                          settings.caption_extension)
        print(report.summary() + ("; 'stylelora captions undo' puts the previous captions back"
                                  if report.changes else ""), file=sys.stderr)
    return 0


def _add_captions(sub: Any) -> None:
    c = sub.add_parser("captions", help="bulk caption edits: find/replace, remove or replace a tag, tag list, undo")
    tools = c.add_subparsers(dest="tool", required=True, metavar="TOOL")

    def tool(name: str, help_text: str) -> argparse.ArgumentParser:
        p = tools.add_parser(name, help=help_text, description=help_text)
        p.add_argument("folder", help="the dataset folder")
        p.add_argument("--caption-extension", default=".txt", help="extension of caption sidecar files")
        return p

    r = tool("replace", "find and replace text in every caption (shows each change; undo with 'captions undo')")
    r.add_argument("find", help="the text to find (a Python regular expression with --regex)")
    r.add_argument("replacement", help="what to put instead ('' to delete; \\1 refers to a group with --regex)")
    r.add_argument("--regex", action="store_true", help="FIND is a regular expression")
    rt = tool("replace-tag", "replace one comma-separated tag in every caption by another")
    rt.add_argument("tag", help="the tag to replace (case, '_' and ' ' do not matter)")
    rt.add_argument("new", help="the tag to put instead")
    rm = tool("remove-tag", "remove one comma-separated tag from every caption")
    rm.add_argument("tag", help="the tag to remove (case, '_' and ' ' do not matter)")
    for p in (r, rt, rm):
        p.add_argument("--dry-run", action="store_true", help="show the changes; write nothing")
    t = tool("tags", "list every tag with the number of captions holding it, most frequent first")
    t.add_argument("--top", type=int, metavar="N", help="only the N most frequent")
    tool("undo", "put back the captions of the last bulk edit (caption, replace, tag edits)")
    c.set_defaults(func=cmd_captions)


def cmd_captions(args: argparse.Namespace) -> int:
    from .data import caption_tools as tools

    ext = args.caption_extension
    if args.tool == "tags":
        for tag, count in tools.tag_frequency(args.folder, caption_extension=ext)[: args.top]:
            print(f"{count:6d}  {tag}")
        return 0
    if args.tool == "undo":
        label, files = tools.undo_last(args.folder)
        print(f"undid '{label}': {files} file(s) restored")
        return 0
    if args.tool == "replace":
        changes = tools.find_replace(args.folder, args.find, args.replacement, regex=args.regex, caption_extension=ext)
        label = f"replace {args.find!r} with {args.replacement!r}"
    elif args.tool == "replace-tag":
        changes = tools.replace_tag(args.folder, args.tag, args.new, caption_extension=ext)
        label = f"replace tag {args.tag!r} with {args.new!r}"
    else:
        changes = tools.remove_tag(args.folder, args.tag, caption_extension=ext)
        label = f"remove tag {args.tag!r}"
    print(tools.preview_text(changes, args.folder))
    if args.dry_run:
        print("dry run: nothing was changed", file=sys.stderr)
    elif changes:
        tools.apply_changes(args.folder, changes, label, ext)
        print("written; 'stylelora captions undo' puts the previous captions back", file=sys.stderr)
    return 0


def _add_import_kohya(sub: Any) -> None:
    k = sub.add_parser(
        "import-kohya", help="turn a kohya_ss GUI JSON or sd-scripts TOML config into a stylelora config",
        description="Read a kohya_ss GUI config (.json) or an sd-scripts --config_file TOML (with its "
        "--dataset_config TOML) and write a stylelora config that 'stylelora train' runs. Every key that is "
        "not imported is listed with the reason, in the output and as comments at the top of the file.")
    k.add_argument("file", help="the kohya_ss .json, the sd-scripts config .toml, or a dataset config .toml alone")
    k.add_argument("--dataset-config", metavar="TOML", help="sd-scripts' --dataset_config file (read from the "
                   "config's dataset_config key when not given)")
    k.add_argument("--out", required=True, help="the stylelora config .toml to write")
    k.add_argument("--force", action="store_true", help="replace --out if it exists")
    k.set_defaults(func=cmd_import_kohya)


def cmd_import_kohya(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .core import fileio
    from .services.kohya_import import import_kohya

    out = Path(args.out)
    if out.exists() and not args.force:
        raise StyleloraError(f"--out: {out} exists; choose another name or pass --force to replace it")
    report = import_kohya(args.file, args.dataset_config)
    fileio.write_text(out, report.to_toml())
    print(report.to_text())
    print(f"wrote {out}; train with: stylelora train {out}", file=sys.stderr)
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from .adapters.merge import split

    report = split(args.file, args.keep, args.out, base_model=args.model)
    print(report.summary)
    return 0


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

    e = sub.add_parser("export", help="convert a run or adapter file to kohya or diffusers format, verified")
    e.add_argument("source", help="a run folder, an adapter .safetensors (kohya or diffusers), or a diffusers folder")
    e.add_argument("--format", choices=["kohya", "diffusers"], required=True,
                   help="kohya: one .safetensors for AUTOMATIC1111/ComfyUI; diffusers: a folder for load_lora_weights")
    e.add_argument("--out", required=True, help="kohya: FILE.safetensors; diffusers: a folder")
    e.add_argument("--precision", choices=["fp16", "fp32", "bf16"], default="fp16", help="saved precision")
    e.add_argument("--model", help="the base model, when the file does not name it (files from other trainers)")
    e.add_argument("--bake-alpha", action="store_true",
                   help="diffusers: fold alpha/rank into the weights (alpha = rank), for diffusers before 0.34")
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("merge", help="bake an adapter into its base model: a diffusers folder, or one checkpoint file")
    m.add_argument("--model", required=True, help="the base model (builtin:tiny, a folder, a .safetensors, a hub id)")
    m.add_argument("--lora", required=True, help="the adapter file (kohya or diffusers)")
    m.add_argument("--scale", type=float, default=1.0, help="adapter strength baked in (default 1.0)")
    m.add_argument("--out", required=True, help="the diffusers folder to write, or FILE.safetensors for one "
                   "checkpoint in the original layout (AUTOMATIC1111, ComfyUI), verified")
    m.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="precision of a .safetensors checkpoint (a diffusers folder keeps the model's own)")
    m.set_defaults(func=cmd_merge)

    r = sub.add_parser("resize", help="lower an adapter's rank by SVD and report the energy retained")
    r.add_argument("file", help="the adapter file (kohya or diffusers)")
    r.add_argument("--rank", type=int, required=True, help="the new, lower rank")
    r.add_argument("--out", required=True, help="the adapter file to write (same format as the input)")
    r.add_argument("--model", help="the base model, when the file does not name it")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        print("interrupted; continue from the last complete checkpoint with --resume auto", file=sys.stderr)
        return 130
    except Exception:  # a bug, not a user error: show everything needed to report it
        traceback.print_exc()
        print("error: this is a bug in stylelora, not a problem with your input. Please report it with the "
              "traceback above and the command you ran.", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
