"""What the interop tests compare against: base weights, stylelora's exports and the outputs they give.

    python tests/interop_reference.py FOLDER

writes, for builtin:tiny (SD1) and builtin:tiny-sdxl, under FOLDER/<kind>/:
- ``base.safetensors``: the base model's UNet and text-encoder weights, keyed by the conventional
  (transformers 4) module names, so another transformers builds the very same model from them;
- ``style.safetensors`` (kohya) and ``diffusers/pytorch_lora_weights.safetensors``: one random LoRA
  (rank 4, alpha 2; LoCon rank 2, alpha 3; UNet and text encoders) exported by stylelora in fp32;
- ``outputs.safetensors``: fixed inputs, and the UNet's and text encoders' outputs for them: of the base
  (``<part>.base``), of the base with every delta alpha/rank·up@down added by hand (``<part>.truth``),
  and with each file loaded by this diffusers' ``load_lora_weights`` (``<part>.kohya``, ``<part>.diffusers``).

.ci/old-stack runs this with the newest versions, then the interop tests with the oldest ones
against its output (STYLELORA_INTEROP_REFERENCE); without that variable the tests write their own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import make_adapter  # noqa: E402
from stylelora.adapters.formats import save_diffusers, save_kohya  # noqa: E402
from stylelora.families import load_base_model  # noqa: E402
from stylelora.model.base import BaseModel  # noqa: E402
from stylelora.model.text import conventional_text_path  # noqa: E402

KINDS = ("tiny", "tiny-sdxl")
FORMATS = ("kohya", "diffusers")
FILES = {"kohya": "style.safetensors", "diffusers": "diffusers/pytorch_lora_weights.safetensors"}


def conventional(part: str, name: str) -> str:
    """A parameter's name as transformers 4 spells it (``text_model.encoder...``), whatever this one does."""
    if part == "unet":
        return f"unet.{name}"
    module, _, leaf = name.rpartition(".")
    return f"{part}.{conventional_text_path(module)}.{leaf}"


def base_weights(model: BaseModel) -> dict[str, torch.Tensor]:
    return {conventional(part, n): p.detach().clone().contiguous()
            for part, module in model.parts() for n, p in module.named_parameters()}


def model_with_weights(kind: str, weights: dict[str, torch.Tensor]) -> BaseModel:
    """builtin:<kind>'s architecture with exactly ``weights`` (every parameter, none left over)."""
    model = load_base_model(f"builtin:{kind}")
    used = set()
    with torch.no_grad():
        for part, module in model.parts():
            for name, p in module.named_parameters():
                key = conventional(part, name)
                p.copy_(weights[key])
                used.add(key)
    assert used == set(weights), sorted(set(weights) - used)[:5]
    return model


def fixed_inputs(model: BaseModel) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    unet = model.unet.config
    x = {
        "latents": torch.randn(1, unet.in_channels, 8, 8, generator=gen),
        "timestep": torch.tensor([637]),
        "context": torch.randn(1, 12, unet.cross_attention_dim, generator=gen),
        "ids": torch.randint(0, model.text_encoder.config.vocab_size, (1, 16), generator=gen),
    }
    if model.kind == "sdxl":
        pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        x["text_embeds"] = torch.randn(1, pooled, generator=gen)
        x["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    return x


@torch.no_grad()
def outputs(model: BaseModel, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's noise prediction and each text encoder's last hidden state for the fixed inputs."""
    extra = {}
    if "time_ids" in x:
        extra["added_cond_kwargs"] = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    out = {"unet": model.unet(x["latents"], x["timestep"], encoder_hidden_states=x["context"], **extra).sample}
    for part, module in model.parts()[1:]:
        out[part] = module(x["ids"])[0]
    return out


def with_deltas_added(model: BaseModel, adapter) -> BaseModel:
    """The ground truth, without any loader: every adapted weight W + alpha/rank · up @ down."""
    with torch.no_grad():
        for part, module in model.parts():
            params = dict(module.named_parameters())
            for path in adapter.modules(part):
                sd = adapter.state[part]
                down, up = sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"]
                weight = params[f"{path}.weight"]
                delta = (up.flatten(1).double() @ down.flatten(1).double()).reshape(weight.shape)
                weight += (delta * adapter.alpha_of(part, path) / down.shape[0]).float()
    return model


def write(folder: Path) -> Path:
    for kind in KINDS:
        out = folder / kind
        adapter = make_adapter(kind, rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, seed=7)
        model = load_base_model(f"builtin:{kind}")
        weights = base_weights(model)
        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out / "base.safetensors"))
        save_kohya(out / FILES["kohya"], adapter, model, precision="fp32")
        save_diffusers(out / "diffusers", adapter, model, precision="fp32")
        x = fixed_inputs(model)
        results = {f"input.{k}": v for k, v in x.items()}
        results.update({f"{p}.base": v for p, v in outputs(model, x).items()})
        truth = with_deltas_added(model_with_weights(kind, weights), adapter)
        results.update({f"{p}.truth": v for p, v in outputs(truth, x).items()})
        for fmt in FORMATS:
            loaded = model_with_weights(kind, weights)
            path = out / FILES[fmt]
            loaded.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="style")
            results.update({f"{p}.{fmt}": v for p, v in outputs(loaded, x).items()})
        save_file({k: v.contiguous() for k, v in results.items()}, str(out / "outputs.safetensors"))
    return folder


def read(folder: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights, inputs, outputs) of one kind."""
    results = load_file(str(folder / kind / "outputs.safetensors"))
    x = {k.removeprefix("input."): v for k, v in results.items() if k.startswith("input.")}
    return load_file(str(folder / kind / "base.safetensors")), x, results


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(f"interop reference written to {write(Path(sys.argv[1]))}")
