"""Importing kohya configs: two kohya_ss GUI JSONs and one sd-scripts config + dataset TOML pair, written by
hand in the shapes those tools write (tests/kohya/), converted, checked key by key, and trained on builtin:tiny."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import draw_image, run_cli
from stylelora.core.config import Config
from stylelora.core.errors import ConfigError
from stylelora.services.kohya_import import import_kohya
from stylelora.training.loop import train

KOHYA = Path(__file__).parent / "kohya"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The configs next to a kohya-layout dataset: img/3_zxc style/ (captioned) and reg/ (class images)."""
    for f in KOHYA.iterdir():
        shutil.copy(f, tmp_path / f.name)
    for i in range(4):
        draw_image(tmp_path / "img" / "3_zxc style" / f"{i}.png", (64, 64), seed=i)
        (tmp_path / "img" / "3_zxc style" / f"{i}.txt").write_text(f"zxc style, a thing number {i}")
    for i in range(2):
        draw_image(tmp_path / "reg" / f"r{i}.png", (64, 64), seed=10 + i)
    return tmp_path


def local(config: Config, workdir: Path, **overrides: object) -> Config:
    """The imported config with its output (and disk cache) inside the test's folder."""
    return config.with_overrides({"train.output_dir": str(workdir / "run"), "cache.dir": str(workdir / "cache"),
                                  **overrides})


def test_kohya_ss_standard_lora_json(workdir: Path) -> None:
    report = import_kohya(workdir / "lora-standard.json")
    c = report.config
    assert (c.model.name, c.model.clip_skip, c.data.max_token_length) == ("builtin:tiny", 2, 150)
    assert Path(c.data.path) == workdir / "img" and c.data.resolution == 64
    assert (c.lora.type, c.lora.rank, c.lora.alpha, c.lora.conv_rank, c.lora.train_text_encoder) == (
        "lora", 8, 4.0, 0, False)  # text_encoder_lr 0 with a unet_lr: the UNet alone, as kohya_ss does
    assert (c.train.epochs, c.train.batch_size, c.train.lr, c.train.lr_scheduler) == (2, 2, 1e-4, "cosine")
    # 4 images x 3 repeats / batch 2 = 6 steps an epoch, 12 in all; kohya_ss's lr_warmup is 10% of them
    assert c.train.lr_warmup_steps == 1
    assert (c.train.optimizer, c.train.weight_decay, c.train.adam_beta1, c.train.adam_beta2) == (
        "adamw", 0.05, 0.9, 0.98)
    assert (c.train.min_snr_gamma, c.train.noise_offset, c.train.seed, c.train.save_every_epochs) == (5, 0.05, 1234, 1)
    assert (c.train.mixed_precision, c.export.precision, c.export.name) == ("no", "fp16", "flat-style")
    assert (c.data.shuffle_tags, c.data.keep_tags, c.data.caption_dropout, c.data.bucket_no_upscale) == (
        True, 1, 0.05, True)
    assert c.sample.prompts == ["a lighthouse on a cliff, flat style", "a boat at sea"]
    assert (c.sample.negative_prompt, c.sample.seed, c.sample.steps, c.sample.guidance) == (
        "blurry, lowres", 7, 12, 6.5)
    assert c.cache.latents == "memory" and c.train.attention == "sdpa"
    assert set(report.unsupported_keys()) == {
        "sample_prompts --w", "sample_prompts --h", "color_aug", "logging_dir", "max_bucket_reso", "sample_sampler",
        "scale_weight_norms", "training_comment", "wandb_api_key"}
    reasons = dict((k, r) for k, _, r in report.unsupported)
    assert "not implemented" in reasons["color_aug"] and "secret" in reasons["wandb_api_key"]
    assert "do-not-copy-this-key" not in report.to_toml() + report.to_text()
    assert "max_timestep" in report.empty and "vae" in report.empty  # defaults and empty fields: nothing lost
    result = train(local(c, workdir, **{"train.epochs": 1, "sample.every": 0}))
    assert result.steps == 6 and not result.stopped_early


