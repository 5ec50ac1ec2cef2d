"""A base model loaded from files computes bit for bit as the same weights built in code.

safetensors maps a file's tensors at 8-byte offsets, and MKL's matrix-vector products (a Linear on one
row, as the UNet's time embedding for one image) round differently at such addresses than at the 64-byte
boundaries torch allocates on, on AVX2 CPUs (AMD EPYC). ``load_base_model`` gives every loaded tensor
memory of its own, so a saved and reloaded model (a merged folder at strength 0) renders as its source.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stylelora.families import load_base_model
from stylelora.families.ldm_single_file import save_single_file
from stylelora.families.loading import TENSOR_ALIGNMENT
from stylelora.model.base import BaseModel


def outputs(model: BaseModel) -> dict[str, torch.Tensor]:
    """Each network on fixed inputs, one image (batch 1: the time embedding is a one-row product)."""
    g = torch.Generator().manual_seed(0)
    latents, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    ids = torch.randint(0, 200, (1, 77), generator=g)
    with torch.no_grad():
        return {"unet": model.unet(latents, 10, states).sample,
                "text_encoder": model.text_encoder(ids).last_hidden_state,
                "vae": model.vae.decode(latents).sample}


def misaligned(model: BaseModel) -> list[str]:
    modules = {"vae": model.vae, **dict(model.parts())}
    return [f"{part}.{name}" for part, module in modules.items()
            for name, t in [*module.named_parameters(), *module.named_buffers()]
            if t.data_ptr() % TENSOR_ALIGNMENT]


@pytest.mark.parametrize("layout", ["folder", "single file"])
def test_a_model_loaded_from_files_computes_as_the_same_model_built_in_code(tmp_path: Path, layout: str) -> None:
    built = load_base_model("builtin:tiny")
    folder = tmp_path / "tiny"
    built.pipeline.save_pretrained(folder, safe_serialization=True)
    if layout == "folder":
        loaded = load_base_model(str(folder))
    else:
        loaded = load_base_model(str(save_single_file(built.pipeline, tmp_path / "tiny.safetensors", "fp32")),
                                 str(folder))
    ours, theirs = outputs(loaded), outputs(built)
    for part in ours:
        assert torch.equal(ours[part], theirs[part]), part
    # the cause, which every CPU can check: the loaded weights sit where torch would have put them
    assert misaligned(built) == [] and misaligned(loaded) == []
