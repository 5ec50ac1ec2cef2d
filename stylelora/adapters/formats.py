"""Adapter files: kohya (AUTOMATIC1111, ComfyUI, sd-scripts) and diffusers/peft; read, write, verify.

In memory an adapter is canonical: ``{"unet": {...}, "text_encoder": {...}}`` of peft state dicts
keyed by the model's own module paths (``down_blocks.0.attentions.0.proj_in.lora_A.weight``).
Alpha is per kind of module (see ``Adapter``). Every file written here is re-read and checked
(``verify_file``). Converting a run or file lives above this module, in ``stylelora.convert``;
merging and resizing in ``stylelora.merge``; the metadata written here comes from ``stylelora.metadata``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ..core import fileio
from ..core.errors import FormatError, setting
from ..core.fileio import PICKLE_SUFFIXES
from ..model.lora import full_lokr_rank, lycoris_factorization
from ..model.text import conventional_text_path
from .adapter import Adapter, ModelLayout, module_paths
from .fused import fuse, split
from .kohya_names import KOHYA_PREFIXES
from .metadata import adapter_facts, model_hashes

if TYPE_CHECKING:
    from ..model.base import BaseModel

log = logging.getLogger(__name__)

__all__ = ["Adapter", "ModelLayout", "load_adapter", "read_safetensors", "save_diffusers", "save_kohya",
           "verify_file"]
PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")  # diffusers' component names
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
# header keys that belong to the diffusers file only (diffusers refuses kohya files that carry them)
DIFFUSERS_ONLY_METADATA = ("format", "lora_adapter_metadata", "stylelora.alpha")
# how a diffusers file carries alpha (header key stylelora.alpha)
ALPHA_METADATA_KEY = "stylelora.alpha"
ALPHA_IN_METADATA = "lora_adapter_metadata (alpha and alpha_pattern per module; diffusers >= 0.34 reads it)"
ALPHA_BAKED = ("baked: every lora_B holds alpha/rank, ranks padded with zeros to one per part, alpha = rank "
               "(right strength in every diffusers version)")
# LyCORIS' LoHa and LoKr weights as A1111, ComfyUI and LyCORIS name them (Tucker cores not written or read)
LYCORIS_WEIGHTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                   "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
DORA_KOHYA_REFUSAL = (
    "DoRA adapters are not exported to kohya format: AUTOMATIC1111 normalises a kohya dora_scale per input "
    "channel where peft (and stylelora) normalise per output channel, and diffusers drops dora_scale keys, "
    "so the file would load wrong or without effect. Export it in the diffusers format (diffusers and peft load DoRA), "
    "or train without DoRA for A1111 and ComfyUI."
)


# --- writing ------------------------------------------------------------------------------------


LYCORIS_DIFFUSERS_REFUSAL = (
    "the diffusers format holds LoRA only (diffusers' load_lora_weights reads no LoHa or LoKr), so a LoHa or LoKr "
    "adapter has no diffusers file: export it in the kohya format, the LyCORIS layout that AUTOMATIC1111, ComfyUI "
    "and LyCORIS load."
)


def to_kohya(adapter: Adapter, layout: ModelLayout, precision: str = "fp16") -> dict[str, torch.Tensor]:
    """kohya's layout: ``lora_down``/``lora_up`` for LoRA, LyCORIS' ``hada_*`` (LoHa) and ``lokr_*``
    (LoKr) weights under the same module names, and one ``alpha`` per module."""
    if adapter.is_dora:
        raise FormatError(DORA_KOHYA_REFUSAL)
    dtype = DTYPES[precision]
    out: dict[str, torch.Tensor] = {}
    for part, sd in adapter.state.items():
        for path in module_paths(sd):
            name = layout.kohya.name(part, path)
            if name in layout.kohya.fused:  # one module of the original layout holds it and others
                if f"{name}.alpha" not in out:
                    out.update(_fused_kohya(adapter, layout, name, dtype))
                continue
            alpha = adapter.alpha_of(part, path)
            if adapter.network == "lora":
                out[f"{name}.lora_down.weight"] = sd[f"{path}.lora_A.weight"].to(dtype).contiguous()
                out[f"{name}.lora_up.weight"] = sd[f"{path}.lora_B.weight"].to(dtype).contiguous()
            else:
                weights, alpha = lycoris_module(adapter, part, path, layout.shapes[part][path])
                out.update({f"{name}.{param}": value.to(dtype).contiguous() for param, value in weights.items()})
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def _fused_kohya(adapter: Adapter, layout: ModelLayout, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One kohya module for the modules the original layout fuses under ``name`` (``adapters.fused``)."""
    if adapter.network != "lora":
        raise FormatError(f"{name}: {adapter.network} modules cannot be fused into the original layout's combined "
                          "layer; train plain LoRA for this model")
    loras, sizes = [], []
    for part, path in layout.kohya.fused[name]:
        sd = adapter.state.get(part, {})
        down, up = sd.get(f"{path}.lora_A.weight"), sd.get(f"{path}.lora_B.weight")
        loras.append(None if down is None else (down.float(), up.float(), adapter.alpha_of(part, path)))
        shape = layout.shapes[part][path]
        if not shape and up is None:
            raise FormatError(f"{name}: the size of {path} is unknown (a layout of names only); load the base model")
        sizes.append(shape[0] if shape else up.shape[0])
    down, up, alpha = fuse(loras, sizes)
    return {f"{name}.lora_down.weight": down.to(dtype).contiguous(),
            f"{name}.lora_up.weight": up.to(dtype).contiguous(), f"{name}.alpha": torch.tensor(alpha, dtype=dtype)}


