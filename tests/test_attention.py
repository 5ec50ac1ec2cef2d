"""train.attention=sdpa on a CPU: an fp32 run's attention is exactly diffusers' own; a bf16 run computes the
attention itself in fp32 (PyTorch's CPU kernel is slower in bf16). train.mixed_precision=auto takes bf16
on a CPU only where it has AMX, and says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import stylelora.training.loop as training
from conftest import make_dataset, tiny_config
from stylelora.core import events
from stylelora.families import load_base_model
from stylelora.model.attention import CpuSdpaProcessor
from stylelora.training import precision


def unet_output(processor: object, dtype: torch.dtype) -> torch.Tensor:
    """builtin:tiny's UNet on fixed inputs, its weights in ``dtype`` (under CPU autocast when not fp32)."""
    unet = load_base_model("builtin:tiny").unet.to(dtype)
    unet.set_attn_processor(processor)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype != torch.float32):
        return unet(latents, torch.tensor([10, 700]), text).sample.float()


def test_fp32_attention_is_diffusers_own_exactly() -> None:
    assert torch.equal(unet_output(CpuSdpaProcessor(), torch.float32), unet_output(AttnProcessor2_0(), torch.float32))


def test_bf16_attention_is_computed_in_fp32_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    seen: list[torch.dtype] = []

    def recording(query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(query.dtype)
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    exact = unet_output(CpuSdpaProcessor(), torch.float32)
    seen.clear()
    upcast = unet_output(CpuSdpaProcessor(), torch.bfloat16)
    attentions = len(load_base_model("builtin:tiny").unet.attn_processors)
    assert seen == [torch.float32] * attentions  # every attention of the bf16 UNet, in fp32
    seen.clear()
    plain = unet_output(AttnProcessor2_0(), torch.bfloat16)
    assert seen == [torch.bfloat16] * attentions  # diffusers' processor: what autocast gives it
    # the bf16 UNet still computes what the fp32 one does, to bf16's precision
    assert (upcast - exact).abs().max() < 0.05 * exact.abs().max()
    assert (plain - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("attention") / "data")


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_on_a_cpu_is_bf16_only_with_amx(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       amx: bool) -> None:
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AMX" if amx else "AVX2")
    seen: list[object] = []
    model = load_base_model("builtin:tiny")
    config = tiny_config(data, tmp_path / "out", **{"train.steps": 2, "train.device": "cpu",
                                                    "sample.prompts": ["a red square"], "sample.every": 2,
                                                    "sample.steps": 2})
    assert config.train.mixed_precision == "auto"
    result = training.train(config, seen.append, model=model)
    to_q = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert to_q.base_layer.weight.dtype == (torch.bfloat16 if amx else torch.float32)
    assert to_q.lora_A["default"].weight.dtype == torch.float32  # the LoRA trains in fp32 either way
    assert all(loss == loss for loss in result.losses) and len(result.losses) == 2
    said = [e.text for e in seen if isinstance(e, events.Message) and e.text.startswith("precision:")]
    assert len(said) == 1 and said[0].startswith("precision: bf16 base weights, LoRA in fp32 (train.mixed_precision"
                                                 "=auto on a CPU with AMX" if amx else "precision: fp32 (train.mixed_"
                                                 "precision=auto on a CPU with AVX2")
    assert {type(p) for p in model.unet.attn_processors.values()} == {CpuSdpaProcessor}
    # a sample renders from the bf16 base too (its VAE used to get the fp32 latents accelerate's UNet returns)
    assert [p.name for p in (tmp_path / "out" / "samples").iterdir()] == ["step-000002-00.png"]
