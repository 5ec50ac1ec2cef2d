"""SDXL and SD2-768-v train as SD1 does: both text encoders, SDXL's size/crop conditioning, kind detection
by structure, metadata per kind, adapters that diffusers loads, exact resume, foreign model folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import (
    assert_diffusers_fuses_exactly,
    assert_loaded_cleanly,
    captured_logs,
    draw_image,
    make_dataset,
    run_cli,
    tiny_config,
)
from stylelora.adapters.formats import load_adapter
from stylelora.core import events
from stylelora.core.config import Config
from stylelora.core.errors import ConfigError
from stylelora.data.batches import BatchSource, TrainingSet
from stylelora.data.dataset import CaptionedImages, scan
from stylelora.families import detect_kind, load_base_model
from stylelora.model.placement import prepare_for_training
from stylelora.model.text import tokenize
from stylelora.preview.previewer import Previewer
from stylelora.training.loop import train
from stylelora.training.validation import Validator

KINDS = ["tiny-sdxl", "tiny-sd2v"]


def kohya_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("xl") / "data", n=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[str, Path]:
    """One short run per kind with LoRA on the UNet and every text encoder."""
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind) / "style"
        train(tiny_config(data, folder, **{"model.name": f"builtin:{kind}", "train.steps": 2,
                                           "lora.train_text_encoder": True, "export.precision": "fp32"}))
        out[kind] = folder
    return out


# --- what the model is --------------------------------------------------------------------------------


def test_forms_learn_the_kind_from_configs_or_file_keys_without_loading(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from stylelora.families import ModelFacts, peek_model

    folder = _foreign_sd2v(tmp_path / "sd2v")
    assert peek_model(str(folder)) == ModelFacts("sd2-v", 192)  # 96 latents wide, a VAE that halves twice
    assert peek_model("builtin:tiny-sdxl") == ModelFacts("sdxl", 64)
    for key, kind in [("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
                      ("cond_stage_model.model.ln_final.weight", "sd2-v"),
                      ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1")]:
        save_file({key: torch.zeros(1)}, str(tmp_path / "single.safetensors"))
        assert peek_model(str(tmp_path / "single.safetensors")).kind == kind
    assert peek_model("someone/not-in-the-cache") is None


def test_kind_is_told_apart_by_structure_and_can_be_set() -> None:
    kinds = [load_base_model(f"builtin:{k}").kind for k in ("tiny", "tiny-sd2v", "tiny-sdxl")]
    assert kinds == ["sd1", "sd2-v", "sdxl"]
    sd2 = {"use_linear_projection": True, "cross_attention_dim": 1024, "sample_size": 64}
    assert detect_kind("StableDiffusionPipeline", sd2, None, {"prediction_type": "epsilon"}) == "sd2"
    assert detect_kind("StableDiffusionPipeline", sd2, None, {"prediction_type": "v_prediction"}) == "sd2-v"
    assert detect_kind("StableDiffusionPipeline", {**sd2, "sample_size": 96}) == "sd2-v"  # no scheduler config
    sd1 = {"use_linear_projection": False, "cross_attention_dim": 768, "sample_size": 64}
    assert detect_kind("StableDiffusionPipeline", sd1, {"hidden_act": "quick_gelu"}) == "sd1"
    assert detect_kind("StableDiffusionPipeline", sd1, {"hidden_act": "gelu"}) == "sd2"  # an OpenCLIP text encoder
    assert detect_kind("StableDiffusionPipeline", {"addition_embed_type": "text_time"}) == "sdxl"

    assert load_base_model("builtin:tiny-sd2v", prediction_type="epsilon").kind == "sd2"
    plain = load_base_model("builtin:tiny", kind="sd2-v")  # a mistaken detection is corrected by model.kind
    assert (plain.kind, plain.prediction_type) == ("sd2-v", "v_prediction")
    with pytest.raises(ConfigError, match="model.kind: 'sd1' does not fit 'builtin:tiny-sdxl', which is SDXL"):
        load_base_model("builtin:tiny-sdxl", kind="sd1")
    with pytest.raises(ConfigError, match="model.kind: 'sd2-v' is SD2 768-v .* model.prediction_type is epsilon"):
        Config().with_overrides({"model.kind": "sd2-v", "model.prediction_type": "epsilon"})


# --- SDXL's conditioning --------------------------------------------------------------------------------


def test_sdxl_text_is_both_encoders_penultimate_states_and_the_pooled_second() -> None:
    model = load_base_model("builtin:tiny-sdxl")
    captions = ["a lighthouse, flat style", "a cat"]
    ids = tokenize(model.tokenizers, captions)
    with torch.no_grad():
        text = model.family.encode_text(model.text_encoders, ids)
        one = model.text_encoder(ids[0][:, 0], output_hidden_states=True)
        two = model.text_encoder_2(ids[1][:, 0], output_hidden_states=True)
        # diffusers' own SDXL prompt encoding (clip_skip None: the penultimate layers, the pooled second)
        embeds, _, pooled, _ = model.pipeline.encode_prompt(captions, do_classifier_free_guidance=False)
    assert text.states.shape == (2, 77, 64) and text.pooled is not None and text.pooled.shape == (2, 32)
    assert torch.equal(text.states, torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1))
    assert torch.equal(text.pooled, two.text_embeds)
    torch.testing.assert_close(text.states, embeds)
    torch.testing.assert_close(text.pooled, pooled)
    assert ids[1][0, 0, -1] == model.tokenizers[1].pad_token_id == 0  # the second tokenizer pads with "!"


def test_sdxl_long_captions_join_their_chunks_as_kohyas_sdxl_trainer() -> None:
    model = load_base_model("builtin:tiny-sdxl")
    caption = "a" * 199 + "z"  # 200 tokens for the built-in tokenizers (one per character)
    ids = tokenize(model.tokenizers, [caption], max_token_length=225)
    assert [t.shape for t in ids] == [(1, 3, 77), (1, 3, 77)]
    with torch.no_grad():
        text = model.family.encode_text(model.text_encoders, ids)
        other = model.family.encode_text(model.text_encoders, tokenize(model.tokenizers, ["a" * 199 + "y"], 225))
        first = model.text_encoder_2(ids[1][:, 0])
        one = model.text_encoder(ids[0][0], output_hidden_states=True).hidden_states[-2]  # the 3 chunks
    assert text.states.shape == (1, 227, 64)  # start, 3 x 75 text states, end; both encoders side by side
    torch.testing.assert_close(text.states[0, 1:76, :32], one[0, 1:76])
    torch.testing.assert_close(text.states[0, 151:226, :32], one[2, 1:76])
    torch.testing.assert_close(text.pooled, first.text_embeds)  # the pooled text of the first chunk, as kohya
    assert (text.states - other.states).abs().max() > 1e-3  # the 200th token counts


def test_time_ids_are_each_images_real_size_applied_crop_and_bucket(tmp_path: Path) -> None:
    sizes = [(120, 72), (56, 150), (200, 200)]  # (w, h): landscape, portrait (smaller than the target), square
    for i, size in enumerate(sizes):
        draw_image(tmp_path / "data" / f"img{i}.png", size, seed=i)
    model = load_base_model("builtin:tiny-sdxl")
    config = tiny_config(tmp_path / "data", tmp_path / "out", **{
        "model.name": "builtin:tiny-sdxl", "data.center_crop": False, "data.random_flip": True,
        "data.bucket_step": 16, "train.batch_size": 1})
    source = BatchSource(TrainingSet.from_config(config), config, model)
    seen_flips, offsets = set(), set()
    for _ in range(18):
        epoch, index = source.state()["epoch"], source.state()["batch"]
        if index >= len(source.data.epoch_batches(epoch)):
            epoch, index = epoch + 1, 0
        batch = source.next_batch()
        slot = source.data.epoch_batches(epoch)[index][0]
        orig_h, orig_w, top, left, target_h, target_w = (int(v) for v in batch.time_ids[0])
        with Image.open(batch.images[0]) as im:
            original = im.convert("RGB")
        assert (orig_w, orig_h) == original.size  # the image's real size, not the bucket's
        assert (target_h, target_w) == tuple(s * 8 for s in batch.latents.shape[-2:])  # the bucket trained at
        # the pixels the VAE encoded are the original resized to cover the bucket, cut at (top, left) of the
        # image as trained: the mirrored image when flipped
        scale = max(target_w / orig_w, target_h / orig_h)
        resized = original.resize((max(target_w, round(orig_w * scale)), max(target_h, round(orig_h * scale))),
                                   Image.Resampling.LANCZOS)
        pixels = source.data.pixels(epoch, slot)
        matches = []
        for flip, image in ((False, resized), (True, resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
            crop = np.asarray(image.crop((left, top, left + target_w, top + target_h)), dtype=np.float32) / 127.5 - 1
            if np.array_equal(crop, pixels.permute(1, 2, 0).numpy()):
                matches.append(flip)
        assert len(matches) == 1, (batch.images[0].name, batch.time_ids)
        seen_flips.add(matches[0])
        offsets.add((top, left))
    assert seen_flips == {False, True} and len(offsets) > 3  # flips and random crops both happened


def test_validation_holds_the_time_ids_of_its_centre_crops(tmp_path: Path) -> None:
    draw_image(tmp_path / "data" / "wide.png", (128, 64))
    config = tiny_config(tmp_path / "data", tmp_path / "o", **{"model.name": "builtin:tiny-sdxl"})
    example = CaptionedImages(scan(config.data.path), config.data).example(0, 0, 0)
    assert example["view"].time_ids == (64, 128, 0, 32, 64, 64)  # resized to 128x64, centre crop 32 px in


# --- training ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_training_runs_with_finite_loss_that_falls_on_fixed_noise(kind: str, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=2)
    config = tiny_config(data, tmp_path / "run", **{
        "model.name": f"builtin:{kind}", "train.steps": 30, "train.lr": 1e-2, "lora.train_text_encoder": True,
        "lora.conv_rank": 4, "data.repeats": 4, "train.seed": 3})  # LoCon: capacity enough for random tiny models
    model = load_base_model(f"builtin:{kind}")
    seen: list[object] = []
    result = train(config, seen.append, model=model)
    assert all(np.isfinite(result.losses)) and len(result.losses) == 30
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    notes = [e.text for e in seen if isinstance(e, events.Message)]
    assert any(f"base model: {'SDXL' if kind == 'tiny-sdxl' else 'SD2 768-v'}" in n for n in notes)

    # the trained images scored at fixed noise and timesteps: lower with the LoRA than without (as at step 0)
    items = TrainingSet.from_config(config).items
    examples = [CaptionedImages(items, config.data).example(i, 0, 0) for i in range(len(items))]
    from stylelora.model.losses import DiffusionObjective, training_scheduler

    scheduler = training_scheduler(model.pipeline.scheduler.config, model.prediction_type)
    validator = Validator(examples, model, DiffusionObjective(scheduler), torch.device("cpu"), torch.float32, seed=0)
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for _, module in model.parts() for m in module.modules() if isinstance(m, BaseTunerLayer)]
    trained = validator.loss()
    for layer in layers:
        layer.enable_adapters(False)
    untrained = validator.loss()
    assert trained < untrained * 0.85, (trained, untrained)


@pytest.mark.parametrize("kind", KINDS)
def test_kohya_files_carry_the_expected_module_names_and_kind(kind: str, runs: dict[str, Path]) -> None:
    path = runs[kind] / "style.safetensors"
    tensors = load_file(path)
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in tensors}
    meta = kohya_metadata(path)
    if kind == "tiny-sdxl":
        expected = [
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
            "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k",  # down_blocks.2.attentions.1, 2nd layer
            "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2",
            "lora_unet_output_blocks_1_1_proj_in",  # up_blocks.0.attentions.1: B-LoRA's style block
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_1_mlp_fc1",
        ]
        assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_")) for n in names)
        facts = {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_v_parameterization": "False",
                 "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "modelspec.prediction_type": "epsilon"}
    else:
        expected = [
            "lora_unet_down_blocks_0_attentions_0_proj_in",
            "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
            "lora_te_text_model_encoder_layers_1_self_attn_v_proj",
        ]
        assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 2  # a Linear in SD2
        facts = {"ss_base_model_version": "sd_v2_v", "ss_v2": "True", "ss_v_parameterization": "True",
                 "modelspec.architecture": "stable-diffusion-v2-768-v/lora", "modelspec.prediction_type": "v"}
    assert set(expected) <= names
    assert {k: meta[k] for k in facts} == facts
    assert meta["ss_network_train_unet_only"] == "False"


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_loads_the_run_files_cleanly_and_fuses_exactly(kind: str, fmt: str, runs: dict[str, Path]) -> None:
    path = runs[kind] / ("style.safetensors" if fmt == "kohya" else "diffusers/pytorch_lora_weights.safetensors")
    model = load_base_model(f"builtin:{kind}")
    adapter = load_adapter(path, model)
    assert set(adapter.state) == {part for part, _ in model.parts()}
    assert_diffusers_fuses_exactly(path, adapter, model)


@pytest.mark.parametrize("kind", KINDS)
def test_strength_zero_renders_the_plain_base_models_image(kind: str, runs: dict[str, Path]) -> None:
    plain = load_base_model(f"builtin:{kind}").pipeline
    plain.set_progress_bar_config(disable=True)
    for part in (plain.unet, plain.vae, plain.text_encoder, getattr(plain, "text_encoder_2", None)):
        if part is not None:  # frozen as in the Previewer: CPU kernels round differently for weights with grad
            part.requires_grad_(False)
    expected = plain("a red house", num_inference_steps=3, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(5)).images[0]
    preview = Previewer(f"builtin:{kind}")
    preview.attach(runs[kind], "style")
    at_zero = preview.generate("a red house", adapter="style", scale=0.0, seed=5, steps=3)
    at_one = preview.generate("a red house", adapter="style", scale=1.0, seed=5, steps=3)
    assert np.array_equal(np.asarray(at_zero), np.asarray(expected))
    assert not np.array_equal(np.asarray(at_one), np.asarray(expected))


def test_sdxl_resume_gives_the_uninterrupted_adapter(tmp_path: Path, data: Path) -> None:
    settings = {"model.name": "builtin:tiny-sdxl", "train.steps": 6, "train.save_every": 2,
                "lora.train_text_encoder": True, "data.random_flip": True, "train.noise_offset": 0.1,
                "train.min_snr_gamma": 5.0, "train.ema": True,
                "lora.dropout": 0.1, "train.text_encoder_2_lr": 5e-5, "export.precision": "fp32", "export.name": "s",
                "train.validation_images": 1, "train.validate_every": 3, "sample.prompts": ["a cat"],
                "sample.every": 3, "sample.steps": 2}
    whole = train(tiny_config(data, tmp_path / "whole", **settings))
    steps: list[int] = []
    stopped = train(tiny_config(data, tmp_path / "cut", **settings),
                    lambda e: steps.append(e.step) if isinstance(e, events.Progress) else None,
                    stop=lambda: len(steps) >= 3)
    assert stopped.stopped_early and stopped.steps == 3
    resumed = train(tiny_config(data, tmp_path / "cut", **settings, **{"train.resume": "auto"}))
    assert resumed.steps == 6 and resumed.losses == pytest.approx(whole.losses[3:], rel=1e-5)
    expected, got = load_file(tmp_path / "whole" / "s.safetensors"), load_file(tmp_path / "cut" / "s.safetensors")
    assert expected.keys() == got.keys() and any(k.startswith("lora_te2_") for k in got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # validation and samples ran with SDXL's conditioning, and agree between the two runs
    metrics = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("whole", "cut")]
    validation = [[m["val_loss"] for m in run if "val_loss" in m] for run in metrics]
    assert len(validation[0]) == 2 and validation[1] == pytest.approx(validation[0], rel=1e-5)
    for step in (3, 6):
        assert (tmp_path / "cut" / "samples" / f"step-{step:06d}-00.png").is_file()


def test_each_text_encoder_trains_at_its_own_rate_or_not_at_all(tmp_path: Path, data: Path) -> None:
    from stylelora.training.optim import param_groups

    model = load_base_model("builtin:tiny-sdxl")
    config = tiny_config(data, tmp_path / "o", **{"model.name": "builtin:tiny-sdxl", "lora.train_text_encoder": True,
                                                   "train.text_encoder_lr": 2e-5, "train.text_encoder_2_lr": 1e-5})
    prepare_for_training(model, config, torch.device("cpu"), "no")
    groups = param_groups(model, config.train)
    assert [g["lr"] for g in groups] == [1e-4, 2e-5, 1e-5]
    assert [len(g["params"]) for g in groups[1:]] == [2 * 6 * 2, 2 * 6 * 2]  # 2 layers x 6 modules x (A, B)

    only = load_base_model("builtin:tiny-sdxl")
    prepare_for_training(only, config.with_overrides({"lora.text_encoders": "te2"}), torch.device("cpu"), "no")
    assert not any(p.requires_grad for p in only.text_encoder.parameters())
    assert [g["lr"] for g in param_groups(only, config.train)] == [1e-4, 1e-5]


def test_fp16_runs_keep_sdxls_vae_in_fp32(tmp_path: Path, data: Path) -> None:
    model = load_base_model("builtin:tiny-sdxl")
    config = tiny_config(data, tmp_path / "o", **{"model.name": "builtin:tiny-sdxl"})
    _, dtype = prepare_for_training(model, config, torch.device("cpu"), "fp16")
    assert dtype == torch.float16 and model.unet.dtype == torch.float16 and model.vae.dtype == torch.float32
    source = BatchSource(TrainingSet.from_config(config), config, model)
    assert any("VAE encodes in fp32" in n and "SDXL's VAE overflows in fp16" in n for n in source.notes)
    assert source.next_batch().latents.dtype == torch.float32  # encoded by the fp32 VAE
    # samples: the fp16 UNet's latents are decoded by the fp32 VAE (the pipeline alone would mix dtypes)
    from stylelora.training.artifacts import render_samples

    [path] = render_samples(model, config.with_overrides({"sample.prompts": ["a cat"], "sample.steps": 2}),
                            tmp_path / "o", step=1)
    sample = np.asarray(Image.open(path), dtype=np.float32)
    assert sample.shape == (64, 64, 3) and sample.std() > 1
    sd1 = load_base_model("builtin:tiny")
    prepare_for_training(sd1, config.with_overrides({"model.name": "builtin:tiny"}), torch.device("cpu"), "fp16")
    assert sd1.vae.dtype == torch.float16


# --- models stylelora did not write ------------------------------------------------------------------------


def _foreign_sdxl(folder: Path) -> Path:
    """An SDXL pipeline made with diffusers from config, in other widths and layer counts than builtin:tiny-sdxl
    (one layer per block, 24- and 40-wide text encoders), saved as a diffusers folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stylelora.model.builtin import clip_tokenizer as _builtin_tokenizer

    tokenizer = _builtin_tokenizer()
    te = {"vocab_size": len(tokenizer), "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
          "eos_token_id": tokenizer.eos_token_id, "num_attention_heads": 4, "hidden_act": "gelu"}
    torch.manual_seed(1)
    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(
            sample_size=16, block_out_channels=(16, 32, 48), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 2, 4), use_linear_projection=True,
            cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 16, norm_num_groups=8),
        vae=AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                          sample_size=32),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, **te)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=40, intermediate_size=80,
                                                                  num_hidden_layers=3, projection_dim=16, **te)),
        tokenizer=tokenizer, tokenizer_2=_builtin_tokenizer(pad_token="!"),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    )
    pipe.save_pretrained(folder)
    return folder


