"""Loss, noise, optimizer, schedule, memory, adapter-variant, EMA and validation options of the loop.

Each test fails if its option were ignored: it compares against a run without it, or against a number
computed here from the option's formula.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_dataset, tiny_config
from stylelora.adapters.checkpoint_files import list_checkpoints, load_checkpoint
from stylelora.core import events
from stylelora.core.errors import ConfigError
from stylelora.data.batches import TrainingSet, noise_generator
from stylelora.families import load_base_model
from stylelora.training.loop import train

SEED = 42


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("loop") / "data")


def run(data: Path, out: Path, **overrides: object):
    """Train on builtin:tiny; returns (result, events, model)."""
    seen: list[object] = []
    model = load_base_model("builtin:tiny", prediction_type=str(overrides.get("model.prediction_type", "auto")))
    config = tiny_config(data, out, **{"train.steps": 1, "train.seed": SEED, **overrides})
    return train(config, seen.append, model=model), seen, model


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def first_timestep(data: Path) -> int:
    """The loop's first timestep: the first example's own generator, keyed by (seed, epoch, slot), draws its
    noise, then t."""
    config = tiny_config(data, data.parent / "unused", **{"train.seed": SEED})
    slot = TrainingSet.from_config(config).epoch_batches(0)[0][0]
    g = noise_generator(SEED, 0, slot)
    torch.randn((1, 4, 8, 8), generator=g)
    return int(torch.randint(0, 1000, (1,), generator=g))


def tiny_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False):
    from stylelora.model.losses import training_scheduler

    config = load_base_model("builtin:tiny").pipeline.scheduler.config
    return training_scheduler(config, prediction_type, zero_terminal_snr)


@pytest.fixture(scope="module")
def baseline(data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("baseline") / "run"
    result, _, _ = run(data, out)
    return result, out


# --- loss and noise -----------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(prediction_type: str) -> None:
    from stylelora.model.losses import min_snr_weights

    scheduler = tiny_scheduler(prediction_type)
    t = torch.tensor([0, 10, 100, 500, 999])
    abar = scheduler.alphas_cumprod[t]
    snr = abar / (1 - abar)
    gamma = 5.0
    expected = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert torch.allclose(min_snr_weights(scheduler, t, gamma), expected, rtol=1e-5)
    assert min_snr_weights(scheduler, t, gamma)[0] < 1  # low-noise steps (high SNR) are down-weighted
    assert torch.equal(min_snr_weights(scheduler, t, 0.0), torch.ones(5))


def test_min_snr_scales_the_training_loss_by_its_weight(data: Path, tmp_path: Path, baseline) -> None:
    from stylelora.model.losses import min_snr_weights, snr

    base_result, _ = baseline
    t = torch.tensor([first_timestep(data)])
    gamma = round(float(snr(tiny_scheduler(), t)[0]) / 2, 6)  # clips the first step's SNR to about half
    result, _, _ = run(data, tmp_path / "snr", **{"train.min_snr_gamma": gamma})
    weight = float(min_snr_weights(tiny_scheduler(), t, gamma)[0])
    assert weight == pytest.approx(0.5, rel=1e-3)
    assert result.losses[0] == pytest.approx(base_result.losses[0] * weight, rel=1e-4)


def test_noise_offset_adds_a_per_channel_constant(data: Path, tmp_path: Path, baseline) -> None:
    from stylelora.model.losses import sample_noise

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise = sample_noise((2, 4, 8, 8), g1, offset=0.1)
    plain = torch.randn((2, 4, 8, 8), generator=g2)
    offsets = torch.randn((2, 4, 1, 1), generator=g2)
    assert torch.allclose(noise, plain + 0.1 * offsets)
    assert torch.equal(sample_noise((2, 4, 8, 8), torch.Generator().manual_seed(3)), torch.randn(
        (2, 4, 8, 8), generator=torch.Generator().manual_seed(3)))

    result, _, _ = run(data, tmp_path / "offset", **{"train.noise_offset": 0.5})
    assert result.losses[0] != pytest.approx(baseline[0].losses[0], rel=1e-3)


def test_zero_terminal_snr_rescales_betas_and_needs_v_prediction(data: Path, tmp_path: Path) -> None:
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    plain, rescaled = tiny_scheduler("v_prediction"), tiny_scheduler("v_prediction", zero_terminal_snr=True)
    assert torch.allclose(rescaled.betas, rescale_zero_terminal_snr(plain.betas))
    assert float(rescaled.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(plain.alphas_cumprod[-1]) > 1e-3

    with pytest.raises(ConfigError, match="train.zero_terminal_snr: needs v-prediction"):
        tiny_config(data, tmp_path / "x", **{"train.zero_terminal_snr": True, "model.prediction_type": "epsilon"})
    with pytest.raises(ConfigError, match="model.prediction_type=v_prediction"):  # auto: the model is epsilon
        run(data, tmp_path / "eps", **{"train.zero_terminal_snr": True})

    v = {"model.prediction_type": "v_prediction"}
    plain_run, _, _ = run(data, tmp_path / "v", **v)
    ztsnr_run, _, model = run(data, tmp_path / "vz", **v, **{"train.zero_terminal_snr": True})
    assert ztsnr_run.losses[0] != pytest.approx(plain_run.losses[0], rel=1e-4)
    assert model.pipeline.scheduler.config.rescale_betas_zero_snr  # samples start from pure noise too


# --- optimizers and schedules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "lr", "class_name", "state_key"),
    [("prodigy", 1.0, "Prodigy", "p0"), ("adafactor", 1e-3, "Adafactor", "exp_avg_sq_row")],
)
def test_optimizer_is_the_one_configured(data: Path, tmp_path: Path, name, lr, class_name, state_key) -> None:
    run(data, tmp_path / name, **{"train.optimizer": name, "train.lr": lr})
    state = load_checkpoint(list_checkpoints(tmp_path / name)[-1])
    assert state.extra["optimizer"] == class_name
    assert any(state_key in per_param for per_param in state.optimizer["state"].values())
    if name == "prodigy":
        assert "d" in state.optimizer["param_groups"][0]


def test_adamw_is_the_default(baseline) -> None:
    state = load_checkpoint(list_checkpoints(baseline[1])[-1])
    assert state.extra["optimizer"] == "AdamW"
    assert all("exp_avg" in per_param for per_param in state.optimizer["state"].values())


def test_adamw8bit_without_cuda_is_a_clear_config_error(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.optimizer: 'adamw8bit' uses bitsandbytes, which needs a CUDA GPU"):
        run(data, tmp_path / "bnb", **{"train.optimizer": "adamw8bit", "train.device": "cpu"})
    assert not (tmp_path / "bnb" / "run.safetensors").exists()


def test_prodigy_refuses_two_learning_rates() -> None:
    from stylelora.core.config import Config
    from stylelora.training.optim import build_optimizer

    train_cfg = Config().with_overrides({"train.optimizer": "prodigy", "train.lr": 1.0}).train
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.5}]
    with pytest.raises(ConfigError, match="train.text_encoder_lr"):
        build_optimizer(groups, train_cfg, torch.device("cpu"))


def _lr_curve(name: str, steps: int = 10, warmup: int = 2, **extra: object) -> list[float]:
    from stylelora.core.config import Config
    from stylelora.training.optim import build_lr_scheduler

    train_cfg = Config().with_overrides({"train.lr_scheduler": name, "train.steps": steps,
                                         "train.lr_warmup_steps": warmup, "train.lr": 1.0, **extra}).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, train_cfg)
    curve = []
    for _ in range(steps):
        opt.step()
        sched.step()
        curve.append(sched.get_last_lr()[0])
    return curve


def _restarts(s: int, n: int, w: int, cycles: int) -> float:
    if s < w:
        return s / w
    progress = (s - w) / (n - w)
    return 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))


def test_each_schedule_has_its_documented_shape() -> None:
    n, w = 10, 2
    assert _lr_curve("constant") == [1.0] * n
    assert _lr_curve("constant_with_warmup") == pytest.approx([0.5] + [1.0] * (n - 1))
    assert _lr_curve("linear") == pytest.approx([s / w if s < w else (n - s) / (n - w) for s in range(1, n + 1)])
    cosine = [s / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / (n - w))) for s in range(1, n + 1)]
    assert _lr_curve("cosine") == pytest.approx(cosine, abs=1e-9)
    assert _lr_curve("cosine_with_restarts", **{"train.lr_scheduler_cycles": 2}) == pytest.approx(
        [_restarts(s, n, w, 2) for s in range(1, n + 1)], abs=1e-9)
    lr_end = 1e-7
    poly = [s / w if s < w else (1 - lr_end) * (1 - (s - w) / (n - w)) ** 2 + lr_end for s in range(1, n + 1)]
    assert _lr_curve("polynomial", **{"train.lr_scheduler_power": 2.0}) == pytest.approx(poly, abs=1e-9)


def test_the_loop_follows_the_configured_schedule(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "restarts"
    run(data, out, **{"train.steps": 5, "train.lr": 1e-3, "train.lr_scheduler": "cosine_with_restarts",
                      "train.lr_warmup_steps": 1, "train.lr_scheduler_cycles": 2})
    lrs = [m["lr"] for m in metrics(out)]
    assert lrs == pytest.approx([1e-3 * _restarts(s, 5, 1, 2) for s in range(1, 6)], abs=1e-12)
    assert lrs[2] > lrs[1]  # the restart happened


# --- memory -------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_losses(data: Path, tmp_path: Path) -> None:
    common = {"train.steps": 2, "train.lr": 1e-2, "lora.train_text_encoder": True}
    off, _, model_off = run(data, tmp_path / "off", **common)
    on, _, model_on = run(data, tmp_path / "on", **common, **{"train.gradient_checkpointing": True})
    assert model_on.unet.is_gradient_checkpointing and not model_off.unet.is_gradient_checkpointing
    assert model_on.text_encoder.is_gradient_checkpointing
    assert on.losses == pytest.approx(off.losses, rel=1e-5)  # step 2 proves the gradients were the same


def test_attention_kernel_and_bf16_keep_lora_in_fp32(data: Path, tmp_path: Path) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    from stylelora.model.attention import CpuSdpaProcessor

    result, _, model = run(data, tmp_path / "bf16", **{"train.mixed_precision": "bf16", "train.device": "cpu",
                                                        "train.attention": "default", "train.steps": 2})
    assert all(math.isfinite(x) for x in result.losses)
    assert {type(p) for p in model.unet.attn_processors.values()} == {AttnProcessor}
    base = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert base.base_layer.weight.dtype == torch.bfloat16
    assert base.lora_A["default"].weight.dtype == torch.float32
    _, _, sdpa = run(data, tmp_path / "sdpa")
    assert {type(p) for p in sdpa.unet.attn_processors.values()} == {CpuSdpaProcessor}  # diffusers' own on GPUs


# --- adapter variants ---------------------------------------------------------------------------


def test_locon_and_dora(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(data, out, **{"lora.conv_rank": 8, "lora.conv_alpha": 2.0, "lora.dora": True, "train.steps": 2,
                      "train.lr": 1e-2, "export.precision": "fp32"})
    state = load_checkpoint(list_checkpoints(out)[-1]).lora["unet"]
    conv = "down_blocks.0.resnets.0.conv1"
    assert state[f"{conv}.lora_A.weight"].shape == (8, 32, 3, 3)  # the conv rank, not the rank of 4
    assert state["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape == (4, 32)

    # DoRA: a trained magnitude per output channel next to every LoRA pair
    magnitudes = [k for k in state if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == len([k for k in state if k.endswith("lora_A.weight")])
    base = load_base_model("builtin:tiny").unet.down_blocks[0].resnets[0].conv1.weight
    norm = base.flatten(1).norm(dim=1)
    assert not torch.allclose(state[f"{conv}.lora_magnitude_vector"].flatten(), norm, atol=1e-6)

    # the export keeps both: per-module rank/alpha patterns and the magnitudes (DoRA: diffusers format only)
    assert not (out / "run.safetensors").exists()
    diffusers = out / "diffusers" / "pytorch_lora_weights.safetensors"
    tensors = load_file(diffusers)
    assert torch.equal(tensors[f"unet.{conv}.lora_magnitude_vector"], state[f"{conv}.lora_magnitude_vector"])
    with safe_open(str(diffusers), "pt") as f:
        peft_meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert peft_meta["unet.rank_pattern"][conv] == 8 and peft_meta["unet.alpha_pattern"][conv] == 2.0


# --- EMA, samples, checkpoints, validation ------------------------------------------------------


def test_ema_weights_are_exported_and_differ_from_raw(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    seen: list[object]
    _, seen, _ = run(data, out, **{"train.ema": True, "train.ema_decay": 0.9, "train.steps": 4, "train.lr": 1e-2,
                                   "export.precision": "fp32", "train.save_every": 1, "train.keep_checkpoints": 2})
    assert [p.name for p in list_checkpoints(out)] == ["step-000003", "step-000004"]  # keeps the newest K
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert [e.step for e in seen if isinstance(e, events.CheckpointSaved)] == [1, 2, 3, 4]

    state = load_checkpoint(list_checkpoints(out)[-1])
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    raw, ema = state.lora["unet"][key], state.ema["unet"][key]
    assert not torch.allclose(raw, ema, atol=1e-6)
    exported = load_file(out / "run.safetensors")["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
                                                  ".lora_up.weight"]
    assert torch.equal(exported, ema) and not torch.equal(exported, raw)


def test_samples_are_rendered_at_fixed_seeds_without_changing_training(data: Path, tmp_path: Path,
                                                                       baseline) -> None:
    from PIL import Image

    out = tmp_path / "samples"
    result, seen, _ = run(data, out, **{"sample.prompts": ["a red square", "flat style"], "sample.every": 1,
                                        "sample.steps": 2, "train.steps": 2})
    saved = [e for e in seen if isinstance(e, events.SampleSaved)]
    assert [e.step for e in saved] == [1, 2] and saved[0].prompts == ["a red square", "flat style"]
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == ["step-000001-00.png", "step-000001-01.png", "step-000002-00.png", "step-000002-01.png"]
    assert Image.open(saved[0].paths[0]).size == (64, 64)
    # rendering draws from its own seeded generator, so the training noise stream is untouched
    assert result.losses[0] == baseline[0].losses[0]


def test_validation_loss_uses_fixed_noise_on_held_out_images(data: Path, tmp_path: Path) -> None:
    from stylelora.core.config import Config
    from stylelora.data.dataset import CaptionedImages, scan
    from stylelora.model.lora import add_lora, set_lora_state
    from stylelora.model.losses import DiffusionObjective, training_scheduler
    from stylelora.training.validation import Validator, split_holdout

    out = tmp_path / "val"
    _, seen, _ = run(data, out, **{"train.validation_images": 1, "train.validate_every": 2, "train.steps": 3,
                                   "train.lr": 1e-2, "train.mixed_precision": "no"})  # fp32, as recomputed below
    started = next(e for e in seen if isinstance(e, events.Started))
    assert started.num_images == 3  # the held-out image is not trained on
    logged = {m["step"]: m["val_loss"] for m in metrics(out) if "val_loss" in m}
    assert sorted(logged) == [2, 3] and logged[2] != logged[3]
    assert [(e.step, e.loss) for e in seen if isinstance(e, events.Validation)] == sorted(logged.items())

    # the same weights give the same number, computed afresh from the final checkpoint
    config = Config.load(out / "config.toml")
    model = load_base_model("builtin:tiny")
    add_lora(model, config.lora)
    set_lora_state(model, load_checkpoint(list_checkpoints(out)[-1]).lora)
    _, held_out = split_holdout(scan(data), 1, SEED)
    examples = [CaptionedImages(held_out, config.data).example(0, SEED, 0)]
    scheduler = training_scheduler(model.pipeline.scheduler.config, model.prediction_type)
    validator = Validator(examples, model, DiffusionObjective(scheduler), torch.device("cpu"), torch.float32, SEED)
    first = validator.loss()
    assert first == validator.loss()
    assert first == pytest.approx(logged[3], rel=1e-5)
