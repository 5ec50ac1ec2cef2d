"""Runs survive kills and interrupts: exact resume after SIGKILL, clean stop on SIGINT/SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli, tiny_config
from stylelora.adapters.checkpoint_files import list_checkpoints
from stylelora.core import events
from stylelora.training.loop import train

STEPS = 8
# Every source of randomness and every piece of state is on: dropout (global RNG), random flips (data
# order RNG), noise offset and min-SNR (noise/timestep RNG), warmup+cosine schedule, EMA.
FEATURES = ["--set", "lora.dropout=0.1", "--set", "data.random_flip=true", "--set", "train.noise_offset=0.1",
            "--set", "train.min_snr_gamma=5", "--set", "train.lr_scheduler=cosine", "--set", "train.lr_warmup_steps=2",
            "--set", "train.ema=true", "--set", "train.ema_decay=0.9", "--set", "export.precision=fp32",
            "--set", "export.name=style", "--set", "train.validation_images=1", "--set", "train.validate_every=3"]


def train_args(data: Path, out: Path, steps: int = STEPS) -> list[str]:
    return ["train", "--model", "builtin:tiny", "--data", str(data), "--output", str(out), "--steps", str(steps),
            "--resolution", "64", "--rank", "4", "--lr", "1e-3", "--save-every", "2", *FEATURES]


def start_cli(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "stylelora", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def wait_for(condition, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before the moment to interrupt it: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_auto_ends_with_the_uninterrupted_adapter(dataset: Path, tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = start_cli(*train_args(dataset, killed))
    wait_for(lambda: (killed / "checkpoints" / "step-000002" / "state.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "style.safetensors").exists()

    # the uninterrupted run, in this process (the same code path as the CLI, without its start-up cost)
    from stylelora.cli import build_parser, config_from_args

    train(config_from_args(build_parser().parse_args(train_args(dataset, whole))))
    r = run_cli(*train_args(dataset, killed), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr

    expected, got = load_file(whole / "style.safetensors"), load_file(killed / "style.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    a, b = metrics(whole), metrics(killed)
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))  # no step logged twice, none missing
    for m, n in zip(a, b, strict=True):
        assert n["loss"] == pytest.approx(m["loss"], rel=1e-4) and n["lr"] == pytest.approx(m["lr"])
        assert ("val_loss" in n) == ("val_loss" in m) and n.get("val_loss", 0) == pytest.approx(m.get("val_loss", 0))
    assert [p.name for p in list_checkpoints(killed)] == [p.name for p in list_checkpoints(whole)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_a_checkpoint_and_the_adapter_and_says_how_to_resume(sig, dataset: Path,
                                                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_cli("train", "--model", "builtin:tiny", "--data", str(dataset), "--output", str(out),
                     "--steps", "1000", "--resolution", "64", "--rank", "4")
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip(), proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    step = metrics(out)[-1]["step"]
    assert 1 <= step < 1000
    assert [p.name for p in list_checkpoints(out)] == [f"step-{step:06d}"]
    assert (out / "run.safetensors").is_file() and (out / "diffusers/pytorch_lora_weights.safetensors").is_file()
    assert f"stopped at step {step} of 1000" in stderr
    assert f"continue with: stylelora train {out / 'config.toml'} --resume auto" in stderr
    assert "Traceback" not in stderr


def test_a_half_written_or_damaged_checkpoint_is_never_resumed(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(dataset, out, **{"train.steps": 2}))
    checkpoints = out / "checkpoints"
    # what a kill can leave: a temporary folder mid-write, and (by hand damage) a folder with a missing file
    partial = checkpoints / ".step-000004.abc123.tmp"
    partial.mkdir()
    (partial / "lora.safetensors").write_bytes(b"\0" * 10)
    damaged = checkpoints / "step-000003"
    damaged.mkdir()
    (damaged / "state.json").write_text(json.dumps({"step": 3, "complete": True}))
    with open(out / "metrics.jsonl", "a") as f:  # a line the kill cut short
        f.write('{"step": 3, "lo')

    seen: list[object] = []
    result = train(tiny_config(dataset, out, **{"train.steps": 4, "train.resume": "auto"}), seen.append)
    messages = [e.text for e in seen if isinstance(e, events.Message)]
    assert any(m.startswith("resumed from") and m.endswith("step-000002 at step 2") for m in messages), messages
    assert result.steps == 4 and not partial.exists() and not damaged.exists()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]

    # resuming from an explicit earlier checkpoint rewinds the run: later checkpoints and metrics go
    seen.clear()
    (checkpoints / "step-000002").rename(tmp_path / "kept-step-2")
    result = train(tiny_config(dataset, out, **{"train.steps": 3, "train.resume": str(tmp_path / "kept-step-2")}),
                   seen.append)
    messages = [e.text for e in seen if isinstance(e, events.Message)]
    assert any("removed the later checkpoints step-000004" in m for m in messages), messages
    assert result.steps == 3 and [p.name for p in list_checkpoints(out)] == ["step-000003"]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_a_continued_run_s_first_eta_comes_from_its_earlier_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step of a session also warms up (caches, allocations): its time alone gave a continued run a
    first ETA of 1:14:49. Until this session has a pace of its own, the run's earlier sessions' pace counts."""
    from stylelora.training import loop

    now = [1000.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    clock = loop._Clock(100, 200.0)  # 100 steps trained before, in 200 s: 0.5 steps/s
    now[0] += 60.0  # this session's first step, warming up
    elapsed, rate, eta = clock.pace(101, 300)
    assert (elapsed, rate, eta) == (260.0, 0.5, 398.0)  # not 199 steps x 60 s
    now[0] += 4.0  # then two steps in 4 s: this session's own pace
    clock.pace(102, 300)
    now[0] += 2.0
    assert clock.pace(103, 300)[1:] == (2 / 6.0, 197 * 3.0)
    fresh = loop._Clock(0, 0.0)  # a new run has nothing earlier: its first step's pace
    now[0] += 3.0
    assert fresh.pace(1, 10)[1:] == (1 / 3.0, 27.0)


def test_an_image_deleted_during_the_run_stops_it_saved_and_it_continues_once_put_back(dataset: Path,
                                                                                        tmp_path: Path) -> None:
    """Nothing trained is lost when the dataset changes under a run: it stops with a checkpoint of its last step
    (it used to stop with none since the last scheduled save), and continues once the image is back."""
    from stylelora.core.errors import TrainingError

    out, image = tmp_path / "run", sorted(dataset.glob("*.png"))[0]
    kept = image.read_bytes()
    config = tiny_config(dataset, out, **{"train.steps": 12, "cache.latents": "off", "train.log_every": 1})

    def on_event(event: events.Event) -> None:
        if isinstance(event, events.Progress) and event.step == 2 and image.exists():
            image.unlink()  # the next time its turn comes, the batch cannot be made

    with pytest.raises(TrainingError) as stopped:
        train(config, on_event)
    message = str(stopped.value)
    assert message.startswith("the dataset changed while the run trained: ") and image.name in message
    saved = list_checkpoints(out)
    assert saved and int(saved[-1].name.split("-")[1]) >= 2  # the step before the missing image, not none
    assert f"the last complete checkpoint, {saved[-1]}, is intact" in message

    image.write_bytes(kept)
    result = train(config.with_overrides({"train.resume": "auto"}))
    assert result.steps == 12 and not result.stopped_early and (out / "run.safetensors").is_file()
