"""Adapter files load everywhere: kohya and diffusers, checked with diffusers' own loaders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import (
    assert_diffusers_fuses_exactly,
    assert_fused_delta,
    assert_loaded_cleanly,
    captured_logs,
    make_adapter,
    run_cli,
    tiny_config,
    weights,
)
from stylelora.adapters.convert import export
from stylelora.adapters.formats import Adapter, ModelLayout, load_adapter, save_diffusers, save_kohya, to_kohya
from stylelora.adapters.merge import merge, resize
from stylelora.core.config import Config
from stylelora.core.errors import FormatError
from stylelora.families import load_base_model
from stylelora.model.lora import lora_alphas, lora_state


def unet_output(model, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return model.pipeline(
        "a red square, flat style", num_inference_steps=2, height=64, width=64, generator=gen, output_type="pt"
    ).images


# --- key names -----------------------------------------------------------------------------------


@pytest.mark.interop
def test_kohya_names_for_builtin_tiny_are_the_documented_ones() -> None:
    model = load_base_model("builtin:tiny")
    tensors = to_kohya(make_adapter(), ModelLayout.of(model))
    blocks = [
        "lora_unet_down_blocks_0_attentions_0",
        "lora_unet_mid_block_attentions_0",
        "lora_unet_up_blocks_1_attentions_0",
        "lora_unet_up_blocks_1_attentions_1",
    ]
    leaves = [
        "proj_in", "proj_out",
        "transformer_blocks_0_attn1_to_q", "transformer_blocks_0_attn1_to_k",
        "transformer_blocks_0_attn1_to_v", "transformer_blocks_0_attn1_to_out_0",
        "transformer_blocks_0_attn2_to_q", "transformer_blocks_0_attn2_to_k",
        "transformer_blocks_0_attn2_to_v", "transformer_blocks_0_attn2_to_out_0",
        "transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2",
    ]
    te = [
        f"lora_te_text_model_encoder_layers_{i}_{leaf}"
        for i in (0, 1)
        for leaf in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                     "mlp_fc1", "mlp_fc2")
    ]
    golden = {f"{b}_{leaf}" for b in blocks for leaf in leaves} | set(te)
    assert {k.split(".")[0] for k in tensors} == golden
    assert {k.split(".", 1)[1] for k in tensors} == {"lora_down.weight", "lora_up.weight", "alpha"}
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{q}.lora_down.weight"].shape == (4, 32) and tensors[f"{q}.lora_up.weight"].shape == (32, 4)
    assert tensors[f"{q}.alpha"].dim() == 0 and float(tensors[f"{q}.alpha"]) == 2.0
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert tensors[f"{q}.lora_down.weight"].dtype == torch.float16


@pytest.mark.interop
def test_sdxl_uses_sgm_names_and_two_text_encoders() -> None:
    model = load_base_model("builtin:tiny-sdxl")
    names = {k.split(".")[0] for k in to_kohya(make_adapter("tiny-sdxl", conv_rank=2), ModelLayout.of(model))}
    for expected in [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down block 1, layer 0, attention
        "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k",  # down block 2, 2nd transformer layer
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_1_0_in_layers_2",  # resnet conv1 (LoCon)
        "lora_unet_output_blocks_8_0_out_layers_3",  # last up block, 3rd resnet, conv2
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc2",
    ]:
        assert expected in names
    assert not any("down_blocks" in n or "up_blocks" in n or "lora_te_" in n for n in names)


def test_sdxl_kohya_file_with_diffusers_style_names_is_read(tmp_path: Path) -> None:
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # as some trainers write SDXL
    save_file({f"{q}.lora_down.weight": torch.ones(2, 32), f"{q}.lora_up.weight": torch.ones(32, 2),
               f"{q}.alpha": torch.tensor(1.0)}, str(tmp_path / "x.safetensors"))
    adapter = load_adapter(tmp_path / "x.safetensors", load_base_model("builtin:tiny-sdxl"))
    assert adapter.modules("unet") == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]


# --- diffusers' own loaders ------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("kind", ["tiny", "tiny-sdxl"])
def test_diffusers_loads_the_file_and_fuses_exactly_up_down_alpha_over_rank(tmp_path: Path, fmt: str,
                                                                             kind: str) -> None:
    adapter = make_adapter(kind, rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0)
    model = load_base_model(f"builtin:{kind}")
    if fmt == "kohya":
        path = save_kohya(tmp_path / "style.safetensors", adapter, model, precision="fp32")
        with safe_open(str(path), "pt") as f:
            assert "lora_adapter_metadata" not in (f.metadata() or {})
    else:
        path = save_diffusers(tmp_path / "style", adapter, model, precision="fp32")
    assert_diffusers_fuses_exactly(path, adapter, model)


def test_adapter_scale_zero_gives_the_base_image_exactly(tmp_path: Path) -> None:
    model = load_base_model("builtin:tiny")
    base = unet_output(model)
    path = save_kohya(tmp_path / "style.safetensors", make_adapter(conv_rank=2), model)
    model.pipeline.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="style")
    model.pipeline.set_adapters(["style"], [0.0])
    assert torch.equal(unet_output(model), base)
    model.pipeline.set_adapters(["style"], [1.0])
    assert (unet_output(model) - base).abs().max() > 1e-3


# --- round trips and runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_dataset
    from stylelora.training.loop import train

    tmp = tmp_path_factory.mktemp("formats")
    data = make_dataset(tmp / "data", n=3)
    out = tmp / "style"
    train(tiny_config(data, out, **{"train.steps": 2, "lora.train_text_encoder": True, "lora.alpha": 2.0,
                                    "data.trigger_word": "zq"}))
    return out


def test_run_files_carry_metadata_hashes_and_config(run: Path) -> None:
    path = run / "style.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert Config.from_toml(meta["stylelora.config"]) == Config.load(run / "config.toml")
    assert load_adapter(path, load_base_model("builtin:tiny")).config == Config.load(run / "config.toml")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.trigger_phrase"] == "zq"
    assert json.loads(meta["ss_tag_frequency"]) == {"data": {"a picture number 0": 1, "a picture number 1": 1,
                                                             "a picture number 2": 1, "flat style": 3}}
    blob = path.read_bytes()
    header = int.from_bytes(blob[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header:]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8
    record = json.loads(meta["stylelora.reproducibility"])
    assert record["seed"] == 42 and record["num_images"] == 3 and len(record["dataset_sha256"]) == 64
    assert {"torch", "diffusers", "peft", "transformers"} <= set(record["versions"])
    assert "lora_adapter_metadata" not in meta


def test_kohya_to_diffusers_to_kohya_keeps_every_tensor_and_the_config(run: Path, tmp_path: Path) -> None:
    original = load_file(run / "style.safetensors")
    to_diffusers = export(run, "diffusers", tmp_path / "d")
    assert to_diffusers.verified and to_diffusers.path == tmp_path / "d" / "pytorch_lora_weights.safetensors"
    back = export(to_diffusers.path, "kohya", tmp_path / "back.safetensors")
    assert back.num_tensors == len(original)
    again = load_file(back.path)
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) and again[k].dtype == original[k].dtype for k in original)
    with safe_open(str(back.path), "pt") as f:
        meta = f.metadata()
    assert Config.from_toml(meta["stylelora.config"]) == Config.load(run / "config.toml")
    assert "lora_adapter_metadata" not in meta
    # and the diffusers file equals the one training wrote
    trained = load_file(run / "diffusers" / "pytorch_lora_weights.safetensors")
    exported = load_file(to_diffusers.path)
    assert trained.keys() == exported.keys() and all(torch.equal(trained[k], exported[k]) for k in trained)


@pytest.mark.interop
def test_hand_written_kohya_file_from_another_trainer_loads_and_applies(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    proj = "lora_unet_up_blocks_1_attentions_1_proj_out"
    te = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    tensors = {  # as sd-scripts writes them; proj_out with its own alpha, as a hand-edited file might have
        f"{q}.lora_down.weight": torch.randn(8, 32, generator=gen),
        f"{q}.lora_up.weight": torch.randn(32, 8, generator=gen),
        f"{q}.alpha": torch.tensor(4.0),
        f"{proj}.lora_down.weight": torch.randn(8, 32, 1, 1, generator=gen),
        f"{proj}.lora_up.weight": torch.randn(32, 8, 1, 1, generator=gen),
        f"{proj}.alpha": torch.tensor(2.0),
        f"{te}.lora_down.weight": torch.randn(8, 32, generator=gen),
        f"{te}.lora_up.weight": torch.randn(64, 8, generator=gen),
        f"{te}.alpha": torch.tensor(4.0),
    }
    path = tmp_path / "other.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_dim": "8", "ss_network_alpha": "4"})
    model = load_base_model("builtin:tiny")
    adapter = load_adapter(path, model)
    assert adapter.modules("unet") == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                       "up_blocks.1.attentions.1.proj_out"]
    fc1 = "text_model.encoder.layers.1.mlp.fc1"  # CLIP's own module path (transformers 5 drops "text_model.")
    fc1 = fc1 if any(n == fc1 for n, _ in model.text_encoder.named_modules()) else fc1.removeprefix("text_model.")
    assert adapter.modules("text_encoder") == [fc1]
    from stylelora.model.lora import adaptable_modules

    assert load_adapter(path, adaptable_modules(model)).state.keys() == adapter.state.keys()  # names-only form
    assert adapter.alpha_of("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == 4.0
    assert adapter.alpha_of("unet", "up_blocks.1.attentions.1.proj_out") == 2.0
    assert adapter.alpha_of("text_encoder", fc1) == 4.0
    before = {part: weights(module) for part, module in model.parts()}
    with captured_logs() as records:
        model.pipeline.load_lora_weights(str(tmp_path), weight_name=path.name)
    assert_loaded_cleanly(records)
    model.pipeline.fuse_lora(lora_scale=0.5)
    model.pipeline.unload_lora_weights()
    assert_fused_delta(adapter, model, before, scale=0.5)
    # stylelora converts it too, given the base model (the file does not name one)
    report = export(path, "diffusers", tmp_path / "converted", base_model="builtin:tiny")
    assert report.num_tensors == 6
    with pytest.raises(FormatError, match="name it in `model.name`"):
        export(path, "diffusers", tmp_path / "nope")


def test_keys_naming_no_module_are_refused_and_listed(tmp_path: Path) -> None:
    bad = "lora_unet_down_blocks_7_attentions_0_proj_in"
    path = tmp_path / "bad.safetensors"
    save_file({f"{bad}.lora_down.weight": torch.zeros(4, 32), f"{bad}.lora_up.weight": torch.zeros(32, 4)}, str(path))
    with pytest.raises(FormatError, match=bad):
        load_adapter(path, load_base_model("builtin:tiny"))
    # an SD1 adapter is not silently applied to an SDXL model
    model = load_base_model("builtin:tiny")
    sd1 = save_kohya(tmp_path / "sd1.safetensors", make_adapter(), model)
    with pytest.raises(FormatError, match="another base model"):
        load_adapter(sd1, load_base_model("builtin:tiny-sdxl"))


def test_a_corrupted_write_fails_verification_and_keeps_the_old_file(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load, save

    from stylelora.adapters import formats as fm

    model = load_base_model("builtin:tiny")
    target = tmp_path / "x.safetensors"
    save_kohya(target, make_adapter(), model)
    good = target.read_bytes()

    def save_with_one_value_flipped(tensors, metadata=None) -> bytes:
        tensors = load(save(tensors))
        key = sorted(k for k in tensors if "lora_up" in k)[0]
        tensors[key].view(-1)[0] += 1
        return save(tensors, metadata=metadata)

    monkeypatch.setattr(fm, "save", save_with_one_value_flipped)
    with pytest.raises(FormatError, match="verification failed"):
        save_kohya(target, make_adapter(seed=1), model)
    assert target.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary file left behind


@pytest.mark.interop
def test_dora_goes_to_diffusers_and_is_refused_for_kohya_with_a_reason(tmp_path: Path) -> None:
    adapter, trained = make_adapter(dora=True, with_model=True)
    model = load_base_model("builtin:tiny")
    with pytest.raises(FormatError, match="DoRA.*in the diffusers format"):
        save_kohya(tmp_path / "d.safetensors", adapter, model)
    path = save_diffusers(tmp_path / "d", adapter, model)
    with captured_logs() as records:
        model.pipeline.load_lora_weights(str(path.parent), weight_name=path.name)
    assert_loaded_cleanly(records)
    assert load_adapter(path, model).is_dora
    # diffusers applies the magnitudes as peft does in training
    torch.testing.assert_close(unet_output(model), unet_output(trained), atol=1e-3, rtol=1e-3)


# --- merge and resize --------------------------------------------------------------------------------


def test_merge_equals_the_base_with_the_adapter_at_that_scale(tmp_path: Path) -> None:
    model = load_base_model("builtin:tiny")
    lora = save_kohya(tmp_path / "style.safetensors", make_adapter(conv_rank=2), model, precision="fp32")
    merged = merge("builtin:tiny", lora, 0.7, tmp_path / "merged")
    assert (merged / "model_index.json").is_file()
    base = unet_output(model)
    model.pipeline.load_lora_weights(str(tmp_path), weight_name=lora.name, adapter_name="style")
    model.pipeline.set_adapters(["style"], [0.7])
    with_adapter = unet_output(model)
    baked = unet_output(load_base_model(str(merged)))
    torch.testing.assert_close(baked, with_adapter, atol=1e-4, rtol=1e-4)
    assert (baked - base).abs().max() > 1e-3


def test_resize_lowers_the_rank_reports_energy_and_stays_close(tmp_path: Path) -> None:
    model = load_base_model("builtin:tiny")
    adapter = make_adapter(rank=8, alpha=8.0, te=False)
    # a realistic spectrum: most of each delta in a few directions
    decay = torch.tensor([1.0, 0.8, 0.6, 0.5, 0.05, 0.04, 0.03, 0.02])
    for key, value in adapter.state["unet"].items():
        if key.endswith("lora_B.weight"):
            adapter.state["unet"][key] = value * decay.reshape(1, -1, *[1] * (value.dim() - 2))
    src = save_kohya(tmp_path / "r8.safetensors", adapter, model, precision="fp32")
    report = resize(src, 4, tmp_path / "r4.safetensors", base_model="builtin:tiny")
    small = load_adapter(report.path, model)
    assert small.rank == 4 and small.alpha["unet"] == 4.0
    assert 0.9 < report.energy_retained < 1.0 and report.min_energy_retained <= report.energy_retained
    # the reported energy is the share of squared singular values kept, computed here independently
    kept = total = 0.0
    for path in adapter.modules("unet"):
        s = torch.linalg.svdvals(adapter.state["unet"][f"{path}.lora_B.weight"].flatten(1).double()
                                 @ adapter.state["unet"][f"{path}.lora_A.weight"].flatten(1).double())
        kept, total = kept + float(s[:4].pow(2).sum()), total + float(s.pow(2).sum())
    assert report.energy_retained == pytest.approx(kept / total, rel=1e-6)

    base = unet_output(model)
    outputs = {}
    for name in ("r8", "r4"):
        model.pipeline.load_lora_weights(str(tmp_path), weight_name=f"{name}.safetensors", adapter_name=name)
    for name in ("r8", "r4"):
        model.pipeline.set_adapters([name], [1.0])
        outputs[name] = unet_output(model)
    effect = (outputs["r8"] - base).abs().mean()
    error = (outputs["r4"] - outputs["r8"]).abs().mean()
    assert error < 0.2 * effect


# --- the CLI ------------------------------------------------------------------------------------------


def test_cli_export_merge_resize(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stylelora.cli import main

    done = run_cli("export", str(run), "--format", "kohya", "--out", str(tmp_path / "a.safetensors"))
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout and (tmp_path / "a.safetensors").is_file()
    # the other commands in-process (same parser and handlers, without a second interpreter start)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert main(["resize", a, "--rank", "2", "--out", b]) == 0
    assert "energy retained" in capsys.readouterr().out
    assert load_file(b)["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 2
    assert main(["merge", "--model", "builtin:tiny", "--lora", a, "--scale", "0.5", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    for scale in ("1e30", "nan", "inf"):  # a strength no one means is refused before the model loads, no file
        out = tmp_path / f"m{scale}"
        assert main(["merge", "--model", "builtin:tiny", "--lora", a, "--scale", scale, "--out", str(out)]) == 1
        assert "scale: must be a number from -1 to 2" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(tmp_path / "none.safetensors"), "--format", "kohya", "--out", str(tmp_path / "c")]) == 1
    assert "no such run folder or adapter file" in capsys.readouterr().err
    assert main(["resize", a, "--rank", "9", "--out", str(tmp_path / "d.safetensors")]) == 1
    assert "already rank 4" in capsys.readouterr().err


def test_training_export_writes_locon_alphas_and_skips_kohya_for_dora(tmp_path: Path) -> None:
    from stylelora.training.artifacts import export_adapter

    _, model = make_adapter(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, with_model=True)
    config = tiny_config(tmp_path / "data", tmp_path / "run")
    kohya, diffusers = export_adapter(model, config, tmp_path / "run", 5, 0)
    tensors = load_file(kohya)
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 3.0
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 2, 1, 1)
    assert float(tensors["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]) == 2.0
    with safe_open(str(kohya), "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3"}
    peft_meta = json.loads(safe_open(str(diffusers), "pt").metadata()["lora_adapter_metadata"])
    assert peft_meta["unet.alpha_pattern"]["down_blocks.0.resnets.0.conv1"] == 3.0
    assert peft_meta["unet.rank_pattern"]["down_blocks.0.resnets.0.conv1"] == 2

    _, dora_model = make_adapter(dora=True, with_model=True)
    paths = export_adapter(dora_model, config, tmp_path / "dora", 5, 0)
    assert [p.name for p in paths] == ["pytorch_lora_weights.safetensors"]


def test_both_files_of_a_run_state_what_the_weights_say_and_how_they_were_trained(tmp_path: Path) -> None:
    from stylelora.training.artifacts import export_adapter

    # weights that disagree with the config on purpose: rank, alpha and LoCon are read from the weights
    _, model = make_adapter(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, te=False, with_model=True)
    config = tiny_config(tmp_path / "data", tmp_path / "run",
                         **{"lora.rank": 8, "lora.alpha": 8.0, "lora.train_text_encoder": True})
    files = export_adapter(model, config, tmp_path / "run", 5, 3)
    assert [p.name for p in files] == ["run.safetensors", "pytorch_lora_weights.safetensors"]
    for path in files:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2"), path
        assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3"}, path
        assert meta["ss_network_train_unet_only"] == "True", path
        assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert (meta["ss_steps"], meta["ss_num_train_images"], meta["ss_output_name"]) == ("5", "3", "run"), path
        assert Config.from_toml(meta["stylelora.config"]).lora.rank == 8  # the run's config, as given


# --- LoCon as wide as kohya's conv_dim ----------------------------------------------------------------


def kohya_conv_dim_modules(unet: torch.nn.Module) -> set[str]:
    """What sd-scripts' networks/lora.py adapts in a UNet once conv_dim is set, beyond the attention
    blocks: every Linear and Conv2d inside a ResnetBlock2D, Downsample2D or Upsample2D (its rule,
    restated here independently of stylelora's target list)."""
    found = set()
    for name, module in unet.named_modules():
        if type(module).__name__ in ("ResnetBlock2D", "Downsample2D", "Upsample2D"):
            for child, sub in module.named_modules():
                if type(sub).__name__ in ("Linear", "Conv2d") and "lora_" not in child and child:
                    found.add(f"{name}.{child}".removesuffix(".base_layer"))
    return found


@pytest.mark.interop
@pytest.mark.parametrize("kind, expected", [
    ("tiny", {  # SD1 names are the diffusers paths; SD1.5 has the same three at these places
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": ((4, 32, 1, 1), (64, 4, 1, 1), 2.0),
        "lora_unet_down_blocks_0_downsamplers_0_conv": ((2, 32, 3, 3), (32, 2, 1, 1), 3.0),
        "lora_unet_up_blocks_0_upsamplers_0_conv": ((2, 64, 3, 3), (64, 2, 1, 1), 3.0),
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj": ((4, 128), (32, 4), 2.0),
    }),
    ("tiny-sdxl", {  # SGM names (SDXL base 1.0 has input_blocks_7_0_skip_connection, _3_0_op, output_blocks_2_2_conv)
        "lora_unet_input_blocks_7_0_skip_connection": ((4, 32, 1, 1), (64, 4, 1, 1), 2.0),
        "lora_unet_input_blocks_3_0_op": ((2, 32, 3, 3), (32, 2, 1, 1), 3.0),
        "lora_unet_input_blocks_6_0_op": ((2, 32, 3, 3), (32, 2, 1, 1), 3.0),
        "lora_unet_output_blocks_2_2_conv": ((2, 64, 3, 3), (64, 2, 1, 1), 3.0),
        "lora_unet_output_blocks_5_2_conv": ((2, 32, 3, 3), (32, 2, 1, 1), 3.0),
        "lora_unet_input_blocks_1_0_emb_layers_1": ((4, 128), (32, 4), 2.0),
    }),
])
def test_locon_covers_what_kohya_conv_dim_covers_with_kohya_names(kind: str, expected: dict) -> None:
    from stylelora.model.lora import add_lora

    model = load_base_model(f"builtin:{kind}")
    config = Config().with_overrides({"lora.rank": 4, "lora.alpha": 2.0, "lora.conv_rank": 2, "lora.conv_alpha": 3.0})
    add_lora(model, config.lora)
    adapter = Adapter.from_module_alphas(lora_state(model), lora_alphas(model))
    tensors = to_kohya(adapter, ModelLayout.of(model))
    for name, (down, up, alpha) in expected.items():
        assert tuple(tensors[f"{name}.lora_down.weight"].shape) == down, name
        assert tuple(tensors[f"{name}.lora_up.weight"].shape) == up, name
        assert float(tensors[f"{name}.alpha"]) == alpha, name
    # and nothing more or less than kohya's rule outside the attention blocks
    adapted = set(adapter.modules("unet"))
    assert {p for p in adapted if "attentions" not in p} == kohya_conv_dim_modules(model.unet)


# --- the diffusers file: conventional names, alphas every version reads, every layout read -------------


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["tiny", "tiny-sdxl"])
def test_diffusers_file_names_text_encoder_modules_under_text_model_whatever_transformers_calls_them(
        tmp_path: Path, kind: str) -> None:
    import transformers

    adapter, model = make_adapter(kind, with_model=True)
    module_names = [n for n, _ in model.text_encoder.named_modules() if n.endswith("q_proj")]
    if int(transformers.__version__.split(".")[0]) >= 5:  # transformers 5 calls them encoder.layers...
        assert module_names and not any(n.startswith("text_model.") for n in module_names)
    path = save_diffusers(tmp_path / "d", adapter, load_base_model(f"builtin:{kind}"))
    keys = load_file(path).keys()
    te_keys = [k for k in keys if k.startswith("text_encoder")]
    encoders = ["text_encoder", "text_encoder_2"] if kind == "tiny-sdxl" else ["text_encoder"]
    assert {k.split(".", 1)[0] for k in te_keys} == set(encoders)
    assert all(k.split(".", 1)[1].startswith("text_model.encoder.layers.") for k in te_keys)
    assert f"{encoders[-1]}.text_model.encoder.layers.1.self_attn.q_proj.lora_A.weight" in keys
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["stylelora.alpha"].startswith("lora_adapter_metadata")


