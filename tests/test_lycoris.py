"""A second, independent kohya loader: LyCORIS (lycoris-lora) builds its network from stylelora's kohya
file by matching each key's name to a module of the model, as sd-scripts and A1111's extension do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from safetensors.torch import load_file

from conftest import assert_fused_delta, make_adapter, weights
from stylelora.formats import save_kohya
from stylelora.models import load_base_model


def text_encoder_as_kohya_sees_it(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """sd-scripts, A1111 and ComfyUI walk CLIP with its modules under ``text_model.`` (transformers 4's
    layout). transformers 5 flattened CLIPTextModel, so there LyCORIS gets the same modules under that name."""
    if any(name.startswith("text_model.") for name, _ in text_encoder.named_modules()):
        return text_encoder
    holder = torch.nn.Module()
    holder.text_model = text_encoder
    return holder


@pytest.mark.parametrize("conv_rank", [0, 2], ids=["lora", "locon"])
def test_lycoris_matches_every_key_to_a_module_and_merges_the_same_weights(tmp_path: Path, conv_rank: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # LyCORIS 4 also lists the "TimestepEmbedding" class (for Anima) beside the name time_embedding.linear_1,
    # so building its default network on an SD UNet asserts "duplicated lora name". Its SD targets
    # (sd-scripts' list) avoid that; they do not change how the file's keys are matched below.
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_MODULE",
                        ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"])
    adapter = make_adapter("tiny", rank=4, alpha=2.0, conv_rank=conv_rank, conv_alpha=3.0)
    base = load_base_model("builtin:tiny")
    path = save_kohya(tmp_path / "style.safetensors", adapter, base, precision="fp32")
    tensors = load_file(path)
    text_encoder = text_encoder_as_kohya_sees_it(base.text_encoder)

    network, _ = create_network_from_weights(1.0, str(path), None, text_encoder, base.unet, weights_sd=tensors)
    loras = network.unet_loras + network.text_encoder_loras
    # every module named in the file was found in the model by name, and LyCORIS built a LoRA/LoCon for it
    assert sorted(m.lora_name for m in loras) == sorted({k.split(".")[0] for k in tensors})
    assert {type(m).__name__ for m in loras} == {"LoConModule"}
    convs = [m for m in loras if tensors[f"{m.lora_name}.lora_down.weight"].dim() == 4
             and tensors[f"{m.lora_name}.lora_down.weight"].shape[-1] == 3]
    assert bool(convs) == bool(conv_rank)
    for m in loras:  # shapes as the file has them (LyCORIS copies them in; a broadcastable misfit would pass)
        assert m.lora_down.weight.shape == tensors[f"{m.lora_name}.lora_down.weight"].shape, m.lora_name
        assert m.lora_up.weight.shape == tensors[f"{m.lora_name}.lora_up.weight"].shape, m.lora_name
        assert float(m.alpha) == float(tensors[f"{m.lora_name}.alpha"]), m.lora_name

    before = {part: weights(module) for part, module in base.parts()}
    network.merge_to(text_encoder, base.unet, tensors, torch.float32, "cpu")
    # LyCORIS's merged weights are ours: W + alpha/rank * up @ down in every adapted module, the rest untouched
    assert_fused_delta(adapter, base, before)
