"""The benchmark scripts run (on builtin:tiny or tiny widths) and print what RESULTS.md records. No timing is
asserted: the figures themselves live in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, make_dataset


def run_script(*args: str, timeout: float = 600) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([*args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_bench_train_reports_rate_phases_and_memory(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=2)
    out = run_script(sys.executable, "benchmarks/bench_train.py", "--model", "builtin:tiny", "--data", str(data),
                     "--resolution", "64", "--batch-size", "1", "--rank", "4", "--alpha", "4", "--steps", "4")
    assert re.search(r"train\(\): \d+\.\d+ images/s over warm steps 3\.\.4", out)
    for phase in ("batch", "unet forward", "backward", "optimizer", "other"):
        assert re.search(rf"{phase}\s+\d+\.\d ms\s+\d+\.\d %", out), phase
    assert re.search(r"outside UNet forward\+backward: \d+\.\d %", out)
    assert re.search(r"peak memory: \d+ MiB \(RSS\)", out)


def test_peer_shape_builds_a_loadable_model_and_photos_the_peer_setting_trains_on(tmp_path: Path) -> None:
    run_script(sys.executable, "benchmarks/peer_shape.py", str(tmp_path / "peer"), "--width-scale", "0.1",
               "--photos", "3", "--photo-size", "96")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "peer/model", subfolder="unet")
    assert list(unet.config.block_out_channels) == [32, 32, 64, 64]  # 128/256/512/512 at a tenth, min 32
    assert unet.config.layers_per_block == 2 and unet.config.down_block_types[-1] == "DownBlock2D"
    rows = [json.loads(line) for line in (tmp_path / "peer/photos/metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["photo_00.jpg", "photo_01.jpg", "photo_02.jpg"]
    assert all((tmp_path / "peer/photos" / r["file_name"]).is_file() and r["text"] for r in rows)
    out = run_script(sys.executable, "benchmarks/bench_train.py", "--peer", "--model", str(tmp_path / "peer/model"),
                     "--data", str(tmp_path / "peer/photos"), "--resolution", "64", "--steps", "3", "--threads", "1")
    assert "64px batch 2 rank 4 precision no" in out and "images/s" in out


def test_side_by_side_times_whole_commands_alternately(tmp_path: Path) -> None:
    fast = f"{sys.executable} -c 'sum(range({{steps}} * 2_000_000))'"  # CPU work in proportion to the steps
    out = run_script(sys.executable, "benchmarks/side_by_side.py", "--batch-size", "2", "--steps", "1", "3",
                     "--run", "ours", fast, "--run", "reference", fast, "--logs", str(tmp_path))
    order = re.findall(r"^\s*(ours|reference)\s+(\d) steps", out, re.MULTILINE)
    assert order == [("ours", "1"), ("reference", "1"), ("ours", "3"), ("reference", "3")]
    assert re.search(r"\| ours \| \d+\.\d\d \| \d+\.\d\d \| \d+ MiB \| x\d+\.\d\d images/s", out)


def test_gpu_check_dry_run_builds_both_unets_and_runs_every_variant(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    out = run_script("env", f"PYTHON={sys.executable}", "bash", "benchmarks/gpu_check.sh", "--dry-run",
                     "--results", str(results))
    variants = [(m, gc, "off") for m in ("SD1.5-shaped UNet", "SDXL-shaped UNet") for gc in ("False", "True")]
    for model, checkpointing, compile_mode in [*variants, ("SD1.5-shaped UNet", "False", "default")]:
        line = f"{model} checkpointing={checkpointing} compile={compile_mode}: "
        assert re.search(re.escape(line) + r"\d+\.\d\d images/s, peak 0\.0 GiB, share \d+\.\d %", out), line
    for model in ("FLUX.1-shaped transformer", "SD3.5-Large-shaped transformer"):  # flow matching, bf16 and nf4 bases
        for base in ("bf16", "nf4"):
            line = f"{model} checkpointing=True base={base}: "
            assert re.search(re.escape(line) + r"\d+\.\d\d images/s, peak 0\.0 GiB, share \d+\.\d %", out), line
    text = results.read_text()
    assert "DRY RUN" in text and "GEMM rate" in text
    assert text.count("| SD1.5-shaped UNet |") == 3 and text.count("| SDXL-shaped UNet |") == 2
    assert text.count("| FLUX.1-shaped transformer | on | off | nf4 |") == 1
    assert text.count("| SD3.5-Large-shaped transformer | on | off |") == 2


def test_bench_preview_runs_fused_and_unfused(tmp_path: Path) -> None:
    out = run_script(sys.executable, "benchmarks/bench_preview.py", "--steps", "2", "--repeats", "1", "--threads", "1")
    for key in ("plain", "slider", "slider_unet", "slider_unfused", "diffusers_lora"):
        assert re.search(rf"cpu\s+{key}\s+\d+\.\d+ s", out), key


def test_optimizer_step_compares_the_three_adamw_implementations() -> None:
    out = run_script(sys.executable, "benchmarks/optimizer_step.py", "--model", "builtin:tiny", "--repeats", "4")
    assert "96 LoRA tensors" in out  # builtin:tiny's attention and projection layers at stylelora's targets
    for kind in ("for-loop", "foreach", "fused"):
        assert re.search(rf"{kind}\s+\d+\.\d\d /\s+\d+\.\d\d", out), kind


def test_unet_step_times_each_variant_and_the_attention_kernels() -> None:
    for extra in ([], ["--precision", "bf16", "--attention", "diffusers"], ["--no-lora", "--onednn", "ieee"]):
        out = run_script(sys.executable, "benchmarks/unet_step.py", "--model", "builtin:tiny", "--resolution", "64",
                         "--steps", "2", *extra)
        assert re.search(r"LoRA.*64 px batch 2, \d threads: \d+\.\d{3} s per step \(median of 2\), peak RSS \d+ MiB",
                         out), out
    table = run_script(sys.executable, "benchmarks/unet_step.py", "--sdpa", "--steps", "1")
    assert len(re.findall(r"^\| \d+ x \d+, \d+ \|( \d+\.\d\d ms \|){4}$", table, re.MULTILINE)) == 6
