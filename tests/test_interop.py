"""stylelora's exports load in every diffusers/transformers the project supports, with the same result.

These tests run twice in CI: in the main environment (the newest versions), and in .ci/old-stack's
environment of the oldest versions pyproject.toml declares (transformers 4), against the files and
outputs the newest versions wrote (STYLELORA_INTEROP_REFERENCE; see interop_reference.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_loaded_cleanly, captured_logs
from interop_reference import FILES, FORMATS, KINDS, model_with_weights, outputs, read, write
from stylelora.adapters.formats import load_adapter, save_diffusers, save_kohya

pytestmark = pytest.mark.interop
TOLERANCE = 1e-5  # fp32, absolute


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("STYLELORA_INTEROP_REFERENCE")
    return Path(given) if given else write(tmp_path_factory.mktemp("interop-reference"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_exports_load_here_without_warnings_and_give_the_newest_versions_outputs(reference: Path, kind: str,
                                                                                 fmt: str) -> None:
    weights, x, expected = read(reference, kind)
    model = model_with_weights(kind, weights)
    base = outputs(model, x)
    for part, value in base.items():  # the same base model as the newest versions had
        torch.testing.assert_close(value, expected[f"{part}.base"], atol=TOLERANCE, rtol=0, msg=f"{part} base")
    path = reference / kind / FILES[fmt]
    with captured_logs() as records:
        model.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="style")
    assert_loaded_cleanly(records)  # no unexpected or missing keys, nothing left unloaded
    got = outputs(model, x)
    assert set(got) == {p for p, _ in model.parts()}
    for part, value in got.items():
        # what the newest diffusers/transformers gave, and the deltas added by hand: W + alpha/rank · up @ down
        torch.testing.assert_close(value, expected[f"{part}.{fmt}"], atol=TOLERANCE, rtol=0, msg=f"{part} {fmt}")
        torch.testing.assert_close(value, expected[f"{part}.truth"], atol=TOLERANCE, rtol=0, msg=f"{part} truth")
        assert (value - base[part]).abs().max() > 1e-3, f"{part}: the adapter changed nothing"


@pytest.mark.parametrize("kind", KINDS)
def test_exports_written_here_equal_the_newest_versions_files(reference: Path, kind: str, tmp_path: Path) -> None:
    weights, _, _ = read(reference, kind)
    model = model_with_weights(kind, weights)
    adapter = load_adapter(reference / kind / FILES["kohya"], model)
    written = {"kohya": save_kohya(tmp_path / "style.safetensors", adapter, model, precision="fp32"),
               "diffusers": save_diffusers(tmp_path / "diffusers", adapter, model, precision="fp32")}
    for fmt, path in written.items():  # the same names (text_model. included) and tensors, whatever CLIP calls them
        ours, newest = load_file(path), load_file(reference / kind / FILES[fmt])
        assert ours.keys() == newest.keys(), fmt
        assert all(torch.equal(ours[k], newest[k]) for k in ours), fmt
