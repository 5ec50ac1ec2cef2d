"""Metadata embedded in exported adapters: kohya's ss_* keys, modelspec, the run's config and a
reproducibility record. All values are strings (safetensors headers hold only strings).

Two sources, one owner each: ``adapter_facts`` states what the weights themselves say (rank, alpha,
LoCon, base model kind), ``kohya_metadata`` states how they were trained (config, steps, data)."""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import io
import json
import logging
import platform
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save

from .. import families
from ..core.config import Config
from ..data.batches import folder_repeats, repeats_folder

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..model.base import BaseModel
    from .adapter import Adapter

PREDICTION_TYPE = {"epsilon": "epsilon", "v_prediction": "v"}  # diffusers' name -> modelspec's
LIBRARIES = ("stylelora", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")


def _g(x: float) -> str:
    return f"{x:g}"


def adapter_facts(adapter: Adapter, kind: str) -> dict[str, str]:
    """The ss_* and modelspec keys that follow from the weights themselves (rank, alpha, LoCon, base model:
    what the family of ``kind`` writes for it)."""
    family = families.family_of(kind)
    facts = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": _g(adapter.alpha.get(family.denoiser, next(iter(adapter.alpha.values()), adapter.rank))),
        "modelspec.sai_model_spec": "1.0.0",
        **family.metadata(kind),
    }
    args: dict[str, str] = {}
    if adapter.network != "lora":  # LoHa/LoKr: LyCORIS' kohya network, as sd-scripts records it
        facts["ss_network_module"] = "lycoris.kohya"
        args["algo"] = adapter.network
        if adapter.network == "lokr":
            args["factor"] = str(adapter.lokr_factor(next(iter(adapter.state))))
    convs = [(part, p) for part in adapter.state for p in adapter.modules(part) if adapter.is_kxk_conv(part, p)]
    if convs:  # LoCon: sd-scripts' networks.lora takes the 3x3-conv rank and alpha as network args
        # the most common pair: a LoKr conv stored with two full factors states a rank of its own
        pairs = collections.Counter((adapter.rank_of(part, p), adapter.alpha_of(part, p)) for part, p in convs)
        rank, alpha = pairs.most_common(1)[0][0]
        args.update({"conv_dim": str(rank), "conv_alpha": _g(alpha)})
    if args:
        facts["ss_network_args"] = json.dumps(args)
    facts["ss_network_train_unet_only"] = str(set(adapter.state) == {family.denoiser})
    return facts


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the data after the header) and ``sshs_legacy_hash``
    (first 8 hex of sha256 of 64 KiB at offset 1 MiB), computed as sd-scripts does: over a file
    holding only the ss_* metadata, so user-facing keys do not change the hashes."""
    blob = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len :]).hexdigest()
    stream = io.BytesIO(blob)
    stream.seek(0x100000)
    legacy = hashlib.sha256(stream.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy


def tag_frequency(captions: Sequence[str]) -> dict[str, int]:
    """Comma-separated caption tags and how often each occurs (kohya's ss_tag_frequency)."""
    counts: collections.Counter[str] = collections.Counter()
    for caption in captions:
        counts.update(t.strip() for t in caption.split(",") if t.strip())
    return dict(counts.most_common())


def dataset_hash(items: Sequence[Any]) -> str:
    """sha256 over every image's name, bytes and caption, in name order: equal hash, same data. An image gone
    since training started (its dataset deleted or moved during the run) counts as missing, with a warning: the
    adapter is still saved."""
    h = hashlib.sha256()
    for item in sorted(items, key=lambda i: Path(i.image).name):
        h.update(Path(item.image).name.encode() + b"\0")
        try:
            h.update(hashlib.sha256(Path(item.image).read_bytes()).digest())
        except OSError as e:
            log.warning("%s: cannot read it any more (%s); the adapter's dataset_sha256 counts it as missing",
                        item.image, e.strerror or e)
            h.update(b"missing\0")
        h.update(str(item.caption).encode() + b"\0")
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed" if name != "stylelora" else "source checkout"
    return versions


def kohya_metadata(
    config: Config, model: BaseModel, steps: int, num_images: int, items: Sequence[Any] | None = None,
    total_steps: int | None = None, epoch: int | None = None,
) -> dict[str, str]:
    """The training facts as sd-scripts writes them, so A1111, ComfyUI and Civitai show them, plus the
    run's config (``stylelora.config``) and how to reproduce it (``stylelora.reproducibility``).
    ``items`` are the training images (``dataset.Item``) for tag frequencies and the dataset hash.
    What the weights say (rank, alpha, base model version) is ``adapter_facts``'s, not repeated here."""
    res = config.data.resolution
    te_lr = config.train.text_encoder_lr or config.train.lr
    meta = {
        "ss_output_name": config.run_name,
        "ss_sd_model_name": config.model.name,
        "ss_resolution": f"({res}, {res})",
        "ss_steps": str(steps),
        "ss_max_train_steps": str(total_steps or config.train.steps),
        "ss_num_train_images": str(num_images),
        "ss_learning_rate": _g(config.train.lr),
        "ss_unet_lr": _g(config.train.lr),
        "ss_text_encoder_lr": _g(te_lr) if config.lora.train_text_encoder else "0",
        "ss_batch_size_per_device": str(config.train.batch_size),
        "ss_gradient_accumulation_steps": str(config.train.gradient_accumulation_steps),
        "ss_lr_scheduler": config.train.lr_scheduler,
        "ss_lr_warmup_steps": str(config.train.warmup_steps(total_steps or config.train.steps)),
        "ss_optimizer": config.train.optimizer,
        "ss_mixed_precision": config.train.mixed_precision,
        "ss_seed": str(config.train.seed),
        "ss_training_finished_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": config.run_name,
        "modelspec.resolution": f"{res}x{res}",
        "ss_v_parameterization": str(model.prediction_type == "v_prediction"),
        "modelspec.prediction_type": PREDICTION_TYPE.get(model.prediction_type, model.prediction_type),
        "modelspec.date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "stylelora.config": config.to_toml(),
    }
    meta.update(_data_facts(config))
    meta["ss_clip_skip"] = str(config.model.clip_skip)
    if config.data.max_token_length != 75:
        meta["ss_max_token_length"] = str(config.data.max_token_length)
    if config.train.epochs:
        meta["ss_num_epochs"] = str(config.train.epochs)
    if epoch is not None:
        meta["ss_epoch"] = str(epoch)
    if config.data.trigger_word:
        meta["modelspec.trigger_phrase"] = config.data.trigger_word
    record: dict[str, Any] = {
        "seed": config.train.seed, "steps": steps, "base_model": config.model.name,
        "versions": library_versions(),
    }
    if items is not None:
        dirs = dataset_dirs(items, config)
        meta["ss_tag_frequency"] = json.dumps({name: tag_frequency([str(i.caption) for i in folder])
                                               for name, (_, folder) in dirs.items()})
        meta["ss_dataset_dirs"] = json.dumps({name: {"n_repeats": repeats, "img_count": len(folder)}
                                              for name, (repeats, folder) in dirs.items()})
        meta["ss_num_train_images"] = str(sum(repeats * len(folder) for repeats, folder in dirs.values()))
        record["dataset_sha256"] = dataset_hash(items)
        record["num_images"] = len(items)
    meta["stylelora.reproducibility"] = json.dumps(record, sort_keys=True)
    return meta


def dataset_dirs(items: Sequence[Any], config: Config) -> dict[str, tuple[int, list[Any]]]:
    """The training images by the folder that sets their repeats, as sd-scripts lists its subsets: each kohya
    ``10_name`` folder by its name with its repeats, images outside such folders under the dataset folder's
    name with ``data.repeats``."""
    root = Path(config.data.path)
    dirs: dict[str, tuple[int, list[Any]]] = {}
    for item in items:
        repeats, _ = folder_repeats(Path(item.image), root)
        name = repeats_folder(Path(item.image), root) or root.name or "data"
        dirs.setdefault(name, (repeats if repeats is not None else config.data.repeats, []))[1].append(item)
    return dirs


def _data_facts(config: Config) -> dict[str, str]:
    """How the data was fed, under the keys sd-scripts uses (Civitai and the A1111 info panel show them)."""
    data = config.data
    return {
        "ss_enable_bucket": str(data.buckets),
        "ss_bucket_no_upscale": str(data.bucket_no_upscale),
        "ss_min_bucket_reso": str(data.bucket_step),
        "ss_max_bucket_reso": str(max(data.bucket_step, 2 * data.resolution // data.bucket_step * data.bucket_step)),
        "ss_flip_aug": str(data.random_flip),
        "ss_random_crop": str(not data.center_crop),
        "ss_shuffle_caption": str(data.shuffle_tags),
        "ss_keep_tokens": str(data.keep_tags),
        "ss_caption_dropout_rate": f"{data.caption_dropout:g}",
        "ss_prior_loss_weight": f"{data.prior_loss_weight:g}" if data.reg_path else "1",
        "ss_cache_latents": str(config.cache.latents != "off" and data.center_crop),
    }
