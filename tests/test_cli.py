import argparse
import json
import math
import tomllib
from pathlib import Path

import pytest

from conftest import run_cli


def test_train_end_to_end_and_replay_from_the_runs_config(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "first"
    r = run_cli("train", "--model", "builtin:tiny", "--data", str(dataset), "--steps", "20",
                "--resolution", "64", "--rank", "4", "--output", str(out))
    assert r.returncode == 0, r.stderr
    for rel in ["config.toml", "first.safetensors", "diffusers/pytorch_lora_weights.safetensors", "metrics.jsonl"]:
        assert (out / rel).is_file(), rel
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert "first.safetensors" in r.stdout

    replay = tmp_path / "replay"
    r2 = run_cli("train", str(out / "config.toml"), "--output", str(replay))
    assert r2.returncode == 0, r2.stderr
    first = tomllib.loads((out / "config.toml").read_text())
    second = tomllib.loads((replay / "config.toml").read_text())
    first["train"].pop("output_dir"), second["train"].pop("output_dir")
    assert first == second and first["train"]["steps"] == 20
    same = [json.loads(x)["loss"] for x in (replay / "metrics.jsonl").read_text().splitlines()]
    assert same == pytest.approx(losses, rel=1e-4)  # one seed for everything: the replay is the same run


def test_a_copied_run_folder_continues_in_the_copy_and_leaves_the_original_alone(dataset: Path,
                                                                                   tmp_path: Path) -> None:
    import shutil

    from stylelora.evaluation.checkpoints import run_checkpoints

    first = tmp_path / "style"
    r = run_cli("train", "--model", "builtin:tiny", "--data", str(dataset), "--steps", "2", "--resolution", "64",
                "--rank", "4", "--output", str(first), "--set", "train.save_every=1")
    assert r.returncode == 0, r.stderr
    copy = tmp_path / "style try lower lr"
    shutil.copytree(first, copy)
    before = {p.relative_to(first): p.stat().st_mtime_ns for p in first.rglob("*")}

    r = run_cli("train", str(copy / "config.toml"), "--resume", "auto", "--steps", "4")
    assert r.returncode == 0, r.stderr
    assert {p.relative_to(first): p.stat().st_mtime_ns for p in first.rglob("*")} == before  # untouched
    assert f"it goes on here, in {copy}" in r.stderr
    assert f"resumed from {copy / 'checkpoints' / 'step-000002'} at step 2" in r.stdout + r.stderr
    # the copy's files keep the name they carry, and it scores as one run with all its saves
    assert (copy / "style-step00000003.safetensors").is_file() and (copy / "style.safetensors").is_file()
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 4
    files = {c.step: c.source.file.name for c in run_checkpoints(copy)}
    assert files[1] == "style-step00000001.safetensors" and files[3] == "style-step00000003.safetensors"
    assert files[4] == "style.safetensors"


def test_training_into_an_existing_run_is_refused(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--steps", "1", "--resolution", "64", "--output", str(out)]
    assert run_cli(*args).returncode == 0
    r = run_cli(*args)
    assert r.returncode == 1 and "already holds a run" in r.stderr and "--resume auto" in r.stderr


@pytest.mark.parametrize("command", [[], ["train"], ["generate"], ["export"], ["check-data"]])
def test_help_for_every_command(command: list[str]) -> None:
    r = run_cli(*command, "--help")
    assert r.returncode == 0 and "usage: stylelora" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.lr=-1"], "train.lr: must be > 0, got -1"),
        (["--set", "train.setps=3"], "did you mean 'train.steps'"),
        (["--model", "someone/some-model"], "could not be downloaded"),
        (["--model", "/no/such/folder"], "no such folder or file"),
        (["--data", "/no/such/data"], "no such folder"),
        (["--model", "weights.ckpt"], "pickled checkpoints"),
    ],
)
def test_input_errors_exit_1_with_one_message_and_no_traceback(args, message, dataset: Path, tmp_path: Path) -> None:
    base = ["train", "--data", str(dataset), "--steps", "1", "--resolution", "64", "--output", str(tmp_path / "o")]
    r = run_cli(*base, *args)
    assert r.returncode == 1, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_debug_shows_the_traceback(dataset: Path, tmp_path: Path) -> None:
    r = run_cli("train", "--data", str(tmp_path / "missing"), "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_usage_errors_exit_2() -> None:
    assert run_cli("train", "--steps", "many").returncode == 2
    assert run_cli("no-such-command").returncode == 2


def test_train_on_a_diffusers_folder_stylelora_did_not_write(dataset: Path, tmp_path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stylelora.model.builtin import clip_tokenizer as _builtin_tokenizer

    torch.manual_seed(1)
    tok = _builtin_tokenizer()
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=1,
                                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                  cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8),
        vae=AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=4),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                                  num_attention_heads=2, vocab_size=len(tok),
                                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                  pad_token_id=tok.pad_token_id)),
        tokenizer=tok, scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    folder = tmp_path / "someones-model"
    pipe.save_pretrained(folder)
    out = tmp_path / "run"
    r = run_cli("train", "--model", str(folder), "--data", str(dataset), "--steps", "3", "--resolution", "64",
                "--train-text-encoder", "--output", str(out))
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    keys = load_file(out / "run.safetensors")
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in keys)


