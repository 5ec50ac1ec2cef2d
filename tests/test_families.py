"""The model-family interface: only stylelora/families knows which family a model is, and a new family is one
module plus one line of registration. A family made here (an SD1 clone whose blocks are named differently)
walks through training, the preview and export without a line changed anywhere else."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors import safe_open

from conftest import make_dataset, tiny_config
from stylelora import families
from stylelora.adapters.formats import load_adapter
from stylelora.cli import main
from stylelora.core.config import Config
from stylelora.core.errors import ConfigError
from stylelora.families.sd1 import SD1, SD1_SIZES, build_sd1
from stylelora.model.base import Configs
from stylelora.preview.previewer import Previewer
from stylelora.training.loop import train

ROOT = Path(__file__).resolve().parent.parent


def kind_tests(files: list[Path], root: Path = ROOT) -> list[str]:
    """Every line of ``files`` that tests which model it has: a kind compared with a kind's name, a table keyed
    by kinds, a ``KIND_*`` table looked up (as path:line: text)."""
    kinds = "|".join(re.escape(k) for k in sorted(families.kinds(), key=len, reverse=True))
    literal = rf"[\"']({kinds})[\"']"
    patterns = [
        re.compile(rf"kind\s*(==|!=)\s*{literal}"),  # kind == "sdxl", model.kind != "sd1"
        re.compile(rf"{literal}\s*(==|!=)\s*[\w.]*kind\b"),
        re.compile(rf"kind\s+(not\s+)?in\s*[(\[{{][^)\]}}]*{literal}"),  # kind in ("sdxl", "sd2-v")
        re.compile(rf"{literal}\s*:"),  # {"sd1": ..., "sdxl": ...}
        re.compile(r"\bKIND_[A-Z_]+\b"),  # KIND_NAMES[kind], KIND_PRESETS
    ]
    found = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in patterns):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_module_outside_the_families_tests_the_model_kind() -> None:
    library = [p for p in (ROOT / "stylelora").rglob("*.py") if "families" not in p.relative_to(ROOT).parts]
    shells = [ROOT / "app.py", *(ROOT / "webui").rglob("*.py")]
    assert kind_tests(library + shells) == []


def test_the_kind_test_finds_what_it_looks_for(tmp_path: Path) -> None:
    code = tmp_path / "offender.py"
    code.write_text('if model.kind == "sdxl":\n    pass\nNAMES = {"sd1": "SD1.x"}\nx = kind in ("sdxl", "sd2-v")\n'
                    'y = KIND_PRESETS[kind]\nok = kind == "sdpa" or key in ("v2", "sdxl")  # not a model kind\n')
    assert [line.split(": ", 1)[0] for line in kind_tests([code], tmp_path)] == [
        "offender.py:1", "offender.py:3", "offender.py:4", "offender.py:5"]


# --- a family of our own: one module (this class) plus one line of registration ----------------------------

CLONE_UNET = {**SD1_SIZES["tiny"]["unet"], "cross_attention_dim": 24}
CLONE_CLIP = {**SD1_SIZES["tiny"]["clip"], "hidden_size": 24, "projection_dim": 24}


def build_clone(prediction_type: str = "epsilon") -> Any:
    """SD1's tiny built-in at another width: its 24-wide cross-attention is how the family knows it."""
    return build_sd1({**SD1_SIZES["tiny"], "unet": CLONE_UNET, "clip": CLONE_CLIP}, prediction_type)


class Clone(SD1):
    """An SD1 clone whose blocks users call ``enc.N`` and ``dec.N`` and whose adapters say so."""

    name = "clone"
    kinds: ClassVar[dict[str, str]] = {"clone": "SD1 clone"}
    builtins: ClassVar[dict[str, Any]] = {"tiny-clone": build_clone}
    base_model_version: ClassVar[dict[str, str]] = {"clone": "sd_v1"}
    modelspec_architecture: ClassVar[dict[str, str]] = {"clone": "stylelora-test-clone"}
    names = {"enc": "down", "dec": "up"}

    def detect(self, configs: Configs) -> str | None:
        return "clone" if configs.get("denoiser", "cross_attention_dim") == 24 else None

    def _sd(self, selectors: Any) -> list[str]:
        return [re.sub(r"^(enc|dec)\b", lambda m: self.names[m.group(1)], s) for s in selectors]

    def check_blocks(self, selectors: Any, field: str = "lora.blocks") -> None:
        if any(not re.match(r"^(enc|dec)\.\d+$", s) for s in selectors):
            raise ConfigError(f"{field}: the clone's blocks are enc.N and dec.N, got {list(selectors)}")

    def select_blocks(self, paths: Any, selectors: Any, field: str = "lora.blocks", what: str = "") -> list[str]:
        self.check_blocks(selectors, field)
        return super().select_blocks(paths, self._sd(selectors), field, what)


@pytest.fixture
def clone() -> Any:
    family = families.register(Clone())
    yield family
    families.unregister(family)


def test_a_registered_family_is_detected_trained_previewed_and_exported(tmp_path: Path, clone: Any) -> None:
    data = make_dataset(tmp_path / "data")
    assert families.load_base_model("builtin:tiny-clone").family is clone
    assert Config().with_overrides({"model.kind": "clone"}).model.kind == "clone"
    with pytest.raises(ConfigError, match="the clone's blocks are enc.N and dec.N"):
        Config().with_overrides({"model.kind": "clone", "lora.blocks": ["up.1"]})

    run = tmp_path / "run"
    result = train(tiny_config(data, run, **{"model.name": "builtin:tiny-clone", "lora.blocks": ["dec.1"],
                                             "train.steps": 2}))
    adapter = load_adapter(result.adapter_paths[0], families.load_base_model("builtin:tiny-clone"))
    assert adapter.modules("unet") and all(m.startswith("up_blocks.1.") for m in adapter.modules("unet"))
    with safe_open(str(result.adapter_paths[0]), framework="pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stylelora-test-clone/lora"

    preview = Previewer("builtin:tiny-clone")
    name = preview.attach(run)
    base, strength_0 = preview.base("a cat", steps=2), preview.generate("a cat", adapter=name, scale=0, steps=2)
    trained = preview.generate("a cat", adapter=name, scale=1, steps=2)
    assert list(base.getdata()) == list(strength_0.getdata()) and list(trained.getdata()) != list(base.getdata())

    out = tmp_path / "exported.safetensors"
    assert main(["export", str(run), "--format", "kohya", "--precision", "fp32", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        names = {f"lora_unet_{m.replace('.', '_')}" for m in adapter.modules("unet")}
        assert {k.split(".")[0] for k in f.keys()} == names
        exported = {k: f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")}
    assert all(torch.isfinite(t).all() for t in exported.values())


def test_a_family_leaves_the_registry_as_it_found_it(clone: Any) -> None:
    assert "clone" in families.kinds() and "builtin:tiny-clone" in families.builtin_names()
    assert families.FAMILIES[-1].name == "sd1"  # registered ahead of the catch-all
    families.unregister(clone)
    try:
        assert "clone" not in families.kinds()
        with pytest.raises(ConfigError, match="model.kind: must be one of"):
            Config().with_overrides({"model.kind": "clone"})
    finally:
        families.register(clone)
