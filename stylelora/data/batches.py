"""Where training batches come from: examples, buckets, captions, regularisation images and caches.

The training loop asks ``BatchSource.next_batch()`` for a ``Batch`` (latents, caption token ids or
cached text-encoder states, SDXL's size and crop conditioning, per-example loss weights) and saves
``BatchSource.state()`` in its checkpoints.
Everything random (batch order, flips, crops, caption shuffle and dropout, the sample drawn from the
VAE posterior, and each example's training noise and timestep) is derived from (seed, epoch, slot)
alone, so a resumed run gets exactly the batches an uninterrupted one would, cached or not, and an
example is trained on the same way whatever batch it falls in.

An epoch holds every training image ``repeats`` times (a folder named ``10_name`` repeats its
images 10 times, as in kohya's layout) and, with ``data.reg_path``, as many regularisation
examples, drawn in turn from the regularisation images. Slots are shuffled, grouped by bucket and
cut into batches, so every batch has one shape; batches follow each other in the order their first
slots were shuffled into. With one bucket the epoch is thus one shuffled list of slots read in batch
size steps: two batches of 1 hold the examples of one batch of 2.

Under N processes (``accelerate launch``, ``torchrun``) the stream of batches is one global order that
the processes deal out: process r takes every N-th batch, starting at the r-th. So N processes at their
batch b train on exactly what one process sees at batches N·b ... N·b + N-1, and a run's result does
not depend on how many GPUs shared it (up to rounding), only on the effective batch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.config import Config, DataConfig, TrainConfig
from ..core.errors import DataError
from ..model.text import TextStates
from . import dataset
from .buckets import Size, assign_bucket, oriented_size
from .cache import LatentCache, default_cache_dir, module_identity
from .captions import build_caption
from .dataset import Item, View, apply_view, plan_view, scan

log = logging.getLogger(__name__)

FOLDER_REPEATS = re.compile(r"^(\d+)_(.+)$")
# Separate streams of the per-slot randomness, so e.g. caption dropout never shifts a crop.
_ORDER, _VIEW, _CAPTION, _POSTERIOR, _NOISE = range(5)


@dataclass(frozen=True)
class Example:
    """One image as the training set uses it."""

    image: Path
    caption: str  # as written, before the caption options
    size: Size  # upright pixel size
    bucket: Size  # training size (w, h)
    regularisation: bool = False


def repeats_folder(image: Path, root: Path) -> str | None:
    """The name of the nearest folder named like ``10_sks style`` that holds ``image`` under ``root``, or None."""
    try:
        relative = image.resolve().relative_to(root.resolve())
    except ValueError:  # an image listed from outside the folder: no folder name applies
        return None
    return next((parent.name for parent in relative.parents if FOLDER_REPEATS.match(parent.name)), None)


def folder_repeats(image: Path, root: Path) -> tuple[int | None, str]:
    """(repeats, class words) from the nearest folder named like ``10_sks style`` under ``root``."""
    folder = repeats_folder(image, root)
    match = FOLDER_REPEATS.match(folder) if folder else None
    if match is None:
        return None, ""
    return int(match.group(1)), match.group(2).replace("_", " ").strip()


def _examples(items: list[Item], root: Path, config: DataConfig, regularisation: bool) -> list[Example]:
    """The examples of ``items`` (images under ``root``), each listed as often as it repeats per epoch."""
    side = config.resolution
    out: list[Example] = []
    for item in items:
        repeats, words = folder_repeats(item.image, root)
        caption = item.caption or (config.reg_caption if regularisation else "") or words
        size = oriented_size(item.image)
        if config.buckets:
            bucket = assign_bucket(size, side, config.bucket_step, config.bucket_no_upscale)
        else:
            bucket = (side, side)
        example = Example(item.image, caption, size, bucket, regularisation)
        out += [example] * (repeats if repeats is not None else config.repeats)
    return out


class TrainingSet:
    """The examples of an epoch and the seeded order of its batches."""

    def __init__(self, images: list[Example], reg: list[Example], config: DataConfig, batch_size: int, seed: int):
        if not images:
            raise DataError(f"dataset '{config.path}': every image repeats 0 times; rename its 0_ folders")
        self.images, self.reg, self.config = images, reg, config
        if len(self) < batch_size:
            raise DataError(
                f"dataset '{config.path}': {len(self)} examples per epoch (images x repeats"
                f"{', plus as many regularisation images' if reg else ''}) cannot fill one batch of {batch_size}; "
                f"lower the batch size to {len(self)} or fewer, or add images"
            )
        self.batch_size, self.seed = batch_size, seed
        self.epoch_batches = lru_cache(maxsize=2)(self._epoch_batches)

    @classmethod
    def from_config(cls, config: Config, items: list[Item] | None = None) -> TrainingSet:
        """The set ``config`` describes; ``items`` replaces the scan of data.path (e.g. only usable images)."""
        data = config.data
        if items is None:
            items = scan(data.path, data.caption_extension)
        reg: list[Example] = []
        if data.reg_path:
            if not Path(data.reg_path).is_dir():
                raise DataError(
                    f"data.reg_path: '{data.reg_path}': no such folder. Point it at a folder of class images "
                    "(regularisation), or leave it empty to train without them."
                )
            try:
                reg_items = scan(data.reg_path, data.caption_extension)
            except DataError as e:
                raise DataError(f"data.reg_path (regularisation images): {e}") from e
            reg = _examples(reg_items, Path(data.reg_path), data, regularisation=True)
        images = _examples(items, Path(data.path), data, regularisation=False)
        return cls(images, reg, data, config.train.batch_size, config.train.seed)

    @property
    def items(self) -> list[Item]:
        """The distinct training images with their captions (no repeats, no regularisation images)."""
        unique = {e.image: Item(e.image, e.caption) for e in self.images}
        return list(unique.values())

    @property
    def num_images(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        """Examples per epoch."""
        return len(self.images) * (2 if self.reg else 1)

    def steps_per_epoch(self, accumulation: int = 1, processes: int = 1) -> int:
        """Optimizer steps in one pass over the epoch's batches, each step taking ``accumulation`` batches in
        each of ``processes`` (kohya counts epochs the same way)."""
        return max(1, -(-len(self.epoch_batches(0)) // (accumulation * processes)))

    def total_steps(self, train: TrainConfig, processes: int = 1) -> int:
        """The run's length: ``train.epochs`` passes when set, else ``train.steps``."""
        if train.epochs:
            return train.epochs * self.steps_per_epoch(train.gradient_accumulation_steps, processes)
        return train.steps

    def example(self, epoch: int, slot: int) -> Example:
        n = len(self.images)
        if slot < n:
            return self.images[slot]
        # Regularisation slots walk through the regularisation images across epochs, so with more
        # of them than training examples every one is used in turn.
        return self.reg[(epoch * n + slot - n) % len(self.reg)]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        order = _rng(self.seed, epoch, 0, _ORDER).permutation(len(self)).tolist()
        groups: dict[Size, list[int]] = {}
        for slot in order:
            groups.setdefault(self.example(epoch, slot).bucket, []).append(slot)
        size = self.batch_size
        chunks = [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]
        # Ordered by where their first slot was shuffled to (not shuffled again), so with one bucket the
        # batches of 1 are the batches of 2 cut in half: results depend on the effective batch only.
        place = {slot: i for i, slot in enumerate(order)}
        return sorted(chunks, key=lambda chunk: place[chunk[0]])

    def view(self, epoch: int, slot: int) -> View:
        """How the example is cut: resized to cover its bucket, cropped (centre or seeded random), maybe
        flipped; from the image's size alone, so cached latents get the crop their pixels had."""
        example = self.example(epoch, slot)
        rng = _rng(self.seed, epoch, slot, _VIEW)
        flip = self.config.random_flip and bool(rng.integers(0, 2))
        return plan_view(example.size, example.bucket, self.config.center_crop, flip, rng)

    def pixels(self, epoch: int, slot: int) -> torch.Tensor:
        """The pixels of the example's ``view``."""
        image = dataset.load_image(self.example(epoch, slot).image)  # a DataError names a file that cannot be used
        return apply_view(image, self.view(epoch, slot))

    def caption(self, epoch: int, slot: int) -> str:
        example = self.example(epoch, slot)
        rng = _rng(self.seed, epoch, slot, _CAPTION)
        return build_caption(example.caption, self.config, rng, trigger=not example.regularisation)


