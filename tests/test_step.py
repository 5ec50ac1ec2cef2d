"""The lean step: the loss is read from the device only at report steps, yet every step is reported exactly;
the speed options (channels-last, fused AdamW) train the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from stylelora.core import events
from stylelora.families import load_base_model
from stylelora.training.loop import train


def test_reading_the_loss_every_few_steps_reports_every_step_exactly(dataset: Path, tmp_path: Path) -> None:
    every = train(tiny_config(dataset, tmp_path / "every", **{"train.steps": 5}))
    seen: list[object] = []
    sparse = train(tiny_config(dataset, tmp_path / "sparse", **{"train.steps": 5, "train.log_every": 2}), seen.append)

    assert sparse.losses == every.losses
    progress = [e for e in seen if isinstance(e, events.Progress)]
    assert [e.step for e in progress] == [1, 2, 3, 4, 5]
    assert [e.loss for e in progress] == every.losses
    metrics = [json.loads(line) for line in (tmp_path / "sparse/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 5]
    assert [m["loss"] for m in metrics] == [every.losses[1], every.losses[3], every.losses[4]]


def test_a_nan_between_reports_names_its_step_and_saves_nothing_after_it(dataset: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import UNet2DConditionModel

    from stylelora.adapters.checkpoint_files import list_checkpoints
    from stylelora.core.errors import TrainingError

    real, calls = UNet2DConditionModel.forward, {"n": 0}

    def forward(self, sample, *args, **kwargs):
        result = real(self, sample, *args, **kwargs)
        if sample.device.type != "meta":  # the run's estimate traces the UNet on meta tensors first
            calls["n"] += 1
            if calls["n"] == 3:
                result.sample = result.sample * float("nan")
        return result

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    out = tmp_path / "run"
    config = tiny_config(dataset, out, **{"train.steps": 8, "train.log_every": 4, "train.save_every": 4})
    with pytest.raises(TrainingError, match="the loss became nan at step 3"):
        train(config)
    assert list_checkpoints(out) == []  # step 4's checkpoint would have held NaN weights


def test_channels_last_trains_the_same_run(dataset: Path, tmp_path: Path) -> None:
    fp32 = {"train.steps": 3, "train.mixed_precision": "no"}  # bf16 rounds differently per memory format
    plain = train(tiny_config(dataset, tmp_path / "plain", **fp32))
    model = load_base_model("builtin:tiny")
    last = train(tiny_config(dataset, tmp_path / "last", **fp32, **{"train.channels_last": True}), model=model)
    conv = model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert last.losses == pytest.approx(plain.losses, rel=1e-4)
