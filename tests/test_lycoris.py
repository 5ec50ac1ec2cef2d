"""A second, independent kohya loader: LyCORIS (lycoris-lora) builds its network from stylelora's kohya
file by matching each key's name to a module of the model, as sd-scripts and A1111's extension do.
LoRA and LoCon: every key matched, merged weights equal ours. LoHa and LoKr (trained through peft,
written in LyCORIS' layout): every key matched, the same weights and merged weights as ours, and
strength 0 is the base model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_fused_delta, make_adapter, make_dataset, run_cli, tiny_config, weights
from stylelora.config import LoraConfig
from stylelora.formats import load_adapter, save_kohya
from stylelora.merge import merge
from stylelora.models import ADAPTER_NAME, add_lora, load_base_model
from stylelora.train import train


@pytest.fixture(autouse=True)
def sd_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    """LyCORIS 4 also lists the "TimestepEmbedding" class (for Anima) beside the name time_embedding.linear_1,
    so building its default network on an SD UNet asserts "duplicated lora name". Its SD targets
    (sd-scripts' list) avoid that; they do not change how a file's keys are matched."""
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_MODULE",
                        ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"])


def text_encoder_as_kohya_sees_it(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """sd-scripts, A1111 and ComfyUI walk CLIP with its modules under ``text_model.`` (transformers 4's
    layout). transformers 5 flattened CLIPTextModel, so there LyCORIS gets the same modules under that name."""
    if any(name.startswith("text_model.") for name, _ in text_encoder.named_modules()):
        return text_encoder
    holder = torch.nn.Module()
    holder.text_model = text_encoder
    return holder


@pytest.mark.parametrize("conv_rank", [0, 2], ids=["lora", "locon"])
def test_lycoris_matches_every_key_to_a_module_and_merges_the_same_weights(tmp_path: Path, conv_rank: int) -> None:
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


@pytest.fixture(scope="module", params=["loha", "lokr"])
def trained(request, tmp_path_factory):
    """A LoHa or LoKr on the UNet (with the ResNet convs) and the text encoder, alpha != rank, 3 steps."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = load_base_model("builtin:tiny")
    config = tiny_config(make_dataset(tmp / "data"), tmp / "run", **{
        "lora.type": request.param, "lora.rank": 4, "lora.alpha": 2.0, "lora.conv_rank": 2, "lora.conv_alpha": 1.0,
        "lora.train_text_encoder": True, "train.lr": 1e-2, "export.precision": "fp32"})
    result = train(config, model=model)
    return request.param, result.adapter_paths, model


def lycoris_network(path: Path, base) -> tuple[object, dict]:
    """LyCORIS' kohya loader on ``base``, building its modules from the file."""
    return create_network_from_weights(1.0, str(path), base.vae, text_encoder_as_kohya_sees_it(base.text_encoder),
                                       base.unet, for_inference=True)


def test_only_a_lycoris_file_is_written_with_its_metadata(trained) -> None:
    network, paths, _ = trained
    assert [p.name for p in paths] == ["run.safetensors"]  # diffusers reads LoRA only
    with safe_open(str(paths[0]), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefix = "hada_" if network == "loha" else "lokr_"
    assert all(k.endswith(".alpha") or f".{prefix}" in k for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in keys)
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == network and args["conv_dim"] == "2" and args["conv_alpha"] == "1"


def test_lycoris_loads_every_key_and_builds_our_weights(trained) -> None:
    network, paths, model = trained
    base = load_base_model("builtin:tiny")
    lyco, weights = lycoris_network(paths[0], base)
    names = {k.split(".")[0] for k in weights}
    loaded = {m.lora_name: m for m in lyco.unet_loras + lyco.text_encoder_loras}
    assert set(loaded) == names and len(names) == 91  # UNet: 48 attention + 31 conv_dim modules; 12 TE
    ours = load_adapter(paths[0], base)
    compared = 0
    for part, module in model.parts():
        for path, layer in module.named_modules():
            if not isinstance(layer, LycorisLayer) or ADAPTER_NAME not in layer.r:
                continue
            trained_delta = layer.get_delta_weight(ADAPTER_NAME).detach()
            shape = tuple(trained_delta.shape)
            name = ("lora_unet_" if part == "unet" else "lora_te_text_model_") + path.replace(".", "_")
            # LyCORIS' forward adds get_weight() x multiplier (its merge_to scales LoHa twice: not used here)
            theirs = loaded[name].get_weight(shape).detach()
            assert torch.allclose(theirs, trained_delta, atol=1e-7, rtol=1e-5), name
            assert torch.allclose(ours.delta(part, path, shape), trained_delta, atol=1e-7, rtol=1e-5), name
            assert trained_delta.abs().max() > 0  # the steps moved it away from its zero start
            compared += 1
    assert compared == 91


def test_merged_weights_and_outputs_equal_lycoris_and_strength_0_is_the_base(trained, tmp_path: Path) -> None:
    network, paths, _ = trained
    merged = load_base_model(str(merge("builtin:tiny", paths[0], 1.0, tmp_path / "merged")))
    base = load_base_model("builtin:tiny")
    lyco, _ = lycoris_network(paths[0], base)
    for module in lyco.unet_loras + lyco.text_encoder_loras:  # LyCORIS' weights, merged as its forward uses them
        target = module.org_module[0]
        with torch.no_grad():
            target.weight += module.get_weight(tuple(target.weight.shape)) * module.multiplier
    for (_, a), (_, b) in zip(merged.parts(), base.parts(), strict=True):
        ours, theirs = a.state_dict(), b.state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.allclose(ours[key], theirs[key], atol=1e-6), key
    plain = load_base_model("builtin:tiny")
    zero = load_base_model(str(merge("builtin:tiny", paths[0], 0.0, tmp_path / "zero")))
    for (_, a), (_, b) in zip(zero.parts(), plain.parts(), strict=True):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    g = torch.Generator().manual_seed(0)
    latents, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(zero.unet(latents, 10, states).sample, plain.unet(latents, 10, states).sample)
        assert not torch.allclose(merged.unet(latents, 10, states).sample, plain.unet(latents, 10, states).sample)


def test_lycoris_networks_have_no_diffusers_file(trained, tmp_path: Path) -> None:
    _, paths, _ = trained
    r = run_cli("export", str(paths[0]), "--format", "diffusers", "--out", str(tmp_path / "d"), "--model",
                "builtin:tiny")
    assert r.returncode == 1 and "LyCORIS layout" in r.stderr and "Traceback" not in r.stderr
    ok = run_cli("export", str(paths[0]), "--format", "kohya", "--out", str(tmp_path / "again.safetensors"),
                 "--model", "builtin:tiny", "--precision", "fp32")
    assert ok.returncode == 0, ok.stderr
    assert "LoHa" in ok.stdout or "LoKr" in ok.stdout


def test_the_preview_renders_them_and_strength_0_is_the_base_image(trained) -> None:
    from stylelora.config import GenerateSettings
    from stylelora.generate import Previewer

    _, paths, _ = trained
    preview = Previewer("builtin:tiny")
    name = preview.attach(paths[0])
    settings = GenerateSettings(seed=3, steps=2)
    base = np.asarray(preview.base("a lighthouse", settings))
    assert np.array_equal(np.asarray(preview.generate("a lighthouse", settings, adapter=name, scale=0.0)), base)
    styled = np.asarray(preview.generate("a lighthouse", settings, adapter=name, scale=1.0))
    assert not np.array_equal(styled, base)


def test_a_lokr_factor_peft_splits_other_than_lycoris_is_refused_before_training() -> None:
    """Above a side's square root peft splits factor x rest, LyCORIS rest x factor: no file of those factors
    would load in LyCORIS, so training does not start (32 channels: factor 8 is 8 x 4 in peft, 4 x 8 there)."""
    from stylelora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora.lokr_factor: 8 splits the 32 channels of .* as 8 x 4 in peft, where "
                                          r"LyCORIS splits them 4 x 8.* at most 5 \(the square root of the narrowest"):
        add_lora(load_base_model("builtin:tiny"), LoraConfig(type="lokr", lokr_factor=8))
    add_lora(load_base_model("builtin:tiny"), LoraConfig(type="lokr", lokr_factor=4))  # 4 x 8 both ways
