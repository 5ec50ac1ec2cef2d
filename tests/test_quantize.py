"""model.quantize: the frozen base is held quantized (optimum-quanto on the CPU), the LoRA still learns in fp32,
and its adapter is an ordinary one (previews and other tools load it on an unquantized base)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_dataset, tiny_config
from stylelora.families import load_base_model
from stylelora.preview.previewer import Previewer
from stylelora.training.loop import train


def fixed_loss(model, data: Path, lora_on: bool) -> float:
    """The UNet's loss on the training images at fixed noise and timesteps, with the LoRA on or off."""
    from stylelora.core.config import Config
    from stylelora.data.batches import BatchSource, TrainingSet

    config = Config().with_overrides({"data.path": str(data), "data.resolution": 64, "train.batch_size": 2})
    batch = BatchSource(TrainingSet.from_config(config), config, model).make_batch(0, [0, 1])
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(batch.latents.shape, generator=g)
    timesteps = torch.tensor([200, 600])
    scheduler = model.pipeline.scheduler
    noisy = scheduler.add_noise(batch.latents, noise, timesteps)
    for module in model.unet.modules():
        if hasattr(module, "enable_adapters") and hasattr(module, "lora_A"):
            module.enable_adapters(lora_on)
    with torch.no_grad():
        pred = model.unet(noisy, timesteps, batch.text.states).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


def test_a_4_bit_base_trains_and_its_adapter_loads(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=2)
    settings = {"train.steps": 20, "train.lr": 3e-3, "train.batch_size": 2, "model.quantize": "nf4"}
    model = load_base_model("builtin:tiny")
    result = train(tiny_config(data, tmp_path / "run", **settings), model=model)

    layer = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(layer.base_layer).__name__ == "QLinear"  # the frozen weight is held quantized...
    assert layer.lora_A["default"].weight.dtype == torch.float32  # ...the LoRA weight is not
    assert all(np.isfinite(result.losses))
    # the loss falls: on the training images at fixed noise, the trained LoRA beats the base it started from
    assert fixed_loss(model, data, lora_on=True) < 0.9 * fixed_loss(model, data, lora_on=False)

    preview = Previewer("builtin:tiny", device="cpu")  # an unquantized base, as any other tool has
    preview.attach(tmp_path / "run")
    base = np.asarray(preview.base("a picture", steps=2), dtype=float)
    styled = np.asarray(preview.generate("a picture", steps=2, scale=1.0), dtype=float)
    assert np.abs(styled - base).mean() > 0.5


def test_quantized_int8_base_follows_the_full_precision_run(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=2)
    full = train(tiny_config(data, tmp_path / "full", **{"train.steps": 3}))
    int8 = train(tiny_config(data, tmp_path / "int8", **{"train.steps": 3, "model.quantize": "int8"}))
    # int8 weights with per-channel scales: the same training, up to rounding of the frozen weights
    assert int8.losses == pytest.approx(full.losses, rel=0.05)
    assert int8.losses != full.losses
