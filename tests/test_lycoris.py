"""A second, independent kohya loader: LyCORIS (lycoris-lora) builds its network from stylelora's kohya
file by matching each key's name to a module of the model, as sd-scripts and A1111's extension do.
LoRA and LoCon: every key matched, merged weights equal ours. LoHa and LoKr (trained through peft,
written in LyCORIS' layout): every key matched, the same weights and merged weights as ours, and
strength 0 is the base model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_fused_delta, make_adapter, make_dataset, run_cli, tiny_config, weights
from stylelora.adapters.adapter import NETWORK_NAMES, Adapter, ModelLayout
from stylelora.adapters.convert import export, open_adapter
from stylelora.adapters.formats import load_adapter, save_kohya, to_kohya
from stylelora.adapters.merge import merge
from stylelora.core.config import LoraConfig
from stylelora.core.errors import FormatError
from stylelora.families import family_of, load_base_model
from stylelora.model.base import BaseModel
from stylelora.model.lora import ADAPTER_NAME, add_lora, lora_alphas
from stylelora.training.loop import train


@pytest.fixture(autouse=True)
def sd_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    """LyCORIS 4 also lists the "TimestepEmbedding" class (for Anima) beside the name time_embedding.linear_1,
    so building its default network on an SD UNet asserts "duplicated lora name". Its SD targets
    (sd-scripts' list) avoid that; they do not change how a file's keys are matched."""
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_MODULE",
                        ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"])


def text_encoder_as_kohya_sees_it(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """sd-scripts, A1111 and ComfyUI walk CLIP with its modules under ``text_model.`` (transformers 4's
    layout). transformers 5 flattened CLIPTextModel, so there LyCORIS gets the same modules under that name."""
    if any(name.startswith("text_model.") for name, _ in text_encoder.named_modules()):
        return text_encoder
    holder = torch.nn.Module()
    holder.text_model = text_encoder
    return holder


@pytest.mark.parametrize("conv_rank", [0, 2], ids=["lora", "locon"])
def test_lycoris_matches_every_key_to_a_module_and_merges_the_same_weights(tmp_path: Path, conv_rank: int) -> None:
    adapter = make_adapter("tiny", rank=4, alpha=2.0, conv_rank=conv_rank, conv_alpha=3.0)
    base = load_base_model("builtin:tiny")
    path = save_kohya(tmp_path / "style.safetensors", adapter, base, precision="fp32")
    tensors = load_file(path)
    text_encoder = text_encoder_as_kohya_sees_it(base.text_encoder)

    network, _ = create_network_from_weights(1.0, str(path), None, text_encoder, base.unet, weights_sd=tensors)
    loras = network.unet_loras + network.text_encoder_loras
    # every module named in the file was found in the model by name, and LyCORIS built a LoRA/LoCon for it
    assert sorted(m.lora_name for m in loras) == sorted({k.split(".")[0] for k in tensors})
    assert {type(m).__name__ for m in loras} == {"LoConModule"}
    convs = [m for m in loras if tensors[f"{m.lora_name}.lora_down.weight"].dim() == 4
             and tensors[f"{m.lora_name}.lora_down.weight"].shape[-1] == 3]
    assert bool(convs) == bool(conv_rank)
    for m in loras:  # shapes as the file has them (LyCORIS copies them in; a broadcastable misfit would pass)
        assert m.lora_down.weight.shape == tensors[f"{m.lora_name}.lora_down.weight"].shape, m.lora_name
        assert m.lora_up.weight.shape == tensors[f"{m.lora_name}.lora_up.weight"].shape, m.lora_name
        assert float(m.alpha) == float(tensors[f"{m.lora_name}.alpha"]), m.lora_name

    before = {part: weights(module) for part, module in base.parts()}
    network.merge_to(text_encoder, base.unet, tensors, torch.float32, "cpu")
    # LyCORIS's merged weights are ours: W + alpha/rank * up @ down in every adapted module, the rest untouched
    assert_fused_delta(adapter, base, before)


@pytest.fixture(scope="module", params=["loha", "lokr"])
def trained(request, tmp_path_factory):
    """A LoHa or LoKr on the UNet (with the ResNet convs) and the text encoder, alpha != rank, 3 steps."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = load_base_model("builtin:tiny")
    config = tiny_config(make_dataset(tmp / "data"), tmp / "run", **{
        "lora.type": request.param, "lora.rank": 4, "lora.alpha": 2.0, "lora.conv_rank": 2, "lora.conv_alpha": 1.0,
        "lora.train_text_encoder": True, "train.lr": 1e-2, "export.precision": "fp32"})
    result = train(config, model=model)
    return request.param, result.adapter_paths, model


def lycoris_network(path: Path, base) -> tuple[object, dict]:
    """LyCORIS' kohya loader on ``base``, building its modules from the file."""
    return create_network_from_weights(1.0, str(path), base.vae, text_encoder_as_kohya_sees_it(base.text_encoder),
                                       base.unet, for_inference=True)


def test_only_a_lycoris_file_is_written_with_its_metadata(trained) -> None:
    network, paths, _ = trained
    assert [p.name for p in paths] == ["run.safetensors"]  # diffusers reads LoRA only
    with safe_open(str(paths[0]), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefix = "hada_" if network == "loha" else "lokr_"
    assert all(k.endswith(".alpha") or f".{prefix}" in k for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in keys)
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == network and args["conv_dim"] == "2" and args["conv_alpha"] == "1"


def test_lycoris_loads_every_key_and_builds_our_weights(trained) -> None:
    network, paths, model = trained
    base = load_base_model("builtin:tiny")
    lyco, weights = lycoris_network(paths[0], base)
    names = {k.split(".")[0] for k in weights}
    loaded = {m.lora_name: m for m in lyco.unet_loras + lyco.text_encoder_loras}
    assert set(loaded) == names and len(names) == 91  # UNet: 48 attention + 31 conv_dim modules; 12 TE
    ours = load_adapter(paths[0], base)
    compared = 0
    for part, module in model.parts():
        for path, layer in module.named_modules():
            if not isinstance(layer, LycorisLayer) or ADAPTER_NAME not in layer.r:
                continue
            trained_delta = layer.get_delta_weight(ADAPTER_NAME).detach()
            shape = tuple(trained_delta.shape)
            name = ("lora_unet_" if part == "unet" else "lora_te_text_model_") + path.replace(".", "_")
            # LyCORIS' forward adds get_weight() x multiplier (its merge_to scales LoHa twice: not used here)
            theirs = loaded[name].get_weight(shape).detach()
            assert torch.allclose(theirs, trained_delta, atol=1e-7, rtol=1e-5), name
            assert torch.allclose(ours.delta(part, path, shape), trained_delta, atol=1e-7, rtol=1e-5), name
            assert trained_delta.abs().max() > 0  # the steps moved it away from its zero start
            compared += 1
    assert compared == 91


def test_merged_weights_and_outputs_equal_lycoris_and_strength_0_is_the_base(trained, tmp_path: Path) -> None:
    network, paths, _ = trained
    merged = load_base_model(str(merge("builtin:tiny", paths[0], 1.0, tmp_path / "merged")))
    base = load_base_model("builtin:tiny")
    lyco, _ = lycoris_network(paths[0], base)
    for module in lyco.unet_loras + lyco.text_encoder_loras:  # LyCORIS' weights, merged as its forward uses them
        target = module.org_module[0]
        with torch.no_grad():
            target.weight += module.get_weight(tuple(target.weight.shape)) * module.multiplier
    for (_, a), (_, b) in zip(merged.parts(), base.parts(), strict=True):
        ours, theirs = a.state_dict(), b.state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.allclose(ours[key], theirs[key], atol=1e-6), key
    plain = load_base_model("builtin:tiny")
    zero = load_base_model(str(merge("builtin:tiny", paths[0], 0.0, tmp_path / "zero")))
    for (_, a), (_, b) in zip(zero.parts(), plain.parts(), strict=True):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    g = torch.Generator().manual_seed(0)
    latents, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(zero.unet(latents, 10, states).sample, plain.unet(latents, 10, states).sample)
        assert not torch.allclose(merged.unet(latents, 10, states).sample, plain.unet(latents, 10, states).sample)


def test_lycoris_networks_have_no_diffusers_file(trained, tmp_path: Path) -> None:
    _, paths, _ = trained
    r = run_cli("export", str(paths[0]), "--format", "diffusers", "--out", str(tmp_path / "d"), "--model",
                "builtin:tiny")
    assert r.returncode == 1 and "LyCORIS layout" in r.stderr and "Traceback" not in r.stderr
    ok = run_cli("export", str(paths[0]), "--format", "kohya", "--out", str(tmp_path / "again.safetensors"),
                 "--model", "builtin:tiny", "--precision", "fp32")
    assert ok.returncode == 0, ok.stderr
    assert "LoHa" in ok.stdout or "LoKr" in ok.stdout


def test_a_lycoris_run_folder_exports_from_its_checkpoint(trained, tmp_path: Path) -> None:
    """``stylelora export outputs/RUN --format kohya`` of a LoHa or LoKr run: the fp32 weights of the run's
    checkpoint (peft's hada_*/lokr_* keys) in LyCORIS' layout, the same file the run wrote; the checkpoint opens as
    an adapter too; the diffusers format says it holds LoRA only."""
    network, paths, _ = trained
    run, out = paths[0].parent, tmp_path / "exported.safetensors"
    r = run_cli("export", str(run), "--format", "kohya", "--out", str(out), "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert "from step-000003's fp32 weights" in r.stdout and NETWORK_NAMES[network] in r.stdout
    exported, written = load_file(out), load_file(paths[0])
    assert exported.keys() == written.keys() and all(torch.equal(exported[k], written[k]) for k in written)
    checkpoint = open_adapter(run / "checkpoints" / "step-000003" / "lora.safetensors", "builtin:tiny")
    assert checkpoint.adapter.network == network and checkpoint.format == "diffusers"
    with pytest.raises(FormatError, match="the diffusers format holds LoRA only"):
        export(run, "diffusers", tmp_path / "d")


def test_the_preview_renders_them_and_strength_0_is_the_base_image(trained) -> None:
    from stylelora.core.config import GenerateSettings
    from stylelora.preview.previewer import Previewer

    _, paths, _ = trained
    preview = Previewer("builtin:tiny")
    name = preview.attach(paths[0])
    settings = GenerateSettings(seed=3, steps=2)
    base = np.asarray(preview.base("a lighthouse", settings))
    assert np.array_equal(np.asarray(preview.generate("a lighthouse", settings, adapter=name, scale=0.0)), base)
    styled = np.asarray(preview.generate("a lighthouse", settings, adapter=name, scale=1.0))
    assert not np.array_equal(styled, base)


# --- at SD1.5's and SDXL's real shapes ---------------------------------------------------------------------
# LyCORIS' loader guesses a LoKr module's decompose factor from the stored shapes and builds that factor's
# split; the tiny built-ins factor alike either way, real models do not (SD1.5's 1920->640 3x3 convs at -1).
# One lone module per distinct shape (on the meta device, which is all peft and LyCORIS need to build their
# factors), trained layout from peft as stylelora injects it, random weights.

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # the rest: diffusers' defaults
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
REAL_KINDS = {"sd15": ("sd1", SD15_UNET, [CLIP_L]), "sdxl": ("sdxl", SDXL_UNET, [CLIP_L, CLIP_G])}
NETWORKS = [("loha", -1), ("lokr", -1), ("lokr", 4), ("lokr", 8)]


@pytest.fixture(scope="module", params=list(REAL_KINDS))
def real_model(request):
    """(name, meta-device UNet and text encoders of the real architecture, their layout)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kind, unet, clips = REAL_KINDS[request.param]
    with init_empty_weights():
        parts = {"unet": UNet2DConditionModel(**unet)}
        for part, cls, size in zip(["text_encoder", "text_encoder_2"], [CLIPTextModel, CLIPTextModelWithProjection],
                                   clips, strict=False):
            parts[part] = cls(CLIPTextConfig(**size))
    model = BaseModel(SimpleNamespace(**parts), request.param, kind, family_of(kind))
    return request.param, model, ModelLayout.of(model)


def lone_modules(model: BaseModel, lora) -> BaseModel:
    """The modules ``lora`` adapts, one per part and weight shape, at their own paths, on the meta device."""
    from types import SimpleNamespace

    from stylelora.model.blocks import LOCON_TARGETS, UNET_TARGETS

    names = {"unet": [*(lora.unet_targets or UNET_TARGETS), *LOCON_TARGETS]}
    parts: dict[str, torch.nn.Module] = {}
    for part, module in model.parts():
        targets, seen = names.get(part, lora.text_encoder_targets), set()
        holder = parts[part] = torch.nn.Module()
        for path, layer in module.named_modules():
            if (isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and layer.weight.shape not in seen
                    and any(path == t or path.endswith("." + t) for t in targets)):
                seen.add(layer.weight.shape)
                *owners, leaf = path.split(".")
                node = holder
                for owner in owners:
                    if not hasattr(node, owner):
                        node.add_module(owner, torch.nn.Module())
                    node = getattr(node, owner)
                node.add_module(leaf, layer)
    return BaseModel(SimpleNamespace(vae=torch.nn.Module(), **parts), model.name, model.kind, model.family)


def trained_at_real_shapes(model: BaseModel, network: str, factor: int) -> Adapter:
    """peft's LoHa/LoKr layers as stylelora injects them for training (UNet with the ResNet convs, text
    encoders), with random weights: the canonical adapter a run would export."""
    from peft import get_peft_model_state_dict

    lora = LoraConfig(type=network, rank=8, alpha=4.0, conv_rank=4, conv_alpha=1.0, lokr_factor=factor,
                      train_text_encoder=True, text_encoders="both")
    lone = lone_modules(model, lora)
    add_lora(lone, lora)
    g = torch.Generator().manual_seed(0)
    state = {part: {k: torch.randn(v.shape, generator=g) * 0.1  # peft made them on the meta device, as its base
                    for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME).items()}
             for part, module in lone.parts()}
    return Adapter.from_module_alphas(state, lora_alphas(lone))


def kohya_holders(layout: ModelLayout, names: set[str]) -> tuple[torch.nn.Module, torch.nn.Module | list]:
    """A UNet and text encoder(s) as LyCORIS' kohya loader walks them: modules named so that prefix + name
    is the file's module name, of the real module's shape (meta device)."""
    unet, encoders = torch.nn.Module(), {"text_encoder": torch.nn.Module(), "text_encoder_2": torch.nn.Module()}
    for name in names:
        part, path = layout.kohya.reverse[name]
        shape = layout.shapes[part][path]
        layer = (torch.nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), device="meta") if len(shape) == 4
                 else torch.nn.Linear(shape[1], shape[0], device="meta"))
        holder = unet if part == "unet" else encoders[part]
        holder.add_module(name.removeprefix(layout.family.kohya_prefix(part)), layer)
    return unet, (list(encoders.values()) if layout.kind == "sdxl" else encoders["text_encoder"])


def lycoris_rebuilds(path: Path, layout: ModelLayout) -> dict[str, object]:
    """LyCORIS' own kohya loader on ``path``: its module per file module name, each checked against the file."""
    tensors = load_file(path)
    names = {k.split(".")[0] for k in tensors}
    unet, encoders = kohya_holders(layout, names)
    network, _ = create_network_from_weights(1.0, str(path), None, encoders, unet, weights_sd=tensors,
                                             for_inference=True)
    loaded = {m.lora_name: m for m in network.unet_loras + network.text_encoder_loras}
    assert set(loaded) == names  # every module of the file, and only those
    for name, module in loaded.items():
        assert type(module).__name__ in ("LohaModule", "LokrModule"), name
        stored = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".") and
                  not k.endswith(".alpha")}
        for param, value in stored.items():  # copy_ would broadcast a misfit of size 1: compare shapes
            assert tuple(getattr(module, param).shape) == tuple(value.shape), (name, param)
    return loaded


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """Equal up to fp32 rounding: within ``rel`` of the largest entry (allclose is slow at 30M entries)."""
    with torch.no_grad():
        return a.shape == b.shape and float(torch.sub(a, b).abs_().max()) <= rel * float(b.abs().max())


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys")  # samplers: deduplicated away
@pytest.mark.parametrize(("network", "factor"), NETWORKS, ids=[f"{n}{'' if f == -1 else f}" for n, f in NETWORKS])
def test_lycoris_rebuilds_every_module_at_real_shapes_with_our_deltas(real_model, network: str, factor: int,
                                                                      tmp_path: Path) -> None:
    _, model, layout = real_model
    adapter = trained_at_real_shapes(model, network, factor)
    path = save_kohya(tmp_path / "style.safetensors", adapter, layout, precision="fp32")  # verified on writing
    loaded = lycoris_rebuilds(path, layout)
    ours = load_adapter(path, layout)
    kinds = set()
    for part in adapter.state:
        for module_path in adapter.modules(part):
            shape = layout.shapes[part][module_path]
            kinds.add("conv" if len(shape) == 4 and shape[2] * shape[3] > 1 else "linear")
            trained = adapter.delta(part, module_path, shape)
            # the weight LyCORIS' forward adds (get_weight x multiplier): its merged weight minus the base
            theirs = loaded[layout.kohya.name(part, module_path)].get_weight(shape).detach()
            assert close(theirs, trained, 1e-6), (part, module_path)
            # stylelora reads the file back to the same delta: the trained factors, or the full ones written instead
            written = {k: v for k, v in ours.state[part].items() if k.rsplit(".", 1)[0] == module_path}
            if written.keys() == {k for k in adapter.state[part] if k.rsplit(".", 1)[0] == module_path}:
                assert all(torch.equal(v, adapter.state[part][k]) for k, v in written.items()), module_path
            else:
                assert close(ours.delta(part, module_path, shape), trained, 1e-6), (part, module_path)
    assert kinds == {"conv", "linear"}
    assert len(loaded) == sum(adapter.num_modules().values())



