"""Runs never lose work: a save that fails half-way leaves the previous file whole, and a run that cannot
go on (full disk, out of memory, diverged loss) stops with the last checkpoint intact and says what to do.
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
import torch

from conftest import draw_image, make_dataset
from stylelora.cli import main
from stylelora.core.errors import DiskFullError


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) and the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class FailingWrites:
    """Patches Path.write_bytes/write_text: call number ``fail_at`` writes half its data, then raises.

    With ``under``, only writes to paths containing that folder name count.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, error: BaseException, fail_at: int = 1, under: str = ""):
        self.calls, self.error, self.fail_at, self.failed_on, self.under = 0, error, fail_at, None, under
        real_bytes, real_text = Path.write_bytes, Path.write_text

        def write_bytes(path: Path, data: bytes) -> int:
            return self._write(path, data, real_bytes)

        def write_text(path: Path, text: str, *args: object, **kwargs: object) -> int:
            return self._write(path, text.encode(), real_bytes)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
        monkeypatch.setattr(Path, "write_text", write_text)
        self._real_text = real_text

    def _write(self, path: Path, data: bytes, real) -> int:
        if self.under and self.under not in path.parts:
            return real(path, data)
        self.calls += 1
        if self.calls == self.fail_at:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])  # a partial file exists on disk when the failure hits
            self.failed_on = path
            raise self.error
        return real(path, data)


ERRORS = {
    "io error": OSError(errno.EIO, "Input/output error"),
    "disk full": OSError(errno.ENOSPC, "No space left on device"),
    "killed": KeyboardInterrupt(),
}


def tiny_adapter(seed: int):
    from stylelora.adapters.formats import Adapter

    g = torch.Generator().manual_seed(seed)
    state = {"unet": {"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 32, generator=g),
                      "down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(32, 4, generator=g)}}
    return Adapter(state, {"unet": 4.0}, {"ss_network_dim": "4"})


def save_adapter_kohya(folder: Path, seed: int) -> None:
    from stylelora.adapters.formats import save_kohya

    save_kohya(folder / "style.safetensors", tiny_adapter(seed), {"unet": ["down_blocks.0.attentions.0.proj_in"]})


def save_adapter_diffusers(folder: Path, seed: int) -> None:
    from stylelora.adapters.formats import save_diffusers

    save_diffusers(folder / "diffusers", tiny_adapter(seed))


def save_checkpoint(folder: Path, seed: int) -> None:
    from stylelora.adapters.checkpoint_files import TrainingState, save_checkpoint

    a = tiny_adapter(seed).state
    opt = {"state": {0: {"step": torch.tensor(float(seed)), "exp_avg": torch.full((4, 32), float(seed))}},
           "param_groups": [{"lr": 1e-4, "params": [0]}]}
    state = TrainingState(step=5, epoch=0, batch=5, lora=a, optimizer=opt, lr_scheduler={"last_epoch": seed},
                          rng={"noise": torch.zeros(8, dtype=torch.uint8)}, extra={})
    save_checkpoint(folder / "checkpoints" / "step-000005", state)


def save_config(folder: Path, seed: int) -> None:
    from stylelora.core.config import Config

    Config().with_overrides({"train.steps": 100 + seed}).save(folder / "config.toml")


def save_caption(folder: Path, seed: int) -> None:
    from stylelora.data.dataset import write_caption

    write_caption(folder / "cat.png", f"a cat, version {seed}, " + "flat style " * 50)


SAVES = {"kohya adapter": save_adapter_kohya, "diffusers adapter": save_adapter_diffusers,
         "checkpoint": save_checkpoint, "config": save_config, "caption": save_caption}


@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize("kind", list(SAVES))
def test_a_save_failing_half_way_leaves_the_previous_file_intact(kind, error, tmp_path, monkeypatch) -> None:
    save = SAVES[kind]
    save(tmp_path, seed=1)
    before = snapshot(tmp_path)
    # the checkpoint writes three files: fail in the middle of the second one
    failing = FailingWrites(monkeypatch, ERRORS[error], fail_at=2 if kind == "checkpoint" else 1)
    expected = DiskFullError if error == "disk full" else type(ERRORS[error])
    with pytest.raises(expected) as raised:
        save(tmp_path, seed=2)
    assert failing.failed_on is not None  # the failure really hit mid-write
    assert snapshot(tmp_path) == before  # the old files, byte for byte, and no partial or temporary file
    if error == "disk full":
        assert "disk is full" in str(raised.value) and "intact" in str(raised.value)
    monkeypatch.undo()
    save(tmp_path, seed=2)  # and the next save works
    assert snapshot(tmp_path) != before


def test_a_new_checkpoint_failing_half_way_leaves_no_folder(tmp_path, monkeypatch) -> None:
    from stylelora.adapters.checkpoint_files import list_checkpoints

    FailingWrites(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), fail_at=2)
    with pytest.raises(DiskFullError):
        save_checkpoint(tmp_path, seed=1)
    assert list_checkpoints(tmp_path) == [] and snapshot(tmp_path) == {}
    assert list((tmp_path / "checkpoints").iterdir()) == []


# --- whole runs ----------------------------------------------------------------------------------------


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", n=2, size=(64, 64))


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--resolution", "64", "--rank", "2", "--output", str(out), *extra]


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_adapter(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run(capsys, *train_args(data, out, "--steps", "2"))[0] == 0
    before = snapshot(out / "checkpoints")
    adapter_files = [out / "run.safetensors", out / "diffusers/pytorch_lora_weights.safetensors"]
    adapters = {p: p.read_bytes() for p in adapter_files}

    FailingWrites(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), under="checkpoints")
    code, output = run(capsys, "train", str(out / "config.toml"), "--steps", "4", "--resume", "auto")
    assert code == 1 and "Traceback" not in output
    assert "the disk is full" in output and "step-000004" in output
    assert "step-000002, is intact" in output and "run.safetensors" in output and "--resume auto" in output
    assert snapshot(out / "checkpoints") == before  # step 2 as it was, and nothing of step 4
    assert all(path.read_bytes() == blob for path, blob in adapters.items())

    FailingWrites(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))  # the very first write
    code, output = run(capsys, "train", str(out / "config.toml"), "--steps", "4", "--resume", "auto")
    assert code == 1 and "config.toml: the disk is full" in output and "Traceback" not in output
    assert snapshot(out / "checkpoints") == before

    # space freed: the run continues from step 2
    monkeypatch.undo()
    code, output = run(capsys, "train", str(out / "config.toml"), "--steps", "4", "--resume", "auto")
    assert code == 0, output
    import json

    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def fault_in_unet(monkeypatch: pytest.MonkeyPatch, on_call: int, fault) -> None:
    """From the ``on_call``-th UNet forward pass on, ``fault(output)`` decides what happens."""
    from diffusers import UNet2DConditionModel

    real = UNet2DConditionModel.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        if args and getattr(args[0], "device", None) == torch.device("meta"):
            return real(self, *args, **kwargs)  # the estimate counts a step on meta tensors: not a training call
        calls["n"] += 1
        result = real(self, *args, **kwargs)
        return fault(result) if calls["n"] >= on_call else result

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)


