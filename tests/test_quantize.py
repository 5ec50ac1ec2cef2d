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


def test_a_4_bit_sdxl_base_trains_in_bf16(tmp_path: Path) -> None:
    """At real widths (over 128, in groups of 128) a 4-bit bf16 weight takes quanto's int4 matmul, which refuses
    an input that is not contiguous in memory, and SDXL's (and SD2's) linear proj_in gets a permuted view:
    SDXL-shaped runs with model.quantize=nf4 stopped at their first step. builtin:tiny-sdxl is too narrow to take
    that matmul, so its UNet is swapped for one 256 channels wide."""
    from diffusers import UNet2DConditionModel

    data = make_dataset(tmp_path / "data", n=1)
    model = load_base_model("builtin:tiny-sdxl")
    torch.manual_seed(0)
    model.pipeline.unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(256, 256), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(8, 8), use_linear_projection=True, cross_attention_dim=64, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32)
    settings = {"model.name": "builtin:tiny-sdxl", "model.quantize": "nf4", "train.mixed_precision": "bf16",
                "train.steps": 2, "train.lr": 3e-3}
    result = train(tiny_config(data, tmp_path / "run", **settings), model=model)

    proj_in = model.unet.down_blocks[1].attentions[0].proj_in
    assert type(proj_in.base_layer.weight).__name__ == "TinyGemmWeightQBitsTensor"  # the int4 matmul was taken
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert result.adapter_paths[0].is_file()


def test_saving_a_4_bit_run_never_reads_its_frozen_weights(tmp_path: Path, monkeypatch) -> None:
    """Each checkpoint and adapter write takes the LoRA's tensors alone: asking the model for its whole state dict
    unpacked every 4-bit weight of the base (an SDXL-shaped nf4 run spent minutes there on a CPU, and a card
    would need the model's size again)."""
    from optimum.quanto.nn.qmodule import QModuleMixin

    def refuse(*args, **kwargs):
        raise AssertionError("a quantized frozen weight was read while saving")

    data = make_dataset(tmp_path / "data", n=1)
    monkeypatch.setattr(QModuleMixin, "_save_to_state_dict", refuse)
    settings = {"train.steps": 2, "train.save_every": 1, "model.quantize": "nf4"}
    result = train(tiny_config(data, tmp_path / "run", **settings))
    assert result.adapter_paths[0].is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[-1] == "step-000002"


def test_a_4_bit_run_on_a_cpu_says_before_quanto_compiles_its_kernel(tmp_path: Path, monkeypatch) -> None:
    """A fresh install's first nf4 run on a CPU waits a minute or more for quanto's C++ build: the run says why."""
    from optimum.quanto.library.extensions import get_extension

    from stylelora.training.loop import _model_notes

    build = tmp_path / "build"
    monkeypatch.setattr(get_extension("quanto_cpp"), "build_directory", str(build))
    model, cpu = load_base_model("builtin:tiny"), torch.device("cpu")

    def notes(scheme: str) -> str:
        config = tiny_config(tmp_path, tmp_path / "run", **{"model.quantize": scheme})
        return "\n".join(m.text for m in _model_notes(config, model, cpu))

    compiles = "model.quantize=nf4 on a CPU: optimum-quanto first compiles its kernel for 4-bit weights"
    assert compiles in notes("nf4")
    assert "compiles" not in notes("int8") and "compiles" not in notes("none")
    build.mkdir()
    (build / "pytorch_version.txt").write_text(torch.__version__)  # what quanto leaves once it has built it
    assert "compiles" not in notes("nf4")
