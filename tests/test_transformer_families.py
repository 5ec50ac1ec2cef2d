"""FLUX.1 and SD3.5 train, resume, preview, export and merge as the SD families do: on the tiny built-ins
(builtin:tiny-flux, builtin:tiny-flux-schnell, builtin:tiny-sd35), told apart by structure, with flow matching,
a frozen T5 whose states are cached, kohya files in the original layout (q, k and v fused), diffusers files that
diffusers' own loaders take, and full-size key maps checked on FLUX.1 [dev] and SD3.5 Large on the meta device."""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_diffusers_fuses_exactly, assert_fused_delta, make_dataset, tiny_config, weights
from stylelora.adapters.adapter import Adapter, ModelLayout
from stylelora.adapters.formats import load_adapter, to_kohya
from stylelora.cli import main
from stylelora.core import events
from stylelora.core.config import Config
from stylelora.core.errors import ConfigError, ModelError
from stylelora.families import ModelFacts, family_of, load_base_model, peek_model
from stylelora.model.lora import add_lora, lora_alphas, lora_state
from stylelora.preview.previewer import Previewer
from stylelora.training.loop import train

sys.path.insert(0, str(ROOT / "benchmarks"))
BUILT_INS = {"tiny-flux": "flux-dev", "tiny-sd35": "sd35-medium"}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("dit") / "data", n=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[str, Path]:
    """One short run per built-in with LoRA on the transformer and the CLIP encoders, written in fp32."""
    out = {}
    for name in BUILT_INS:
        folder = tmp_path_factory.mktemp(name) / "style"
        train(tiny_config(data, folder, **{"model.name": f"builtin:{name}", "train.steps": 2,
                                           "lora.train_text_encoder": True, "export.precision": "fp32"}))
        out[name] = folder
    return out


def random_adapter(name: str, seed: int = 0, **lora: object) -> Adapter:
    """A LoRA injected by the trainer's own add_lora (the family's targets), with random non-zero weights."""
    model = load_base_model(f"builtin:{name}")
    config = Config().with_overrides({"lora.rank": 4, "lora.alpha": 2.0, **{f"lora.{k}": v for k, v in lora.items()}})
    add_lora(model, config.lora)
    generator = torch.Generator().manual_seed(seed)
    for _, module in model.parts():
        for param_name, p in module.named_parameters():
            if "lora_A" in param_name or "lora_B" in param_name:
                p.data = torch.randn(p.shape, generator=generator) * 0.2
    return Adapter.from_module_alphas(lora_state(model), lora_alphas(model))


# --- what the model is --------------------------------------------------------------------------------------


def test_built_ins_folders_and_single_files_are_told_apart_by_structure(tmp_path: Path) -> None:
    flux = load_base_model("builtin:tiny-flux")
    assert (flux.kind, flux.family.name, flux.native_resolution, flux.prediction_type) == ("flux-dev", "flux", 64,
                                                                                           "flow")
    assert [part for part, _ in flux.parts()] == ["transformer", "text_encoder"]  # T5 is frozen: no adapter part
    assert type(flux.text_encoders[-1]).__name__ == "T5EncoderModel"
    assert load_base_model("builtin:tiny-flux-schnell").kind == "flux-schnell"
    sd35 = load_base_model("builtin:tiny-sd35")
    assert sd35.kind == "sd35-medium" and [p for p, _ in sd35.parts()] == ["transformer", "text_encoder",
                                                                           "text_encoder_2"]
    flux.pipeline.save_pretrained(tmp_path / "flux")
    assert load_base_model(str(tmp_path / "flux")).kind == "flux-dev"
    assert peek_model(str(tmp_path / "flux")) == ModelFacts("flux-dev", 64)
    for keys, kind in [(["double_blocks.0.img_attn.qkv.weight", "guidance_in.in_layer.weight"], "flux-dev"),
                       (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "flux-schnell"),
                       (["model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight",
                         "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight"], "sd35-medium"),
                       (["joint_blocks.0.x_block.attn.ln_q.weight"], "sd35-large"),
                       (["joint_blocks.0.x_block.attn.qkv.weight"], "sd3-medium")]:
        save_file({key: torch.zeros(1) for key in keys}, str(tmp_path / "single.safetensors"))
        assert peek_model(str(tmp_path / "single.safetensors")) == ModelFacts(kind, 1024)
    with pytest.raises(ConfigError, match="model.kind: 'flux-schnell' does not fit this model, which is FLUX.1 "
                                          r"\[dev\] by its structure \(a guidance input\)"):
        load_base_model("builtin:tiny-flux", kind="flux-schnell")
    with pytest.raises(ConfigError, match="which is FLUX.1 \\[dev\\] by its structure"):
        load_base_model("builtin:tiny-flux", kind="sd35-large")


