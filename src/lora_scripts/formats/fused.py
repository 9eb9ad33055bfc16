"""One LoRA on a fused Linear <-> one LoRA per layer it fuses.

Where the original layout has one Linear for what diffusers splits into several (Flux's q/k/v `qkv`, a
single block's `linear1`), the kohya file holds one LoRA module for the fused weight. Trained per part
(down_i: r x in, up_i: out_i x r, scale alpha/r), the parts fuse exactly into
    down = [down_1; ...; down_k]   (k r x in)      up = blockdiag(up_1, ..., up_k)   (sum out_i x k r)
with alpha k x alpha, so that every loader's alpha / rank (rank = k r) is still alpha / r. This is the layout
sd-scripts writes for split q/k/v, and the one diffusers' kohya converter recognises as "sparse" and splits
back without loss. A part without LoRA contributes zero rows; all parts are always written, so the rank
and the block structure are the same for every module of a kind.
"""

from __future__ import annotations

import torch
from torch import Tensor

Part = tuple[Tensor, Tensor, float]  # (down, up, alpha) of one layer


def fuse(parts: list[Part | None], sizes: list[int]) -> Part:
    """parts[i]: the LoRA of the i-th layer of the fused weight, None where it has none; sizes[i]: that layer's
    output rows. All present parts must share rank and alpha/rank (they come from one LoraConfig)."""
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("nothing to fuse")
    rank, scale = present[0][0].shape[0], present[0][2] / present[0][0].shape[0]
    if any(p[0].shape[0] != rank or abs(p[2] / p[0].shape[0] - scale) > 1e-9 * max(1.0, scale) for p in present):
        raise ValueError("the parts of a fused layer differ in rank or alpha/rank")
    ref_down, ref_up = present[0][0], present[0][1]
    downs, ups = [], []
    for p, rows in zip(parts, sizes):
        if p is None:
            downs.append(ref_down.new_zeros(ref_down.shape))
            ups.append(ref_up.new_zeros((rows,) + tuple(ref_up.shape[1:])))
        else:
            if p[1].shape[0] != rows:
                raise ValueError(f"a part has {p[1].shape[0]} output rows, its slot {rows}")
            downs.append(p[0])
            ups.append(p[1])
    up = torch.block_diag(*[u.flatten(1) for u in ups]).reshape((sum(sizes), rank * len(parts)) + tuple(ref_up.shape[2:]))
    return torch.cat(downs, dim=0), up, scale * rank * len(parts)


def fuse_slots(ratios: tuple[int, ...], parts: dict[int, Part]) -> Part:
    """fuse, for the parts of one module by their slot index, with the row ratios of all its slots (FUSED_RATIOS
    of formats/flux.py): every slot's rows follow from any one present part's."""
    index, (_, up, _) = next(iter(parts.items()))
    unit = up.shape[0] // ratios[index]
    return fuse([parts.get(i) for i in range(len(ratios))], [r * unit for r in ratios])


def split(down: Tensor, up: Tensor, alpha: float, sizes: list[int]) -> list[Part | None]:
    """The per-layer LoRAs of a fused module. A block-diagonal module (as `fuse` writes it) splits back into the
    rank-r parts it came from; any other (a LoRA trained on the fused weight) gives each layer the shared down
    and its rows of up, at the file's rank. Either way each part's delta is exactly its rows of the fused delta.
    None for a part `fuse` wrote as zeros (a layer that had no LoRA)."""
    k, rank = len(sizes), down.shape[0]
    if rank % k == 0:
        r = rank // k
        blocks = torch.split(up.flatten(1), sizes, dim=0)
        if all(bool((b[:, :i * r] == 0).all()) and bool((b[:, (i + 1) * r:] == 0).all()) for i, b in enumerate(blocks)):
            part_alpha = alpha / k  # alpha / rank stays the same at rank r
            parts = [(down[i * r:(i + 1) * r], up[sum(sizes[:i]):sum(sizes[:i + 1]), i * r:(i + 1) * r], part_alpha)
                     for i in range(k)]
            return [None if not (p[0].any() or p[1].any()) else p for p in parts]
    ups = torch.split(up, sizes, dim=0)
    return [(down, u, alpha) for u in ups]


# --- LoHa / LoKr on a fused layer (training.fused_adapters trains them with shared factors) -------------------
# LoHa's parts own their rows of w1_a and w2_a and share w1_b, w2_b; LoKr's parts share every factor.
_OWN_ROWS = ("hada_w1_a", "hada_w2_a")


def fuse_lycoris(ratios: tuple[int, ...], parts: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """The fused module of per-part LoHa/LoKr factors (slot index -> {param: tensor}) trained with shared factors:
    LoHa's own rows stacked in slot order (a slot without a part given zero rows: its rows of ΔW are zero), the
    shared factors once. ΔW of the result is the parts' ΔW stacked, by both loaders' rules."""
    index = min(parts)
    first = parts[index]
    own = [k for k in _OWN_ROWS if k in first]
    if not own and sorted(parts) != list(range(len(ratios))):
        raise ValueError("a fused LoKr module needs every part: its product spans the whole fused weight")
    shared = {k: v for k, v in first.items() if k not in own}
    for tensors in parts.values():
        if set(tensors) != set(first):
            raise ValueError("the parts of a fused layer hold different LoHa/LoKr factors")
        for key, value in shared.items():
            if not torch.equal(tensors[key], value):
                raise ValueError(f"the parts of a fused layer differ in {key}, which they must share")
    out = dict(shared)
    for key in own:
        unit = first[key].shape[0] // ratios[index]  # the part's rows per unit of the slot ratios
        out[key] = torch.cat([parts[slot][key] if slot in parts else
                              first[key].new_zeros((ratio * unit,) + tuple(first[key].shape[1:]))
                              for slot, ratio in enumerate(ratios)], dim=0)
    return out


__all__ = ["Part", "fuse", "fuse_lycoris", "fuse_slots", "split"]