def strip_header(path: Path) -> Path:
    """The file as a loader that reads no lora_adapter_metadata (diffusers before 0.34) sees it."""
    tensors = load_file(path)
    bare = path.with_name("bare.safetensors")
    save_file(tensors, str(bare), metadata={"format": "pt"})
    return bare


def module_delta(adapter: Adapter, part: str, path: str) -> torch.Tensor:
    sd = adapter.state[part]
    up, down = sd[f"{path}.lora_B.weight"].flatten(1), sd[f"{path}.lora_A.weight"].flatten(1)
    return (up @ down) * adapter.alpha_of(part, path) / adapter.rank_of(part, path)


@pytest.mark.interop
def test_baked_alpha_gives_the_right_strength_to_a_loader_that_reads_no_alpha(tmp_path: Path) -> None:
    adapter = make_adapter(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0)  # scales 0.5 and 1.5
    model = load_base_model("builtin:tiny")
    baked = save_diffusers(tmp_path / "baked", adapter, model, precision="fp32", bake_alpha=True)
    plain = save_diffusers(tmp_path / "plain", adapter, model, precision="fp32")
    with safe_open(str(baked), "pt") as f:
        assert f.metadata()["stylelora.alpha"].startswith("baked")
    # read back, the baked file is the same adapter: every module's delta equal
    again = load_adapter(baked, model)
    for part in adapter.state:
        for path in adapter.modules(part):
            torch.testing.assert_close(module_delta(again, part, path), module_delta(adapter, part, path),
                                       atol=1e-7, rtol=1e-6)
    # without the header (an old loader), the baked file still applies exactly; the plain one would not
    before = {part: weights(module) for part, module in model.parts()}
    bare = strip_header(baked)
    with captured_logs() as records:
        model.pipeline.load_lora_weights(str(bare.parent), weight_name=bare.name)
    assert_loaded_cleanly(records)
    model.pipeline.fuse_lora(lora_scale=1.0)
    model.pipeline.unload_lora_weights()
    assert_fused_delta(adapter, model, before)
    wrong = load_adapter(strip_header(plain), model)
    assert wrong.alpha_of("unet", "down_blocks.0.resnets.0.conv1") == 2.0  # alpha = rank: 1.5x scale lost