def test_settings_a_flow_transformer_cannot_use_are_refused_by_name() -> None:
    for setting, word in [({"lora.type": "loha"}, "lora.type: loha is not trained on FLUX.1 models"),
                          ({"train.min_snr_gamma": 5.0}, "train.min_snr_gamma: is for the SD UNets"),
                          ({"model.prediction_type": "epsilon"}, "model.prediction_type: is for the SD UNets"),
                          ({"data.resolution": 72}, "data.resolution: 72 is not a multiple of 16"),
                          ({"lora.blocks": ["up.0"]}, "lora.blocks: 'up.0' is not a block of a FLUX.1 transformer; "
                                                      "use double.N or single.N")]:
        with pytest.raises(ConfigError, match=word.replace(".", r"\.").replace("(", r"\(")):
            Config().with_overrides({"model.kind": "flux-dev", **setting})
    assert Config().with_overrides({"model.kind": "flux-dev", "lora.blocks": ["double.1", "single_blocks.0"]})
    assert Config().with_overrides({"lora.blocks": ["joint.3"]})  # auto: any family's block names
    flux, sd1 = family_of("flux-dev"), family_of("sd1")
    assert not flux.applies("model.clip_skip") and flux.applies("train.flow_shift") and flux.applies("lora.rank")
    assert sd1.applies("model.clip_skip") and not sd1.applies("train.flow_shift")


def test_import_kohya_leaves_out_what_flux_reads_its_own_way(tmp_path: Path) -> None:
    from stylelora.services.kohya_import import import_kohya

    config = tmp_path / "flux.json"
    config.write_text(json.dumps({"pretrained_model_name_or_path": "builtin:tiny-flux", "clip_skip": 2,
                                  "max_token_length": 225, "max_train_steps": 10, "train_data_dir": "./img"}))
    report = import_kohya(config)
    assert (report.config.model.clip_skip, report.config.data.max_token_length) == (1, 75)
    reasons = {key: reason for key, _, reason in report.unsupported}
    assert "up to 512 T5 tokens" in reasons["clip_skip"] and "does not apply to FLUX.1" in reasons["clip_skip"]
    assert "75-token chunks do not apply to FLUX.1" in reasons["max_token_length"]


def test_flux_step_packs_latents_feeds_guidance_and_positions() -> None:
    from stylelora.families.flux import image_ids, pack, unpack

    model = load_base_model("builtin:tiny-flux")
    latents = torch.randn(2, 16, 8, 6)
    assert pack(latents).shape == (2, 12, 64) and torch.equal(unpack(pack(latents), 8, 6), latents)
    from diffusers import FluxPipeline

    assert torch.equal(image_ids(8, 6, "cpu", torch.float32),  # each token's (0, row, column), as the pipeline's
                       FluxPipeline._prepare_latent_image_ids(1, 4, 3, "cpu", torch.float32))
    ids = model.family.tokenize(model, ["a cat", "a dog"], 75)
    assert [tuple(t.shape) for t in ids] == [(2, 1, 77), (2, 512)]  # CLIP's first window; T5 to [dev]'s 512
    text = model.family.encode_text(model.text_encoders, ids)
    assert tuple(text.states.shape) == (2, 512, 32) and tuple(text.pooled.shape) == (2, 32)
    seen = {}
    model.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    out = model.family.predict(model.denoiser, latents, torch.tensor([0.3, 0.7]), text, None)
    assert out.shape == latents.shape and seen["guidance"].tolist() == [1.0, 1.0]
    assert seen["hidden_states"].shape == (2, 12, 64) and seen["timestep"].tolist() == pytest.approx([0.3, 0.7])
    schnell = load_base_model("builtin:tiny-flux-schnell")
    assert schnell.family.tokenize(schnell, ["a cat"], 75)[1].shape == (1, 256)  # [schnell] reads 256 T5 tokens


