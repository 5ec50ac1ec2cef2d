"""Checkpoints: snapshot() and restore() carry a run's whole state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conftest import make_dataset, tiny_config
from stylelora import events, optim
from stylelora.batches import BatchSource, TrainingSet
from stylelora.checkpoint import LiveState, list_checkpoints, load_checkpoint, restore, snapshot
from stylelora.config import Config
from stylelora.ema import LoraEMA
from stylelora.models import load_base_model, lora_state, prepare_for_training

PROMPT = "a picture number 1, flat style"
LOCON_CONV = "down_blocks.0.resnets.0.conv1"


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _live(run_dir: Path, config: Config, seed: int) -> LiveState:
    model = load_base_model("builtin:tiny")
    params, _ = prepare_for_training(model, config, torch.device("cpu"), "no")
    optimizer = optim.build_optimizer(optim.param_groups(model, config.train), config.train, torch.device("cpu"))
    data = BatchSource(TrainingSet.from_config(config), config, model)
    return LiveState(run_dir, model, optimizer, optim.build_lr_scheduler(optimizer, config.train),
                     torch.Generator().manual_seed(seed), data, LoraEMA(params, 0.9))


def test_restore_puts_back_everything_snapshot_saved(tmp_path: Path) -> None:
    config = tiny_config(make_dataset(tmp_path / "data", n=2), tmp_path / "run", **{
        "lora.train_text_encoder": True, "train.text_encoder_lr": 1e-3, "train.lr_scheduler": "cosine",
        "train.lr_warmup_steps": 1, "lora.conv_rank": 2})
    run_dir = tmp_path / "run"
    saved = _live(run_dir, config, seed=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # two steps with made-up gradients move weights, optimizer, schedule and EMA
        for group in saved.optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=g)
        saved.optimizer.step()
        saved.lr_scheduler.step()
        saved.ema.update()
    saved.data.load_state({"epoch": 3, "batch": 1})
    torch.randn(5, generator=saved.noise_rng)
    seen: list[object] = []
    folder = snapshot(saved, 2, 12.5, 3, seen.append)
    assert folder == run_dir / "checkpoints" / "step-000002"
    assert [(e.step, e.path) for e in seen if isinstance(e, events.CheckpointSaved)] == [(2, folder)]
    expected_noise, expected_global = torch.randn(4, generator=saved.noise_rng), torch.rand(3)

    restored, seen = _live(run_dir, config, seed=99), []
    assert restore(restored, folder, config.train, seen.append) == (2, 12.5)
    assert seen[0].text == f"resumed from {folder} at step 2"
    assert torch.equal(torch.randn(4, generator=restored.noise_rng), expected_noise)
    assert torch.equal(torch.rand(3), expected_global)  # torch's global stream (dropout) too
    assert restored.data.state() == {"epoch": 3, "batch": 1}
    assert restored.lr_scheduler.state_dict() == saved.lr_scheduler.state_dict()
    assert restored.ema.steps == saved.ema.steps == 2
    assert_same_lora(lora_state(restored.model), lora_state(saved.model))
    with saved.averaged(), restored.averaged():  # the EMA average too
        assert_same_lora(lora_state(restored.model), lora_state(saved.model))
    a, b = saved.optimizer.state_dict(), restored.optimizer.state_dict()
    as_json = json.dumps  # stored as JSON: tuples (betas) come back as lists
    assert as_json(a["param_groups"]) == as_json(b["param_groups"]) and a["state"].keys() == b["state"].keys()
    for idx, per_param in a["state"].items():
        for key, value in per_param.items():
            assert torch.equal(torch.as_tensor(b["state"][idx][key]), torch.as_tensor(value)), (idx, key)

    # nothing happened since the resume: the folder it came from is not written again
    assert snapshot(restored, 2, 13.0, 3, seen.append) is None
    assert load_checkpoint(folder).extra["elapsed_s"] == 12.5
    assert snapshot(restored, 3, 14.0, 1, seen.append) == run_dir / "checkpoints" / "step-000003"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000003"]  # pruned to the newest one


def assert_same_lora(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for part in a:
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