def test_a_lokr_factor_peft_splits_other_than_lycoris_is_refused_before_training() -> None:
    """Above a side's square root peft splits factor x rest, LyCORIS rest x factor: no file of those factors
    would load in LyCORIS, so training does not start (32 channels: factor 8 is 8 x 4 in peft, 4 x 8 there)."""
    from stylelora.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora.lokr_factor: 8 splits the 32 channels of .* as 8 x 4 in peft, where "
                                          r"LyCORIS splits them 4 x 8.* at most 5 \(the square root of the narrowest"):
        add_lora(load_base_model("builtin:tiny"), LoraConfig(type="lokr", lokr_factor=8))
    add_lora(load_base_model("builtin:tiny"), LoraConfig(type="lokr", lokr_factor=4))  # 4 x 8 both ways

# --- a conv LyCORIS' loader misreads, in a model small enough to render -----------------------------------

WIDE_CONV = "up_blocks.1.resnets.0.conv1"  # 144 -> 48 channels, 3x3: split (6, 8) x (12, 12) at factor -1


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:tiny with a UNet 48/96 channels wide, as a diffusers folder. Its WIDE_CONV is a 3x3 conv whose
    low-rank LoKr layout LyCORIS' loader reads as another split at factor -1, as it does SD1.5's 1920 -> 640."""
    from diffusers import UNet2DConditionModel

    from stylelora.families.sd1 import SD1_SIZES

    pipe = load_base_model("builtin:tiny").pipeline
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel(**{**SD1_SIZES["tiny"]["unet"], "block_out_channels": (48, 96)},
                                         use_linear_projection=False)
    folder = tmp_path_factory.mktemp("wide") / "model"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def random_lokr(model: BaseModel) -> Adapter:
    """LoKr layers injected as training injects them (UNet with the ResNet convs, text encoder), random weights."""
    from stylelora.model.lora import lora_state

    add_lora(model, LoraConfig(type="lokr", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, train_text_encoder=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in model.parts():
            for name, p in module.named_parameters():
                if ".lokr_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return Adapter.from_module_alphas(lora_state(model), lora_alphas(model))


def trained_deltas(model: BaseModel) -> dict[tuple[str, str], torch.Tensor]:
    return {(part, path): layer.get_delta_weight(ADAPTER_NAME).detach() for part, module in model.parts()
            for path, layer in module.named_modules() if isinstance(layer, LycorisLayer) and ADAPTER_NAME in layer.r}


def assert_lycoris_builds(path: Path, model_dir: Path, deltas: dict[tuple[str, str], torch.Tensor]) -> None:
    """LyCORIS' loader rebuilds every module of the file, with the trained deltas, and so does stylelora."""
    base = load_base_model(str(model_dir))
    layout = ModelLayout.of(base)
    lyco, tensors = lycoris_network(path, base)
    loaded = {m.lora_name: m for m in lyco.unet_loras + lyco.text_encoder_loras}
    assert set(loaded) == {k.split(".")[0] for k in tensors} and len(loaded) == len(deltas)
    ours = load_adapter(path, base)
    for (part, module_path), delta in deltas.items():
        shape = tuple(delta.shape)
        assert close(loaded[layout.kohya.name(part, module_path)].get_weight(shape).detach(), delta, 1e-6), module_path
        assert close(ours.delta(part, module_path, shape), delta, 1e-6), module_path


