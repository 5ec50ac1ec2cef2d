"""Options people bring from kohya_ss: epochs and per-epoch saves, clip skip, long captions, trackers,
pytorch-optimizer optimizers, and the memory/time estimate before a run."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import draw_image, make_dataset, run_cli, tiny_config
from stylelora.core import events
from stylelora.core.config import Config
from stylelora.data.batches import BatchSource, TrainingSet
from stylelora.data.doctor import check_dataset
from stylelora.families import load_base_model
from stylelora.model.text import encode, token_ids
from stylelora.training.artifacts import render_samples
from stylelora.training.loop import train


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_epochs_and_an_adapter_every_epoch(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=4)
    config = tiny_config(data, tmp_path / "run", **{"train.epochs": 3, "train.batch_size": 2,
                                                      "train.save_every_epochs": 1})
    seen: list[events.Event] = []
    result = train(config, seen.append)
    assert result.steps == 6  # 4 images / batch 2 = 2 steps an epoch, 3 epochs (train.steps=3 is not used)
    assert next(e for e in seen if isinstance(e, events.Started)).total_steps == 6
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["run-000001.safetensors", "run-000002.safetensors",
                                                                 "run.safetensors"]  # the last epoch is the final
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    first = metadata(run / "run-000001.safetensors")
    assert (first["ss_epoch"], first["ss_steps"], first["ss_num_epochs"], first["ss_max_train_steps"]) == (
        "1", "2", "3", "6")
    final = metadata(run / "run.safetensors")
    assert final["ss_steps"] == "6" and "ss_epoch" not in final
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6


def test_clip_skip_2_trains_samples_and_is_recorded(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=2)
    model = load_base_model("builtin:tiny")
    one = tiny_config(data, tmp_path / "o")
    two = tiny_config(data, tmp_path / "o", **{"model.clip_skip": 2})
    source1 = BatchSource(TrainingSet.from_config(one), one, model)
    source2 = BatchSource(TrainingSet.from_config(two), two, model)
    b1, b2 = source1.next_batch(), source2.next_batch()
    assert b1.captions == b2.captions
    assert (b1.text.states - b2.text.states).abs().max() > 1e-3  # different text states
    with torch.no_grad():
        assert torch.equal(b2.text.states, encode(model.text_encoder, b2.input_ids[0], 2))
    sample = {"sample.prompts": ["a lighthouse"], "sample.steps": 2}
    img1 = render_samples(model, one.with_overrides(sample), tmp_path / "s1", 0)[0]
    img2 = render_samples(model, two.with_overrides(sample), tmp_path / "s2", 0)[0]
    from PIL import Image

    assert not np.array_equal(np.asarray(Image.open(img1)), np.asarray(Image.open(img2)))  # samples use it
    result = train(tiny_config(data, tmp_path / "run", **{"model.clip_skip": 2, "train.steps": 2}))
    assert metadata(result.adapter_paths[0])["ss_clip_skip"] == "2"
    from stylelora.core.config import GenerateSettings
    from stylelora.preview.previewer import Previewer

    preview = Previewer("builtin:tiny")  # the preview encodes prompts as the adapter was trained
    name = preview.attach(result.adapter_paths[0])
    as_trained = preview.generate("a lighthouse", GenerateSettings(steps=2), adapter=name)
    assert "Clip skip: 2" in as_trained.info["parameters"]
    last_layer = preview.generate("a lighthouse", GenerateSettings(steps=2, clip_skip=1), adapter=name)
    assert "Clip skip" not in last_layer.info["parameters"]
    assert not np.array_equal(np.asarray(as_trained), np.asarray(last_layer))
    assert tomllib.loads((tmp_path / "run" / "config.toml").read_text())["model"]["clip_skip"] == 2
    with pytest.raises(Exception, match="model.clip_skip: 3 is more than"):
        train(tiny_config(data, tmp_path / "run3", **{"model.clip_skip": 3}))


def test_a_200_token_caption_trains_whole_at_225(tmp_path: Path) -> None:
    data = tmp_path / "data"
    caption = "zxc, " + "x" * 196  # builtin:tiny's tokenizer: one token per character and comma: 200 tokens
    for i in range(2):
        draw_image(data / f"{i}.png", (64, 64), seed=i)
        (data / f"{i}.txt").write_text(caption)
    model = load_base_model("builtin:tiny")
    assert len(model.tokenizer(caption).input_ids) == 202
    short = check_dataset(data, 64, model="builtin:tiny")
    assert any("cut off" in f.action for f in short.findings)  # at 75 tokens the dataset check warns
    long = check_dataset(data, 64, model="builtin:tiny", max_token_length=225)
    assert not any("tokens" in f.problem for f in long.findings)
    config = tiny_config(data, tmp_path / "run", **{"data.max_token_length": 225, "train.steps": 2})
    batch = BatchSource(TrainingSet.from_config(config), config, model).next_batch()
    [ids] = batch.input_ids  # SD1: one text encoder
    assert ids.shape == (1, 3, 77) and batch.text.states.shape == (1, 227, 32)
    assert (ids[:, :, 1:-1] != model.tokenizer.eos_token_id).sum() == 200  # every token is in
    assert torch.equal(ids, token_ids(model.tokenizer, batch.captions, 225))
    result = train(config)
    assert result.steps == 2 and metadata(result.adapter_paths[0])["ss_max_token_length"] == "225"


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow", "none"])
def test_trackers_get_the_loss_and_the_config(tracker: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_dataset(tmp_path / "data", n=2)
    train(tiny_config(data, tmp_path / "run", **{"train.log_with": tracker, "train.steps": 2}))
    logs = tmp_path / "run" / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()] if logs.exists() else []
    if tracker == "none":
        assert files == []
        return
    text = {p: p.read_text(errors="replace") for p in files if p.stat().st_size < 2_000_000}
    if tracker == "tensorboard":
        hparams = next(t for p, t in text.items() if p.name == "hparams.yml")
        assert "train.steps: 2" in hparams and "lora.rank: 4" in hparams
        assert any(p.name.startswith("events.out.tfevents") for p in files)
    elif tracker == "wandb":  # the offline run, to 'wandb sync' later: protobuf records with config and history
        import wandb

        wandb.teardown()  # W&B's own service writes the run file: wait until it has stopped
        files = [p for p in logs.rglob("*") if p.is_file()]
        record = next(p for p in files if p.suffix == ".wandb" and "offline-run" in str(p)).read_bytes()
        assert b"train.steps" in record and b"lora.rank" in record and b"\x04loss" in record, record[-300:]
    else:
        params = {p.name: t for p, t in text.items() if p.parent.name == "params"}
        assert params["train.steps"] == "2" and params["lora.rank"] == "4"
        losses = next(t for p, t in text.items() if p.parent.name == "metrics" and p.name == "loss")
        assert len(losses.splitlines()) == 2


@pytest.mark.parametrize("name", ["lion", "came", "ademamix", "schedulefree_adamw"])
def test_pytorch_optimizer_optimizers_train_and_resume(name: str, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=2)
    args = ["betas=0.95,0.98"] if name == "lion" else []
    config = tiny_config(data, tmp_path / "run", **{"train.optimizer": name, "train.optimizer_args": args,
                                                      "train.steps": 2, "train.lr": 1e-3, "export.precision": "fp32"})
    first = train(config)
    assert all(np.isfinite(first.losses)) and metadata(first.adapter_paths[0])["ss_optimizer"] == name
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    groups = json.loads((ckpt / "state.json").read_text())["optimizer"]["param_groups"]
    if name == "lion":  # train.optimizer_args reached the optimizer
        assert groups[0]["betas"] == [0.95, 0.98]
    trained = {k: v for k, v in load_file(ckpt / "lora.safetensors").items()}
    exported = load_file(tmp_path / "run" / "diffusers" / "pytorch_lora_weights.safetensors")
    weights = [k for k in trained if "lora_B" in k]
    same = all(torch.equal(trained[k], exported[k]) for k in weights)
    # schedule-free trains on one sequence of weights and exports their average; the others export what trained
    assert same is (name != "schedulefree_adamw")
    resumed = train(config.with_overrides({"train.steps": 3, "train.resume": "auto"}))
    assert resumed.steps == 3


def test_a_bad_optimizer_argument_is_named(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=2)
    r = run_cli("train", "--data", str(data), "--resolution", "64", "--steps", "1", "--output", str(tmp_path / "o"),
                "--set", "train.optimizer=lion", "--set", 'train.optimizer_args=["betass=0.9,0.99"]')
    assert r.returncode == 1 and "train.optimizer_args: lion (Lion) has no argument betass" in r.stderr


def test_the_estimate_comes_before_the_run_and_advises_when_it_will_not_fit(tmp_path: Path, monkeypatch) -> None:
    from stylelora.training import estimate as est
    from stylelora.training.loop import estimate_run

    data = make_dataset(tmp_path / "data", n=2)
    r = run_cli("train", "--data", str(data), "--resolution", "64", "--steps", "2", "--output", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith("estimate (formula, cpu): memory"))
    assert said < next(i for i, line in enumerate(lines) if "checkpoint:" in line)
    estimate_only = run_cli("train", "--data", str(data), "--resolution", "64", "--output", str(tmp_path / "e"),
                            "--estimate")
    assert estimate_only.returncode == 0 and "per step" in estimate_only.stdout
    assert not (tmp_path / "e").exists()  # nothing written

    model = load_base_model("builtin:small")
    config = Config().with_overrides({"model.name": "builtin:small", "data.path": str(data), "data.resolution": 512,
                                      "train.batch_size": 2})
    profile = est.profile_step(model, config)
    assert est.profile_step(model, config, batch_size=4).activation_bytes == pytest.approx(
        2 * profile.activation_bytes, rel=0.1)
    assert est.profile_step(model, config, gradient_checkpointing=True).activation_bytes < profile.activation_bytes / 3
    monkeypatch.setattr(est, "available_memory", lambda device: est.resident_bytes() + 10 * 2**20)
    result = estimate_run(config, model)
    assert not result.fits and "It will not fit" in result.summary()
    assert result.advice[0].startswith("set train.gradient_checkpointing=true")
    assert any("train.batch_size=1 with train.gradient_accumulation_steps=2" in a for a in result.advice)


def test_when_reading_the_base_is_the_peak_the_advice_offers_no_step_setting(tmp_path: Path, monkeypatch) -> None:
    """A quantized base is read in full precision before it is packed: gradient checkpointing cannot bring the
    run under that, and the advice says what can instead of a figure the run would never reach."""
    from stylelora.training import estimate as est
    from stylelora.training.loop import estimate_run

    data = make_dataset(tmp_path / "d", n=2)
    config = Config().with_overrides({"model.name": "builtin:small", "data.path": str(data), "data.resolution": 64,
                                      "model.quantize": "nf4", "train.output_dir": str(tmp_path / "o")})
    fits = estimate_run(config)
    assert fits.loading_bytes > sum(fits.parts.values())  # the loading, not the step, is this run's host peak
    assert fits.host_bytes == fits.loading_bytes
    monkeypatch.setattr(est, "available_memory", lambda device: fits.loading_bytes - 2**20)
    result = estimate_run(config)
    assert not result.fits
    assert result.advice == [f"reading the base model alone takes ~{fits.loading_bytes / 2**30:.2f} GiB (its weights "
                             "in the run's precision, before model.quantize packs them): use a machine with more "
                             "memory, or train on a GPU"]