def lycoris_module(adapter: Adapter, part: str, path: str, shape: tuple[int, ...]) -> tuple[dict[str, torch.Tensor],
                                                                                           float]:
    """One LoHa or LoKr module in LyCORIS' layout (its ``hada_*``/``lokr_*`` names and shapes, which are peft's)
    and the alpha to store with it, for a base weight of ``shape``.

    LyCORIS' loader guesses a LoKr's decompose factor from the stored shapes and builds that factor's split
    (``lycoris_reads``); for a kxk conv with a low-rank second factor it counts the kernel as input channels and
    can guess wrong (SD1.5's 1920->640 3x3 convs at factor -1), also for files LyCORIS wrote itself. Such a
    module is written with both factors full instead (``lokr_w1`` = w1_a @ w1_b, ``lokr_w2`` = w2_a @ w2_b as
    (out, in, kh, kw), the layout LyCORIS writes at full rank): the same Kronecker product, so the same delta.
    Loaders scale a module of two full factors by 1, so alpha/rank is folded into ``lokr_w2``."""
    sd = adapter.state[part]
    weights = {key[len(path) + 1 :]: value for key, value in sd.items()
               if key.startswith(f"{path}.") and "." not in key[len(path) + 1 :]}
    alpha = adapter.alpha_of(part, path)
    if adapter.network != "lokr":
        return weights, alpha
    rank = adapter.rank_of(part, path)
    w1, w2_stored = _lokr_w1_shape(weights), _lokr_w2_dims(weights)
    kernel = tuple(shape[2:])
    if "lokr_w2" not in weights and math.prod(kernel) > 1 and not lycoris_reads(w1, w2_stored, shape):
        w1_full = (weights["lokr_w1"] if "lokr_w1" in weights
                   else (weights["lokr_w1_a"].double() @ weights["lokr_w1_b"].double()).float())
        w2_full = weights["lokr_w2_a"].double() @ weights["lokr_w2_b"].double()
        w2_full = w2_full.reshape(w2_full.shape[0], shape[1] // w1[1], *kernel)
        if lycoris_reads(w1, tuple(w2_full.shape), shape):
            w2_full = (w2_full * (alpha / rank)).float()
            return {"lokr_w1": w1_full, "lokr_w2": w2_full}, float(full_lokr_rank(w2_full))
    if not lycoris_reads(w1, w2_stored, shape):
        log.warning("LoKr module %s %s: LyCORIS 4.1's loader would not rebuild its split (w1 %s); AUTOMATIC1111 "
                    "and ComfyUI load it", part, path, w1)
    if "lokr_w1" in weights and "lokr_w2" in weights:  # loaders scale two full factors by 1: fold the scale in
        weights["lokr_w2"] = weights["lokr_w2"] * (alpha / rank)
        alpha = rank
    return weights, alpha


def _lokr_w1_shape(weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    if "lokr_w1" in weights:
        return int(weights["lokr_w1"].shape[0]), int(weights["lokr_w1"].shape[1])
    return int(weights["lokr_w1_a"].shape[0]), int(weights["lokr_w1_b"].shape[1])


def _lokr_w2_dims(weights: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The second factor's shape as LyCORIS' loader reads it: a full ``lokr_w2``'s shape, else (rows of
    ``lokr_w2_a``, columns of ``lokr_w2_b``), a conv's kernel inside those columns."""
    if "lokr_w2" in weights:
        return tuple(int(d) for d in weights["lokr_w2"].shape)
    return int(weights["lokr_w2_a"].shape[0]), int(weights["lokr_w2_b"].shape[1])


def lycoris_reads(w1: tuple[int, int], w2: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether LyCORIS' loader (4.1, ``LokrModule.make_module_from_state_dict``) rebuilds a LoKr module whose
    first factor is ``w1`` (rows, columns) and second ``w2`` (``_lokr_w2_dims``) on a base weight of ``shape``.

    It takes -1 when the first factor is the most balanced split of the sizes the factors multiply out to, else
    the larger side of the first factor, else of the second, when that size appears on both sides and divides
    both; then it builds the split of that factor for the layer's real channels (``lycoris_factorization``),
    which must be the stored one. Unknown shapes (a layout of names only) pass."""
    if len(shape) < 2:
        return True
    rows, cols = w2[0], w2[1]
    out_dim, in_dim = w1[0] * rows, w1[1] * cols
    if (w1[0] == lycoris_factorization(out_dim, -1)[0] and w1[1] == lycoris_factorization(in_dim, -1)[0]):
        factor = -1
    else:
        def fits(f: int) -> bool:
            return out_dim % f == 0 and in_dim % f == 0 and f in (w1[0], rows) and f in (w1[1], cols)

        first, second = max(w1), max(w2)
        factor = first if fits(first) else second if fits(second) else min(first, second)
    out_channels, in_channels = shape[0], shape[1]
    return (lycoris_factorization(out_channels, factor) == (w1[0], out_channels // w1[0])
            and lycoris_factorization(in_channels, factor) == (w1[1], in_channels // w1[1]))


def to_diffusers(adapter: Adapter, precision: str = "fp16") -> dict[str, torch.Tensor]:
    """``unet.<path>.lora_A.weight`` ...; text encoders under the conventional ``text_model.`` path
    whatever the installed transformers calls its modules, as every diffusers version loads it."""
    dtype = DTYPES[precision]
    out = {}
    for part, sd in adapter.state.items():
        for key, value in sd.items():
            if part.startswith("text_encoder"):
                module, _, suffix = key.rpartition(".lora_")
                key = f"{conventional_text_path(module)}.lora_{suffix}"
                if key.endswith(".lora_magnitude_vector"):
                    key += ".weight"  # transformers' load_adapter wants DoRA magnitudes as ...magnitude_vector.weight
            out[f"{part}.{key}"] = value.to(dtype).contiguous()
    return out


def short_text_path(path: str) -> str:
    """A text-encoder module path without ``text_model.``: as a peft target or pattern it matches the
    module under transformers 4 (``text_model.encoder...``, by suffix) and 5 (``encoder...``) alike."""
    return path.removeprefix("text_model.")


def peft_metadata(adapter: Adapter) -> dict[str, object]:
    """diffusers' ``lora_adapter_metadata``: the LoraConfig per part, so it scales every module right."""
    meta: dict[str, object] = {}
    for part in adapter.state:
        fields = adapter.peft_fields(part)
        if part.startswith("text_encoder"):  # module names that match under transformers 4 and 5 alike
            fields["target_modules"] = [short_text_path(p) for p in fields["target_modules"]]
            for pattern in ("rank_pattern", "alpha_pattern"):
                fields[pattern] = {short_text_path(p): v for p, v in fields[pattern].items()}
        meta.update({f"{part}.{k}": v for k, v in fields.items()})
    return meta


def kohya_file_metadata(adapter: Adapter, layout: ModelLayout, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The adapter's metadata for a kohya file: what the weights say (``adapter_facts``) replaces any
    older statement of it, and kohya's hashes are taken over the tensors written."""
    metadata = {k: v for k, v in adapter.metadata.items() if k not in DIFFUSERS_ONLY_METADATA}
    metadata.update(adapter_facts(adapter, layout.kind))
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hashes(tensors, metadata)
    return metadata


def save_kohya(path: str | Path, adapter: Adapter, layout: BaseModel | ModelLayout, precision: str = "fp16") -> Path:
    """Write one kohya ``.safetensors`` and verify it (a failed check raises FormatError)."""
    layout = ModelLayout.of(layout)
    tensors = to_kohya(adapter, layout, precision)
    _write_verified(path, save(tensors, metadata=kohya_file_metadata(adapter, layout, tensors)), tensors, layout)
    return Path(path)


def save_diffusers(
    folder: str | Path, adapter: Adapter, layout: BaseModel | ModelLayout | None = None, precision: str = "fp16",
    bake_alpha: bool = False,
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` (or the ``.safetensors`` path given) for
    ``pipe.load_lora_weights``; verified against ``layout`` when one is given.

    Alphas travel in ``lora_adapter_metadata``, which diffusers reads from 0.34 on; ``bake_alpha``
    multiplies each lora_B by alpha/rank, pads each part's modules to one rank, and stores
    alpha = rank instead (``Adapter.with_alpha_baked``), so loaders that ignore that header (diffusers
    before 0.34, peft-only tools) apply the same strength.
    ``stylelora.alpha`` in the header says which was done."""
    if adapter.network != "lora":
        raise FormatError(LYCORIS_DIFFUSERS_REFUSAL)
    target = Path(folder)
    if target.suffix.lower() != ".safetensors":
        target = target / DIFFUSERS_WEIGHT_NAME
    if bake_alpha:
        adapter = adapter.with_alpha_baked()
    tensors = to_diffusers(adapter, precision)
    metadata = {k: v for k, v in adapter.metadata.items() if k not in DIFFUSERS_ONLY_METADATA}
    metadata["format"] = "pt"
    metadata["lora_adapter_metadata"] = json.dumps(peft_metadata(adapter), sort_keys=True)
    metadata[ALPHA_METADATA_KEY] = ALPHA_BAKED if bake_alpha else ALPHA_IN_METADATA
    checked = None if layout is None else ModelLayout.of(layout)
    _write_verified(target, save(tensors, metadata=metadata), tensors, checked)
    return target


def _write_verified(
    path: str | Path, blob: bytes, expected: dict[str, torch.Tensor], layout: ModelLayout | None
) -> None:
    """Write under a temporary name and verify that file before it replaces ``path``: a file that
    fails the check is removed and an older file at ``path`` stays as it was."""
    with fileio.atomic_path(path) as tmp:
        tmp.write_bytes(blob)
        del blob  # the only reference: verifying re-reads the file, so the bytes need not stay in memory
        if layout is not None:
            verify_file(tmp, expected, layout, shown_as=path)


def verify_file(path: str | Path, expected: dict[str, torch.Tensor], layout: ModelLayout,
                shown_as: str | Path | None = None) -> Adapter:
    """Re-read a written adapter: the same keys, every tensor equal in dtype and value, and every key
    naming a real module of the base model with a fitting shape. Raises FormatError otherwise."""
    tensors, metadata = read_safetensors(path)
    path = shown_as or path
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise FormatError(f"{path}: verification failed: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    wrong = [k for k, v in expected.items() if tensors[k].dtype != v.dtype or not torch.equal(tensors[k], v)]
    if wrong:
        raise FormatError(f"{path}: verification failed: {len(wrong)} tensors differ from those written: {wrong[:5]}")
    if is_kohya(tensors) and "lora_adapter_metadata" in metadata:
        raise FormatError(f"{path}: verification failed: a kohya file must not carry lora_adapter_metadata")
    return adapter_from_tensors(tensors, metadata, layout, str(path), upcast=False)


# --- reading ------------------------------------------------------------------------------------


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and header metadata; never unpickles. Errors name the file."""
    p = Path(path)
    if p.is_dir():
        p = p / DIFFUSERS_WEIGHT_NAME
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(f"{p}: pickled files can run code when opened and are not read; use a .safetensors file")
    if not p.is_file():
        raise FormatError(f"{p}: no such adapter file")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{p}: not a readable .safetensors file ({e}); it may be truncated or corrupt") from None
    return tensors, metadata


def is_kohya(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(KOHYA_PREFIXES) for k in tensors)


def file_format(tensors: dict[str, torch.Tensor]) -> str | None:
    if is_kohya(tensors):
        return "kohya"
    if any(_diffusers_key(k) is not None and not k.endswith(".alpha") for k in tensors):
        return "diffusers"
    return None


def load_adapter(path: str | Path, model: BaseModel | ModelLayout) -> Adapter:
    """Read a kohya or diffusers adapter into canonical form, strictly: every key must name a module
    of ``model`` with a fitting shape; the error lists the keys that do not."""
    tensors, metadata = read_safetensors(path)
    return adapter_from_tensors(tensors, metadata, ModelLayout.of(model), str(path))


def adapter_from_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], layout: ModelLayout, source: str = "adapter",
    upcast: bool = True,
) -> Adapter:
    """Map a file's tensors onto ``layout`` strictly (see ``load_adapter``); the weights come out fp32
    unless ``upcast`` is False (a check that needs no copy of them)."""
    fmt = file_format(tensors)
    if fmt is None:
        raise FormatError(
            f"{source}: no LoRA keys in a known layout (kohya lora_unet_/lora_te_ or diffusers unet./"
            f"text_encoder.); first keys: {sorted(tensors)[:3]}"
        )
    state, alphas, unknown = (_from_kohya if fmt == "kohya" else _from_diffusers)(tensors, metadata, layout)
    if unknown:
        raise FormatError(
            f"{source}: {len(unknown)} keys name no module of the base model {layout.name or layout.kind} "
            f"({layout.kind}): {unknown[:8]}. Was it made for another base model? Name that one in "
            f"{setting('model.name')}."
        )
    _check_pairs_and_shapes(state, layout, source)
    if upcast:
        state = {part: {k: v.float() for k, v in sd.items()} for part, sd in state.items()}
    return Adapter.from_module_alphas(state, alphas, metadata)


def _from_kohya(tensors, metadata, layout):
    reverse, fused = layout.kohya.reverse, layout.kohya.fused
    state: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    unknown = []
    combined: dict[str, dict[str, torch.Tensor]] = {}  # a fused module's down, up and alpha, split below
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if name in fused and suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            combined.setdefault(name, {})[suffix] = value
            continue
        if name not in reverse:
            unknown.append(key)
            continue
        part, module = reverse[name]
        if suffix == "lora_down.weight":
            state.setdefault(part, {})[f"{module}.lora_A.weight"] = value
        elif suffix == "lora_up.weight":
            state.setdefault(part, {})[f"{module}.lora_B.weight"] = value
        elif suffix == "alpha":
            alphas.setdefault(part, {})[module] = float(value)
        elif suffix == "dora_scale":
            raise FormatError(f"kohya DoRA keys ({key}) are not supported; convert the DoRA adapter elsewhere")
        elif suffix in LYCORIS_WEIGHTS:
            state.setdefault(part, {})[f"{module}.{suffix}"] = value.float()
        else:
            unknown.append(key)
    for name, found in combined.items():
        unknown += _split_kohya(name, found, layout, state, alphas)
    for part, sd in state.items():  # two full LoKr factors: loaders scale by 1 whatever alpha says
        for module in module_paths(sd):
            if f"{module}.lokr_w1" in sd and f"{module}.lokr_w2" in sd:
                alphas.setdefault(part, {})[module] = full_lokr_rank(sd[f"{module}.lokr_w2"])
    return state, alphas, unknown


def _split_kohya(name: str, found: dict[str, torch.Tensor], layout: ModelLayout, state: dict,
                 alphas: dict) -> list[str]:
    """A fused kohya module's LoRA shared out to the modules it holds (``adapters.fused.split``); its keys when
    it cannot be (returned as keys naming nothing)."""
    down, up = found.get("lora_down.weight"), found.get("lora_up.weight")
    members = layout.kohya.fused[name]
    sizes = [layout.shapes[part][path][0] if layout.shapes[part][path] else 0 for part, path in members]
    if down is None or up is None or up.dim() != 2 or not all(sizes) or sum(sizes) != up.shape[0]:
        return [f"{name}.{suffix}" for suffix in found]
    alpha = float(found["alpha"]) if "alpha" in found else float(down.shape[0])
    for (part, path), lora in zip(members, split(down, up, alpha, sizes), strict=True):
        if lora is not None:
            state.setdefault(part, {}).update({f"{path}.lora_A.weight": lora[0], f"{path}.lora_B.weight": lora[1]})
            alphas.setdefault(part, {})[path] = lora[2]
    return []


# The LoRA weight layouts that diffusers' scripts and loaders have written, by key ending, and the
# peft suffix each means: peft's lora_A/lora_B; ``.lora.down/.lora.up`` (the LoRACompatible layers of
# diffusers <= 0.24, still what its SDXL scripts write for the UNet); ``.lora_linear_layer.down/up``
# (the text encoders in those scripts); DoRA magnitudes; per-module alphas. Longest ending first.
_DIFFUSERS_SUFFIXES = {
    "lora_linear_layer.down.weight": "lora_A.weight",
    "lora_linear_layer.up.weight": "lora_B.weight",
    "lora_magnitude_vector.weight": "lora_magnitude_vector",
    "lora_magnitude_vector": "lora_magnitude_vector",
    "lora.down.weight": "lora_A.weight",
    "lora.up.weight": "lora_B.weight",
    "lora_A.weight": "lora_A.weight",
    "lora_B.weight": "lora_B.weight",
    "alpha": "alpha",
    **{name: name for name in sorted(LYCORIS_WEIGHTS)},  # peft's LoHa/LoKr weights, as a run's checkpoints hold them
}
# diffusers' attention-processor files (0.14-0.20): ``attn1.processor.to_q_lora.down.weight``, no prefix
_ATTN_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _diffusers_key(key: str) -> tuple[str | None, str, str] | None:
    """(part or None when the key has no unet./text_encoder. prefix, module path, peft suffix)."""
    if match := _ATTN_PROCESSOR.match(key):
        owner, proj, side = match.groups()
        module = f"{owner}.{'to_out.0' if proj == 'to_out' else proj}"
        suffix = "lora_A.weight" if side == "down" else "lora_B.weight"
    else:
        ending = next((e for e in _DIFFUSERS_SUFFIXES if key.endswith("." + e)), None)
        if ending is None:
            return None
        module, suffix = key[: -len(ending) - 1], _DIFFUSERS_SUFFIXES[ending]
    first, _, rest = module.partition(".")
    return (first, rest, suffix) if first in PARTS else (None, module, suffix)


def _text_path_forms(path: str) -> tuple[str, ...]:
    """A text-encoder module path under both transformers layouts (with and without ``text_model.``)."""
    short = short_text_path(path)
    return (path, short, "text_model." + short)


def _resolve_module(part: str | None, module: str, modules: dict[str, dict]) -> tuple[str, str] | None:
    """The (part, module path) of ``layout`` that a file's module names; unprefixed keys belong to the
    UNet when it has that module, else to the (first) text encoder."""
    for candidate in [part] if part else [p for p in PARTS if p in modules]:
        if candidate not in modules:
            continue
        forms = _text_path_forms(module) if candidate.startswith("text_encoder") else (module,)
        found = next((m for m in forms if m in modules[candidate]), None)
        if found is not None:
            return candidate, found
    return None


def _pattern_value(pattern: dict[str, float], path: str, default: float) -> float:
    """A module's value in a peft rank/alpha pattern: its own path in either text-encoder layout, else
    the first key the path ends with (peft's rule), else ``default``."""
    forms = _text_path_forms(path)
    for form in forms:
        if form in pattern:
            return float(pattern[form])
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", forms[-1]):
            return float(value)
    return default


def _from_diffusers(tensors, metadata, layout):
    modules = layout.shapes
    state: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    network_alphas: dict[str, dict[str, float]] = {}
    for key, value in tensors.items():
        parsed = _diffusers_key(key)
        found = _resolve_module(parsed[0], parsed[1], modules) if parsed else None
        if found is None:
            unknown.append(key)
            continue
        part, module = found
        if parsed[2] == "alpha":
            network_alphas.setdefault(part, {})[module] = float(value)
        else:
            state.setdefault(part, {})[f"{module}.{parsed[2]}"] = value
    peft_meta = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    alphas: dict[str, dict[str, float]] = {}
    for part, sd in state.items():
        if f"{part}.lora_alpha" in peft_meta:
            pattern = peft_meta.get(f"{part}.alpha_pattern") or {}
            default = float(peft_meta[f"{part}.lora_alpha"])
            alphas[part] = {p: _pattern_value(pattern, p, default) for p in module_paths(sd)}
        else:  # no LoraConfig stored: per-module .alpha keys, else diffusers' convention alpha = rank
            alphas[part] = network_alphas.get(part, {})
    return state, alphas, unknown


def _lycoris_shape(sd: dict[str, torch.Tensor], path: str) -> tuple[int, int] | str:
    """(rows, columns) of the weight a LoHa or LoKr module rebuilds (a conv's kernel in the columns), or
    what is missing or does not fit."""
    get = sd.get
    if f"{path}.hada_w1_a" in sd:
        w1a, w1b, w2a, w2b = (get(f"{path}.hada_{k}") for k in ("w1_a", "w1_b", "w2_a", "w2_b"))
        if w1b is None or w2a is None or w2b is None:
            return "has only some of the hada_w1_a/w1_b/w2_a/w2_b weights"
        if not (w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0] and w1a.shape[0] == w2a.shape[0]
                and w1b.shape[1] == w2b.shape[1]):
            return "hada_* weights of shapes that do not multiply"
        return int(w1a.shape[0]), int(w1b.shape[1])
    w1, w2 = get(f"{path}.lokr_w1"), get(f"{path}.lokr_w2")
    if w1 is None and (get(f"{path}.lokr_w1_a") is None or get(f"{path}.lokr_w1_b") is None):
        return "has no lokr_w1 (nor lokr_w1_a and lokr_w1_b)"
    if w2 is None and (get(f"{path}.lokr_w2_a") is None or get(f"{path}.lokr_w2_b") is None):
        return "has no lokr_w2 (nor lokr_w2_a and lokr_w2_b)"
    w1_shape = w1.shape if w1 is not None else (sd[f"{path}.lokr_w1_a"].shape[0], sd[f"{path}.lokr_w1_b"].shape[1])
    if w2 is not None:
        w2_shape = (w2.shape[0], int(torch.tensor(w2.shape[1:]).prod()))
    else:
        w2_shape = (sd[f"{path}.lokr_w2_a"].shape[0], sd[f"{path}.lokr_w2_b"].shape[1])
    return int(w1_shape[0] * w2_shape[0]), int(w1_shape[1] * w2_shape[1])


def _lycoris_problems(sd: dict[str, torch.Tensor], path: str, weight: tuple[int, ...], part: str) -> list[str]:
    shape = _lycoris_shape(sd, path)
    if isinstance(shape, str):
        return [f"{part} {path}: {shape}"]
    if weight and shape != (weight[0], int(torch.tensor(weight[1:]).prod())):
        return [f"{part} {path}: rebuilds a {shape[0]}x{shape[1]} weight, which does not fit the module's weight "
                f"{weight}"]
    return []


def _check_pairs_and_shapes(state, layout: ModelLayout, source: str) -> None:
    problems = []
    for part, sd in state.items():
        for path in module_paths(sd):
            if f"{path}.lora_A.weight" not in sd and f"{path}.lora_B.weight" not in sd:  # LoHa, LoKr
                problems += _lycoris_problems(sd, path, layout.shapes[part][path], part)
                continue
            down, up = sd.get(f"{path}.lora_A.weight"), sd.get(f"{path}.lora_B.weight")
            if down is None or up is None:
                problems.append(f"{part} {path}: has only one of the down/up (lora_A/lora_B) weights")
                continue
            weight = layout.shapes[part][path]
            if not weight:  # a layout from bare module names: nothing to check the shapes against
                continue
            fits = (down.shape[1] == weight[1] and up.shape[0] == weight[0] and up.shape[1] == down.shape[0]
                    and tuple(down.shape[2:]) == tuple(weight[2:]) and all(s == 1 for s in up.shape[2:]))
            if not fits:
                problems.append(f"{part} {path}: down {tuple(down.shape)} / up {tuple(up.shape)} "
                                f"do not fit the module's weight {weight}")
    if problems:
        raise FormatError(f"{source}: {len(problems)} modules do not fit the base model: " + "; ".join(problems[:5]))
