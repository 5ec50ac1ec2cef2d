"""Several processes through accelerate launch and torchrun (DDP over gloo on the CPU, builtin:tiny).

One run: one writer, each step logged once, an adapter like a single process's. The same result as one
process with the same effective batch. Exact resume under two processes, and a clear end, naming the
process, when one of them is killed. The app's runner follows such a run through its events and stops it.
Each launch starts two Python processes that import torch, so these tests are few, and their timeouts
are generous for a loaded machine; nothing here is timed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_dataset
from stylelora.adapters.checkpoint_files import is_complete, list_checkpoints, load_checkpoint
from stylelora.adapters.formats import load_adapter
from stylelora.cli import build_parser, config_from_args
from stylelora.core import events
from stylelora.core.config import Config
from stylelora.families import load_base_model
from stylelora.training.loop import train

LAUNCH_TIMEOUT = 900  # seconds; a launch takes well under a minute on an idle 2-core machine
# Every random source of the loop but dropout (which draws per batch, so batches of 1 and 2 differ):
# flips, noise offset, min-SNR timesteps, warmup + cosine, EMA, validation on a held-out image.
FEATURES = ["--set", "data.random_flip=true", "--set", "train.noise_offset=0.1", "--set", "train.min_snr_gamma=5",
            "--set", "train.lr_scheduler=cosine", "--set", "train.lr_warmup_steps=2", "--set", "train.ema=true",
            "--set", "train.ema_decay=0.9", "--set", "export.precision=fp32", "--set", "export.name=style",
            "--set", "train.validation_images=1", "--set", "train.validate_every=3", "--set", "train.device=cpu",
            "--set", "train.mixed_precision=no"]  # fp32: the tolerance below is fp32 rounding (auto is bf16 on AMX)
# Largest difference of a LoRA weight, 2 processes x batch 1 vs 1 process x batch 2 after 6 steps (fp32, lr 1e-3,
# weights up to 1.0): measured 2.3e-6. Rounding only: DDP averages two gradients where one process averages
# the batch, and Adam's first steps magnify such differences in the weights that start at zero.
TOLERANCE = 2e-5


def bin_of(name: str) -> str:
    """A launcher installed beside this Python (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    assert found, f"{name} is not installed"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher(kind: str) -> list[str]:
    """The start of a two-process launch, as the README writes it (plus a free port: tests may overlap)."""
    if kind == "accelerate":
        return [bin_of("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(free_port()), "-m"]
    return [bin_of("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m"]


def start(kind: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([*launcher(kind), "stylelora", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def launch(kind: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = start(kind, *args)
    stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def train_args(data: Path, out: Path, *extra: str, steps: int = 6, batch: int = 1) -> list[str]:
    return ["train", "--model", "builtin:tiny", "--data", str(data), "--output", str(out), "--steps", str(steps),
            "--resolution", "64", "--rank", "4", "--lr", "1e-3", "--save-every", "2", "--batch-size", str(batch),
            *FEATURES, *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 5 images, one held out: 4 examples an epoch, so batches of 1 pair up into batches of 2 exactly
    return make_dataset(tmp_path_factory.mktemp("multi") / "data", n=5)


@pytest.fixture(scope="module")
def two_processes(data: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = data.parent / "runs" / "two"
    result = launch("accelerate", *train_args(data, out))
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.fixture(scope="module")
def one_process(data: Path) -> Path:
    """The same run in one process with the same effective batch: batch 2."""
    out = data.parent / "runs" / "one"
    train(config_from_args(build_parser().parse_args(train_args(data, out, batch=2))))
    return out


def test_accelerate_launch_trains_one_run_in_two_processes(two_processes, one_process: Path) -> None:
    out, result = two_processes
    assert f"training on cpu:0 with 2 processes (effective batch 2): 4 images -> {out}" in result.stderr
    assert result.stderr.count("done: 6 steps") == 1  # only the main process reports
    assert sorted(p.name for p in out.parent.iterdir()) == ["one", "two"]  # no second run folder
    # one adapter per save and the final one, each written once (by the main process)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "style-step00000002.safetensors", "style-step00000004.safetensors", "style.safetensors"]
    assert [p.name for p in out.glob("*.toml")] == ["config.toml"] and len(list(out.glob("*.jsonl"))) == 1
    writers = {p.name.split(".")[-2] for p in (out / "logs").rglob("events.out.tfevents.*")}  # ...host.PID.N
    assert len(writers) == 1  # one process wrote TensorBoard (the curves, and the config as hyperparameters)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]  # each step once
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004", "step-000006"]
    assert all(p.name.startswith("step-") for p in (out / "checkpoints").iterdir())  # no temporary leftovers
    assert "rank1.torch" in load_checkpoint(out / "checkpoints" / "step-000006").rng  # both processes' streams

    # the adapter loads like the single-process one: same modules, ranks, alphas and facts; diffusers takes it
    model = load_base_model("builtin:tiny")
    two, one = load_adapter(out / "style.safetensors", model), load_adapter(one_process / "style.safetensors", model)
    assert {part: sd.keys() for part, sd in two.state.items()} == {part: sd.keys() for part, sd in one.state.items()}
    assert two.rank == one.rank == 4 and two.alpha == one.alpha
    for key in ("ss_network_dim", "ss_network_alpha", "ss_steps", "ss_num_train_images"):
        assert two.metadata[key] == one.metadata[key], key
    model.pipeline.load_lora_weights(str(out / "diffusers"), adapter_name="two")


def test_two_processes_of_batch_1_reach_the_adapter_of_one_process_of_batch_2(two_processes, one_process: Path) -> None:
    out, _ = two_processes
    two, one = load_file(out / "style.safetensors"), load_file(one_process / "style.safetensors")
    assert two.keys() == one.keys()
    difference = max(float((two[k] - one[k]).abs().max()) for k in one)
    largest = max(float(one[k].abs().max()) for k in one if not k.endswith(".alpha"))
    assert largest > 0.1 and difference < TOLERANCE, (difference, largest)
    for a, b in zip(metrics(out), metrics(one_process), strict=True):  # the logged loss is the whole step's
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == pytest.approx(b["lr"])
        assert a.get("val_loss", 0) == pytest.approx(b.get("val_loss", 0), rel=1e-5)


def workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the processes a launcher started (read from /proc: their RANK variable)."""
    found = {}
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((v for v in environ if v.startswith(b"RANK=")), None)
            if rank is not None:
                found[int(rank.split(b"=")[1])] = int(pid)
    return found


def test_a_killed_process_is_named_and_the_run_resumes_exactly(data: Path) -> None:
    runs = data.parent / "runs"
    killed, whole = runs / "killed", runs / "whole"
    # each process's own dropout stream must resume too; a schedule that does not depend on the step count,
    # so the run to kill can be long (it cannot end before the kill on a slow machine) and resume with 10
    extra = ["--set", "lora.dropout=0.1", "--set", "train.lr_scheduler=constant_with_warmup"]
    proc = start("torchrun", *train_args(data, killed, *extra, steps=1000))
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not (killed / "checkpoints" / "step-000002" / "state.json").is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.02)
    ranks = workers(proc.pid)
    os.kill(ranks[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)

    assert proc.returncode != 0
    assert f"error: process 1 (pid {ranks[1]}) of this run ended unexpectedly, so process 0 of 2 stopped too" in stderr
    newest = list_checkpoints(killed)[-1]
    assert is_complete(newest) and 2 <= load_checkpoint(newest).step < 10
    assert f"the last complete checkpoint, {newest}, is intact" in stderr
    resume = f"-m stylelora train {killed / 'config.toml'} --resume auto"
    assert f"Continue with: accelerate launch --multi_gpu --num_processes 2 {resume}" in stderr
    assert not (killed / "style.safetensors").exists()  # nothing half-done: no adapter of an unfinished run
    assert all(p.name.startswith("step-") for p in (killed / "checkpoints").iterdir())

    resumed = launch("accelerate", *train_args(data, killed, *extra, steps=10), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {newest}" in resumed.stderr
    uninterrupted = launch("torchrun", *train_args(data, whole, *extra, steps=10))
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    expected, got = load_file(whole / "style.safetensors"), load_file(killed / "style.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [m["step"] for m in metrics(killed)] == list(range(1, 11))
    for m, n in zip(metrics(whole), metrics(killed), strict=True):
        assert n["loss"] == pytest.approx(m["loss"], rel=1e-4)


def test_the_app_offers_gpus_and_follows_and_stops_a_two_process_run(tmp_path: Path) -> None:
    """The app on a machine with 2 GPUs (as its Context says): "GPUs: 2" runs accelerate launch, and the page
    gets progress, the loss curve and Stop as for one GPU. Here the two processes train on the CPU."""
    from gradio_client import Client
    from gui_server import launch as serve
    from gui_server import make_root

    root = make_root(tmp_path / "root")
    demo, ctx, url = serve(root, gpus=2)
    try:
        gpus = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "train-gpus")
        assert gpus.visible and [c[1] for c in gpus.choices] == [1, 2]
        client = Client(url, verbose=False)
        # the queue trains in the app's process: a 2-GPU run is refused there, never silently run on one
        from gradio_client.exceptions import AppError
        with pytest.raises(AppError, match="queued runs train on one GPU: set GPUs to 1"):
            client.predict(gpus=2, train_steps=2, api_name="/queue_add")
        assert ctx.job.queued() == []
        toml = "\n".join(['[model]', 'name = "builtin:tiny"', '[data]', 'path = "datasets/example"',
                          'resolution = 64', '[lora]', 'rank = 4', '[train]', 'steps = 1000', 'device = "cpu"',
                          'lr = 1e-4', 'scale_lr = true'])
        job = client.submit(toml, 2, api_name="/train_toml")
        for update in job:
            if update["step"] >= 2:
                break
        assert client.predict(api_name="/stop") == "stopping after the current step"
        ctx.job.join(LAUNCH_TIMEOUT)
    finally:
        demo.close()
    snap = ctx.job.snapshot()
    assert snap.status == "stopped", snap.error
    started = next(e for e in snap.events if isinstance(e, events.Started))
    out = root / "outputs" / "example"
    assert (started.processes, started.effective_batch, started.output_dir) == (2, 2, out)
    steps = [e.step for e in snap.events if isinstance(e, events.Progress)]  # the page's progress and loss plot
    finished = snap.events[-1]
    assert isinstance(finished, events.Finished) and finished.stopped_early and 2 <= finished.step == steps[-1] < 1000
    assert [p.name for p in finished.adapter_paths] == ["example.safetensors", "pytorch_lora_weights.safetensors"]
    assert [m["step"] for m in metrics(out)] == steps
    assert [p.name for p in list_checkpoints(out)] == [f"step-{finished.step:06d}"]
    messages = [e.text for e in snap.events if isinstance(e, events.Message)]
    assert any("stopped at step" in m for m in messages)
    # train.scale_lr: said aloud, and the rate trained with is the configured one times the processes
    assert "train.scale_lr: learning rates x 2 processes (lr 0.0001 -> 0.0002)" in messages
    assert all(m["lr"] == pytest.approx(2e-4) for m in metrics(out))
    replay = Config.load(out / "config.toml")  # the TOML a CLI run writes, which `stylelora train` replays
    assert (replay.data.path, replay.train.output_dir, replay.train.device) == (
        str(root / "datasets" / "example"), str(out), "cpu")


def test_events_survive_the_json_stream() -> None:
    sent = [events.Started(10, 2, 4, "cuda:0", Path("/runs/a"), 2, 8),
            events.Progress(3, 10, 0.25, 1e-4, 7.5, 1.5, float("inf")),
            events.SampleSaved(3, [Path("/runs/a/samples/a.png")], ["a cat"]),
            events.Finished(10, False, Path("/runs/a"), [Path("/runs/a/a.safetensors")])]
    assert [events.from_record(json.loads(json.dumps(events.to_record(e)))) for e in sent] == sent
    with pytest.raises(ValueError, match="not a stylelora event"):
        events.from_record({"event": "Exploded"})