def test_flow_objectives_shift_as_each_model_samples() -> None:
    flux, sd35 = load_base_model("builtin:tiny-flux"), load_base_model("builtin:tiny-sd35")
    train_settings = Config().train
    u = 1 / (1 + torch.exp(-torch.randn(64, generator=torch.Generator().manual_seed(0))))  # unshifted logit-normal
    shifted = {}
    for name, model in (("flux", flux), ("sd35", sd35)):
        objective = model.family.objective(model, train_settings)
        for side in (8, 128):  # 16 and 4096 tokens: FLUX.1 [dev]'s scheduler shifts from e^0.46 to e^1.15
            shifted[(name, side)] = objective.shift(u, (16, side, side))
            generators = [torch.Generator().manual_seed(i) for i in range(4)]
            sigmas = objective.draw(generators, (16, side, side))[1]
            assert sigmas.shape == (4,) and bool(((sigmas > 0) & (sigmas < 1)).all())
        latents, noise = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
        assert torch.equal(objective.target(latents, noise, torch.tensor([0.5])), noise - latents)
    assert shifted[("flux", 128)].mean() > shifted[("flux", 8)].mean() + 0.1  # more tokens, more noise (FLUX's shift)
    torch.testing.assert_close(shifted[("flux", 128)], math.e ** 1.15 * u / (1 + (math.e ** 1.15 - 1) * u))
    assert torch.equal(shifted[("sd35", 128)], shifted[("sd35", 8)])  # SD3's shift (3.0) is the same at every size
    torch.testing.assert_close(shifted[("sd35", 8)], 3 * u / (1 + 2 * u))


# --- training ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILT_INS)
def test_training_without_the_text_encoder_writes_both_formats(name: str, tmp_path: Path, data: Path) -> None:
    result = train(tiny_config(data, tmp_path / "run", **{"model.name": f"builtin:{name}", "train.steps": 2}))
    kohya, diffusers = result.adapter_paths
    keys = set(load_file(kohya))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert {k.split(".")[0] for k in load_file(diffusers)} == {"transformer"}
    facts = metadata(kohya)
    expected = {"tiny-flux": ("flux-1-dev/lora", "flux1"), "tiny-sd35": ("stable-diffusion-3-5-medium/lora",
                                                                         "5-medium")}[name]
    assert (facts["modelspec.architecture"], facts["ss_base_model_version"]) == expected


@pytest.mark.parametrize("name", BUILT_INS)
def test_runs_with_the_clip_encoders_write_fused_kohya_modules_that_read_back(name: str,
                                                                             runs: dict[str, Path]) -> None:
    run = runs[name]
    tensors = load_file(run / "style.safetensors")
    fused = {"tiny-flux": ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
                           "lora_unet_single_blocks_1_linear1"],
             "tiny-sd35": ["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
                           "lora_unet_joint_blocks_1_context_block_attn_qkv"]}[name]
    for module in fused:  # rank 3 (q, k, v: 4 each, [dev]'s linear1 also the MLP) and alpha to match
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        members = down.shape[0] // 4
        assert members in (3, 4) and float(tensors[f"{module}.alpha"]) == 4.0 * members
        assert torch.count_nonzero(up[:32, 4:]) == 0 and torch.count_nonzero(up[32:64, :4]) == 0  # block-diagonal
    te = {"tiny-flux": ("lora_te1_",), "tiny-sd35": ("lora_te1_", "lora_te2_")}[name]
    assert {k.split("_text_model")[0] + "_" for k in tensors if k.startswith("lora_te")} == set(te)
    diffusers = load_file(run / "diffusers" / "pytorch_lora_weights.safetensors")
    parts = {"tiny-flux": {"transformer", "text_encoder"},
             "tiny-sd35": {"transformer", "text_encoder", "text_encoder_2"}}[name]
    assert {k.split(".")[0] for k in diffusers} == parts  # T5 (text_encoder_2 of FLUX, _3 of SD3.5) stays frozen
    model = load_base_model(f"builtin:{name}")
    from_kohya, from_diffusers = load_adapter(run / "style.safetensors", model), load_adapter(run / "diffusers", model)
    assert from_kohya.state.keys() == from_diffusers.state.keys()
    for part in from_diffusers.state:
        assert from_kohya.modules(part) == from_diffusers.modules(part)
        for path in from_diffusers.modules(part):
            shape = tuple(dict(model.parts())[part].get_submodule(path).weight.shape)
            torch.testing.assert_close(from_kohya.delta(part, path, shape), from_diffusers.delta(part, path, shape),
                                       rtol=1e-6, atol=1e-7)