def _foreign_sd2v(folder: Path) -> Path:
    """An SD2-768-v pipeline from config whose cross-attention is 40 wide (not 1024), saved as a folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stylelora.model.builtin import clip_tokenizer as _builtin_tokenizer

    tokenizer = _builtin_tokenizer(pad_token="!")
    torch.manual_seed(2)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(
            sample_size=96, block_out_channels=(16, 32), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=40, attention_head_dim=(2, 4),
            use_linear_projection=True, norm_num_groups=8),
        vae=AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                          sample_size=32),
        text_encoder=CLIPTextModel(CLIPTextConfig(
            hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu",
            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["sdxl", "sd2-v"])
def test_headless_run_on_a_model_folder_stylelora_did_not_write(kind: str, tmp_path: Path, data: Path) -> None:
    folder = (_foreign_sdxl if kind == "sdxl" else _foreign_sd2v)(tmp_path / "model")
    out = tmp_path / "run"
    r = run_cli("train", "--model", str(folder), "--data", str(data), "--output", str(out), "--steps", "2",
                "--resolution", "64", "--rank", "4", "--train-text-encoder")
    assert r.returncode == 0, r.stderr
    assert f"base model: {'SDXL' if kind == 'sdxl' else 'SD2 768-v'}" in r.stderr
    path = out / "run.safetensors"
    meta, tensors = kohya_metadata(path), load_file(path)
    if kind == "sdxl":
        # one layer per block: down_blocks.1.attentions.0 is SGM's input_blocks.3, up_blocks.0.attentions.1
        # its output_blocks.1
        for name in ["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",
                     "lora_unet_output_blocks_1_1_proj_out", "lora_te1_text_model_encoder_layers_1_mlp_fc2",
                     "lora_te2_text_model_encoder_layers_2_self_attn_k_proj"]:
            assert f"{name}.lora_down.weight" in tensors, name
        assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.architecture"]) == (
            "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora")
        from diffusers import StableDiffusionXLPipeline as Pipeline
    else:
        assert tensors["lora_unet_down_blocks_0_attentions_1_proj_in.lora_down.weight"].shape == (4, 16)
        assert tensors["lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight"].shape == (40, 4)
        assert {k: meta[k] for k in ("ss_v2", "ss_base_model_version", "ss_v_parameterization",
                                     "modelspec.architecture", "modelspec.prediction_type")} == {
            "ss_v2": "True", "ss_base_model_version": "sd_v2_v", "ss_v_parameterization": "True",
            "modelspec.architecture": "stable-diffusion-v2-768-v/lora", "modelspec.prediction_type": "v"}
        from diffusers import StableDiffusionPipeline as Pipeline
    assert meta["ss_network_dim"] == "4"
    pipe = Pipeline.from_pretrained(str(folder))
    with captured_logs() as records:
        pipe.load_lora_weights(str(out), weight_name=path.name)
    assert_loaded_cleanly(records)


def test_presets_for_sdxl_and_sd2_768v_load_and_fit_their_kind() -> None:
    from conftest import ROOT
    from stylelora.families import family_of

    sdxl = Config.load(ROOT / "presets" / f"{family_of('sdxl').presets['sdxl']}.toml")
    assert (sdxl.data.resolution, sdxl.train.gradient_checkpointing, sdxl.train.mixed_precision) == (1024, True, "auto")
    assert "xl" in sdxl.model.name
    sd2 = Config.load(ROOT / "presets" / f"{family_of('sd2-v').presets['sd2-v']}.toml")
    assert sd2.data.resolution == 768 and sd2.model.prediction_type == "auto"  # v is read from the scheduler


def test_model_kind_set_in_the_config_reaches_the_run_files_and_later_exports(tmp_path: Path, data: Path) -> None:
    from stylelora.adapters.convert import export

    out = tmp_path / "run"
    train(tiny_config(data, out, **{"model.kind": "sd2-v", "train.steps": 1}))  # builtin:tiny taken as SD2-768-v
    exported = export(out, "kohya", tmp_path / "again.safetensors").path
    for path in (out / "run.safetensors", exported):
        meta = kohya_metadata(path)
        assert (meta["ss_v2"], meta["ss_v_parameterization"], meta["modelspec.architecture"]) == (
            "True", "True", "stable-diffusion-v2-768-v/lora"), path


def test_sdxl_text_cache_holds_both_encoders_and_the_pooled_text(tmp_path: Path, data: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_base_model("builtin:tiny-sdxl")
    calls = {"text_encoder": 0, "text_encoder_2": 0}
    for part in calls:
        encoder = getattr(model, part)
        original = encoder.forward

        def counted(*args, _part=part, _original=original, **kwargs):
            calls[_part] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(encoder, "forward", counted)
    config = tiny_config(data, tmp_path / "o", **{"model.name": "builtin:tiny-sdxl"})
    cached = BatchSource(TrainingSet.from_config(config), config, model)
    first = [cached.next_batch() for _ in range(6)]  # two epochs of three captions
    assert calls == {"text_encoder": 3, "text_encoder_2": 3}  # each caption encoded once, by both
    plain = BatchSource(TrainingSet.from_config(config), config.with_overrides({"cache.text_encoder": False}), model)
    for a, b in zip(first, [plain.next_batch() for _ in range(6)], strict=True):
        assert a.text is not None and b.text is not None and a.text.pooled is not None
        torch.testing.assert_close(a.text.states, b.text.states)
        torch.testing.assert_close(a.text.pooled, b.text.pooled)


def test_buckets_at_1024_are_sdxls_usual_ones() -> None:
    from stylelora.data.buckets import make_buckets

    # SDXL's training resolutions (w, h) with the widest side for each height, from its paper's list
    sdxl = {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
            (1600, 640), (640, 1600), (2048, 512), (512, 2048)}
    assert sdxl <= set(make_buckets(1024, 64))
    assert all(w * h <= 1024 * 1024 and max(w, h) <= 2048 for w, h in make_buckets(1024, 64))


def test_zero_terminal_snr_trains_the_v_prediction_sd2_and_is_refused_for_epsilon_sdxl(tmp_path: Path,
                                                                                     data: Path) -> None:
    result = train(tiny_config(data, tmp_path / "v", **{"model.name": "builtin:tiny-sd2v", "train.steps": 2,
                                                         "train.zero_terminal_snr": True}))
    assert result.steps == 2 and all(np.isfinite(result.losses))
    with pytest.raises(ConfigError, match="zero_terminal_snr: needs v-prediction, but this model predicts epsilon"):
        train(tiny_config(data, tmp_path / "xl", **{"model.name": "builtin:tiny-sdxl", "train.steps": 2,
                                                    "train.zero_terminal_snr": True}))
