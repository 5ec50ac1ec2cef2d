"""Checkpoints: snapshot() and restore() carry a run's whole state, and a checkpoint's LoRA file holds every
module's alpha, so it previews as trained whatever the run's config.toml says now."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_dataset, tiny_config
from stylelora.adapters.checkpoint_files import list_checkpoints, load_checkpoint, stores_alphas
from stylelora.adapters.formats import ModelLayout, load_adapter
from stylelora.core import events
from stylelora.core.config import Config
from stylelora.data.batches import BatchSource, TrainingSet
from stylelora.families import load_base_model
from stylelora.model.lora import lora_state
from stylelora.model.placement import prepare_for_training
from stylelora.preview.previewer import Previewer
from stylelora.training import optim
from stylelora.training.checkpoint import LiveState, restore, snapshot
from stylelora.training.ema import LoraEMA

PROMPT = "a picture number 1, flat style"
LOCON_CONV = "down_blocks.0.resnets.0.conv1"


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="module")
def locon_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoCon run whose alphas are neither the rank nor exact in fp32 (0.1), a checkpoint per step."""
    from stylelora.training.loop import train

    data = make_dataset(tmp_path_factory.mktemp("data"), n=2)
    out = tmp_path_factory.mktemp("runs") / "locon"
    config = tiny_config(data, out, **{
        "train.steps": 2, "train.lr": 0.05, "train.save_every": 1, "lora.alpha": 0.1, "lora.conv_rank": 2,
        "lora.conv_alpha": 3.0, "lora.train_text_encoder": True, "export.precision": "fp32",
    })
    return train(config).output_dir


def test_checkpoints_store_every_modules_alpha_read_back_by_the_adapter_reader(locon_run: Path) -> None:
    folder = list_checkpoints(locon_run)[-1]
    state = load_checkpoint(folder)
    assert stores_alphas(folder)
    assert not any(k.endswith(".alpha") for sd in state.lora.values() for k in sd)  # weights only, as before
    for part, sd in state.lora.items():
        modules = {k.rsplit(".lora_", 1)[0] for k in sd}
        assert set(state.alphas[part]) == modules
    assert state.alphas["unet"][LOCON_CONV] == 3.0
    assert state.alphas["unet"]["down_blocks.0.attentions.0.proj_in"] == 0.1  # exactly, not fp32's 0.1
    assert set(state.alphas["text_encoder"].values()) == {0.1}

    # the adapter reader gives the checkpoint the same per-module alphas as the run's exported adapter
    layout = ModelLayout.of(load_base_model("builtin:tiny"))
    from_checkpoint = load_adapter(folder / "lora.safetensors", layout)
    exported = load_adapter(locon_run / "diffusers", layout)
    for part in exported.state:
        for module in exported.modules(part):
            alpha = state.alphas[part][module]
            assert from_checkpoint.alpha_of(part, module) == exported.alpha_of(part, module) == alpha
        for key, value in exported.state[part].items():
            assert torch.equal(from_checkpoint.state[part][key], value)


def test_a_checkpoint_previews_with_its_own_alphas_and_old_ones_fall_back_to_config_toml(
    locon_run: Path, tmp_path: Path
) -> None:
    # a checkpoint saved before alphas were stored: the same run with the alpha tensors taken out
    old_run = shutil.copytree(locon_run, tmp_path / "old")
    old_file = list_checkpoints(old_run)[-1] / "lora.safetensors"
    save_file({k: v for k, v in load_file(old_file).items() if not k.endswith(".alpha")}, old_file)
    assert not stores_alphas(old_file.parent)

    # the run's config.toml changed after training (say, edited for a next run): the checkpoint does not care
    edited = tmp_path / "edited"
    shutil.copytree(locon_run, edited)
    Config.load(edited / "config.toml").with_overrides({"lora.alpha": 1.0, "lora.conv_alpha": 1.0}).save(
        edited / "config.toml")

    p = Previewer("builtin:tiny")
    final = p.generate(PROMPT, adapter=p.attach(locon_run / "diffusers", "final"), steps=3)
    base = p.generate(PROMPT, adapter="final", scale=0.0, steps=3)
    assert np.abs(pixels(final) - pixels(base)).mean() > 1
    for run in (locon_run, edited, old_run):
        name = p.attach(list_checkpoints(run)[-1], f"{run.name}-last")
        assert np.array_equal(pixels(p.generate(PROMPT, adapter=name, steps=3)), pixels(final)), run.name


def _live(run_dir: Path, config: Config) -> LiveState:
    model = load_base_model("builtin:tiny")
    params, _ = prepare_for_training(model, config, torch.device("cpu"), "no")
    optimizer = optim.build_optimizer(optim.param_groups(model, config.train), config.train, torch.device("cpu"))
    data = BatchSource(TrainingSet.from_config(config), config, model)
    return LiveState(run_dir, model, optimizer, optim.build_lr_scheduler(optimizer, config.train), data,
                     LoraEMA(params, 0.9))


def test_restore_puts_back_everything_snapshot_saved(tmp_path: Path) -> None:
    config = tiny_config(make_dataset(tmp_path / "data", n=2), tmp_path / "run", **{
        "lora.train_text_encoder": True, "train.text_encoder_lr": 1e-3, "train.lr_scheduler": "cosine",
        "train.lr_warmup_steps": 1, "lora.conv_rank": 2})
    run_dir = tmp_path / "run"
    saved = _live(run_dir, config)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # two steps with made-up gradients move weights, optimizer, schedule and EMA
        for group in saved.optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=g)
        saved.optimizer.step()
        saved.lr_scheduler.step()
        saved.ema.update()
    saved.data.load_state({"epoch": 3, "batch": 1})
    torch.rand(5)
    seen: list[object] = []
    folder = snapshot(saved, 2, 12.5, 3, seen.append)
    assert folder == run_dir / "checkpoints" / "step-000002"
    assert [(e.step, e.path) for e in seen if isinstance(e, events.CheckpointSaved)] == [(2, folder)]
    expected_global = torch.rand(3)

    torch.manual_seed(99)
    restored, seen = _live(run_dir, config), []
    assert restore(restored, folder, config.train, seen.append) == (2, 12.5)
    assert seen[0].text == f"resumed from {folder} at step 2"
    assert torch.equal(torch.rand(3), expected_global)  # torch's global stream (dropout)
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
