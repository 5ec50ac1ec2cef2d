"""Every CLI tool that writes a file the user names (export, merge, resize, split, generate, import-kohya) treats
``--out`` one way: a path of this machine, never written over without ``--force``, and merge never replaces a
folder of other files."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_adapter, run_cli
from stylelora.adapters.formats import save_kohya
from stylelora.core.config import Config
from stylelora.families import load_base_model

REFUSED = "exists; choose another name or pass --force to replace it"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA of builtin:tiny in kohya format that names its base model."""
    lora = make_adapter("tiny", rank=4, alpha=2.0, te=False)
    lora.metadata["stylelora.config"] = Config().with_overrides({"model.name": "builtin:tiny"}).to_toml()
    return save_kohya(tmp_path_factory.mktemp("adapter") / "style.safetensors", lora, load_base_model("builtin:tiny"),
                      precision="fp32")


def refused(r, path: Path) -> bool:
    return r.returncode == 1 and f"--out: {path} {REFUSED}" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("tool", ["export", "resize", "split"])
def test_an_adapter_tool_refuses_to_write_over_a_file_unless_forced(adapter: Path, tmp_path: Path, tool: str) -> None:
    """``stylelora export RUN --out x.safetensors`` twice replaced the first file without a word."""
    args = {"export": ["export", str(adapter), "--format", "kohya"], "resize": ["resize", str(adapter), "--rank", "2"],
            "split": ["split", str(adapter), "--keep", "mid"]}[tool]
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"the user's own file")
    assert refused(run_cli(*args, "--out", str(out)), out)
    assert out.read_bytes() == b"the user's own file"
    forced = run_cli(*args, "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert out.read_bytes() != b"the user's own file" and "verified" in forced.stdout
    # --out a folder: the file inside it (named after the adapter) is the one not written over
    (tmp_path / "style.safetensors").write_bytes(b"another")
    assert refused(run_cli(*args, "--out", str(tmp_path)), tmp_path / "style.safetensors")


def test_export_to_a_diffusers_folder_twice_is_refused_the_second_time(adapter: Path, tmp_path: Path) -> None:
    first = run_cli("export", str(adapter), "--format", "diffusers", "--out", str(tmp_path / "d"))
    assert first.returncode == 0, first.stderr
    assert refused(run_cli("export", str(adapter), "--format", "diffusers", "--out", str(tmp_path / "d")),
                   tmp_path / "d" / "pytorch_lora_weights.safetensors")


def test_merge_never_replaces_a_folder_of_other_files_and_refuses_an_earlier_merge(adapter: Path,
                                                                                   tmp_path: Path) -> None:
    """``stylelora merge --out ~/models`` deleted every file in ~/models and put the merged model there."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "other.safetensors").write_bytes(b"a model the user keeps")
    for force in ([], ["--force"]):
        r = run_cli("merge", "--model", "builtin:tiny", "--lora", str(adapter), "--out", str(models), *force)
        assert r.returncode == 1 and "is a folder of other files, not a diffusers model" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert [p.name for p in models.iterdir()] == ["other.safetensors"]
    merged = models / "merged"
    assert run_cli("merge", "--model", "builtin:tiny", "--lora", str(adapter), "--out", str(merged)).returncode == 0
    assert refused(run_cli("merge", "--model", "builtin:tiny", "--lora", str(adapter), "--out", str(merged)), merged)
    again = run_cli("merge", "--model", "builtin:tiny", "--lora", str(adapter), "--out", str(merged), "--force")
    assert again.returncode == 0, again.stderr
    assert (merged / "model_index.json").is_file()
    other = models / "other.safetensors"
    assert refused(run_cli("merge", "--model", "builtin:tiny", "--lora", str(adapter), "--out", str(other)), other)
    assert (models / "other.safetensors").read_bytes() == b"a model the user keeps"


def test_generate_refuses_to_write_over_a_png(tmp_path: Path) -> None:
    png = tmp_path / "x.png"
    args = ["generate", "--prompt", "a house", "--steps", "1", "--width", "64", "--height", "64", "--out", str(png)]
    assert run_cli(*args).returncode == 0
    before = png.read_bytes()
    assert refused(run_cli(*args, "--seed", "5"), png) and png.read_bytes() == before
    assert run_cli(*args, "--seed", "5", "--force").returncode == 0 and png.read_bytes() != before


@pytest.mark.parametrize("tool", ["export", "merge", "split", "generate"])
def test_a_windows_path_is_refused_not_made_a_file_of_that_name(adapter: Path, tmp_path: Path, tool: str) -> None:
    """``--out E:\\loras\\x.safetensors`` on Linux wrote a file called 'E:\\loras\\x.safetensors' in the current
    folder and reported success."""
    out = "E:\\loras\\x.png" if tool == "generate" else "E:\\loras\\x.safetensors"
    args = {"export": ["export", str(adapter), "--format", "kohya"],
            "merge": ["merge", "--model", "builtin:tiny", "--lora", str(adapter)],
            "split": ["split", str(adapter), "--keep", "mid"],
            "generate": ["generate", "--prompt", "a house", "--steps", "1", "--width", "64", "--height", "64"]}[tool]
    r = run_cli(*args, "--out", out, cwd=tmp_path)
    assert r.returncode == 1 and "is a Windows path (drive E:) from another machine" in r.stderr and out in r.stderr
    assert "give a path on this machine" in r.stderr and list(tmp_path.iterdir()) == []


def test_ctrl_c_during_a_merge_says_nothing_was_written_not_to_resume_a_run(
        adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C halfway through ``stylelora merge`` advised "continue from the last complete checkpoint with
    --resume auto", a training flag that means nothing to merge."""
    import stylelora.adapters.merge as merging
    from stylelora.cli import main

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(merging, "merge", interrupted)
    assert main(["merge", "--model", "builtin:tiny", "--lora", str(adapter), "--out", str(tmp_path / "m")]) == 130
    err = capsys.readouterr().err
    assert "interrupted; merge wrote nothing" in err and "--resume" not in err
    assert list(tmp_path.iterdir()) == []