def test_frozen_t5_runs_once_per_caption_while_clip_trains(tmp_path: Path, data: Path) -> None:
    calls = {}
    for cache in (True, False):
        model = load_base_model("builtin:tiny-flux")
        count = [0]
        model.text_encoders[-1].register_forward_hook(lambda *_, n=count: n.__setitem__(0, n[0] + 1))
        train(tiny_config(data, tmp_path / f"run-{cache}", **{"model.name": "builtin:tiny-flux", "train.steps": 4,
                                                              "lora.train_text_encoder": True,
                                                              "cache.text_encoder": cache}), model=model)
        calls[cache] = count[0]
    assert calls[True] == 2  # the two captions, once each; CLIP (with its LoRA) still runs every step
    assert calls[False] == 4


@pytest.mark.parametrize("name", BUILT_INS)
def test_sigkill_then_resume_auto_ends_with_the_uninterrupted_adapter(name: str, tmp_path: Path, data: Path) -> None:
    from test_resume import start_cli, wait_for

    from conftest import run_cli

    args = ["train", "--model", f"builtin:{name}", "--data", str(data), "--steps", "4", "--resolution", "64",
            "--rank", "4", "--lr", "1e-3", "--save-every", "2", "--set", "lora.train_text_encoder=true",
            "--set", "data.random_flip=true", "--set", "train.noise_offset=0.05", "--set", "lora.dropout=0.1",
            "--set", "export.precision=fp32", "--set", "export.name=style"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = start_cli(*args, "--output", str(killed))
    wait_for(lambda: (killed / "checkpoints" / "step-000002" / "state.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (killed / "style.safetensors").exists()
    from stylelora.cli import build_parser, config_from_args

    train(config_from_args(build_parser().parse_args([*args, "--output", str(whole)])))
    resumed = run_cli(*args, "--output", str(killed), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = load_file(whole / "style.safetensors"), load_file(killed / "style.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (whole, killed)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4) and len(losses[1]) == 4


def test_nf4_base_trains_on_a_cpu_and_the_adapter_stays_full_precision(tmp_path: Path, data: Path) -> None:
    model = load_base_model("builtin:tiny-flux")
    result = train(tiny_config(data, tmp_path / "run", **{"model.name": "builtin:tiny-flux", "train.steps": 3,
                                                          "model.quantize": "nf4", "export.precision": "fp32"}),
                   model=model)
    layer = model.denoiser.get_submodule("transformer_blocks.0.attn.to_q")
    assert type(layer.base_layer).__name__ == "QLinear"  # the frozen weight held in 4 bits...
    assert type(model.text_encoders[-1].get_submodule("encoder.block.0.layer.0.SelfAttention.q")).__name__ == "QLinear"
    assert all(torch.isfinite(torch.tensor(result.losses)))
    saved = load_file(result.adapter_paths[0])  # ...the LoRA beside it trained and saved in fp32
    assert saved and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())


# --- preview ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILT_INS)
def test_strength_zero_renders_exactly_the_base_model(name: str, runs: dict[str, Path]) -> None:
    preview = Previewer(f"builtin:{name}")
    adapter = preview.attach(runs[name])
    base, zero = preview.compare("a cat", adapter=adapter, scale=0, steps=2)
    styled = preview.generate("a cat", adapter=adapter, scale=1, steps=2)
    assert list(base.getdata()) == list(zero.getdata()) and list(styled.getdata()) != list(base.getdata())
    assert preview.generate("a cat", adapter=adapter, scale=0, steps=2, blocks={"IN": 1.0}).size == base.size


def test_each_family_renders_with_its_own_steps_and_guidance_unless_set() -> None:
    for name, expected in [("tiny-flux", (28, 3.5)), ("tiny-flux-schnell", (4, 0.0)), ("tiny-sd35", (40, 4.5)),
                           ("tiny", (20, 7.5))]:
        resolved = Previewer(f"builtin:{name}").resolve()
        assert (resolved.steps, resolved.guidance) == expected, name
    schnell = Previewer("builtin:tiny-flux-schnell")
    assert (schnell.resolve(steps=2, guidance=1.0).steps, schnell.resolve(guidance=1.0).guidance) == (2, 1.0)
    assert "Steps: 4," in schnell.base("a cat").info["parameters"]
    with pytest.raises(ConfigError, match="sampler: FLUX.1 \\[schnell\\] renders with its own flow-matching sampler"):
        schnell.resolve(sampler="euler")


# --- export, merge, split, resize ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILT_INS)
def test_diffusers_loads_the_diffusers_file_cleanly_and_fuses_exactly(name: str, runs: dict[str, Path]) -> None:
    model = load_base_model(f"builtin:{name}")
    path = runs[name] / "diffusers" / "pytorch_lora_weights.safetensors"
    assert_diffusers_fuses_exactly(path, load_adapter(path, model), model)


@pytest.mark.interop  # .ci/old-stack runs it on diffusers 0.35 too
@pytest.mark.parametrize("name", BUILT_INS)
def test_diffusers_loads_a_written_diffusers_file_cleanly_and_fuses_exactly(name: str, tmp_path: Path) -> None:
    """The same without a training run (so it runs quickly on any diffusers): LoRA on the transformer and every
    CLIP encoder, written by save_diffusers."""
    from stylelora.adapters.formats import save_diffusers

    model = load_base_model(f"builtin:{name}")
    adapter = random_adapter(name, train_text_encoder=True)
    path = save_diffusers(tmp_path / "diffusers", adapter, model, "fp32")
    assert_diffusers_fuses_exactly(path, adapter, model)


def test_flux_kohya_file_loads_in_diffusers_as_the_diffusers_file(tmp_path: Path) -> None:
    """diffusers converts sd-scripts' FLUX names (splitting the fused q/k/v) and gets the same transformer and
    CLIP outputs as from the diffusers file. (Its converter cuts single blocks' linear1 at FLUX.1's own widths,
    so the tiny model's adapter stays in the double blocks here; full width is checked on the meta device.)
    Not interop: diffusers 0.35's converter loads such a file's transformer part only, without its lora_te1_."""
    from stylelora.adapters.formats import save_diffusers, save_kohya

    model = load_base_model("builtin:tiny-flux")
    adapter = random_adapter("tiny-flux", train_text_encoder=True, blocks=["double"])
    save_kohya(tmp_path / "style.safetensors", adapter, model, "fp32")
    save_diffusers(tmp_path / "diffusers", adapter, model, "fp32")
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 512, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
                  txt_ids=torch.zeros(512, 3), img_ids=torch.zeros(16, 3), return_dict=False)
    ids = torch.randint(0, 100, (1, 77))
    outputs = []
    for file in ("style.safetensors", "diffusers/pytorch_lora_weights.safetensors"):
        loaded = load_base_model("builtin:tiny-flux")
        path = tmp_path / file  # the file named: diffusers 0.35 wants weight_name when offline
        loaded.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="style")
        assert set(loaded.pipeline.get_list_adapters()) == {"transformer", "text_encoder"}
        with torch.no_grad():
            outputs.append((loaded.denoiser(**inputs)[0], loaded.text_encoder(ids).pooler_output))
    base = load_base_model("builtin:tiny-flux")
    with torch.no_grad():
        assert not torch.allclose(base.denoiser(**inputs)[0], outputs[0][0])
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kohya_names_map_onto_flux_dev_and_sd35_large_at_full_size() -> None:
    """Every kohya module an adapter on FLUX.1 [dev]'s (SD3.5 Large's) own layer names and shapes gets is a module of
    the original layout with the right shape; diffusers' converters take our original layout back to the same
    weights; and diffusers' kohya converter splits our fused FLUX modules into exactly our LoRAs."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )
    from published_models import flux_transformer, sd35_transformer

    from stylelora.families.bfl import bfl_module, bfl_parameter
    from stylelora.families.mmdit import mmdit_module, mmdit_parameter
    from stylelora.families.original_layout import original_state

    for kind, build, place, renamed, convert, blocks in [
            ("flux-dev", flux_transformer, lambda p, c: bfl_module(p), bfl_parameter,
             convert_flux_transformer_checkpoint_to_diffusers, 19 * 10 + 38 * 3),
            ("sd35-large", sd35_transformer, mmdit_module, mmdit_parameter,
             convert_sd3_transformer_checkpoint_to_diffusers, 38 * 10 - 4)]:  # the last block's text stream: qkv
        with torch.device("meta"):  # every parameter and buffer: names and shapes only
            transformer = build()
        config, state = dict(transformer.config), transformer.state_dict()
        original = original_state(state, lambda p, place=place, config=config: place(p, config), renamed)
        back = convert(dict(original))  # diffusers' own converter (it runs on meta tensors too)
        assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state.items()}, kind
        family = family_of(kind)
        model = SimpleNamespace(denoiser=transformer, parts=lambda t=transformer: [("transformer", t)])
        paths = family.lora_targets(model, Config().lora)[0].names
        generator = torch.Generator().manual_seed(0)
        lora = {}
        for path in paths:
            out, inp = transformer.get_submodule(path).weight.shape
            lora[f"{path}.lora_A.weight"] = torch.randn(1, inp, generator=generator)
            lora[f"{path}.lora_B.weight"] = torch.randn(out, 1, generator=generator)
        adapter = Adapter({"transformer": lora}, {"transformer": 1.0})
        shapes = {p: tuple(m.weight.shape) for p, m in transformer.named_modules() if hasattr(m, "weight")
                  and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        tensors = to_kohya(adapter, ModelLayout(kind, {"transformer": shapes}, config), "fp32")
        modules = {k.split(".")[0] for k in tensors}
        assert len(modules) == blocks, kind  # every block's layers, q/k/v fused
        named = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_"): key for key in original}
        for module in modules:  # a weight of the original layout, of the shape up @ down makes
            weight = original[named[module]]
            up, down = tensors[f"{module}.lora_up.weight"], tensors[f"{module}.lora_down.weight"]
            assert (up.shape[0], down.shape[1]) == tuple(weight.shape), module
        if kind == "flux-dev":
            converted = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
            assert {k.rsplit(".", 2)[0] for k in converted} == {f"transformer.{p}" for p in paths}
            for path in paths:  # alpha/rank is 1 here, so the converted factors are ours exactly
                for side in ("A", "B"):
                    key = f"{path}.lora_{side}.weight"
                    assert torch.equal(converted[f"transformer.{key}"], lora[key]), key


def test_fused_kohya_modules_keep_every_members_change_exact() -> None:
    """q, k and v as one module: stacked downs, block-diagonal ups, summed alphas; split back exactly; a member of
    another scale folded into its block; a member without LoRA as zero rows; sd-scripts' dense fused LoRA shared
    out by its down. Each member's change (alpha/rank · up @ down) is the same before and after."""
    from stylelora.adapters.fused import fuse, split

    g = torch.Generator().manual_seed(0)

    def lora(rank: int, alpha: float, out: int = 8) -> tuple:
        return torch.randn(rank, 6, generator=g), torch.randn(out, rank, generator=g), alpha

    def change(m: tuple) -> torch.Tensor:
        return m[1] @ m[0] * (m[2] / m[0].shape[0])

    members = [lora(4, 2.0), lora(4, 2.0), lora(4, 2.0)]
    down, up, alpha = fuse(members, [8, 8, 8])
    assert (down.shape, up.shape, alpha) == ((12, 6), (24, 12), 6.0)  # rank 3r, alpha 3·alpha: the scale alone
    assert torch.count_nonzero(up[:8, 4:]) == 0 and torch.count_nonzero(up[8:16, :4]) == 0
    for m, back in zip(members, split(down, up, alpha, [8, 8, 8]), strict=True):
        assert torch.equal(back[0], m[0]) and torch.equal(back[1], m[1]) and back[2] == m[2]
    odd = [lora(4, 2.0), None, lora(2, 4.0, out=16)]  # k without LoRA; v of another rank and scale
    down, up, alpha = fuse(odd, [8, 8, 16])
    fused = up @ down * (alpha / down.shape[0])
    torch.testing.assert_close(fused[:8], change(odd[0]))
    assert torch.count_nonzero(fused[8:16]) == 0
    torch.testing.assert_close(fused[16:], change(odd[2]))
    back = split(down, up, alpha, [8, 8, 16])
    assert back[1] is None and [b[0].shape[0] for b in (back[0], back[2])] == [4, 2]
    for m, b in ((odd[0], back[0]), (odd[2], back[2])):
        torch.testing.assert_close(change(b), change(m))
    dense_down, dense_up = torch.randn(6, 6, generator=g), torch.randn(24, 6, generator=g)  # sd-scripts' own
    shared = split(dense_down, dense_up, 3.0, [8, 8, 8])
    for i, m in enumerate(shared):
        assert torch.equal(m[0], dense_down) and m[2] == 3.0
        torch.testing.assert_close(change(m), (dense_up @ dense_down * 0.5)[8 * i : 8 * (i + 1)])


@pytest.mark.parametrize("name", BUILT_INS)
def test_export_writes_both_formats_from_the_runs_fp32_weights(name: str, runs: dict[str, Path],
                                                               tmp_path: Path) -> None:
    model = load_base_model(f"builtin:{name}")
    for fmt, out in (("kohya", tmp_path / "style.safetensors"), ("diffusers", tmp_path / "diffusers")):
        assert main(["export", str(runs[name]), "--format", fmt, "--precision", "fp32", "--out", str(out)]) == 0
    exported = [load_adapter(tmp_path / "style.safetensors", model), load_adapter(tmp_path / "diffusers", model)]
    trained = load_adapter(runs[name] / "diffusers", model)
    for adapter in exported:
        for part in trained.state:
            for path in trained.modules(part):
                shape = tuple(dict(model.parts())[part].get_submodule(path).weight.shape)
                torch.testing.assert_close(adapter.delta(part, path, shape), trained.delta(part, path, shape))


@pytest.mark.parametrize("name", BUILT_INS)
def test_merge_into_a_diffusers_folder_and_into_one_checkpoint_file(name: str, runs: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    base = load_base_model(f"builtin:{name}")
    before = {part: weights(module) for part, module in base.parts()}
    adapter = load_adapter(runs[name] / "style.safetensors", base)
    assert main(["merge", "--model", f"builtin:{name}", "--lora", str(runs[name]), "--out",
                 str(tmp_path / "merged")]) == 0
    folder = load_base_model(str(tmp_path / "merged"))
    assert folder.kind == BUILT_INS[name]
    assert_fused_delta(adapter, folder, before)  # every adapted weight moved by exactly its delta
    assert main(["merge", "--model", f"builtin:{name}", "--lora", str(runs[name]), "--out",
                 str(tmp_path / "merged.safetensors"), "--precision", "fp32"]) == 0
    keys = load_file(tmp_path / "merged.safetensors").keys()
    layout = {"tiny-flux": "double_blocks.0.img_attn.qkv.weight",  # BFL's transformer file, as ComfyUI loads it
              "tiny-sd35": "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"}[name]
    assert layout in keys
    single = load_base_model(str(tmp_path / "merged.safetensors"), str(tmp_path / "merged"))
    for part, module in folder.parts():
        expected, got = weights(module), weights(dict(single.parts())[part])
        assert all(torch.equal(got[k], expected[k]) for k in expected), part


def test_single_files_need_their_folder_and_read_in_either_naming(tmp_path: Path) -> None:
    base = load_base_model("builtin:tiny-flux")
    base.pipeline.save_pretrained(tmp_path / "flux")
    base.family.save_single_file(base.pipeline, tmp_path / "bfl.safetensors", "fp32")
    save_file({k: v.contiguous() for k, v in base.denoiser.state_dict().items()}, str(tmp_path / "named.safetensors"))
    for file in ("bfl.safetensors", "named.safetensors"):
        loaded = load_base_model(str(tmp_path / file), str(tmp_path / "flux"))
        expected, got = base.denoiser.state_dict(), loaded.denoiser.state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected), file
    with pytest.raises(ModelError, match="set `model.config=/path/to/folder`"):
        load_base_model(str(tmp_path / "bfl.safetensors"))
    # a bf16 run reads the transformer file and the folder's parts straight into bf16 (issue 24)
    loaded = load_base_model(str(tmp_path / "bfl.safetensors"), str(tmp_path / "flux"), dtype=torch.bfloat16)
    got = loaded.denoiser.state_dict()
    assert {p.dtype for p in loaded.pipeline.text_encoder.parameters()} == {torch.bfloat16}
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16))
               for k, v in base.denoiser.state_dict().items())


