"""Auto-captioning: describe every image of a dataset with a captioner and write the captions.

Two kinds of captioner, each named by a hub id or a local folder:

- a natural-language one through transformers' image-text-to-text models (BLIP, BLIP-2, GIT,
  Florence-2 in transformers' own format): ``Salesforce/blip-image-captioning-large``;
- a WD14-style booru tagger (``model.onnx`` + ``selected_tags.csv``, as SmilingWolf's taggers ship),
  run with onnxruntime because transformers cannot load those ONNX files.

``builtin:tiny-blip`` is a BLIP with random weights and a generated vocabulary, built in code (for
tests and demos, like ``builtin:tiny``). Captions are planned first (:func:`plan_captions`, which
is also the preview) and written by :func:`caption_folder` through ``caption_tools.apply_changes``:
atomic writes, the previous captions kept for undo, and existing captions never replaced except in
``overwrite`` mode.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from ..core.errors import ConfigError, DataError, ModelError, offline_hint
from ..core.options import option, validate
from .caption_tools import CaptionChange, apply_changes, read_captions
from .captions import split_tags
from .dataset import ImageLoadError, load_image

log = logging.getLogger(__name__)

Mode = Literal["missing", "overwrite", "prefix", "suffix"]

# Words that name a medium or a look rather than what is in the picture. A style LoRA learns
# whatever the captions do not explain: a caption saying "watercolor painting" explains the style
# away (it gets tied to those words), so the adapter learns less of it. Dropping them leaves the
# style for the LoRA to learn, and the captions describe only the content.
STYLE_WORDS = [
    "painting", "paintings", "painted", "illustration", "illustrated", "watercolor", "watercolour",
    "oil painting", "acrylic", "gouache", "drawing", "sketch", "sketched", "pencil drawing", "line art",
    "lineart", "ink", "charcoal", "pastel", "digital art", "digital painting", "concept art", "artwork",
    "art style", "artistic", "style", "stylized", "cartoon", "anime style", "manga style", "comic",
    "3d render", "render", "rendering", "cgi", "photograph", "photo", "photography", "traditional media",
    "impressionist", "impressionism", "abstract", "vector art", "pixel art", "cel shading", "cel shaded",
    "brush strokes", "brushstrokes", "canvas", "medium",
]


@dataclass
class CaptionSettings:
    """How to caption a folder (CLI flags and the Dataset tab's fields are made from these)."""

    captioner: str = option(
        "builtin:tiny-blip",
        "Captioner: a hub id or local folder of a transformers image-to-text model (BLIP, GIT, Florence-2), "
        "or of a WD14-style tagger (model.onnx + selected_tags.csv); blip and wd14 name the usual ones; "
        "builtin:tiny-blip is random, for tests.",
    )
    mode: Mode = option(
        "missing",
        "missing: caption only images without one; overwrite: replace every caption; prefix/suffix: put the "
        "new caption before/after the existing one. Existing captions change only in overwrite, prefix, suffix.",
    )
    prompt: str = option(
        "", "Text the captioner continues (BLIP: 'a picture of'; Florence-2: a task such as <DETAILED_CAPTION>); "
        "it is not kept in the caption.",
    )
    batch_size: int = option(4, "Images captioned at once.", ge=1, le=256)
    max_tokens: int = option(40, "Longest caption a text captioner writes, in tokens.", ge=1, le=512)
    threshold: float = option(0.35, "Tagger: lowest score a general tag needs to be written.", gt=0, lt=1)
    character_threshold: float = option(0.85, "Tagger: lowest score a character tag needs.", gt=0, lt=1)
    style_filter: bool = option(
        True,
        "Drop style words (painting, watercolor, illustration...) from new captions. A style LoRA learns what "
        "the captions leave unexplained: captions that name the style tie it to those words instead of the "
        "adapter, so keep them describing the content only.",
    )
    style_words: list[str] = option(STYLE_WORDS, "The words and phrases the style filter drops (editable).")
    caption_extension: str = option(".txt", "Extension of the caption files written next to the images.")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "Where the captioner runs.")

    def __post_init__(self) -> None:
        validate(self)


class Captioner(Protocol):
    name: str
    kind: str  # "text" (sentences) or "tags" (comma-separated booru tags)

    def caption(self, images: list[Image.Image], settings: CaptionSettings) -> list[str]: ...


# --- the style filter -------------------------------------------------------------------------------


def _phrases(words: list[str]) -> str:
    found = sorted({" ".join(w.lower().split()) for w in words if w.strip()}, key=len, reverse=True)
    return "|".join(r"\s+".join(re.escape(p) for p in phrase.split()) for phrase in found)


