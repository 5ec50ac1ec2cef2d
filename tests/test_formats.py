"""Adapter files load everywhere: kohya and diffusers, checked with diffusers' own loaders."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_cli, tiny_config
from stylelora.config import TEXT_ENCODER_TARGETS, UNET_TARGETS, Config
from stylelora.convert import export
from stylelora.errors import FormatError
from stylelora.formats import Adapter, ModelLayout, load_adapter, save_diffusers, save_kohya, to_kohya
from stylelora.merge import merge, resize
from stylelora.models import load_base_model, lora_alphas, lora_state

# --- helpers -------------------------------------------------------------------------------------


def make_adapter(kind: str = "tiny", rank: int = 4, alpha: float = 2.0, conv_rank: int = 0, conv_alpha: float = 1.0,
                 te: bool = True, dora: bool = False, seed: int = 0, with_model: bool = False):
    """A LoRA (optionally LoCon on the resnets' 3x3 convs, optionally DoRA) with random non-zero weights,
    injected by peft exactly as training does, read back through lora_state/lora_alphas."""
    from peft import LoraConfig, inject_adapter_in_model

    model = load_base_model(f"builtin:{kind}")
    unet_targets = list(UNET_TARGETS) + (["conv1", "conv2"] if conv_rank else [])
    pattern = {"conv1": conv_rank, "conv2": conv_rank} if conv_rank else {}
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=unet_targets, rank_pattern=pattern,
                     alpha_pattern={k: conv_alpha for k in pattern}, use_dora=dora)
    inject_adapter_in_model(cfg, model.unet, adapter_name="default")
    if te:
        for part, module in model.parts():
            if part.startswith("text_encoder"):
                te_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_ENCODER_TARGETS, use_dora=dora)
                inject_adapter_in_model(te_cfg, module, adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    for _, module in model.parts():
        for name, p in module.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.2
    adapter = Adapter.from_module_alphas(lora_state(model), lora_alphas(model))
    return (adapter, model) if with_model else adapter


@contextmanager
def captured_logs():
    """Every log record and Python warning the libraries emit while loading."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records
    records += [str(w.message) for w in caught]
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def assert_loaded_cleanly(records: list[str]) -> None:
    bad = [r for r in records if any(s in r.lower() for s in ("unexpected", "missing", "no lora keys", "not loaded"))]
    assert bad == []


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_fused_delta(adapter: Adapter, model, before: dict, scale: float = 1.0) -> None:
    """After fuse_lora + unload, each adapted weight moved by exactly scale*alpha/rank*up@down, the rest not at all."""
    for part, module in model.parts():
        after = weights(module)
        changed = set()
        for path in adapter.modules(part):
            down = adapter.state[part][f"{path}.lora_A.weight"]
            up = adapter.state[part][f"{path}.lora_B.weight"]
            expected = (up.flatten(1) @ down.flatten(1)).reshape(before[part][f"{path}.weight"].shape)
            expected = expected * scale * adapter.alpha_of(part, path) / down.shape[0]
            delta = after[f"{path}.weight"] - before[part][f"{path}.weight"]
            torch.testing.assert_close(delta, expected, atol=2e-6, rtol=1e-4, msg=f"{part} {path}")
            changed.add(f"{path}.weight")
        assert changed, part
        for name, value in after.items():
            if name not in changed:
                assert torch.equal(value, before[part][name]), f"{part} {name} changed"


def unet_output(model, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return model.pipeline(
        "a red square, flat style", num_inference_steps=2, height=64, width=64, generator=gen, output_type="pt"
    ).images


# --- key names -----------------------------------------------------------------------------------


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
    before = {part: weights(module) for part, module in model.parts()}
    with captured_logs() as records:
        model.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="style")
    assert_loaded_cleanly(records)
    assert set(model.pipeline.get_list_adapters()) == {part for part, _ in model.parts()}
    model.pipeline.fuse_lora(lora_scale=1.0)
    model.pipeline.unload_lora_weights()
    assert_fused_delta(adapter, model, before)


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
    from stylelora.train import train

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
    assert adapter.modules("text_encoder") == ["encoder.layers.1.mlp.fc1"]
    from stylelora.models import adaptable_modules

    assert load_adapter(path, adaptable_modules(model)).state.keys() == adapter.state.keys()  # names-only form
    assert adapter.alpha_of("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == 4.0
    assert adapter.alpha_of("unet", "up_blocks.1.attentions.1.proj_out") == 2.0
    assert adapter.alpha_of("text_encoder", "encoder.layers.1.mlp.fc1") == 4.0
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

    from stylelora import formats as fm

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


def test_dora_goes_to_diffusers_and_is_refused_for_kohya_with_a_reason(tmp_path: Path) -> None:
    adapter, trained = make_adapter(dora=True, with_model=True)
    model = load_base_model("builtin:tiny")
    with pytest.raises(FormatError, match="DoRA.*in the diffusers format"):
        save_kohya(tmp_path / "d.safetensors", adapter, model)
    path = save_diffusers(tmp_path / "d", adapter, model)
    with captured_logs() as records:
        model.pipeline.load_lora_weights(str(path.parent))
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
    assert main(["export", str(tmp_path / "none.safetensors"), "--format", "kohya", "--out", str(tmp_path / "c")]) == 1
    assert "no such run folder or adapter file" in capsys.readouterr().err
    assert main(["resize", a, "--rank", "9", "--out", str(tmp_path / "d.safetensors")]) == 1
    assert "already rank 4" in capsys.readouterr().err


def test_training_export_writes_locon_alphas_and_skips_kohya_for_dora(tmp_path: Path) -> None:
    from stylelora.train import export_adapter

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
    from stylelora.artifacts import export_adapter

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
