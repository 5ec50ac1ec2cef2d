"""LoHa and LoKr: trained through peft, written in LyCORIS' layout, and read by LyCORIS' own loader
(lycoris-lora) with every key matched and the same weights as ours; strength 0 is the base model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris import kohya as lycoris
from safetensors import safe_open

from conftest import make_dataset, run_cli, tiny_config
from stylelora.formats import load_adapter
from stylelora.merge import merge
from stylelora.models import ADAPTER_NAME, load_base_model
from stylelora.train import train


class CLIPNames(torch.nn.Module):
    """The text encoder under the module names the exchange formats use (``text_model.encoder...``):
    transformers 5 dropped the ``text_model`` level, A1111 and LyCORIS name modules with it."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_model = text_encoder


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
    """LyCORIS' kohya loader on ``base``; its default preset is emptied first, so every module it builds
    comes from the file (its preset also matches time_embedding twice on a diffusers UNet)."""
    net = lycoris.LycorisNetworkKohya
    saved = {k: getattr(net, k) for k in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                                          "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME")}
    net.apply_preset({"unet_target_module": [], "unet_target_name": [], "text_encoder_target_module": [],
                      "text_encoder_target_name": []})
    try:
        return lycoris.create_network_from_weights(1.0, str(path), base.vae, CLIPNames(base.text_encoder), base.unet,
                                                   for_inference=True)
    finally:
        for key, value in saved.items():
            setattr(net, key, value)


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
    assert set(loaded) == names and len(names) == 76  # 64 UNet modules (52 linear + 12 convs) + 12 TE
    ours = load_adapter(paths[0], base)
    from peft.tuners.lycoris_utils import LycorisLayer

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
    assert compared == 76


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