def test_a_lokr_conv_lycoris_would_misread_is_written_with_full_factors_and_renders_as_trained(
        wide_tiny: Path, tmp_path: Path) -> None:
    from stylelora.core.config import GenerateSettings
    from stylelora.preview.previewer import Previewer

    trained = load_base_model(str(wide_tiny))
    adapter = random_lokr(trained)
    assert {"lokr_w2_a", "lokr_w2_b"} <= {k.rsplit(".", 1)[1] for k in adapter.state["unet"] if WIDE_CONV in k}
    path = save_kohya(tmp_path / "style.safetensors", adapter, trained, precision="fp32")
    tensors = load_file(path)
    name = "lora_unet_" + WIDE_CONV.replace(".", "_")
    assert {k for k in tensors if k.startswith(name + ".")} == {f"{name}.lokr_w1", f"{name}.lokr_w2", f"{name}.alpha"}
    assert tensors[f"{name}.lokr_w1"].shape == (6, 12) and tensors[f"{name}.lokr_w2"].shape == (8, 12, 3, 3)
    assert sum(k.endswith(".lokr_w2_b") for k in tensors) > 20  # every other module keeps its low-rank factor
    deltas = trained_deltas(trained)
    assert_lycoris_builds(path, wide_tiny, deltas)

    # the Previewer: strength 0 is the base image bit for bit, strength 1 the trained model's image
    trained.pipeline.set_progress_bar_config(disable=True)
    for _, module in trained.parts():
        module.requires_grad_(False)
    expected = np.asarray(trained.pipeline("a lighthouse", num_inference_steps=2, guidance_scale=7.5,
                                           generator=torch.Generator().manual_seed(3)).images[0]).astype(int)
    preview = Previewer(str(wide_tiny))
    attached = preview.attach(path)
    settings = GenerateSettings(seed=3, steps=2)
    base = np.asarray(preview.base("a lighthouse", settings))
    assert np.array_equal(np.asarray(preview.generate("a lighthouse", settings, adapter=attached, scale=0.0)), base)
    styled = np.asarray(preview.generate("a lighthouse", settings, adapter=attached, scale=1.0)).astype(int)
    assert np.abs(styled - expected).max() <= 1 and np.abs(styled - base).mean() > 1

    # merged at 1: base + the trained delta in every adapted weight; at 0: the base weights
    plain = load_base_model(str(wide_tiny))
    merged = load_base_model(str(merge(str(wide_tiny), path, 1.0, tmp_path / "merged")))
    zero = load_base_model(str(merge(str(wide_tiny), path, 0.0, tmp_path / "zero")))
    for (part, module_path), delta in deltas.items():
        weight = dict(getattr(plain, part).named_modules())[module_path].weight
        got = dict(getattr(merged, part).named_modules())[module_path].weight
        assert close(got - weight, delta, 1e-5), module_path
        assert torch.equal(dict(getattr(zero, part).named_modules())[module_path].weight, weight), module_path