def test_folder_without_model_index_is_explained(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "notamodel").mkdir()
    r = run_cli("train", "--model", str(tmp_path / "notamodel"), "--data", str(dataset), "--steps", "1")
    assert r.returncode == 1 and "model_index.json" in r.stderr


def test_a_broken_multi_process_launch_is_explained_before_anything_is_written(dataset: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from conftest import ROOT

    # WORLD_SIZE without the rest of what torchrun/accelerate launch set (no MASTER_ADDR, no peers)
    env = dict(os.environ, WORLD_SIZE="2", PYTHONPATH=str(ROOT))
    env.pop("MASTER_ADDR", None)
    r = subprocess.run([sys.executable, "-m", "stylelora", "train", "--data", str(dataset), "--steps", "1",
                        "--resolution", "64", "--output", str(tmp_path / "run"), "--set", "train.device=cpu"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "the 2 processes of this launch could not join" in r.stderr and "accelerate launch" in r.stderr
    assert not (tmp_path / "run").exists()


def _options(command: str) -> dict[str, argparse.Action]:
    from stylelora.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: action for action in sub.choices[command]._actions for flag in action.option_strings}


def test_generate_flags_are_the_generate_settings_fields() -> None:
    import dataclasses

    from stylelora.cli import build_parser
    from stylelora.core.config import GenerateSettings

    options = _options("generate")
    for f in dataclasses.fields(GenerateSettings):
        action = options["--" + f.name.replace("_", "-")]
        assert action.dest == f.name and action.default == f.default and f.metadata["help"] in action.help
    assert "euler_a" in options["--sampler"].help  # the sampler names, from samplers.py
    args = build_parser().parse_args(["generate", "--prompt", "p", "--out", "x.png", "--seed", "9", "--guidance",
                                      "4.5", "--width", "96", "--negative-prompt", "blurry"])
    settings = GenerateSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateSettings)})
    assert settings == GenerateSettings(negative_prompt="blurry", seed=9, guidance=4.5, width=96)
    assert (settings.steps, settings.height, settings.sampler) == (None, None, None)  # the defaults: the model's own


def test_check_data_flags_are_the_training_fields() -> None:
    from stylelora.core.config import Config

    options, config = _options("check-data"), Config()
    for flag, dotted in [("--resolution", "data.resolution"), ("--batch-size", "train.batch_size"),
                         ("--caption-extension", "data.caption_extension"), ("--trigger-word", "data.trigger_word"),
                         ("--repeats", "data.repeats")]:
        assert options[flag].dest == dotted and options[flag].default == config.get(dotted), flag
    assert options["--resolution"].default == 512 and options["--model"].default is None
    r = run_cli("check-data", "datasets/example", "--batch-size", "0")
    assert r.returncode == 1 and "train.batch_size: must be >= 1, got 0" in r.stderr


def test_library_messages_are_worded_in_flags() -> None:
    from stylelora.cli import cli_words
    from stylelora.core.errors import continue_run, setting

    message = (f"train.output_dir: 'outputs/x' already holds a run; continue it with "
               f"{continue_run('outputs/x/config.toml')}, or give {setting('train.output_dir')} a new folder")
    assert cli_words(message) == ("train.output_dir: 'outputs/x' already holds a run; continue it with stylelora "
                                  "train outputs/x/config.toml --resume auto, or give --output a new folder")
    assert cli_words(f"try {setting('train.batch_size', 1)} and {setting('train.gradient_checkpointing', True)}") == (
        "try --batch-size 1 and --set train.gradient_checkpointing=true")
    assert cli_words(f"({setting('lora.train_text_encoder', False)})") == "(without --train-text-encoder)"
    assert cli_words("train.steps: must be >= 1, got 0") == "train.steps: must be >= 1, got 0"  # no fix: unchanged