def test_nan_loss_stops_with_the_last_good_checkpoint_and_advice(data, tmp_path, capsys, monkeypatch) -> None:
    from stylelora.adapters.checkpoint_files import list_checkpoints, load_checkpoint

    def nan(result):
        result.sample = result.sample * float("nan")
        return result

    fault_in_unet(monkeypatch, 3, nan)
    out = tmp_path / "run"
    code, output = run(capsys, *train_args(data, out, "--steps", "6", "--save-every", "2"))
    assert code == 1 and "Traceback" not in output
    assert "the loss became nan at step 3" in output
    assert "Lower the learning rate" in output and "bf16" in output and "check the data" in output
    assert "step-000002, is intact" in output and "--resume auto" in output
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    state = load_checkpoint(out / "checkpoints/step-000002")
    assert all(torch.isfinite(t).all() for part in state.lora.values() for t in part.values())


def test_out_of_memory_is_caught_with_advice(data, tmp_path, capsys, monkeypatch) -> None:
    def oom(result):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    fault_in_unet(monkeypatch, 2, oom)
    out = tmp_path / "run"
    code, output = run(capsys, *train_args(data, out, "--steps", "4", "--save-every", "1", "--batch-size", "2"))
    assert code == 1 and "Traceback" not in output
    assert "out of GPU memory at step 2 (batch size 2, resolution 64)" in output
    assert "a smaller batch (--batch-size 1" in output and "--resume auto" in output
    assert "step-000001, is intact" in output
    # the other ways to save memory are named when this version's config offers them
    from stylelora.core.config import all_fields, choices

    if "train.gradient_checkpointing" in all_fields():
        assert "--set train.gradient_checkpointing=true" in output
    if any("8bit" in str(c).lower() for c in choices("train.optimizer") or []):
        assert "an 8-bit optimizer (--set train.optimizer=" in output
    monkeypatch.undo()
    fault_in_unet(monkeypatch, 2, oom)
    code, output = run(capsys, *train_args(data, tmp_path / "r2", "--steps", "2", "--resolution", "256",
                                           "--train-text-encoder", "--set", "train.mixed_precision=no"))
    assert code == 1 and "out of GPU memory at step 2 (batch size 1, resolution 256)" in output
    assert "--resolution 192" in output and "without --train-text-encoder" in output
    assert "--set train.mixed_precision=bf16" in output and "no checkpoint was saved yet" in output


def test_other_runtime_errors_are_not_disguised_as_out_of_memory(data, tmp_path, monkeypatch) -> None:
    from conftest import tiny_config
    from stylelora.training.loop import train

    def bug(result):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    fault_in_unet(monkeypatch, 1, bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(tiny_config(data, tmp_path / "run"))


def test_an_image_that_breaks_after_the_check_names_the_file(data, tmp_path, monkeypatch) -> None:
    """A file replaced while training runs gives a DataError naming it, not a Pillow traceback."""
    from conftest import tiny_config
    from stylelora.data.dataset import ImageLoadError, load_image
    from stylelora.training.loop import train

    draw_image(data / "late.png", (64, 64), seed=9)
    import stylelora.data.doctor

    real = stylelora.data.doctor.check_dataset

    def check_then_break(*args, **kwargs):
        report = real(*args, **kwargs)
        (data / "late.png").write_bytes(b"gone bad")
        return report

    monkeypatch.setattr(stylelora.data.doctor, "check_dataset", check_then_break)
    with pytest.raises(ImageLoadError, match="late.png: not an image"):
        train(tiny_config(data, tmp_path / "run", **{"train.batch_size": 3}))
    with pytest.raises(ImageLoadError):
        load_image(data / "late.png")