def diffusers_sdxl_script_file(adapter: Adapter) -> dict[str, torch.Tensor]:
    """An adapter keyed as diffusers' SDXL LoRA scripts (train_dreambooth_lora_sdxl.py,
    train_text_to_image_lora_sdxl.py) save it: convert_state_dict_to_diffusers gives the UNet
    ``.lora.down/.lora.up`` and the text encoders' q/k/v/out_proj ``.lora_linear_layer.down/up``, under
    ``unet.``, ``text_encoder.`` and ``text_encoder_2.`` with transformers 4's ``text_model.`` paths."""
    out = {}
    for part, sd in adapter.state.items():
        for key, value in sd.items():
            module, _, suffix = key.rpartition(".lora_")
            side = {"A.weight": "down", "B.weight": "up"}[suffix]
            if part == "unet":
                out[f"unet.{module}.lora.{side}.weight"] = value
            else:
                path = module if module.startswith("text_model.") else f"text_model.{module}"
                out[f"{part}.{path}.lora_linear_layer.{side}.weight"] = value
    return out


@pytest.mark.interop
def test_sdxl_file_from_diffusers_scripts_exports_to_kohya_with_exact_deltas(tmp_path: Path) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    from stylelora.families import load_base_model as load

    model = load("builtin:tiny-sdxl")  # the scripts' targets: attention projections of UNet and both CLIPs
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                            model.unet)
    for _, module in model.parts()[1:]:
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj",
                                                                              "out_proj"]), module)
    gen = torch.Generator().manual_seed(5)
    for _, module in model.parts():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.2
    adapter = Adapter.from_module_alphas(lora_state(model), {})  # alpha = rank, as the scripts train
    source = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(diffusers_sdxl_script_file(adapter), str(source), metadata={"format": "pt"})
    base = load("builtin:tiny-sdxl")
    with captured_logs() as records:  # diffusers itself loads the file
        base.pipeline.load_lora_weights(str(tmp_path), weight_name=source.name, adapter_name="scripts")
    assert_loaded_cleanly(records)
    base.pipeline.unload_lora_weights()

    report = export(source, "kohya", tmp_path / "k.safetensors", precision="fp32",
                            base_model="builtin:tiny-sdxl")
    kohya = load_file(report.path)
    counts = {p: sum(k.startswith(p) and k.endswith(".alpha") for k in kohya) for p in ("lora_unet_", "lora_te1_",
                                                                                      "lora_te2_")}
    modules = adapter.num_modules()  # every module came along: 8 projections per transformer block, 4 per CLIP layer
    assert counts == {"lora_unet_": modules["unet"], "lora_te1_": 8, "lora_te2_": 8} and modules["unet"] % 8 == 0
    # each kohya module applies exactly the source's delta: alpha/rank * up @ down
    layout = ModelLayout.of(base)
    for part in adapter.state:
        for path in adapter.modules(part):
            name = layout.kohya.name(part, path)
            up, down = kohya[f"{name}.lora_up.weight"].flatten(1), kohya[f"{name}.lora_down.weight"].flatten(1)
            got = up @ down * float(kohya[f"{name}.alpha"]) / down.shape[0]
            sd = adapter.state[part]
            assert torch.equal(got, sd[f"{path}.lora_B.weight"] @ sd[f"{path}.lora_A.weight"]), name
    # and the kohya file fuses into the SDXL pipeline by exactly those deltas
    before = {part: weights(module) for part, module in base.parts()}
    with captured_logs() as records:
        base.pipeline.load_lora_weights(str(tmp_path), weight_name="k.safetensors")
    assert_loaded_cleanly(records)
    base.pipeline.fuse_lora(lora_scale=1.0)
    base.pipeline.unload_lora_weights()
    assert_fused_delta(adapter, base, before)


