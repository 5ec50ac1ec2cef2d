"""Every file stylelora writes gets the mode a plain ``open()`` would give it under the umask (and every
folder the mode ``mkdir`` would): another user, or AUTOMATIC1111 in a Docker container, can read
adapters, configs, samples, checkpoints, uploads, captions, merged models and metrics as usual."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from conftest import draw_image
from stylelora.adapters.convert import export
from stylelora.adapters.merge import merge
from stylelora.core.config import Config
from stylelora.services import collect
from stylelora.services.jobs import TrainingJob
from stylelora.training.loop import train


def write_everything(root: Path) -> None:
    """One of each kind of file the project writes, under ``root``."""
    uploads = root / "picked"
    files = []
    for i in range(2):
        files.append((draw_image(uploads / f"img{i}.png", (64, 64), seed=i), f"img{i}.png"))
        (uploads / f"img{i}.txt").write_text(f"a picture {i}")
        files.append((uploads / f"img{i}.txt", f"img{i}.txt"))
    data = root / "datasets" / "d"
    collect.add_files(data, files)  # uploaded images and captions
    collect.save_caption(data, "img1.png", "an edited caption")  # a caption edit
    out = root / "outputs" / "run"
    config = Config().with_overrides({
        "model.name": "builtin:tiny", "data.path": str(data), "data.resolution": 64, "lora.rank": 2,
        "lora.alpha": 2.0, "train.steps": 2, "train.save_every": 1, "train.output_dir": str(out),
        "sample.prompts": ["a house"], "sample.every": 1, "sample.steps": 1,
        "cache.latents": "disk", "cache.dir": str(root / "cache"),
    })
    config.save(root / "outputs" / "configs" / "d.toml")  # a saved config
    train(config)  # adapters (kohya, diffusers), config.toml, samples, checkpoints, metrics, logs, latent cache
    train(config.with_overrides({"train.resume": "auto", "train.steps": 3}))  # a resume rewrites metrics.jsonl
    export(out, "kohya", out / "exports" / "run-fp32.safetensors", precision="fp32")
    export(out, "diffusers", out / "exports" / "run-diffusers-fp16.safetensors")
    merge("builtin:tiny", out / "run.safetensors", 1.0, out / "merged-1")  # a merged diffusers folder
    merge("builtin:tiny", out / "run.safetensors", 1.0, out / "merged" / "run-merged-1.safetensors")  # one file
    release = threading.Event()
    job = TrainingJob(lambda config, on_event, stop: release.wait(5), queue_file=root / "outputs" / "queue.json")
    job.enqueue(config)  # the queue file
    release.set()
    job.join_all(10)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_every_written_file_has_the_mode_open_would_give(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        write_everything(tmp_path)
    finally:
        os.umask(old)
    wrong = []
    kinds: set[str] = set()
    for path in sorted(tmp_path.rglob("*")):
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != want:
            wrong.append(f"{path.relative_to(tmp_path)}: {mode:o}, not {want:o}")
        kinds.add(path.suffix or path.name)
    assert wrong == []
    # the walk saw every kind of file: images, captions, adapters, configs, metrics, checkpoint state, the queue
    assert {".png", ".txt", ".safetensors", ".toml", ".jsonl", ".json"} <= kinds
    out = tmp_path / "outputs" / "run"
    for made in [out / "run.safetensors", out / "diffusers" / "pytorch_lora_weights.safetensors",
                 out / "checkpoints" / "step-000003" / "lora.safetensors", out / "merged-1" / "model_index.json",
                 out / "merged" / "run-merged-1.safetensors", out / "metrics.jsonl", tmp_path / "datasets/d/img1.txt",
                 tmp_path / "outputs" / "queue.json"]:
        assert made.exists(), made
    assert list(out.glob("samples/*.png")) and list((tmp_path / "cache").rglob("*.safetensors"))