def test_split_and_resize_a_flux_adapter(runs: dict[str, Path], tmp_path: Path) -> None:
    from stylelora.adapters.merge import resize, split

    model = load_base_model("builtin:tiny-flux")
    report = split(runs["tiny-flux"] / "style.safetensors", "single, te", tmp_path / "single.safetensors")
    kept = load_adapter(report.path, model)
    assert kept.modules("transformer") and all(m.startswith("single_transformer_blocks.")
                                               for m in kept.modules("transformer"))
    assert kept.modules("text_encoder")
    with pytest.raises(ConfigError, match="--keep: 'double.7' names no module of the adapter's transformer; "
                                          "its blocks are: double.0, double.1, single.0, single.1"):
        split(runs["tiny-flux"] / "style.safetensors", "double.7", tmp_path / "none.safetensors")
    resized = resize(runs["tiny-flux"] / "style.safetensors", 2, tmp_path / "rank2.safetensors")
    assert load_adapter(resized.path, model).rank == 2 and resized.energy_retained < 1


# --- memory ----------------------------------------------------------------------------------------------------------


def test_quantize_auto_is_nf4_for_transformers_on_a_gpu_and_the_estimate_names_the_cards(tmp_path: Path,
                                                                                      data: Path) -> None:
    from stylelora.model.placement import quantize_scheme
    from stylelora.training.estimate import card_fit

    flux, sd1 = load_base_model("builtin:tiny-flux"), load_base_model("builtin:tiny")
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert [quantize_scheme("auto", m, d) for m in (flux, sd1) for d in (gpu, cpu)] == ["nf4", "none", "none", "none"]
    assert quantize_scheme("int8", sd1, cpu) == "int8"
    config = tiny_config(data, tmp_path / "run", **{"model.name": "builtin:tiny-flux"})
    held = [card_fit(flux, config.with_overrides({"model.quantize": s})).weight_bytes for s in ("none", "fp8", "nf4")]
    assert held[0] > held[1] > held[2]
    seen: list[object] = []
    train(config.with_overrides({"train.steps": 1}), seen.append)
    said = next(e for e in seen if isinstance(e, events.Estimated)).summary
    assert "on a GPU (bf16, model.quantize=nf4): ~" in said and "fits 12, 16 and 24 GB cards" in said


def test_presets_for_flux_and_sd35_load_and_fit_their_kinds() -> None:
    for kind, name in (("flux-dev", "flux-style"), ("flux-schnell", "flux-style"), ("sd35-large", "sd35-style")):
        assert family_of(kind).presets[kind] == name
        preset = Config.load(ROOT / "presets" / f"{name}.toml")
        assert (preset.data.resolution, preset.train.gradient_checkpointing, preset.model.quantize) == (1024, True,
                                                                                                      "auto")
        assert Config().with_overrides({**{"model.kind": kind}, **{"data.resolution": preset.data.resolution}})
