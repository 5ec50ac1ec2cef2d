"""Importing kohya configs: two kohya_ss GUI JSONs and one sd-scripts config + dataset TOML pair, written by
hand in the shapes those tools write (tests/kohya/), converted, checked key by key, and trained on builtin:tiny."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
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


def section(text: str, title: str) -> list[str]:
    """The indented lines under ``title`` in import-kohya's report."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(title)), len(lines))
    body = lines[start + 1:]
    return [line.strip() for line in body[: next((i for i, x in enumerate(body) if not x.startswith("  ")),
                                                 len(body))]]


def test_kohya_ss_standard_lora_json(workdir: Path) -> None:
    report = import_kohya(workdir / "lora-standard.json")
    c = report.config
    assert (c.model.name, c.model.clip_skip, c.data.max_token_length) == ("builtin:tiny", 2, 150)
    assert Path(c.data.path) == workdir / "img" and c.data.resolution == 64
    assert (c.lora.type, c.lora.rank, c.lora.alpha, c.lora.conv_rank, c.lora.train_text_encoder) == (
        "lora", 8, 4.0, 0, False)  # text_encoder_lr 0 with a unet_lr: the UNet alone, as kohya_ss does
    assert (c.train.epochs, c.train.batch_size, c.train.lr, c.train.lr_scheduler) == (2, 2, 1e-4, "cosine")
    # kohya_ss's lr_warmup is a percentage of the run: a share, whatever length the run gets
    assert (c.train.lr_warmup_ratio, c.train.lr_warmup_steps) == (0.1, 0)
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
    # read, but nothing of their own to set: each says why (kohya_ss keeps conv_dim in a Standard LoRA's config)
    reasons = {key: reason for key, _, reason in report.read}
    assert set(reasons) == {"conv_dim", "conv_alpha", "learning_rate", "multires_noise_discount"}
    assert "only to LoCon, LoHa and LoKr" in reasons["conv_dim"] and "unet_lr" in reasons["learning_rate"]
    assert set(json.loads((workdir / "lora-standard.json").read_text())) <= report.mentioned()
    result = train(local(c, workdir, **{"train.epochs": 1, "sample.every": 0}))
    assert result.steps == 6 and not result.stopped_early
    # 4 images x 3 repeats / batch 2 = 6 steps; 10% of them warm up. The repeats folder is recorded as sd-scripts
    # records it: one entry per folder with its repeats, and the images counted with their repeats
    with safe_open(str(result.adapter_paths[0]), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_zxc style": {"n_repeats": 3, "img_count": 4}}
    assert (meta["ss_num_train_images"], meta["ss_lr_warmup_steps"]) == ("12", "1")
    assert set(json.loads(meta["ss_tag_frequency"])) == {"3_zxc style"}


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
    assert {key for key, _, _ in report.read} == {"cache_latents", "learning_rate", "epoch", "mem_eff_attn"}
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
    assert config.train.lr_warmup_ratio == 0.25  # sd-scripts' lr_warmup_steps below 1: a share of the run
    assert (config.data.shuffle_tags, config.data.keep_tags, config.lora.train_text_encoder) == (True, 1, False)
    listed = [line.split(" = ")[0] for line in section(r.stdout, "not imported")]
    assert set(listed) == {"network_args preset", "vae_batch_size", "logging_dir", "min_bucket_reso"}
    assert run_cli("import-kohya", str(workdir / "sd-scripts-config.toml"), "--out", str(out)).returncode == 1
    run = run_cli("train", str(out), "--set", f"train.output_dir={workdir / 'run'}", "--set", "train.epochs=1",
                  "--set", "sample.every=0", cwd=workdir)
    assert run.returncode == 0, run.stderr
    written = tomllib.loads((workdir / "run" / "config.toml").read_text())
    assert written["lora"]["type"] == "lokr" and written["train"]["optimizer"] == "came"
    lines = (workdir / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[-1])["step"] == 12
    # 4 images x 3 repeats + as many regularisation examples = 24 an epoch / batch 2 = 12 steps; 25% warm up
    with safe_open(str(workdir / "run" / "zxc-lokr.safetensors"), "pt") as f:
        assert f.metadata()["ss_lr_warmup_steps"] == "3"


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
    assert reasons["sample_prompts"].startswith(
        f"{tmp_path / 'prompts.txt'}: the prompt file starts with a UTF-16 mark but is not UTF-16; save it as UTF-8")
    assert reasons["sample_prompts"].endswith("; set sample.prompts")
    (tmp_path / "prompts.txt").unlink()
    reasons = {k: r for k, _, r in import_kohya(config).unsupported}
    assert reasons["sample_prompts"] == f"{tmp_path / 'prompts.txt'}: prompt file not found; set sample.prompts"


def test_windows_paths_never_become_folders_here(workdir: Path) -> None:
    """A kohya_ss config made on Windows: the output falls back to outputs/<output_name>, an input found by name
    beside the config is used, the others are refused by training with the setting to change; nothing named
    'E:' or 'C:' is ever created."""
    config = workdir / "windows.json"
    config.write_text(json.dumps({
        "pretrained_model_name_or_path": "C:\\models\\v1-5-pruned-emaonly.safetensors",
        "train_data_dir": "E:\\kohya\\img", "reg_data_dir": "\\\\nas\\share\\class_images",
        "output_dir": "E:/kohya/outputs", "output_name": "zqx", "logging_dir": "E:\\kohya\\log",
        "max_resolution": "64,64", "max_train_steps": 1, "train_batch_size": 1, "network_dim": 4, "v2": False,
        "sdxl": False}))
    out = workdir / "imported.toml"
    r = run_cli("import-kohya", str(config), "--out", str(out), cwd=workdir)
    assert r.returncode == 0, r.stderr
    said = {line.split()[0]: line for line in section(r.stdout, "check") + section(r.stdout, "not imported")}
    assert "the run goes to outputs/zqx" in said["output_dir"]
    assert "beside the config" in said["train_data_dir"] and "Windows path" in said["train_data_dir"]
    assert "train_data_dir 'E:\\kohya\\img' is a Windows path" in said["train_data_dir"]  # as written: \ once
    assert "output_dir 'E:/kohya/outputs' is a Windows path" in said["output_dir"]
    assert "training refuses it until data.reg_path names" in said["reg_data_dir"]
    assert "training refuses it until --model names" in said["pretrained_model_name_or_path"]
    assert "logs go to the run folder" in said["logging_dir"]
    imported = Config.load(out)
    assert (imported.train.output_dir, Path(imported.data.path)) == ("outputs/zqx", workdir / "img")

    refused = run_cli("train", str(out), cwd=workdir)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "model.name: 'C:\\models\\v1-5-pruned-emaonly.safetensors' is a Windows path" in refused.stderr
    assert "set --model to a path on this machine" in refused.stderr
    assert "data.reg_path: '\\\\nas\\share\\class_images' is a Windows network share" in refused.stderr
    for command in (["train"], ["train", "--estimate"]):  # a stylelora config's own output path: refused alike
        r = run_cli(*command, "--model", "builtin:tiny", "--data", "img", "--output", "E:/kohya/outputs",
                    "--steps", "1", cwd=workdir)
        assert r.returncode == 1 and "train.output_dir: 'E:/kohya/outputs' is a Windows path (drive E:)" in r.stderr
        assert "set --output to a path on this machine" in r.stderr

    ran = run_cli("train", str(out), "--model", "builtin:tiny", "--set", "data.reg_path=", "--set", "sample.every=0",
                  "--set", f"cache.dir={workdir / 'cache'}", cwd=workdir)
    assert ran.returncode == 0, ran.stderr
    assert (workdir / "outputs" / "zqx" / "zqx.safetensors").is_file()
    made = [p.relative_to(workdir) for p in workdir.rglob("*") if ":" in p.name or "\\" in p.name]
    assert made == []


def test_sample_settings_render_samples_during_training(workdir: Path) -> None:
    config = workdir / "samples.json"
    config.write_text(json.dumps({
        "pretrained_model_name_or_path": "builtin:tiny", "train_data_dir": "./img", "max_resolution": "64,64",
        "train_batch_size": 4, "max_train_epochs": 2, "network_dim": 4, "sample_every_n_epochs": 1,
        "sample_every_n_steps": 0, "sample_prompts": "a lighthouse, zxc style --s 2 --d 5", "sdxl": False}))
    report = import_kohya(config)
    assert (report.config.sample.every_epochs, report.config.sample.every) == (1, 0)
    assert report.config.sample.prompts == ["a lighthouse, zxc style"]
    # 4 images x 3 repeats / batch 4: 3 steps an epoch; a sample at the end of each
    result = train(local(report.config, workdir))
    assert result.steps == 6
    assert sorted(p.name for p in (workdir / "run" / "samples").iterdir()) == ["step-000003-00.png",
                                                                             "step-000006-00.png"]
    config.write_text(json.dumps({"sample_every_n_steps": 2, "sample_prompts": "a boat", "sample_every_n_epochs": 0}))
    assert import_kohya(config).config.sample.every == 2
    config.write_text(json.dumps({"sample_every_n_steps": 2, "sample_prompts": ""}))
    report = import_kohya(config)
    assert report.config.sample.every == 0 and dict((k, r) for k, _, r in report.read)["sample_every_n_steps"] == (
        "no sample prompts: kohya renders no samples without them")


def test_an_sdxl_config_says_what_does_not_apply_to_sdxl(workdir: Path) -> None:
    config = workdir / "sdxl.json"
    config.write_text(json.dumps({
        "pretrained_model_name_or_path": "builtin:tiny-sdxl", "sdxl": True, "v2": False, "clip_skip": 2,
        "sdxl_no_half_vae": True, "sdxl_cache_text_encoder_outputs": True, "optimizer": "AdamW8bit",
        "train_data_dir": "./img", "max_resolution": "1024,1024", "max_train_steps": 100}))
    report = import_kohya(config)
    assert report.config.model.clip_skip == 1  # SDXL's family: clip skip does not apply
    reasons = {k: r for k, _, r in report.unsupported}
    assert "clip skip does not apply to SDXL" in reasons["clip_skip"]
    read = {k: r for k, _, r in report.read}
    assert "SDXL" in read["sdxl"]
    # the README's word: SDXL's VAE stays in fp32 in an fp16 run
    assert "SDXL's own" in read["sdxl_no_half_vae"] and "fp32" in read["sdxl_no_half_vae"]
    assert "sdxl_cache_text_encoder_outputs" in reasons
    assert report.config.train.optimizer == "adamw8bit"
    if not torch.cuda.is_available():  # noted at import, not only when training or estimating
        assert any(n.startswith("on this machine: train.optimizer: 'adamw8bit'") and "CUDA GPU" in n
                   for n in report.notes)


def test_every_key_of_a_full_kohya_ss_gui_config_is_accounted_for(workdir: Path) -> None:
    """tests/kohya/kohya_ss-gui-lora.json holds every key kohya_ss's LoRA tab saves (its save_configuration), with
    the values it saves for an SD1.5 Standard LoRA: each is imported, listed as empty or off, or listed as read or
    not imported with its reason; none is left out or dismissed as unknown."""
    path = workdir / "kohya_ss-gui-lora.json"
    settings = json.loads(path.read_text())
    assert len(settings) > 280
    report = import_kohya(path)
    assert set(settings) - report.mentioned() == set()
    text = report.to_text()
    assert [key for key in settings if key not in text] == []
    unknown = [key for key, _, reason in report.unsupported if reason == "not a setting stylelora has"]
    assert unknown == []
    c = report.config
    assert (c.lora.type, c.train.lr, c.train.text_encoder_lr, c.train.epochs) == ("lora", 3e-4, 5e-5, 2)
    assert (c.sample.every_epochs, c.train.lr_warmup_ratio, c.train.optimizer) == (1, 0.1, "adamw8bit")
    read = {k: r for k, _, r in report.read}
    assert {"conv_dim", "conv_alpha", "learning_rate", "multires_noise_iterations"} <= set(read)


def test_a_stylelora_toml_with_every_section_is_never_taken_for_a_kohya_one(tmp_path: Path) -> None:
    """The app's Load a TOML… tells our TOML from sd-scripts' by its tables: a saved config with [eval] (or any
    section Config gains) must load as itself, not be imported as a kohya config with kohya's defaults."""
    from stylelora.services.kohya_keys import is_kohya_file

    path = tmp_path / "mine.toml"
    Config().with_overrides({"train.steps": 20, "eval.every_save": True}).save(path)
    assert "[eval]" in path.read_text(encoding="utf-8") and not is_kohya_file(path)
    (tmp_path / "theirs.toml").write_text('pretrained_model_name_or_path = "x.safetensors"\nmax_train_steps = 10\n')
    assert is_kohya_file(tmp_path / "theirs.toml")


def test_a_windows_dataset_config_path_is_found_beside_the_config_or_named(tmp_path: Path) -> None:
    """sd-scripts' config names its dataset config by a Windows path: the file of that name beside the config is
    read (as for the other inputs); without it the message names the key and says to pass --dataset-config, and
    with a dataset config sd-scripts ignores train_data_dir, so the subset's image_dir gives data.path."""
    draw_image(tmp_path / "10_zqx" / "a.png")
    config = tmp_path / "config.toml"
    config.write_bytes(b"\xef\xbb\xbfpretrained_model_name_or_path = 'builtin:tiny'\r\ntrain_data_dir = "
                       b"'E:\\old\\set'\r\nnetwork_dim = 4\r\ndataset_config = 'E:\\cfg\\dataset.toml'\r\n")
    with pytest.raises(ConfigError) as e:
        import_kohya(config)
    message = str(e.value)
    assert "config.toml: dataset_config 'E:\\cfg\\dataset.toml' is a Windows path (drive E:)" in message
    assert "--dataset-config" in message
    (tmp_path / "dataset.toml").write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "
                                           f"'{tmp_path / '10_zqx'}'\nnum_repeats = 10\n")
    report = import_kohya(config)
    assert Path(report.config.data.path) == tmp_path  # 10_zqx's parent: kohya's N_name layout
    assert any(read[0] == "train_data_dir" for read in report.read), report.read


def test_class_tokens_advice_fits_the_folder_as_named(workdir: Path) -> None:
    """A subset whose folder is already named N_words but with another num_repeats is read as the folder itself:
    the advice names the folder to rename it to, not the name it already has."""
    from stylelora.services.kohya_import import import_kohya

    (workdir / "ds.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img/3_zxc style'\n"
                                     "class_tokens = 'zxc style'\nnum_repeats = 2\n")
    (workdir / "cfg.toml").write_text("pretrained_model_name_or_path = 'builtin:tiny'\nnetwork_dim = 4\n"
                                      "dataset_config = 'ds.toml'\n")
    report = import_kohya(workdir / "cfg.toml")
    advice = next(why for key, _, why in report.unsupported if key == "subsets.class_tokens")
    assert "its folder is named 3_zxc style, but num_repeats is 2" in advice
    assert "name the folder 2_zxc style and import again" in advice