@pytest.mark.parametrize("layout_name", ["peft", "peft-no-prefix", "lora.down", "lora_linear_layer",
                                         "attention-processor", "transformers-5-names"])
@pytest.mark.interop
def test_every_layout_diffusers_writes_reads_as_the_same_adapter(tmp_path: Path, layout_name: str) -> None:
    adapter = make_adapter(rank=4, alpha=4.0)  # alpha = rank: files without alphas mean exactly this
    model = load_base_model("builtin:tiny")
    tensors = {}
    for part, sd in adapter.state.items():
        for key, value in sd.items():
            module, _, suffix = key.rpartition(".lora_")
            side = {"A.weight": "down", "B.weight": "up"}[suffix]
            te = part != "unet"
            long = module if module.startswith("text_model.") or not te else f"text_model.{module}"
            if layout_name == "peft":
                tensors[f"{part}.{long}.lora_{suffix}"] = value
            elif layout_name == "peft-no-prefix" and not te:
                tensors[f"{module}.lora_{suffix}"] = value  # a UNet-only file saved without the part prefix
            elif layout_name == "lora.down":
                tensors[f"{part}.{long}.lora.{side}.weight"] = value
            elif layout_name == "lora_linear_layer":
                tensors[f"{part}.{long}.{'lora_linear_layer' if te else 'lora'}.{side}.weight"] = value
            elif layout_name == "attention-processor" and not te and ".attn" in module and "ff." not in module:
                owner, proj = module.rsplit(".", 1) if not module.endswith("to_out.0") else (module[:-9], "to_out")
                tensors[f"{owner}.processor.{proj}_lora.{side}.weight"] = value
            elif layout_name == "transformers-5-names":
                tensors[f"{part}.{long.removeprefix('text_model.')}.lora_{suffix}"] = value
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    read = load_adapter(path, model)
    expected = {part: {k: v for k, v in sd.items()
                       if f"{part}.{k}" in {f"{p}.{m}" for p, s in read.state.items() for m in s}}
                for part, sd in adapter.state.items()}
    assert sum(len(sd) for sd in read.state.values()) == len(tensors)
    for part, sd in read.state.items():
        assert sd.keys() == expected[part].keys()
        assert all(torch.equal(sd[k], expected[part][k]) for k in sd)
        assert all(read.alpha_of(part, p) == 4.0 for p in read.modules(part))


