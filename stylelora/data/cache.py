"""Caches of VAE latents and text-encoder outputs, so neither encoder runs twice on the same input.

Latents are cached as the VAE posterior's mean and standard deviation, not as one sample: the
trainer samples ``mean + std * noise`` with its own seeded noise each time, exactly as an uncached
run would. On disk each entry is one safetensors file keyed by the image file's content hash, the
bucket, the crop box, the flip and the VAE's identity (a hash of its config and weights), so a later run
on the same images and VAE reuses it, and a different VAE or crop never picks up a stale entry.
Under several processes each entry has one writer (chosen from its name), so no two processes ever
write the same file; the others read it once it is there, or encode the image themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.errors import StyleloraError
from ..core.fileio import atomic_path

log = logging.getLogger(__name__)

# Bump when the way pixels are prepared changes, so old disk entries stop matching.
PREPARE_VERSION = "2"  # 2: the crop box (left,top) in the key, not "centre"

Posterior = tuple[torch.Tensor, torch.Tensor]  # (mean, std), fp32 on the CPU


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stylelora" / "latents"


def module_identity(module: torch.nn.Module) -> str:
    """A sha256 of a module's config and every weight (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    digest.update(json.dumps(dict(config) if config is not None else {}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LatentCache:
    """Posteriors keyed by (image, bucket, crop "left,top", flip): in memory, and on disk when ``folder`` is set.

    ``writer`` is (rank, processes): this process writes the disk entries whose name falls to its rank.
    """

    def __init__(self, folder: Path | None = None, vae_identity: str = "", writer: tuple[int, int] = (0, 1)):
        self.memory: dict[tuple[Any, ...], Posterior] = {}
        self.rank, self.processes = writer
        self.folder = folder / vae_identity[:24] if folder is not None else None
        self._hashes: dict[Path, str] = {}
        self.hits = self.misses = 0

    def _file(self, key: tuple[Any, ...]) -> Path:
        path, bucket, crop, flip = key
        if path not in self._hashes:
            self._hashes[path] = file_hash(path)
        name = f"{self._hashes[path]}|{bucket[0]}x{bucket[1]}|{crop}|{int(flip)}|{PREPARE_VERSION}"
        digest = hashlib.sha256(name.encode()).hexdigest()[:40]
        assert self.folder is not None
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def get(self, key: tuple[Any, ...]) -> Posterior | None:
        found = self.memory.get(key)
        if found is None and self.folder is not None:
            file = self._file(key)
            if file.is_file():
                try:
                    tensors = load_file(str(file))
                    found = (tensors["mean"], tensors["std"])
                except (OSError, SafetensorError, KeyError) as e:
                    log.warning("%s: unreadable latent cache entry (%s); encoding the image again", file, e)
                else:
                    self.memory[key] = found
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: tuple[Any, ...], posterior: Posterior) -> None:
        self.memory[key] = posterior
        if self.folder is None:
            return
        file = self._file(key)
        if int(file.stem, 16) % self.processes != self.rank:  # another process writes this entry
            return
        path, bucket, crop, flip = key
        meta = {"image": path.name, "bucket": f"{bucket[0]}x{bucket[1]}", "crop": str(crop), "flip": str(flip)}
        try:
            with atomic_path(file) as tmp:
                save_file({"mean": posterior[0].contiguous(), "std": posterior[1].contiguous()}, str(tmp), meta)
        except (OSError, StyleloraError) as e:
            log.warning("%s: cannot write the latent cache (%s); keeping it in memory for this run", file, e)
