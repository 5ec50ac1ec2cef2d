"""Memory first (issue 24): a model is read once, straight into the precision it is used in. A bf16 run, a merge,
an export and a preview of a model stored in fp16 never make an fp32 copy of its frozen weights; the estimate
counts the weights as they are held (bf16, packed nf4) before anything is loaded; the run's first line says which
precision ``train.mixed_precision`` resolved to on this CPU, and why.

The fp32 watch is a dispatch mode that sees every tensor torch creates (loading, casting, copying): any fp32
tensor of a frozen weight's shape (a weight matrix, conv kernel or embedding) is a frozen weight materialised in
fp32. Built-ins are saved as fp16 diffusers folders first, the way real models come: a built-in itself is an fp32
random draw by definition.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_formats import make_adapter
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import stylelora.adapters.merge as merging
import stylelora.training.loop as loop
from conftest import make_dataset, tiny_config
from stylelora.adapters.convert import export
from stylelora.adapters.formats import save_kohya
from stylelora.adapters.merge import merge
from stylelora.core import events
from stylelora.core.config import LoraConfig
from stylelora.families import load_base_model, load_plan
from stylelora.model.lora import add_lora
from stylelora.preview.previewer import Previewer
from stylelora.training import estimate as est
from stylelora.training import precision


class Fp32Watch(TorchDispatchMode):
    """Records every fp32 tensor created on a real device with one of ``shapes``."""

    def __init__(self, shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes, self.seen = shapes, []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta"
                    and tuple(t.shape) in self.shapes):
                self.seen.append(f"{func} -> {tuple(t.shape)}")
        return out


def frozen_shapes(folder: Path, lora: LoraConfig | None = None) -> set[tuple[int, ...]]:
    """The shapes of the model's frozen weights with two or more dimensions (matrices, convs, embeddings), less
    any shape a LoRA weight has (those train in fp32)."""
    plan = load_plan(str(folder))
    lora_weights = {id(p): tuple(p.shape) for p in add_lora(plan, lora)} if lora else {}
    frozen = {tuple(p.shape) for network in est.networks(plan) for p in network.parameters()
              if id(p) not in lora_weights and p.dim() >= 2}
    assert frozen
    return frozen - set(lora_weights.values())


@contextlib.contextmanager
def watching(shapes: set[tuple[int, ...]]) -> Iterator[Fp32Watch]:
    with Fp32Watch(shapes) as watch:
        yield watch


def watched(watch: Fp32Watch, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with watch:
            return fn(*args, **kwargs)
    return run


@pytest.fixture(scope="module")
def stored_fp16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """builtin:tiny-sdxl and builtin:small saved as diffusers folders in fp16, as real models are shipped."""
    root = tmp_path_factory.mktemp("fp16")
    folders = {}
    for name in ("tiny-sdxl", "small", "tiny"):
        model = load_base_model(f"builtin:{name}", dtype=torch.float16, vae_dtype=torch.float16)
        model.pipeline.save_pretrained(root / name, safe_serialization=True)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("memory") / "data", n=2)


def started(config: Any, seen: list[Any] | None = None) -> None:
    """``train(config)`` up to its first step: loading, preparation, caches set up, the estimate; a stop asked
    for before the first step ends it there (a bf16 step on a CPU without bf16 instructions takes minutes)."""
    stop = threading.Event()
    stop.set()
    loop.train(config, (seen.append if seen is not None else None), stop)


@pytest.mark.parametrize("name,quantize", [("tiny-sdxl", "none"), ("small", "none"), ("tiny-sdxl", "nf4")])
def test_a_bf16_run_never_holds_a_frozen_weight_in_fp32(stored_fp16: dict[str, Path], data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, name: str,
                                                        quantize: str) -> None:
    folder = stored_fp16[name]
    config = tiny_config(data, tmp_path / "out", **{"model.name": str(folder), "train.mixed_precision": "bf16",
                                                    "model.quantize": quantize, "data.resolution": 64})
    watch = Fp32Watch(frozen_shapes(folder, config.lora))
    loaded: list[Any] = []

    def load(*args: Any, **kwargs: Any) -> Any:
        loaded.append(load_base_model(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(loop, "load_base_model", watched(watch, load))
    monkeypatch.setattr(loop, "prepare_for_training", watched(watch, loop.prepare_for_training))
    started(config)
    assert watch.seen == []
    model = loaded[0]  # and the run did train on it: every frozen weight bf16 (or packed), the LoRA fp32
    dtypes = {p.dtype for network in est.networks(model) for p in network.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for _, part in model.parts() for p in part.parameters() if p.requires_grad} == {torch.float32}
    if quantize == "nf4":
        assert est.frozen_bytes(model) < 0.6 * est.frozen_bytes(model, as_loaded=True)


def test_the_watch_sees_the_fp32_copy_a_default_load_makes(stored_fp16: dict[str, Path]) -> None:
    """What the old loader did (diffusers' own default reads an fp16 UNet into fp32): the watch catches it."""
    from diffusers import UNet2DConditionModel

    folder = stored_fp16["tiny-sdxl"]
    with watching(frozen_shapes(folder)) as watch:
        UNet2DConditionModel.from_pretrained(folder / "unet")
    assert watch.seen


def test_merge_export_and_preview_of_an_fp16_model_make_no_fp32_copy(stored_fp16: dict[str, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = stored_fp16["tiny"]
    model = load_base_model(str(folder))
    assert {p.dtype for network in est.networks(model) for p in network.parameters()} == {torch.float16}  # as stored
    adapter = tmp_path / "style.safetensors"
    save_kohya(adapter, make_adapter(conv_rank=2), model, precision="fp16")
    shapes = frozen_shapes(folder)
    watch = Fp32Watch(shapes)
    # the merge's load is watched: adding an adapter computes each layer's delta in fp32 (one layer at a time,
    # peft's and diffusers' own fuse), which has the weight's shape but is no copy of the model
    monkeypatch.setattr(merging, "load_base_model", watched(watch, load_base_model))
    merged = merge(str(folder), adapter, 0.7, tmp_path / "merged")
    single = merge(str(folder), adapter, 0.7, tmp_path / "merged.safetensors", precision="fp16")
    with watch:
        export(adapter, "diffusers", tmp_path / "exported", precision="fp16", base_model=str(folder))
        Previewer(str(folder), dtype=torch.float16)
        Previewer(str(folder), dtype=torch.bfloat16)
    assert watch.seen == []
    again = load_base_model(str(merged))  # the merged folder stays in the precision the model was stored in
    assert {p.dtype for network in est.networks(again) for p in network.parameters()} == {torch.float16}
    assert load_base_model(str(single), str(folder)).unet.dtype == torch.float16


def test_a_builtin_in_a_lower_precision_is_the_same_model_cast(tmp_path: Path) -> None:
    exact = load_base_model("builtin:tiny-sdxl")
    for dtype in (torch.bfloat16, torch.float16):
        model = load_base_model("builtin:tiny-sdxl", dtype=dtype)
        for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
            ours, theirs = getattr(model.pipeline, part).state_dict(), getattr(exact.pipeline, part).state_dict()
            # SDXL's VAE overflows in fp16, so an fp16 run keeps it in fp32 (the family's vae_dtype)
            want = torch.float32 if (part, dtype) == ("vae", torch.float16) else dtype
            for key, value in theirs.items():
                if value.is_floating_point():
                    assert torch.equal(ours[key], value.to(want)), (part, key)


def test_the_estimate_before_loading_counts_what_the_loaded_run_holds(stored_fp16: dict[str, Path], data: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = stored_fp16["small"]
    config = tiny_config(data, tmp_path / "out", **{"model.name": str(folder), "train.mixed_precision": "bf16",
                                                    "data.resolution": 128})

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the estimate of a diffusers folder on a CPU reads no weight")

    with monkeypatch.context() as m:
        m.setattr(loop, "load_base_model", no_loading)
        before = loop.estimate_run(config)
    seen: list[Any] = []
    started(config, seen)
    during = next(e for e in seen if isinstance(e, events.Estimated))
    assert before.host_bytes == during.host_bytes and during.device_bytes is None
    plan = load_plan(str(folder))
    params = sum(p.numel() for network in est.networks(plan) for p in network.parameters())
    assert before.parts["frozen_weights"] == pytest.approx(2 * params, rel=0.01)  # bf16: two bytes a weight
    assert "frozen weights" in before.summary() and before.summary().startswith("estimate (formula, cpu): memory")
    # the run wrote its folder, which an estimate of the same output_dir refuses (as train would): new folders
    packed = loop.estimate_run(config.with_overrides({"model.quantize": "nf4",
                                                      "train.output_dir": str(tmp_path / "packed")}))
    assert packed.parts["frozen_weights"] < 0.5 * before.parts["frozen_weights"]
    wide = loop.estimate_run(config.with_overrides({"train.mixed_precision": "no",
                                                    "train.output_dir": str(tmp_path / "wide")}))
    assert wide.parts["frozen_weights"] == pytest.approx(2 * before.parts["frozen_weights"], rel=0.01)


@pytest.mark.parametrize("capability,resolved", [("AMX", "bf16"), ("AVX512-BF16", "no"), ("AVX2", "no"),
                                                 ("baseline", "no")])
def test_the_first_line_names_the_precision_auto_chose_and_why(data: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, capability: str,
                                                                resolved: str) -> None:
    monkeypatch.setattr(precision, "cpu_capability", lambda: capability)
    seen: list[Any] = []
    config = tiny_config(data, tmp_path / "out", **{"train.device": "cpu"})
    assert config.train.mixed_precision == "auto"
    started(config, seen)
    first = seen[0]
    assert isinstance(first, events.Message) and first.level == "info"
    rule = precision.cpu_rule(capability)
    weights = "bf16 base weights, LoRA in fp32" if resolved == "bf16" else "fp32"
    cpu = f"a CPU with {capability}" if capability != "baseline" else "a CPU without AVX2"
    assert first.text.startswith(f"precision: {weights} (train.mixed_precision=auto on {cpu}: {rule.reason}")
    assert rule.precision == resolved


def test_bf16_asked_for_on_a_cpu_without_bf16_instructions_warns(data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AVX2")
    seen: list[Any] = []
    started(tiny_config(data, tmp_path / "out", **{"train.mixed_precision": "bf16"}), seen)
    assert seen[0].level == "warning" and seen[0].text.startswith(
        "precision: bf16 base weights, LoRA in fp32 (train.mixed_precision=bf16 on a CPU with AVX2: no bf16")