def test_kohya_ss_loha_json_with_regularisation(workdir: Path) -> None:
    report = import_kohya(workdir / "loha.json")
    c = report.config
    assert (c.lora.type, c.lora.rank, c.lora.alpha, c.lora.conv_rank, c.lora.conv_alpha) == ("loha", 4, 4.0, 4, 2.0)
    assert (c.train.lr, c.train.text_encoder_lr, c.lora.train_text_encoder) == (2e-4, 5e-5, True)
    assert (c.train.optimizer, c.train.steps, c.train.epochs, c.train.lr_warmup_steps) == ("lion", 4, 0, 2)
    assert Path(c.data.reg_path) == workdir / "reg" and c.data.prior_loss_weight == 0.5
    assert (c.cache.latents, c.data.buckets, c.data.random_flip, c.train.gradient_checkpointing) == (
        "disk", False, True, True)
    assert (c.export.precision, c.model.clip_skip, c.data.max_token_length) == ("bf16", 1, 75)
    assert set(report.unsupported_keys()) == {"LyCORIS_preset", "rank_dropout"}
    result = train(local(c, workdir, **{"train.steps": 2}))
    adapter = workdir / "run" / "loha-style.safetensors"
    assert result.adapter_paths[0] == adapter
    with safe_open(str(adapter), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(".hada_w1_a") for k in keys) and any(k.startswith("lora_te_") for k in keys)


def test_sd_scripts_config_and_dataset_toml_through_the_cli(workdir: Path) -> None:
    out = workdir / "imported.toml"
    r = run_cli("import-kohya", str(workdir / "sd-scripts-config.toml"), "--dataset-config",
                str(workdir / "sd-scripts-dataset.toml"), "--out", str(out), cwd=workdir)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "# not imported: network_args preset = 'attn-mlp'" in text
    config = Config.load(out)
    assert Path(config.data.path) == workdir / "img"  # the N_name layout: repeats and class words from the folder
    assert (config.data.reg_path, config.data.reg_caption) == (str(workdir / "reg"), "a picture")
    assert (config.lora.type, config.lora.rank, config.lora.lokr_factor, config.lora.conv_rank) == ("lokr", 8, 4, 4)
    assert (config.train.optimizer, config.train.optimizer_args, config.train.weight_decay) == (
        "came", ["clip_threshold=1.0"], 0.01)
    assert (config.train.epochs, config.train.batch_size, config.model.clip_skip, config.data.max_token_length) == (
        2, 2, 2, 225)
    # 4 images x 3 repeats + as many regularisation examples = 24 a epoch / batch 2 = 12 steps; 2 epochs; 25% warmup
    assert config.train.lr_warmup_steps == 6
    assert (config.data.shuffle_tags, config.data.keep_tags, config.lora.train_text_encoder) == (True, 1, False)
    section = r.stdout.split("\nnot imported")[1].splitlines()[1:]
    listed = [line.split(" = ")[0].strip() for line in section[: next(i for i, x in enumerate(section)
                                                                       if not x.startswith("  "))]]
    assert set(listed) == {"network_args preset", "vae_batch_size", "logging_dir", "min_bucket_reso"}
    assert run_cli("import-kohya", str(workdir / "sd-scripts-config.toml"), "--out", str(out)).returncode == 1
    run = run_cli("train", str(out), "--set", f"train.output_dir={workdir / 'run'}", "--set", "train.epochs=1",
                  "--set", "sample.every=0", cwd=workdir)
    assert run.returncode == 0, run.stderr
    written = tomllib.loads((workdir / "run" / "config.toml").read_text())
    assert written["lora"]["type"] == "lokr" and written["train"]["optimizer"] == "came"
    lines = (workdir / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[-1])["step"] == 12


def test_bad_kohya_files_say_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"network_dim": "eight"}')
    with pytest.raises(ConfigError, match="network_dim: expected a number, got 'eight'"):
        import_kohya(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        import_kohya(bad)
    with pytest.raises(ConfigError, match="kohya config not found"):
        import_kohya(tmp_path / "missing.toml")


def test_an_unreadable_prompt_file_is_skipped_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    config = tmp_path / "kohya.json"
    config.write_text(json.dumps({"network_dim": 8, "sample_prompts": str(tmp_path / "prompts.txt")}))
    report = import_kohya(config)  # the rest of the config still imports
    assert report.config.lora.rank == 8 and report.config.sample.prompts == Config().sample.prompts
    reasons = {k: r for k, _, r in report.unsupported}
    assert reasons["sample_prompts"].startswith(f"{tmp_path / 'prompts.txt'}: cannot read the prompt file (")
    assert reasons["sample_prompts"].endswith("; set sample.prompts")
    (tmp_path / "prompts.txt").unlink()
    reasons = {k: r for k, _, r in import_kohya(config).unsupported}
    assert reasons["sample_prompts"] == f"{tmp_path / 'prompts.txt'}: prompt file not found; set sample.prompts"