def filter_style(caption: str, words: list[str]) -> str:
    """``caption`` without the style ``words``: tags that hold one are dropped whole ("watercolor
    (medium)"), and in sentences "a watercolor painting of a cat" becomes "a cat"."""
    alternatives = _phrases(words)
    if not alternatives or not caption.strip():
        return caption
    style = rf"(?:{alternatives})"
    tags = split_tags(caption)
    if len(tags) > 1 and all(len(t.split()) <= 4 for t in tags):  # a tag list
        kept = [t for t in tags if not re.search(rf"(?<![\w-]){style}(?![\w-])", t.replace("_", " "), re.I)]
        return ", ".join(kept)
    text = caption
    # "a watercolor painting of", "an illustration showing", "in a watercolor style", "oil on canvas"
    text = re.sub(rf"\b(?:a|an|the)\s+(?:{style}\s+)*{style}\s+(?:of|showing|depicting|with)\s+", "", text, flags=re.I)
    text = re.sub(rf"\b(?:in|with)\s+(?:a|an|the)?\s*(?:{style}\s*)+(?:style)?(?=\W|$)", "", text, flags=re.I)
    text = re.sub(rf"(?<![\w-]){style}(?![\w-])", "", text, flags=re.I)
    text = re.sub(r"\b(?:a|an|the)\s+(?=(?:of|in|with|and|,|\.|$)\b|[,.]|$)", "", text, flags=re.I)
    text = re.sub(r"\s+([,.])", r"\1", text)
    text = re.sub(r"([,.])(?:\s*[,.])+", r"\1", text)
    return " ".join(text.split()).strip(" ,.")


# --- captioners ---------------------------------------------------------------------------------------


def _device(settings: CaptionSettings) -> torch.device:
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' was asked for but no CUDA GPU is available; use auto or cpu")
        return torch.device("cuda")
    return torch.device("cpu")


class TransformersCaptioner:
    """An image-text-to-text model from transformers with its processor."""

    kind = "text"

    def __init__(self, name: str, model: Any, processor: Any):
        self.name, self.model, self.processor = name, model.eval(), processor

    def caption(self, images: list[Image.Image], settings: CaptionSettings) -> list[str]:
        device = _device(settings)
        if self.model.device != device:
            self.model.to(device, torch.float16 if device.type == "cuda" else torch.float32)
        florence = self.model.config.model_type == "florence2"
        prompt = settings.prompt or ("<MORE_DETAILED_CAPTION>" if florence else "")
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if prompt:
            kwargs["text"] = [prompt] * len(images)
        inputs = self.processor(**kwargs).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=settings.max_tokens, num_beams=1, do_sample=False,
                                      no_repeat_ngram_size=3)
        if florence:
            texts = self.processor.batch_decode(out, skip_special_tokens=False)
            return [_clean(str(self.processor.post_process_generation(t, task=prompt, image_size=im.size)
                               .get(prompt, ""))) for t, im in zip(texts, images, strict=True)]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [_clean(_drop_prefix(t, prompt)) for t in texts]


def _drop_prefix(text: str, prompt: str) -> str:
    text = text.strip()
    if prompt and text.lower().startswith(prompt.strip().lower()):
        return text[len(prompt.strip()):]
    return text


def _clean(text: str) -> str:
    return " ".join(text.replace("<pad>", " ").replace("</s>", " ").replace("<s>", " ").split()).strip(" ,")


class TaggerCaptioner:
    """A WD14-style tagger: an ONNX image classifier (NHWC, BGR, 0-255, padded square with white)
    and ``selected_tags.csv`` naming its outputs (category 9 ratings, 4 characters, 0 general)."""

    kind = "tags"

    def __init__(self, name: str, model_file: Path, tags_file: Path):
        import onnxruntime

        self.name = name
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in onnxruntime.get_available_providers()]
        try:
            self.session = onnxruntime.InferenceSession(str(model_file), providers=providers)
        except Exception as e:  # onnxruntime raises its own types for unreadable graphs
            raise ModelError(f"captioner '{name}': {model_file} is not a readable ONNX model ({e})") from None
        self.input = self.session.get_inputs()[0]
        side = self.input.shape[1] if len(self.input.shape) == 4 else None
        self.size = side if isinstance(side, int) and side > 0 else 448
        self.tags, self.categories = _read_tags(tags_file, name)

    def caption(self, images: list[Image.Image], settings: CaptionSettings) -> list[str]:
        batch = np.stack([_tagger_pixels(im, self.size) for im in images])
        scores = self.session.run(None, {self.input.name: batch})[0]
        if scores.shape[-1] != len(self.tags):
            raise ModelError(f"captioner '{self.name}': the model has {scores.shape[-1]} outputs but "
                             f"selected_tags.csv names {len(self.tags)} tags; they belong to different taggers")
        out = []
        for row in scores:
            characters = [(s, t) for t, c, s in zip(self.tags, self.categories, row, strict=True)
                          if c == 4 and s >= settings.character_threshold]
            general = [(s, t) for t, c, s in zip(self.tags, self.categories, row, strict=True)
                       if c not in (4, 9) and s >= settings.threshold]
            out.append(", ".join(t for _, t in sorted(characters, reverse=True) + sorted(general, reverse=True)))
        return out