# --- lean conversion ------------------------------------------------------------------------------------


@pytest.mark.interop
def test_converting_against_a_model_folder_reads_its_configs_only(tmp_path: Path) -> None:
    from stylelora.families import load_skeleton

    model = load_base_model("builtin:tiny-sdxl")
    folder = tmp_path / "sdxl-configs"
    model.pipeline.save_pretrained(folder)
    for weights_file in folder.rglob("*.safetensors"):  # no weights at all, and no VAE
        weights_file.unlink()
    for leftover in (folder / "vae").iterdir():
        leftover.unlink()
    (folder / "vae").rmdir()
    skeleton = load_skeleton(str(folder))
    assert skeleton.kind == "sdxl" and {p for p, _ in skeleton.parts()} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(p.device.type == "meta" for _, m in skeleton.parts() for p in m.parameters())
    assert ModelLayout.of(skeleton).shapes == ModelLayout.of(model).shapes
    single = tmp_path / "sdxl-single-file.safetensors"  # a single-file checkpoint takes model.config's configs
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, str(single))
    assert ModelLayout.of(load_skeleton(str(single), str(folder))).shapes == ModelLayout.of(model).shapes

    adapter = make_adapter("tiny-sdxl", conv_rank=2)
    source = save_kohya(tmp_path / "style.safetensors", adapter, model)
    report = export(source, "diffusers", tmp_path / "d", base_model=str(folder))
    reference = export(source, "diffusers", tmp_path / "ref", base_model="builtin:tiny-sdxl")
    ours, theirs = load_file(report.path), load_file(reference.path)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = export(report.path, "kohya", tmp_path / "back.safetensors", base_model=str(folder))
    original, again = load_file(source), load_file(back.path)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