def _rng(seed: int, epoch: int, slot: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, slot, stream])


def noise_generator(seed: int, epoch: int, slot: int) -> torch.Generator:
    """The generator of one example's training noise and timestep (the loop draws the noise first)."""
    return _torch_generator(seed, epoch, slot, _NOISE)


def _torch_generator(seed: int, epoch: int, slot: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch, slot, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


@dataclass
class Batch:
    """One micro-batch, ready for the UNet; every tensor is on the model's device."""

    latents: torch.Tensor  # (B, C, h, w), sampled from the VAE posterior and scaled
    input_ids: list[torch.Tensor]  # caption token ids, one (B, chunks, tokens) per text encoder
    text: TextStates | None  # text-encoder states (SDXL: and pooled); None when a text encoder trains
    time_ids: torch.Tensor  # (B, 6) SDXL's original size (h, w), crop top-left (top, left), target size (h, w)
    loss_weights: torch.Tensor  # (B,) 1 for training images, data.prior_loss_weight for regularisation ones
    captions: list[str]
    images: list[Path]
    noise_generators: list[torch.Generator]  # per example, keyed by (seed, epoch, slot): its noise and timestep
    # while a text encoder trains: the states of the ones that never do (FLUX.1's and SD3.5's T5), cached
    frozen_text: TextStates | None = None

    def __len__(self) -> int:
        return len(self.captions)


class BatchSource:
    """Produces the run's batches in order; ``state()``/``load_state()`` resume it exactly.

    ``rank`` of ``processes``: this process takes every ``processes``-th batch of the global order,
    starting at the ``rank``-th; the position it saves is the global one, the same in every process.
    """

    def __init__(self, data: TrainingSet, config: Config, model: Any, rank: int = 0, processes: int = 1):
        self.data, self.model = data, model
        self.rank, self.processes = rank, processes
        self.epoch = self.batch = 0
        self.train_text_encoder = config.lora.train_text_encoder
        self.max_token_length, self.clip_skip = config.data.max_token_length, config.model.clip_skip
        self.prior_loss_weight = config.data.prior_loss_weight
        self.notes: list[str] = []  # things the user should know about how data is fed (cache choices)
        self.latent_cache: LatentCache | None = None
        if config.cache.latents != "off" and not config.data.center_crop:
            self.notes.append(
                "latent cache off: data.center_crop = false crops differently every epoch, so each "
                "image is encoded every time; set data.center_crop = true to cache latents"
            )
        elif config.cache.latents == "memory":
            self.latent_cache = LatentCache()
        elif config.cache.latents == "disk":
            folder = Path(config.cache.dir) if config.cache.dir else default_cache_dir()
            # each entry is written by one process only (the others read it, or encode it themselves)
            self.latent_cache = LatentCache(folder, module_identity(model.vae), writer=(rank, processes))
            self.notes.append(f"latent cache: {self.latent_cache.folder}")
        vae_dtype, denoiser_dtype = model.vae.dtype, model.denoiser.dtype
        if vae_dtype != denoiser_dtype and vae_dtype == torch.float32:
            family = model.family
            trains_in = str(denoiser_dtype).split(".")[-1]
            self.notes.append(f"the VAE encodes in fp32 while the {family.denoiser_label} trains in {trains_in}: "
                              f"{family.display(model.kind)}'s VAE overflows in fp16")
        self.text_cache: dict[str, TextStates] | None = None
        self.frozen_cache: dict[str, TextStates] | None = None  # T5's states while CLIP trains
        if config.cache.text_encoder and config.data.shuffle_tags:
            if not self.train_text_encoder:
                self.notes.append("text-encoder cache off: data.shuffle_tags makes a new caption every time")
        elif config.cache.text_encoder and self.train_text_encoder:
            self.frozen_cache = {}
        elif config.cache.text_encoder:
            self.text_cache = {}

    # --- position --------------------------------------------------------------------------------
    def state(self) -> dict[str, int]:
        """Where the stream is: the epoch and how many of its batches were used."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch = int(state.get("epoch", 0)), int(state.get("batch", 0))

    def next_batch(self) -> Batch:
        """This process's next batch; the global position moves on by one batch per process."""
        dealt = [self._take() for _ in range(self.processes)]
        return self.make_batch(*dealt[self.rank])

    def _take(self) -> tuple[int, list[int]]:
        """(epoch, slots) of the batch at the global position, which then moves on by one."""
        plan = self.data.epoch_batches(self.epoch)
        if self.batch >= len(plan):  # a position saved at the very end of an epoch
            self.epoch, self.batch = self.epoch + 1, 0
            plan = self.data.epoch_batches(self.epoch)
        epoch, slots = self.epoch, plan[self.batch]
        self.batch += 1
        if self.batch == len(plan):
            self.epoch, self.batch = self.epoch + 1, 0
        return epoch, slots

    # --- building a batch ----------------------------------------------------------------------------
    def make_batch(self, epoch: int, slots: list[int]) -> Batch:
        examples = [self.data.example(epoch, s) for s in slots]
        captions = [self.data.caption(epoch, s) for s in slots]
        ids, text, frozen = self._text(captions)
        weights = [self.prior_loss_weight if e.regularisation else 1.0 for e in examples]
        latents = self._latents(epoch, slots)
        return Batch(
            latents=latents,
            input_ids=ids,
            text=text,
            time_ids=torch.tensor([self.data.view(epoch, s).time_ids for s in slots], dtype=torch.float32,
                                  device=latents.device),
            loss_weights=torch.tensor(weights, dtype=torch.float32, device=latents.device),
            captions=captions,
            images=[e.image for e in examples],
            noise_generators=[noise_generator(self.data.seed, epoch, s) for s in slots],
            frozen_text=frozen,
        )

    def _latents(self, epoch: int, slots: list[int]) -> torch.Tensor:
        """Latents sampled from each image's VAE posterior with its seeded (seed, epoch, slot) noise, scaled."""
        vae = self.model.vae
        posteriors = self._posteriors(epoch, slots)
        means = torch.stack([mean for mean, _ in posteriors])
        stds = torch.stack([std for _, std in posteriors])
        noise = torch.stack([
            torch.randn(means.shape[1:], generator=_torch_generator(self.data.seed, epoch, s, _POSTERIOR))
            for s in slots
        ])
        latents = means + stds * noise
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (latents - shift) * vae.config.scaling_factor
        if vae.device.type == "cuda":  # from pinned memory the copy runs beside the GPU's work
            return latents.to(dtype=vae.dtype).pin_memory().to(vae.device, non_blocking=True)
        return latents.to(vae.device, vae.dtype)

    def _posteriors(self, epoch: int, slots: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The VAE posterior (mean, std; fp32 on the CPU) of each slot's image: cached, or encoded now."""
        vae = self.model.vae
        # the key holds everything that decides the pixels: the image's bytes (hashed), bucket, crop and flip
        keys = [(self.data.example(epoch, s).image, view.target, f"{view.left},{view.top}", view.flip)
                for s, view in ((s, self.data.view(epoch, s)) for s in slots)]
        cache = self.latent_cache
        posteriors = [cache.get(k) if cache is not None else None for k in keys]
        missing = [i for i, p in enumerate(posteriors) if p is None]
        # With a cache, images are encoded one by one, so a cached value depends on its image alone
        # (not on which others shared its first batch) and a resumed run recomputes it bit for bit.
        groups = [[i] for i in missing] if cache is not None else [missing] if missing else []
        for group in groups:
            pixels = torch.stack([self.data.pixels(epoch, slots[i]) for i in group])
            with torch.no_grad():
                dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
            mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
            for j, i in enumerate(group):
                posteriors[i] = (mean[j].clone(), std[j].clone())
                if cache is not None:
                    cache.put(keys[i], posteriors[i])
        return posteriors  # type: ignore[return-value]  # every None was filled above

    def _text(self, captions: list[str]) -> tuple[list[torch.Tensor], TextStates | None, TextStates | None]:
        """Token ids per text encoder (the family's tokenization, data.max_token_length), the encoders' states at
        model.clip_skip unless one trains (the loop runs them then), and while one trains, the states of the
        encoders that never do (the family's ``encode_frozen_text``: T5), cached like the others."""
        encoders, family = self.model.text_encoders, self.model.family
        ids = [t.to(encoders[0].device) for t in family.tokenize(self.model, captions, self.max_token_length)]
        if self.train_text_encoder:
            return ids, None, self._cached(captions, ids, self.frozen_cache, family.encode_frozen_text)

        def encode(encoders: Any, rows: list[torch.Tensor]) -> TextStates:
            return family.encode_text(encoders, rows, self.clip_skip)

        return ids, self._cached(captions, ids, self.text_cache, encode), None

    def _cached(self, captions: list[str], ids: list[torch.Tensor], cache: dict[str, TextStates] | None,
                encode: Any) -> TextStates | None:
        """``encode(encoders, ids)`` of the captions without gradients, each caption once while ``cache`` is kept."""
        encoders = self.model.text_encoders
        if cache is None:
            with torch.no_grad():
                return encode(encoders, ids)
        new = sorted({c for c in captions if c not in cache})
        if new:
            rows = [captions.index(c) for c in new]
            with torch.no_grad():
                states = encode(encoders, [t[rows] for t in ids])
            if states is None:
                return None
            cache.update((caption, states.row(i)) for i, caption in enumerate(new))
        return TextStates.stack([cache[c] for c in captions])
