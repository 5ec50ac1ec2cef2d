"""Style-block targeting: LoRA on chosen UNet blocks (B-LoRA's style preset), split adapters, per-block strength."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from test_formats import captured_logs, make_adapter

from conftest import make_dataset, run_cli, tiny_config
from stylelora.adapters.formats import load_adapter, save_kohya
from stylelora.adapters.merge import split
from stylelora.core.config import Config
from stylelora.core.errors import ConfigError, StyleloraError
from stylelora.data.images import parse_parameters, read_parameters
from stylelora.families import load_base_model
from stylelora.model.blocks import block_name, expand, group_of
from stylelora.preview.previewer import Previewer
from stylelora.training.loop import train

STYLE = "up_blocks.0.attentions.1."  # B-LoRA's style block of SDXL; SGM's output_blocks.1.1 (two layers per block)


def assert_loads_into(path: Path, parts: set[str]) -> None:
    """diffusers' SDXL pipeline loads the file with no key missing, unexpected or left out, onto ``parts``
    (its note that a text encoder has no keys is right for an adapter without that text encoder)."""
    pipe = load_base_model("builtin:tiny-sdxl").pipeline
    with captured_logs() as records:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    absent = [f"prefix='{part}'" for part in ("text_encoder", "text_encoder_2") if part not in parts]
    records = [r for r in records if not (r.startswith("No LoRA keys") and any(a in r for a in absent))]
    assert [r for r in records if any(s in r.lower() for s in ("unexpected", "missing", "not loaded", "no lora"))] == []
    assert set(pipe.get_list_adapters()) == parts


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("blocks") / "data", n=2)


def test_block_names_are_the_ones_users_know() -> None:
    assert block_name("up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q") == "up.0.attn.1"
    assert block_name("down_blocks.2.resnets.1.conv1") == "down.2.res.1"
    assert block_name("down_blocks.1.downsamplers.0.conv") == "down.1.downsample"
    assert block_name("mid_block.attentions.0.proj_in") == "mid.attn.0"
    assert block_name("conv_in") is None
    assert expand(["style", "content", "up_blocks.1", "mid_block", "down"]) == ["up.0.attn.1", "up.0.attn.0", "up.1",
                                                                                "mid", "down"]
    assert [group_of(p) for p in ("conv_in", "time_embedding.linear_1", "down_blocks.0.resnets.0.conv1",
                                  "mid_block.resnets.1.conv2", "up_blocks.2.attentions.0.proj_out", "conv_out")] == [
        "IN", "IN", "IN", "MID", "OUT", "OUT"]
    with pytest.raises(ConfigError, match="lora.blocks: 'up.zero' is not a block name; use down.N, mid or up.N"):
        Config().with_overrides({"lora.blocks": ["up.zero"]})


def test_style_preset_trains_only_up_blocks_0_attentions_1_and_loads_in_diffusers(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "style"
    train(tiny_config(data, out, **{"model.name": "builtin:tiny-sdxl", "lora.blocks": ["style"], "train.steps": 2,
                                    "export.precision": "fp32"}))
    kohya = load_file(out / "style.safetensors")
    assert kohya and all(k.startswith("lora_unet_output_blocks_1_1_") for k in kohya)
    assert {k.split(".")[0] for k in kohya} >= {"lora_unet_output_blocks_1_1_proj_in",
                                                 "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_v",
                                                 "lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_2"}
    diffusers_keys = load_file(out / "diffusers" / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet." + STYLE) for k in diffusers_keys)
    for path in (out / "style.safetensors", out / "diffusers" / "pytorch_lora_weights.safetensors"):
        assert_loads_into(path, {"unet"})


def test_a_block_the_unet_lacks_is_named_with_the_blocks_it_has(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:  # SD1.5's first up block has no attention
        train(tiny_config(data, tmp_path / "x", **{"lora.blocks": ["style"]}))
    assert "lora.blocks: 'up.0.attn.1' names no module of this model's UNet" in str(e.value)
    assert "up.1.attn.0" in str(e.value) and "B-LoRA" in str(e.value)
    assert not (tmp_path / "x" / "config.toml").exists()


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SDXL adapter with LoRA on every attention module of the UNet and both text encoders, in kohya format."""
    adapter = make_adapter("tiny-sdxl", rank=4, alpha=2.0)
    adapter.metadata["stylelora.config"] = Config().with_overrides({"model.name": "builtin:tiny-sdxl"}).to_toml()
    return save_kohya(tmp_path_factory.mktemp("full") / "full.safetensors", adapter,
                      load_base_model("builtin:tiny-sdxl"), precision="fp32")