# --- true fp32 from a run ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [False, True], ids=["weights", "ema"])
def test_fp32_export_of_a_run_is_its_checkpoints_fp32_state_exactly(tmp_path: Path, ema: bool) -> None:
    from conftest import make_dataset
    from stylelora.adapters.checkpoint_files import load_checkpoint, newest_complete
    from stylelora.model.text import conventional_text_path
    from stylelora.training.loop import train

    out = tmp_path / "style"
    train(tiny_config(make_dataset(tmp_path / "data", n=2), out, **{
        "train.steps": 2, "lora.train_text_encoder": True, "lora.alpha": 2.0, "lora.conv_rank": 2,
        "lora.conv_alpha": 3.0, "train.ema": ema, "train.ema_decay": 0.5}))
    state = load_checkpoint(newest_complete(out))
    weights = state.ema if ema else state.lora
    if ema:  # the average is not the live weights, so the test tells which one was exported
        assert any(not torch.equal(weights["unet"][k], state.lora["unet"][k]) for k in weights["unet"])
    layout = ModelLayout.of(load_base_model("builtin:tiny"))

    kohya = load_file(export(out, "kohya", tmp_path / "k.safetensors", precision="fp32").path)
    diffusers = load_file(export(out, "diffusers", tmp_path / "d", precision="fp32").path)
    fp16 = load_file(out / "style.safetensors")
    for part, sd in weights.items():
        for key, value in sd.items():
            module, _, suffix = key.rpartition(".lora_")
            name = layout.kohya.name(part, module)
            side = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[suffix]
            assert kohya[f"{name}.{side}"].dtype == torch.float32
            assert torch.equal(kohya[f"{name}.{side}"], value), name
            path = conventional_text_path(module) if part != "unet" else module
            assert torch.equal(diffusers[f"{part}.{path}.lora_{suffix}"], value), key
            assert float(kohya[f"{name}.alpha"]) == state.alphas[part][module]
    # the run's fp16 file widened is not that (what export --precision fp32 used to write)
    assert any(not torch.equal(fp16[k].float(), kohya[k]) for k in kohya if k.endswith("weight"))


def test_an_adapter_is_saved_when_its_dataset_was_deleted_during_the_run(tmp_path: Path, caplog) -> None:
    """A queued run's dataset deleted while it trained, then Stop: the final save failed with "training failed:
    FileNotFoundError: ... apple.png" (the dataset hash re-read every image) and no final adapter was written."""
    from types import SimpleNamespace

    from stylelora.adapters.metadata import dataset_hash

    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for image in images:
        image.write_bytes(b"png")
    items = [SimpleNamespace(image=image, caption="flat style") for image in images]
    whole = dataset_hash(items)
    images[1].unlink()
    assert dataset_hash(items) not in ("", whole)  # still a hash, of another dataset: one image is missing
    assert f"{images[1]}: cannot read it any more" in caplog.text
