"""Every mistake a user can make with config, paths and files: exit 1, one message naming it, no traceback.

Most cases run ``stylelora.cli.main`` in this process (the same code path as the command, without
the start-up cost of a subprocess); one case runs the real command to check ``--debug``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from conftest import make_dataset, run_cli
from stylelora.cli import main


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# (name, setup(tmp) -> extra CLI args, text the message must contain)
CASES = {
    "invalid field value": (lambda t: ["--set", "train.lr=-1"], "train.lr: must be > 0, got -1"),
    "invalid field in TOML": (lambda t: [str(write(t / "c.toml", '[train]\nsteps = "many"\n'))],
                              "train.steps: must be an integer, got 'many'"),
    "out of range in TOML": (lambda t: [str(write(t / "c.toml", "[lora]\nrank = 0\n"))], "lora.rank: must be >= 1"),
    "wrong choice": (lambda t: ["--set", "train.lr_scheduler=cosin"], "train.lr_scheduler: must be one of"),
    "unknown TOML key": (lambda t: [str(write(t / "c.toml", "[train]\nsetps = 3\n"))],
                         "train.setps: unknown setting; did you mean 'train.steps'?"),
    "unknown TOML section": (lambda t: [str(write(t / "c.toml", "[trian]\nsteps = 3\n"))],
                             "trian: unknown setting; did you mean 'train'?"),
    "unknown --set key": (lambda t: ["--set", "data.resolutoin=64"], "did you mean 'data.resolution'?"),
    "TOML syntax error": (lambda t: [str(write(t / "c.toml", "[train]\nsteps = 3\nlr = = 1\n"))],
                          "c.toml: not valid TOML: Invalid value (at line 3, column 6)"),
    "config not UTF-8": (lambda t: [str(write(t / "c.toml", b"[data]\ntrigger_word = 'caf\xe9'\n"))],
                         "c.toml: the config file is not UTF-8 (byte 0xe9 at offset 26); save it as UTF-8"),
    "missing config": (lambda t: [str(t / "nope.toml")], "nope.toml: config file not found"),
    "folder given as config": (lambda t: [str(t / "data")], "is a folder, not a config file"),
    "missing dataset": (lambda t: ["--data", str(t / "no-data")], "no-data': no such folder"),
    "dataset is a file": (lambda t: ["--data", str(write(t / "f.txt", "x"))], "f.txt': is a file, not a folder"),
    "dataset without images": (lambda t: ["--data", str((t / "empty").mkdir() or t / "empty")], "no images found"),
    "missing model path": (lambda t: ["--model", str(t / "models/sd15")], "sd15': no such folder or file"),
    "missing model file": (lambda t: ["--model", str(t / "m.safetensors")], "m.safetensors': file not found"),
    "unknown built-in": (lambda t: ["--model", "builtin:huge"], "no such built-in model; built-ins are builtin:tiny"),
    "hub id offline": (lambda t: ["--model", "someone/some-model"], "'someone/some-model': could not be downloaded"),
    "folder is not a model": (lambda t: ["--model", str((t / "nm").mkdir() or t / "nm")], "no model_index.json"),
    "corrupt safetensors model": (lambda t: ["--model", str(write(t / "m.safetensors", b"\x10\0\0\0\0\0\0\0{oops"))],
                                  "m.safetensors': not a readable .safetensors file"),
    "output is a file": (lambda t: ["--output", str(write(t / "out.txt", "x"))], "train.output_dir: "),
    "output under a file": (lambda t: ["--output", str(write(t / "out.txt", "x") / "run")],
                            "out.txt' is a file"),
    "output inside the dataset": (lambda t: ["--output", str(t / "data" / "run")], "inside the dataset folder"),
    "resume from a non-checkpoint": (lambda t: ["--resume", str(t)], "train.resume: "),
    "resume from a corrupt checkpoint": (
        lambda t: ["--resume", str(write(t / "ck/state.json", "{").parent), "--output", str(t / "r")],
        "ck: not a complete stylelora checkpoint"),
    "resume from a damaged checkpoint with an earlier one": (
        lambda t: ["--resume", str(write(t / "run/checkpoints/step-000004/state.json", "{").parent), "--output",
                   str(write(t / "run/checkpoints/step-000002/state.json", "{}").parents[2])],
        "step-000004: not a complete stylelora checkpoint (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)); resume from the one before it with --resume "),
    "batch larger than the dataset": (lambda t: ["--batch-size", "9"], "cannot fill one batch of 9"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_and_path_errors_exit_1_naming_the_field_or_path(case: str, tmp_path: Path, capsys) -> None:
    setup, expected = CASES[case]
    data = make_dataset(tmp_path / "data", n=2)
    extra = setup(tmp_path)
    config = [extra.pop(0)] if extra and not extra[0].startswith("-") else []
    args = ["train", *config, "--data", str(data), "--steps", "1", "--resolution", "64",
            "--output", str(tmp_path / "o"), *extra]
    code, output = cli(capsys, *args)
    assert code == 1, output
    assert expected in output
    assert "Traceback" not in output
    assert output.strip().startswith("error:") or "\nerror:" in output


def test_debug_shows_the_traceback_behind_the_message(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=1)
    r = run_cli("train", "--data", str(data), "--model", str(tmp_path / "x.safetensors"), "--resolution", "64",
                "--output", str(tmp_path / "out"), "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "x.safetensors': file not found" in r.stderr


def test_a_bug_shows_its_traceback_and_asks_for_a_report(tmp_path: Path, capsys, monkeypatch) -> None:
    import stylelora.data.doctor

    def broken(*a: object, **k: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(stylelora.data.doctor, "check_dataset", broken)
    code, output = cli(capsys, "check-data", str(tmp_path))
    assert code == 1 and "Traceback" in output and "ZeroDivisionError: a bug" in output
    assert "this is a bug in stylelora" in output and "report it" in output


def test_check_data_errors(tmp_path: Path, capsys) -> None:
    code, output = cli(capsys, "check-data", str(tmp_path / "missing"))
    assert code == 1 and "no such folder" in output and "Traceback" not in output
    code, output = cli(capsys, "check-data", str(tmp_path), "--resolution", "100")
    assert code == 1 and "data.resolution: must be a multiple of 8" in output


# --- untrusted files: nothing is ever unpickled ------------------------------------------------------


class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",))


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of malicious files with every extension stylelora might be handed, and the marker path."""
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil"
    evil.mkdir()
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.is_file()  # the payload works: unpickling it would leave the marker

    for suffix in (".ckpt", ".pt", ".pth", ".bin"):
        torch.save({"state_dict": Payload(marker)}, evil / f"model{suffix}")
    (evil / "pickle.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    # a checkpoint folder whose weights are pickles
    ck = evil / "checkpoints" / "step-000001"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text('{"complete": true, "step": 1}')
    for name in ("lora.safetensors", "optimizer.safetensors"):
        (ck / name).write_bytes(pickle.dumps(Payload(marker)))
    # a diffusers folder whose UNet and VAE weights are pickled .bin files
    from stylelora.families.sd1 import build_tiny

    folder = evil / "diffusers-model"
    build_tiny().save_pretrained(folder, safe_serialization=False)
    for weights in folder.rglob("*.bin"):
        torch.save({"weight": Payload(marker)}, weights)
    # a dataset holding pickles named like images and weights
    data = make_dataset(tmp_path / "data", n=2)
    (data / "photo.png").write_bytes(pickle.dumps(Payload(marker)))
    torch.save(Payload(marker), data / "cache.pt")
    return evil, marker


def test_pickled_files_are_never_unpickled(planted, tmp_path: Path, capsys) -> None:
    evil, marker = planted
    data = tmp_path / "data"
    train = ["train", "--data", str(data), "--steps", "1", "--resolution", "64"]
    runs = [
        *[[*train, "--model", str(evil / f"model{s}"), "--output", str(tmp_path / f"o{s}")]
          for s in (".ckpt", ".pt", ".pth", ".bin")],
        [*train, "--model", str(evil / "pickle.safetensors"), "--output", str(tmp_path / "o1")],
        [*train, "--resume", str(evil / "checkpoints" / "step-000001"), "--output", str(tmp_path / "o3")],
        ["check-data", str(data), "--resolution", "64"],
        ["export", str(evil / "model.pt"), "--format", "kohya", "--out", str(tmp_path / "x.safetensors")],
        ["export", str(evil / "pickle.safetensors"), "--format", "diffusers", "--out", str(tmp_path / "xd")],
        ["generate", "--model", "builtin:tiny", "--lora", str(evil / "model.pt"), "--prompt", "p",
         "--steps", "1", "--width", "64", "--height", "64", "--out", str(tmp_path / "g.png")],
        ["generate", "--model", str(evil / "model.ckpt"), "--prompt", "p", "--out", str(tmp_path / "g2.png")],
    ]
    for args in runs:
        code, output = cli(capsys, *args)
        assert not marker.exists(), f"unpickled by: {args}"
        assert "Traceback" not in output, (args, output[output.find("Traceback") - 300:])
        assert code == (0 if args[0] == "check-data" else 1), (args, output)
        if args[0] == "export":
            assert f"{Path(args[1]).name}: " in output, output
        if args[0] == "generate":
            assert "model.pt" in output or "model.ckpt" in output, output
    # diffusers reads a folder's .bin weights with torch.load(weights_only=True), which refuses the payload;
    # run as a real process, since diffusers' log handler keeps the stderr of the first test that used it.
    r = run_cli(*train, "--model", str(evil / "diffusers-model"), "--output", str(tmp_path / "o2"))
    assert r.returncode == 1 and "cannot load this diffusers folder" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
    code, output = cli(capsys, *train, "--model", str(evil / "model.ckpt"), "--output", str(tmp_path / "o4"))
    assert "pickled checkpoints (.ckpt) can run code" in output

    from stylelora.adapters.formats import load_adapter, read_safetensors
    from stylelora.core.errors import FormatError

    for path in (evil / "model.pt", evil / "pickle.safetensors"):
        with pytest.raises(FormatError, match=path.name):
            load_adapter(path, {"unet": []})
        with pytest.raises(FormatError, match=path.name):
            read_safetensors(path)
    assert not marker.exists()


def test_resuming_with_other_lora_settings_is_explained(tmp_path: Path, capsys) -> None:
    data = make_dataset(tmp_path / "data", n=2, size=(64, 64))
    out = tmp_path / "run"
    code, output = cli(capsys, "train", "--data", str(data), "--steps", "1", "--resolution", "64", "--rank", "2",
                       "--output", str(out))
    assert code == 0, output
    config = str(out / "config.toml")
    for change, why in ((["--rank", "4"], "was lora.rank different?"),
                        (["--train-text-encoder"], "was --train-text-encoder")):
        code, output = cli(capsys, "train", config, "--steps", "2", "--resume", "auto", *change)
        assert code == 1 and "Traceback" not in output
        assert "train.resume: the checkpoint" in output and "step-000001" in output and why in output


def test_a_truncated_adapter_names_the_file(tmp_path: Path) -> None:
    from test_atomic import save_adapter_kohya

    from stylelora.adapters.formats import load_adapter
    from stylelora.core.errors import FormatError

    save_adapter_kohya(tmp_path, seed=1)
    path = tmp_path / "style.safetensors"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(FormatError, match=r"style.safetensors: not a readable .safetensors file .*truncated"):
        load_adapter(path, {"unet": ["down_blocks.0.attentions.0.proj_in"]})