def test_lokr_files_written_before_are_read_and_exported_in_the_layout_lycoris_reads(wide_tiny: Path,
                                                                                      tmp_path: Path) -> None:
    """A file in the earlier layout (peft's factors as they are, the wide conv's too) still reads with its
    deltas; ``stylelora export`` rewrites it so that LyCORIS rebuilds every module."""
    from safetensors.torch import save_file

    from stylelora.adapters.convert import export

    trained = load_base_model(str(wide_tiny))
    adapter = random_lokr(trained)
    layout = ModelLayout.of(load_base_model(str(wide_tiny)))
    name = "lora_unet_" + WIDE_CONV.replace(".", "_")
    old = {k: v for k, v in to_kohya(adapter, layout, "fp32").items() if not k.startswith(name + ".")}
    sd = adapter.state["unet"]
    old.update({f"{name}.{p}": sd[f"{WIDE_CONV}.{p}"] for p in ("lokr_w1", "lokr_w2_a", "lokr_w2_b")})
    old[f"{name}.alpha"] = torch.tensor(adapter.alpha_of("unet", WIDE_CONV))  # the earlier writer differed only here
    save_file(old, tmp_path / "old.safetensors")
    deltas = trained_deltas(trained)
    read = load_adapter(tmp_path / "old.safetensors", layout)
    for (part, module_path), delta in deltas.items():
        assert close(read.delta(part, module_path, tuple(delta.shape)), delta, 1e-6), module_path

    report = export(tmp_path / "old.safetensors", "kohya", tmp_path / "new.safetensors", precision="fp32",
                    base_model=str(wide_tiny))
    assert report.verified and "LoKr" in report.summary
    new = load_file(report.path)
    assert f"{name}.lokr_w2" in new and f"{name}.lokr_w2_b" not in new
    assert_lycoris_builds(report.path, wide_tiny, deltas)


