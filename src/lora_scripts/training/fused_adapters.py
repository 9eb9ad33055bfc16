"""LoHa, LoKr and DoRA on a layer the kohya file fuses (Flux's `qkv`, a single block's `linear1`).

diffusers keeps apart what the original layout holds in one Linear (Flux's q, k and v; a single block's q, k, v
and MLP input), and A1111/ComfyUI/Forge apply a file's module to that one fused weight. For LoRA the parts'
factors fuse exactly (formats/fused.py). A Hadamard or Kronecker product, or a magnitude per input column, of
separate layers cannot: so for these types the parts are trained as one fused module, by sharing parameters
between peft's per-part layers (each part keeps peft's forward, state dict, resume and previews):

* LoHa  ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b): a row slice of ΔW takes the same rows of w1_a and w2_a, so the
  parts share w1_b and w2_b and own their rows of w1_a and w2_a.
* LoKr  ΔW = kron(w1, w2) of the fused weight, split as LyCORIS splits it: every part holds w1 and w2 and
  applies its own rows of the product (the split's row blocks need not line up with the parts).
* DoRA  W' = m ⊙ V / ‖V‖_col over the fused V: the parts share m, and each part's norm is taken over all of
  them (training.adapters._dora_input reads `dora_group`).

Written as the fused module (formats/fused.py fuse_lycoris; DoRA's LoRA factors fuse as LoRA's do).
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn

from ..formats.dora import PEFT_KEY as DORA_KEY

ADAPTER = "default"


def fused_groups(family, component: str, model: nn.Module) -> dict[str, list[tuple[int, tuple[int, ...], nn.Module]]]:
    """kohya name -> [(slot, row ratios of all slots, peft layer)] in slot order, for every fused module with at
    least one adapter layer in `model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    groups: dict[str, list] = {}
    for path, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or ".base_layer" in path:
            continue
        slot = family.fused_slot(component, path)
        if slot is not None:
            groups.setdefault(family.kohya_name(component, path), []).append((slot[0], slot[1], module))
    return {name: sorted(members, key=lambda t: t[0]) for name, members in groups.items()}


def whole_groups(family, component: str, module: nn.Module, chosen: list[str]) -> list[str]:
    """`chosen` plus every other part of a fused module one of them belongs to: DoRA's magnitude and LoKr's
    Kronecker product change the whole fused weight, so every part of it must train."""
    members: dict[str, list[str]] = {}
    for path in family.target_layers(component, module):
        if family.fused_slot(component, path) is not None:
            members.setdefault(family.kohya_name(component, path), []).append(path)
    picked = set(chosen)
    extra = {p for paths in members.values() if picked & set(paths) for p in paths}
    return sorted(picked | extra)


def share_fused(family, component: str, model: nn.Module, network_type: str, lokr_factor: int = -1) -> int:
    """Tie the per-part layers of every fused module into one LoHa/LoKr/DoRA module (see the module's docstring).
    Returns how many fused modules were tied; nothing to do for LoRA/LoCon or a family without fused modules."""
    if network_type not in ("loha", "lokr", "dora"):
        return 0
    groups = fused_groups(family, component, model)
    if network_type == "lokr":
        relayout_lokr(model, lokr_factor, {id(m) for members in groups.values() for _, _, m in members})
    for members in groups.values():
        if network_type == "loha":
            _share([m for _, _, m in members], ("hada_w1_b", "hada_w2_b"))
        elif network_type == "lokr":
            _share_lokr(members, lokr_factor)
        else:
            _share_magnitude(members)
    return len(groups)


def _share(layers: list[nn.Module], attributes: tuple[str, ...]) -> None:
    """Every layer's `attribute`[ADAPTER] becomes the first layer's Parameter (named_parameters lists it once, so
    the optimizer steps it once with the gradient of every part)."""
    first = layers[0]
    for layer in layers[1:]:
        for attribute in attributes:
            store, shared = getattr(layer, attribute), getattr(first, attribute)
            if ADAPTER in shared:
                store[ADAPTER] = shared[ADAPTER]
            elif ADAPTER in store:  # the first layer has no such factor: neither has the fused module
                del store[ADAPTER]


def lycoris_factorization(dimension: int, factor: int) -> tuple[int, int]:
    """LyCORIS' split of a size into (w1's, w2's): the smaller first. peft's factorization is the same search but
    keeps (factor, size / factor) when the factor is the larger, a layout LyCORIS' own loader cannot rebuild."""
    from peft.tuners.lokr.layer import factorization

    return tuple(sorted(factorization(dimension, factor)))


def _lokr_factors(layer: nn.Module, rows: int, factor: int) -> None:
    """Re-make a peft LoKr layer's factors for a weight of `rows` output rows (the fused weight's, or the layer's
    own) and the layer's inputs, split as LyCORIS splits them; started as peft starts them (w1 zeros, w2 and its
    factors kaiming-uniform), so step 0 is the base."""
    base = layer.get_base_layer()
    conv = isinstance(base, nn.Conv2d)
    kernel = tuple(base.kernel_size) if conv else ()
    (out_l, out_k), (in_m, in_n) = (lycoris_factorization(rows, factor),
                                    lycoris_factorization(base.in_channels if conv else base.in_features, factor))
    r = layer.r[ADAPTER]
    like = next(getattr(layer, a)[ADAPTER] for a in ("lokr_w1", "lokr_w1_a") if ADAPTER in getattr(layer, a))
    for attribute in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
        if ADAPTER in getattr(layer, attribute):
            del getattr(layer, attribute)[ADAPTER]

    def new(*shape: int, zero: bool = False) -> nn.Parameter:
        p = nn.Parameter(like.new_zeros(shape), requires_grad=like.requires_grad)
        if not zero:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        return p

    layer.lokr_w1[ADAPTER] = new(out_l, in_m, zero=True)
    if r >= max(out_k, in_n) / 2:  # peft's and LyCORIS' rule: w2 whole unless the rank is small against it
        layer.lokr_w2[ADAPTER] = new(out_k, in_n, *kernel)
    else:
        layer.lokr_w2_a[ADAPTER] = new(out_k, r)
        layer.lokr_w2_b[ADAPTER] = new(r, in_n * math.prod(kernel))


def relayout_lokr(model: nn.Module, factor: int, skip: set[int] = frozenset()) -> int:
    """Give every LoKr layer whose peft split differs from LyCORIS' (a lokr_factor above the square root of a
    size) LyCORIS' split, so LyCORIS' own loader rebuilds the file too (A1111 and ComfyUI read either).
    skip: ids of the layers a fused module re-makes. Returns how many were re-made."""
    from peft.tuners.lokr.layer import LoKrLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoKrLayer) or ADAPTER not in module.r or id(module) in skip:
            continue
        base = module.get_base_layer()
        rows, cols = (base.out_channels, base.in_channels) if isinstance(base, nn.Conv2d) else \
            (base.out_features, base.in_features)
        w1 = module.lokr_w1[ADAPTER] if ADAPTER in module.lokr_w1 else None
        if w1 is not None and tuple(w1.shape) != (lycoris_factorization(rows, factor)[0],
                                                  lycoris_factorization(cols, factor)[0]):
            _lokr_factors(module, rows, factor)
            count += 1
    return count


def _share_lokr(members: list, factor: int) -> None:
    """One LoKr module for the fused weight, split as LyCORIS splits it (so its loader rebuilds the file): every
    part holds the same w1 and w2 and applies its rows of kron(w1, w2) (`_part_delta`). Row blocks of w2 need
    not line up with the parts (Flux's linear1: 21504 = 128 x 168 rows, parts of 3072), so every part must train:
    rows of the fused change no part owns would reach the loaders untrained."""
    layers = [m for _, _, m in members]
    ratios = members[0][1]
    if [slot for slot, _, _ in members] != list(range(len(ratios))):
        raise ValueError("LoKr on a fused layer trains every part of it (adapters.choose_targets adds them)")
    unit = layers[0].get_base_layer().out_features // ratios[0]
    _lokr_factors(layers[0], unit * sum(ratios), factor)
    _share(layers, ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"))
    start = 0
    for layer, ratio in zip(layers, ratios):
        layer.lokr_rows = (start, start + ratio * unit)
        layer.get_delta_weight = types.MethodType(_part_delta, layer)
        start += ratio * unit


def _part_delta(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
    """peft's LoKr get_delta_weight for one part of a fused module: its rows of kron(w1, w2) x scale, computed
    from the w1 rows they come from (rank dropout is not offered for LoKr: lora_dropout is refused)."""
    w1 = self.lokr_w1[adapter_name]
    w2 = self.lokr_w2[adapter_name] if adapter_name in self.lokr_w2 else \
        self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]
    start, stop = self.lokr_rows
    b = w2.shape[0]
    first, last = start // b, -(-stop // b)
    rows = torch.kron(w1[first:last], w2)[start - first * b:stop - first * b]
    return (rows * self.scaling[adapter_name]).reshape(self.get_base_layer().weight.shape)


def _share_magnitude(members: list) -> None:
    """One input-axis magnitude for the fused weight: the parts' initial ones are their column norms, so the fused
    weight's is their root sum of squares (step 0 is still the base)."""
    layers = [m for _, _, m in members]
    with torch.no_grad():
        fused = torch.stack([getattr(m, DORA_KEY)[ADAPTER] for m in layers]).pow(2).sum(0).sqrt()
    shared = getattr(layers[0], DORA_KEY)[ADAPTER]
    shared.data = fused
    for layer in layers:
        getattr(layer, DORA_KEY)[ADAPTER] = shared
        layer.dora_group = tuple(layers)  # a plain tuple: not registered as submodules


__all__ = ["fused_groups", "lycoris_factorization", "relayout_lokr", "share_fused", "whole_groups"]
