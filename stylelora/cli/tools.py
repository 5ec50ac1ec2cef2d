"""The commands around a run: generate, export, merge, resize, split, caption, captions, import-kohya."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

from ..core.config import GenerateSettings
from ..core.errors import StyleloraError
from ..preview.samplers import sampler_names
from .flags import GENERATE_FLAGS, _add_field_flag, _settings_flags, cli_words


def _add_generate(sub: Any) -> None:
    g = sub.add_parser("generate", help="render images with an adapter at one or more strengths")
    g.add_argument("--model", default="builtin:tiny", help="base model: builtin:tiny, a folder, a file or a hub id")
    g.add_argument("--lora", help="adapter: a .safetensors file, a diffusers folder, a run or checkpoint folder")
    g.add_argument("--scale", type=float, nargs="+", metavar="S",
                   help="adapter strength from -1 to 2 (0 = base model, 1 = as trained); several make a strip")
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
    g.add_argument("--force", action="store_true", help=FORCE_HELP)
    g.set_defaults(func=cmd_generate)


FORCE_HELP = "replace --out if it exists (without it an existing file is refused)"


def local_path(flag: str, value: str | None) -> str | None:
    """``value`` unchanged, unless it is a path written on another system (``E:\\loras\\x.safetensors`` on Linux)
    that is not here: read, it names nothing; written, it would become a file of that odd name in this folder."""
    from ..core.fileio import foreign_path_problem

    problem = foreign_path_problem(value) if value else None
    if problem is not None:
        raise StyleloraError(f"{flag}: {problem}; give a path on this machine")
    return value


def new_output(args: argparse.Namespace) -> str:
    """``--out`` checked as every tool here checks it: a path of this machine, and (without ``--force``) not there
    yet. Tools that resolve a folder to a file inside it check that file themselves (``overwrite``)."""
    from pathlib import Path

    from ..core.errors import output_exists

    out = local_path("--out", args.out)
    if not args.force and Path(out).is_file():  # type: ignore[arg-type]
        raise StyleloraError(output_exists(out))
    return out  # type: ignore[return-value]


def _group_strength(text: str) -> tuple[str, float]:
    group, _, value = text.partition("=")
    try:
        return group.strip(), float(value)
    except ValueError:
        raise StyleloraError(f"--blocks {text}: expected GROUP=NUMBER, e.g. MID=0 or OUT=0.5") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from ..adapters.merge import check_strength
    from ..data.images import check_png_path, save_png
    from ..preview.previewer import Previewer, block_scales, check_sampler, find_adapter

    # Cheap checks first, so a typo fails before the base model loads.
    settings = GenerateSettings(**{name: getattr(args, name) for name in GENERATE_FLAGS.values()})
    check_sampler(settings.sampler)
    new_output(args)  # the --out words of every tool: this machine's path, not there yet (or --force)
    check_png_path(args.out)
    local_path("--lora", args.lora)
    for flag, given in (("--scale", args.scale), ("--blocks", args.blocks)):
        if given and not args.lora:
            raise StyleloraError(f"{flag}: give --lora too; without an adapter there is nothing to scale")
    groups = block_scales(dict(_group_strength(text) for text in args.blocks))
    for scale in args.scale or []:
        check_strength(scale, "--scale")
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
    from ..adapters.convert import export

    out = new_output(args)
    source, model = local_path("source", args.source), args.model
    if args.checkpoint:  # one of the run's checkpoints: its adapter file (older runs: its checkpoint folder's)
        from ..evaluation.checkpoints import run_config
        from ..evaluation.runner import chosen_checkpoint

        checkpoint = chosen_checkpoint(args.source, args.checkpoint)
        source, model = checkpoint.source.file, model or run_config(args.source).model.name
        print(f"checkpoint {checkpoint.label} ({args.checkpoint}): {source}", file=sys.stderr)
    report = export(source, args.format, out, precision=args.precision, base_model=model,
                    bake_alpha=args.bake_alpha, overwrite=args.force)
    print(report.summary)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..adapters.merge import merge

    out = merge(args.model, local_path("--lora", args.lora), args.scale, local_path("--out", args.out),
                precision=args.precision, overwrite=args.force)
    print(f"merged {args.lora} at scale {args.scale:g} into {args.model}: {out}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from ..adapters.merge import resize

    report = resize(local_path("file", args.file), args.rank, new_output(args), base_model=args.model,
                    overwrite=args.force)
    print(report.summary)
    return 0


def _add_caption(sub: Any) -> None:
    from ..data.autocaption import CaptionSettings

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

    from ..data.autocaption import CaptionSettings

    return next(f.metadata["help"] for f in dataclasses.fields(CaptionSettings) if f.name == name)


def caption_settings_from_args(args: argparse.Namespace) -> Any:
    import dataclasses

    from ..data.autocaption import CaptionSettings

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

    from ..data.autocaption import caption_folder, load_captioner, plan_captions
    from ..data.caption_tools import read_captions

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
            from ..data.caption_tools import apply_changes

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
    from ..data import caption_tools as tools

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
    k.add_argument("--force", action="store_true", help=FORCE_HELP)
    k.set_defaults(func=cmd_import_kohya)


def cmd_import_kohya(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..core import fileio
    from ..services.kohya_import import import_kohya

    out = Path(new_output(args))
    if out.is_dir():
        raise StyleloraError(f"--out: {out} is a folder; give the config file to write (NAME.toml)")
    report = import_kohya(args.file, args.dataset_config)
    fileio.write_text(out, report.to_toml())
    print(cli_words(report.to_text()))
    print(f"wrote {out}; train with: stylelora train {out}", file=sys.stderr)
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from ..adapters.merge import split

    report = split(local_path("file", args.file), args.keep, new_output(args), base_model=args.model,
                   overwrite=args.force)
    print(report.summary)
    return 0