def test_split_keeps_the_chosen_blocks_verified_and_loadable(full: Path, tmp_path: Path) -> None:
    r = run_cli("split", str(full), "--keep", "style", "--out", str(tmp_path / "style.safetensors"))
    assert r.returncode == 0, r.stderr
    assert "kept style" in r.stdout and "verified" in r.stdout
    original, style = load_file(full), load_file(tmp_path / "style.safetensors")
    assert style and all(k.startswith("lora_unet_output_blocks_1_1_") for k in style)
    assert all(k in original and (original[k] == v).all() for k, v in style.items())  # the same weights and alphas
    assert len(style) == len([k for k in original if k.startswith("lora_unet_output_blocks_1_1_")])

    report = split(full, ["mid", "te1"], tmp_path / "mid.safetensors")
    adapter = load_adapter(report.path, load_base_model("builtin:tiny-sdxl"))
    assert set(adapter.state) == {"unet", "text_encoder"}
    assert all(p.startswith("mid_block.") for p in adapter.modules("unet"))
    assert report.kept + report.dropped == sum(load_adapter(full, load_base_model("builtin:tiny-sdxl"))
                                               .num_modules().values())
    assert_loads_into(tmp_path / "style.safetensors", {"unet"})
    assert_loads_into(report.path, {"unet", "text_encoder"})

    with pytest.raises(StyleloraError, match="--keep: 'up.5' names no module of the adapter's UNet"):
        split(full, "up.5", tmp_path / "no.safetensors")
    with pytest.raises(StyleloraError, match="keeps all"):
        split(full, "unet te", tmp_path / "all.safetensors")
    assert not (tmp_path / "no.safetensors").exists() and not (tmp_path / "all.safetensors").exists()


@pytest.mark.parametrize("group", ["IN", "MID", "OUT"])
def test_block_strength_0_for_a_group_renders_as_the_adapter_without_it(full: Path, tmp_path: Path,
                                                                        group: str) -> None:
    keep = {"IN": "mid up te", "MID": "down up te", "OUT": "down mid te"}[group]
    without = split(full, keep, tmp_path / "without.safetensors").path
    preview = Previewer("builtin:tiny-sdxl")
    preview.attach(full, "full")
    preview.attach(without, "without")
    settings = {"seed": 3, "steps": 3}
    zeroed = preview.generate("a red house", adapter="full", blocks={group: 0}, **settings)
    expected = preview.generate("a red house", adapter="without", **settings)
    whole = preview.generate("a red house", adapter="full", **settings)
    assert np.array_equal(np.asarray(zeroed), np.asarray(expected))
    assert not np.array_equal(np.asarray(zeroed), np.asarray(whole))
    written = parse_parameters(zeroed.info["parameters"])["Lora block strength"]
    assert written == ", ".join(f"{g} {0 if g == group else 1}" for g in ("IN", "MID", "OUT"))


def test_block_strengths_scale_their_groups_and_are_checked(full: Path, tmp_path: Path) -> None:
    preview = Previewer("builtin:tiny-sdxl")
    preview.attach(full, "full")
    settings = {"seed": 3, "steps": 3}
    all_ones = preview.generate("a red house", adapter="full", blocks={"IN": 1, "MID": 1, "OUT": 1}, **settings)
    assert np.array_equal(np.asarray(all_ones), np.asarray(preview.generate("a red house", adapter="full", **settings)))
    assert "block strength" not in all_ones.info["parameters"]
    with pytest.raises(ConfigError, match="block strength 'UP': no such group; the groups are IN, MID, OUT"):
        preview.generate("a red house", adapter="full", blocks={"UP": 0}, **settings)
    r = run_cli("generate", "--model", "builtin:tiny-sdxl", "--lora", str(full), "--blocks", "MID=0", "OUT=0.5",
                "--prompt", "a red house", "--steps", "2", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 0, r.stderr
    assert parse_parameters(read_parameters(tmp_path / "x.png"))["Lora block strength"] == "IN 1, MID 0, OUT 0.5"
    bad = run_cli("generate", "--model", "builtin:tiny-sdxl", "--lora", str(full), "--blocks", "MID",
                  "--prompt", "a red house", "--out", str(tmp_path / "y.png"))
    assert bad.returncode == 1 and "--blocks MID: expected GROUP=NUMBER" in bad.stderr
