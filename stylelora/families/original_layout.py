"""A diffusion transformer's weights in its original layout (FLUX.1's BFL files, SD3.5's MMDiT checkpoints), the
single files ComfyUI and Forge load: the family says where each diffusers module sits there (``place``: module,
its place among the modules fused into it, whether its halves are swapped) and what other parameters are called
(``renamed``); this module stacks, swaps, writes and reads back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from ..core import fileio
from ..core.errors import FormatError

Place = Callable[[str], "tuple[str, int, bool] | None"]
Renamed = Callable[[str], "str | None"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _swap(tensor: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensor.chunk(2)[::-1])


def _where(state: Mapping[str, torch.Tensor], place: Place, renamed: Renamed,
           what: str) -> tuple[dict[str, str], dict[tuple[str, str], list[tuple[int, str, bool]]]]:
    """(original name of each renamed parameter, the diffusers parameters of each original one in their order)."""
    plain: dict[str, str] = {}
    fused: dict[tuple[str, str], list[tuple[int, str, bool]]] = {}
    for key in state:
        other = renamed(key)
        if other is not None:
            plain[key] = other
            continue
        module, _, param = key.rpartition(".")
        found = place(module)
        if found is None:
            raise FormatError(f"{what} weight '{key}' has no name in the original layout; write a diffusers folder "
                              "instead (an output path without .safetensors)")
        original, index, swap = found
        fused.setdefault((original, param), []).append((index, key, swap))
    for members in fused.values():
        members.sort()
    return plain, fused


def original_state(state: Mapping[str, torch.Tensor], place: Place, renamed: Renamed,
                   what: str = "transformer") -> dict[str, torch.Tensor]:
    """``state`` (a diffusers state dict) in the original layout: the weights and biases of modules fused there
    stacked in their order, swapped halves swapped, other parameters renamed."""
    plain, fused = _where(state, place, renamed, what)
    out = {theirs: state[ours] for ours, theirs in plain.items()}
    for (original, param), members in fused.items():
        tensor = torch.cat([state[key] for _, key, _ in members]) if len(members) > 1 else state[members[0][1]]
        out[f"{original}.{param}"] = _swap(tensor) if members[0][2] else tensor
    return out


def diffusers_state(original: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], place: Place,
                    renamed: Renamed, what: str = "transformer") -> dict[str, torch.Tensor]:
    """``original_state`` undone: the original tensors cut back into the diffusers parameters of ``expected``
    (whose shapes say where each fused module's parts end)."""
    plain, fused = _where(expected, place, renamed, what)
    out = {ours: original[theirs] for ours, theirs in plain.items() if theirs in original}
    for (name, param), members in fused.items():
        tensor = original.get(f"{name}.{param}")
        if tensor is None:
            continue
        tensor = _swap(tensor) if members[0][2] else tensor
        sizes = [expected[key].shape[0] for _, key, _ in members]
        if sum(sizes) != tensor.shape[0]:
            continue
        out.update({key: part for (_, key, _), part in zip(members, tensor.split(sizes), strict=True)})
    return out


def save_transformer(transformer: torch.nn.Module, out: str | Path, precision: str, place: Place, renamed: Renamed,
                     metadata: dict[str, str], prefix: str = "", extra: Mapping[str, torch.Tensor] | None = None,
                     ) -> Path:
    """Write ``transformer`` (under ``prefix``, beside ``extra`` tensors already named) as one ``.safetensors``
    file in its original layout, in ``precision``; verified: every weight read back (``diffusers_state``) equals
    the transformer's, or nothing is written."""
    target = Path(out)
    if target.suffix.lower() != ".safetensors":
        raise FormatError(f"{out}: a single-file checkpoint is a .safetensors file; give a name ending in it")
    if precision not in DTYPES:
        raise FormatError(f"precision '{precision}': choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[precision]
    expected = {k: v.detach().to("cpu", dtype).contiguous() for k, v in transformer.state_dict().items()}
    state = {prefix + k: v.contiguous() for k, v in original_state(expected, place, renamed).items()}
    state.update({k: v.detach().to("cpu", dtype).contiguous() for k, v in (extra or {}).items()})
    with fileio.atomic_path(target) as tmp:
        tmp.write_bytes(save(state, metadata={"format": "pt", **metadata}))
        del state
        written = {k[len(prefix):]: v for k, v in load_file(str(tmp)).items() if k.startswith(prefix)}
        read = diffusers_state(written, expected, place, renamed)
        wrong = sorted(k for k, v in expected.items() if k not in read or not torch.equal(read[k], v))
        if wrong:
            raise FormatError(f"{target}: the transformer's {wrong[:3]} do not read back from the written file; "
                              "nothing was written")
    return target


def read_back(path: str | Path, prefix: str = "") -> dict[str, Any]:
    """The tensors of a written single file under ``prefix``, the prefix taken off."""
    return {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