def test_a_loha_or_lokr_merged_into_one_safetensors_file_is_that_file(trained, tmp_path: Path) -> None:
    """Merge's single-file checkpoint (the Export tab's default) of a LoHa or LoKr wrote a diffusers *folder* named
    <run>-merged-1.safetensors: A1111 and ComfyUI cannot load it, and the app's download of it failed."""
    _, paths, _ = trained
    out = merge("builtin:tiny", paths[0], 1.0, tmp_path / "merged.safetensors", precision="fp32")
    assert out == tmp_path / "merged.safetensors" and out.is_file()
    folder = load_base_model(str(merge("builtin:tiny", paths[0], 1.0, tmp_path / "merged")))
    single = load_base_model(str(out), str(tmp_path / "merged"))  # the folder gives the configs (offline)
    ours, theirs = single.unet.state_dict(), folder.unet.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_split_keeps_the_lycoris_modules_of_the_chosen_blocks(trained, tmp_path: Path) -> None:
    """``stylelora split LOHA.safetensors --keep down.0 te`` wrote the text encoder's modules alone (no UNet module
    of a LoHa or LoKr matched a block: ``unet 0`` in the summary) and ``--keep down.0`` said it kept none."""
    network, paths, _ = trained
    original = load_file(paths[0])
    for keep, prefixes in ((["down.0", "te"], ("lora_unet_down_blocks_0_", "lora_te_")),
                           (["down.0"], ("lora_unet_down_blocks_0_",))):
        out = tmp_path / f"{len(keep)}.safetensors"
        r = run_cli("split", str(paths[0]), "--keep", *keep, "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert "unet 0" not in r.stdout and NETWORK_NAMES[network] in r.stdout
        kept = load_file(out)
        assert set(kept) == {k for k in original if k.startswith(prefixes)}
        weight = ".hada_" if network == "loha" else ".lokr_"
        assert any(weight in k for k in kept if k.startswith("lora_unet_"))
        assert all(torch.equal(kept[k], original[k]) for k in kept)