# --- issue 23: the small faults a kohya user meets on the command line -----------------------------------


def test_a_misspelt_flag_gets_its_commands_usage_and_the_flag_meant(capsys) -> None:
    from stylelora.cli import main

    for argv, meant in ((["train", "--stpes", "5"], "--stpes (did you mean --steps?)"),
                        (["captions", "replace", "d", "a", "b", "--dryrun"], "--dryrun (did you mean --dry-run?)")):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        err = capsys.readouterr().err
        assert stopped.value.code == 2
        assert err.startswith(f"usage: stylelora {' '.join(argv[:2]) if argv[0] == 'captions' else 'train'} ")
        assert f"error: unrecognized arguments: {meant}" in err


def test_choices_take_kohyas_spelling_or_name_the_close_one(capsys) -> None:
    from stylelora.cli import main

    assert main(["train", "--set", "train.optimizer=AdamW8bit", "--set", "train.lr_scheduler=Cosine",
                 "--print-config"]) == 0
    train = tomllib.loads(capsys.readouterr().out)["train"]
    assert (train["optimizer"], train["lr_scheduler"]) == ("adamw8bit", "cosine")
    assert main(["train", "--set", "train.optimizer=AdamW9bit", "--print-config"]) == 1
    assert "train.optimizer: must be one of" in (err := capsys.readouterr().err) and "did you mean 'adamw8bit'?" in err


def test_estimate_refuses_an_output_inside_the_dataset_as_train_does(dataset: Path, capsys) -> None:
    from stylelora.cli import main

    for extra in ([], ["--estimate"]):
        code = main(["train", "--data", str(dataset), "--output", str(dataset / "run"), "--steps", "1", *extra])
        assert code == 1 and "is inside the dataset folder" in capsys.readouterr().err
    assert not (dataset / "run").exists()


def test_check_data_words_an_image_over_the_pixel_limit_itself(dataset: Path) -> None:
    """Pillow warns (with its own file path) about an image between its limit and twice it; check-data says it
    once, in its report, as its own line about that image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 9_000, 8, 2, 0, 0, 0))  # 90 MP, just over 89 MP
    (dataset / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                                       + chunk(b"IEND", b""))
    r = run_cli("check-data", str(dataset), "--resolution", "64")
    assert r.returncode == 0 and r.stderr == ""  # no DecompressionBombWarning, no site-packages path
    report = r.stdout.splitlines()
    line = report[report.index("huge.png") + 1]
    assert line.startswith("  error: declares 10000x9000 pixels (90 MP), over the 89 MP limit")
    assert "5 images found, 4 usable, 1 skipped; 1 error, 0 warnings, 0 notes" in r.stdout  # counts in words


def test_a_presets_warmup_is_a_share_of_its_own_run(capsys) -> None:
    """sd15-style with --steps 300 warms up for 5% of 300 steps, not the 100 steps sized for its own 1500."""
    import torch

    from stylelora.cli import main
    from stylelora.core.config import Config
    from stylelora.core.errors import ConfigError
    from stylelora.training.optim import build_lr_scheduler

    preset = Path(__file__).resolve().parent.parent / "presets" / "sd15-style.toml"
    assert main(["train", str(preset), "--steps", "300", "--print-config"]) == 0
    config = Config.from_toml(capsys.readouterr().out)
    assert (config.train.lr_warmup_ratio, config.train.lr_warmup_steps, config.train.warmup_steps(300)) == (0.05, 0, 15)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.train.lr)
    schedule = build_lr_scheduler(optimizer, config.train, 300)
    rates = []
    for _ in range(16):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[14] < config.train.lr == rates[15]  # warm after 15 steps, then cosine decay
    with pytest.raises(ConfigError, match="train.lr_warmup_ratio: .* were both set; set train.lr_warmup_ratio=0"):
        config.with_overrides({"train.lr_warmup_steps": 50})