def _read_tags(path: Path, name: str) -> tuple[list[str], list[int]]:
    tags, categories = [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                tag = row["name"]
                tags.append(tag.replace("_", " ") if len(tag) > 3 else tag)  # keep kaomoji such as ^_^
                categories.append(int(row.get("category") or 0))
    except (OSError, KeyError, ValueError) as e:
        raise ModelError(f"captioner '{name}': {path} is not a tagger's tag list (a CSV with name and "
                         f"category columns): {e}") from None
    return tags, categories


def _tagger_pixels(image: Image.Image, size: int) -> np.ndarray:
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    resample = Image.Resampling.BICUBIC if side < size else Image.Resampling.LANCZOS
    array = np.asarray(square.resize((size, size), resample), dtype=np.float32)
    return np.ascontiguousarray(array[:, :, ::-1])  # RGB -> BGR, as the WD14 taggers were trained


# --- built-in and loading -----------------------------------------------------------------------------

TINY_WORDS = [
    "a", "an", "the", "of", "on", "in", "with", "and", "cat", "dog", "bird", "house", "tree", "boat", "lighthouse",
    "mountain", "river", "bench", "girl", "man", "flower", "sky", "sea", "red", "blue", "green", "small", "old",
    "painting", "watercolor", "illustration", "sketch", "style",
]


def build_tiny_blip() -> TransformersCaptioner:
    """A BLIP captioner with random weights, a generated vocabulary and 32 px input (for tests and
    demos): deterministic, different captions for different pictures, no download."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(specials + TINY_WORDS)}, do_lower_case=True)
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.2)
    config = BlipConfig(
        text_config=dict(size, vocab_size=len(tokenizer), max_position_embeddings=128,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id),
        vision_config=dict(size, image_size=32, patch_size=8),
        projection_dim=32, initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    return TransformersCaptioner("builtin:tiny-blip", model, processor)


BUILTIN_CAPTIONERS: dict[str, Callable[[], Captioner]] = {"tiny-blip": build_tiny_blip}
TAGGER_FILES = ("model.onnx", "selected_tags.csv")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def _captioner_hint(name: str) -> str:
    return offline_hint("captioner", name, "--captioner /path/to/folder (a transformers model folder, or a "
                        "tagger folder holding model.onnx and selected_tags.csv)")


# the short names kohya_ss users know their captioners by, and the hub id each stands for
SHORT_NAMES = {"blip": "Salesforce/blip-image-captioning-large", "wd14": "SmilingWolf/wd-swinv2-tagger-v3"}


def load_captioner(name: str) -> Captioner:
    """The captioner named by ``name``: ``builtin:tiny-blip``, a local folder, a hub id or a short name
    (``SHORT_NAMES``: blip, wd14)."""
    name = name.strip()
    if name.lower() in SHORT_NAMES and not Path(name).expanduser().exists():
        name = SHORT_NAMES[name.lower()]
    if name.startswith("builtin:"):
        key = name.split(":", 1)[1]
        if key not in BUILTIN_CAPTIONERS:
            raise ModelError(f"captioner '{name}': no such built-in captioner; built-ins are "
                             + ", ".join(f"builtin:{k}" for k in BUILTIN_CAPTIONERS))
        return BUILTIN_CAPTIONERS[key]()
    path = Path(name).expanduser()
    if path.is_dir():
        if all((path / f).is_file() for f in TAGGER_FILES):
            return TaggerCaptioner(name, path / TAGGER_FILES[0], path / TAGGER_FILES[1])
        if (path / "config.json").is_file():
            return _load_transformers(name, str(path))
        raise ModelError(f"captioner '{name}': this folder holds neither a transformers model (config.json) "
                         "nor a WD14-style tagger (model.onnx and selected_tags.csv)")
    if path.exists():
        raise ModelError(f"captioner '{name}': a file; give the folder that holds the captioner")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelError(f"captioner '{name}': no such folder. Give a hub id such as "
                         "Salesforce/blip-image-captioning-large, a local folder, builtin:tiny-blip, or a short "
                         "name: " + ", ".join(f"{k} ({v})" for k, v in SHORT_NAMES.items()))
    if "tagger" in name.lower():
        return _load_hub_tagger(name)
    return _load_transformers(name, name)


def _load_hub_tagger(name: str) -> Captioner:
    from huggingface_hub import hf_hub_download

    try:
        files = [Path(hf_hub_download(name, f, local_files_only=_offline())) for f in TAGGER_FILES]
    except Exception as e:  # huggingface_hub raises several types for offline, missing and gated repos
        raise ModelError(_captioner_hint(name)) from e
    return TaggerCaptioner(name, files[0], files[1])


def _load_transformers(name: str, source: str) -> Captioner:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    local = Path(source).is_dir()
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local or _offline())
        model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=local or _offline())
    except Exception as e:  # transformers raises OSError, ValueError and more for absent or odd repos
        if local:
            raise ModelError(f"captioner '{name}': cannot load this folder as an image-to-text model ({e})") from e
        raise ModelError(_captioner_hint(name)) from e
    return TransformersCaptioner(name, model, processor)


# --- captioning a folder ---------------------------------------------------------------------------


@dataclass
class CaptionReport:
    """What captioning a folder did: the changes written (or planned) and the images skipped, with why."""

    changes: list[CaptionChange] = field(default_factory=list)
    unchanged: int = 0  # images left as they were (mode missing: they had a caption)
    skipped: list[str] = field(default_factory=list)
    undo_record: Path | None = None

    def summary(self) -> str:
        text = f"{len(self.changes)} caption(s) written, {self.unchanged} left as they were"
        if self.skipped:
            text += f", {len(self.skipped)} image(s) skipped"
        return text


def combine(existing: str, new: str, mode: Mode) -> str:
    """The caption an image ends with: ``new`` alone, or joined before/after ``existing``."""
    if mode == "overwrite" or not existing:
        return new
    if mode == "missing":
        return existing
    if not new:
        return existing
    return f"{new}, {existing}" if mode == "prefix" else f"{existing}, {new}"


ProgressCallback = Callable[[int, int], None]


def plan_captions(folder: str | Path, captioner: Captioner, settings: CaptionSettings, *,
                  limit: int | None = None, on_progress: ProgressCallback | None = None,
                  stop: Callable[[], bool] | None = None) -> CaptionReport:
    """Caption the images of ``folder`` that ``settings.mode`` asks for, without writing anything.

    ``limit`` stops after that many captions (the preview). ``on_progress(done, total)`` is called
    after each batch; ``stop()`` returning True ends early with what was done so far."""
    entries = read_captions(folder, settings.caption_extension)
    if not entries:
        raise DataError(f"dataset '{folder}': no images to caption")
    todo = [e for e in entries if settings.mode != "missing" or not e.caption]
    report = CaptionReport(unchanged=len(entries) - len(todo))
    if limit is not None:
        todo = todo[:limit]
    done = 0
    for start in range(0, len(todo), settings.batch_size):
        if stop is not None and stop():
            break
        batch, pictures = [], []
        for entry in todo[start : start + settings.batch_size]:
            try:
                pictures.append(load_image(entry.image))
                batch.append(entry)
            except ImageLoadError as e:
                report.skipped.append(f"{entry.image}: {e.reason}")
        texts = captioner.caption(pictures, settings) if pictures else []
        for entry, text in zip(batch, texts, strict=True):
            if settings.style_filter:
                text = filter_style(text, settings.style_words)
            if not text:
                report.skipped.append(f"{entry.image}: the captioner wrote nothing for it (or only style words)")
                continue
            after = combine(entry.caption, text, settings.mode)
            if after != entry.caption:
                report.changes.append(CaptionChange(entry.image, entry.caption, after))
            else:
                report.unchanged += 1
        done += len(todo[start : start + settings.batch_size])
        if on_progress is not None:
            on_progress(done, len(todo))
    return report


def caption_folder(
    folder: str | Path, captioner: Captioner, settings: CaptionSettings, *,
    on_progress: ProgressCallback | None = None, stop: Callable[[], bool] | None = None,
) -> CaptionReport:
    """Caption ``folder`` as ``settings`` say and write the captions (atomically, undoable)."""
    report = plan_captions(folder, captioner, settings, on_progress=on_progress, stop=stop)
    label = f"caption ({settings.mode}) with {captioner.name}"
    report.undo_record = apply_changes(folder, report.changes, label, settings.caption_extension)
    return report
