"""LoRA on modules that one original layer holds side by side (FLUX.1's q, k and v in one ``qkv`` linear) as one
kohya module, and back.

Several LoRAs (down_i: r_i x in, up_i: out_i x r_i, alpha_i) become one: down = the downs stacked (rank R = sum
of r_i), up = block-diagonal (up_i in its rows and its own r_i columns, zeros elsewhere; a member without LoRA
gets zero rows), alpha = the alphas summed. When every member has the same scale alpha_i / r_i, the fused
module's alpha / R is that scale, so every loader's alpha/rank scaling stays exact (n equal LoRAs: rank n·r,
alpha n·alpha); a member of another scale has the ratio folded into its up block.

Reading splits a block-diagonal up back (evenly when the rank divides, as diffusers' converter does, else by
where each member's columns are), and a dense up (sd-scripts trains the fused layer itself) by giving every
member the whole down and its rows of up.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch

Lora = tuple[torch.Tensor, torch.Tensor, float]  # (down, up, alpha)


def fuse(members: Sequence[Lora | None], out_sizes: Sequence[int]) -> Lora:
    """One LoRA for the members (in their order in the fused layer, None where a member has none) whose outputs
    are ``out_sizes`` rows of the fused weight."""
    present = [m for m in members if m is not None]
    scales = [alpha / down.shape[0] for down, _, alpha in present]
    scale = collections.Counter(scales).most_common(1)[0][0]
    down = torch.cat([d for d, _, _ in present])
    rank = down.shape[0]
    up = present[0][1].new_zeros((sum(out_sizes), rank))
    row = column = 0
    for member, size, in zip(members, out_sizes, strict=True):
        if member is not None:
            d, u, alpha = member
            ratio = alpha / d.shape[0] / scale
            up[row : row + size, column : column + d.shape[0]] = u if ratio == 1 else u * ratio
            column += d.shape[0]
        row += size
    alpha = sum(a for _, _, a in present) if len(set(scales)) == 1 else scale * rank
    return down, up, float(alpha)


def split(down: torch.Tensor, up: torch.Tensor, alpha: float, out_sizes: Sequence[int]) -> list[Lora | None]:
    """The members' LoRAs of one fused LoRA (``fuse`` undone, or sd-scripts' own fused layer shared out); None for
    a member the file gives no change."""
    rank = down.shape[0]
    rows = up.split(list(out_sizes))
    used = [torch.nonzero(r.abs().sum(dim=0)).flatten().tolist() for r in rows]
    bounds = _blocks(used, rank)
    if bounds is None:  # dense: each member is its rows of up over the whole down, at the same scale
        return [(down, r, alpha) for r in rows]
    out: list[Lora | None] = []
    for r, (start, end) in zip(rows, bounds, strict=True):
        width = end - start
        out.append(None if width == 0 else (down[start:end], r[:, start:end], alpha * width / rank))
    return out


def _blocks(used: list[list[int]], rank: int) -> list[tuple[int, int]] | None:
    """Each member's column range when every member's rows use only columns apart from the others', in order:
    even ranges when the rank divides and they fit them, else ranges from where each member's columns start.
    None when the columns overlap (a dense up)."""
    n = len(used)
    even = rank % n == 0 and all(all(i * rank // n <= c < (i + 1) * rank // n for c in cols)
                                 for i, cols in enumerate(used))
    if even:
        return [(i * rank // n, (i + 1) * rank // n) for i in range(n)]
    filled = [cols for cols in used if cols]
    if any(a[-1] >= b[0] for a, b in zip(filled, filled[1:], strict=False)):
        return None
    bounds, start = [], 0
    for i, cols in enumerate(used):
        if not cols:
            bounds.append((start, start))
            continue
        later = [c[0] for c in used[i + 1 :] if c]
        end = later[0] if later else rank
        bounds.append((start, end))
        start = end
    return bounds
