"""A run's evaluation set: fixed prompts x seeds, built from the run's config and captions alone (so it is the
same every time), written into the run folder (``eval/evalset.json``) beside the images rendered from it.

- style prompts: training captions with the trigger word, a few picked evenly from the sorted captions;
- transfer prompts: ``eval.prompts``, new subjects, with the trigger word;
- leak prompts: the same transfer prompts without the trigger word (only when the run has one).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core import fileio
from ..core.config import Config, GenerateSettings
from ..core.errors import DataError
from ..data.captions import split_tags, with_trigger
from ..data.dataset import ImageLoadError, load_image, scan
from .scores import Rows

KINDS = ("style", "transfer", "leak")
EVAL_DIR = "eval"
EVALSET_FILE = "evalset.json"


@dataclass(frozen=True)
class EvalPrompt:
    kind: str  # one of KINDS
    index: int
    text: str  # what is rendered
    plain: str  # the prompt without the trigger word (what a CLIP text embedding compares with)


@dataclass
class EvalSet:
    prompts: list[EvalPrompt]
    seeds: list[int]
    steps: int | None  # None: the model's own (as GenerateSettings)
    guidance: float | None
    size: int  # width and height of every image
    clip_skip: int
    descriptor: str
    trigger: str = ""
    images: list[tuple[EvalPrompt, int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.images = [(p, seed) for p in self.prompts for seed in self.seeds]  # the order rows are embedded in

    def settings(self, seed: int) -> GenerateSettings:
        return GenerateSettings(seed=seed, steps=self.steps, guidance=self.guidance, width=self.size,
                                height=self.size, clip_skip=self.clip_skip)

    @staticmethod
    def file_name(prompt: EvalPrompt, seed: int) -> str:
        return f"{prompt.kind}-{prompt.index:02d}-s{seed}.png"

    def rows(self) -> Rows:
        where = {kind: [i for i, (p, _) in enumerate(self.images) if p.kind == kind] for kind in KINDS}
        groups = [[i for i, (q, _) in enumerate(self.images) if q == p] for p in self.prompts]
        return Rows(where["style"] + where["transfer"], where["transfer"], where["leak"], groups)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("images")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalSet:
        return cls(**{**data, "prompts": [EvalPrompt(**p) for p in data["prompts"]]})

    def save(self, folder: Path) -> None:
        fileio.write_text(folder / EVALSET_FILE, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> EvalSet | None:
        """The set written in ``folder``, or None when there is none (or it cannot be read)."""
        try:
            return cls.from_dict(json.loads((folder / EVALSET_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError):
            return None


def pick_evenly(values: list[str], count: int) -> list[str]:
    """``count`` of the sorted ``values``, spread evenly from the first to the last."""
    ordered = sorted(set(values))
    if count >= len(ordered):
        return ordered
    if count == 1:
        return [ordered[0]]
    return [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)]


def build_evalset(config: Config, captions: list[str]) -> EvalSet:
    """The evaluation set of a run with ``config`` whose training captions are ``captions``."""
    cfg, trigger = config.eval, config.data.trigger_word.strip()
    plain = [c for c in (", ".join(t for t in split_tags(c) if t != trigger) for c in captions) if c]
    prompts = [EvalPrompt("style", i, with_trigger(c, trigger), c)
               for i, c in enumerate(pick_evenly(plain, cfg.style_prompts))]
    transfer = [p.strip() for p in cfg.prompts if p.strip()]
    prompts += [EvalPrompt("transfer", i, with_trigger(p, trigger), p) for i, p in enumerate(transfer)]
    if trigger:  # without a trigger word the leak prompts would be the transfer prompts again
        prompts += [EvalPrompt("leak", i, p, p) for i, p in enumerate(transfer)]
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    size = config.data.resolution
    return EvalSet(prompts, seeds, cfg.steps, cfg.guidance, size, config.model.clip_skip, cfg.descriptor, trigger)


def training_images(config: Config) -> tuple[list[str], list[Any]]:
    """(captions, images) of the run's dataset: the captions its style prompts come from and the images the
    scores compare with. Images that cannot be read are left out, as training leaves them out."""
    try:
        items = scan(config.data.path, config.data.caption_extension)
    except DataError as e:
        raise DataError(f"{e} The evaluation compares with the run's training images, so it needs its dataset "
                        "where the run's config.toml says it is.") from None
    images = []
    for item in items:
        try:
            images.append(load_image(item.image))
        except ImageLoadError:
            continue
    if not images:
        raise DataError(f"dataset '{config.data.path}': no readable image to compare the checkpoints with")
    return [item.caption for item in items], images
