"""LoHa, LoKr and DoRA on a layer the kohya file fuses (Flux's `qkv`, a single block's `linear1`).

diffusers keeps apart what the original layout holds in one Linear (Flux's q, k and v; a single block's q, k, v
and MLP input), and A1111/ComfyUI/Forge apply a file's module to that one fused weight. For LoRA the parts'
factors fuse exactly (formats/fused.py). A Hadamard or Kronecker product, or a magnitude per input column, of
separate layers cannot: so for these types the parts are trained as one fused module, by sharing parameters
between peft's per-part layers (each part keeps peft's forward, state dict, resume and previews):

* LoHa  ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b): a row slice of ΔW takes the same rows of w1_a and w2_a, so the
  parts share w1_b and w2_b and own their rows of w1_a and w2_a.
* LoKr  ΔW = kron(w1, w2), w2 with b rows: when b divides every part's rows, part i's rows are kron(w1_i, w2)
  with w1_i its own rows of w1, so the parts share w2 (and its factors) and own their rows of w1.
* DoRA  W' = m ⊙ V / ‖V‖_col over the fused V: the parts share m, and each part's norm is taken over all of
  them (training.adapters._dora_input reads `dora_group`).

Written as the fused module (formats/fused.py fuse_lycoris; DoRA's LoRA factors fuse as LoRA's do).
"""

from __future__ import annotations

import math

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
    """`chosen` plus every other part of a fused module one of them belongs to: DoRA's magnitude scales the whole
    fused weight, so every part of it must carry the magnitude and its norm."""
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
            store = getattr(layer, attribute)
            if attribute in _present(first):
                store[ADAPTER] = getattr(first, attribute)[ADAPTER]
            elif ADAPTER in store:
                del store[ADAPTER]


def _present(layer: nn.Module) -> set[str]:
    return {a for a in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "hada_w1_b",
                        "hada_w2_b") if ADAPTER in getattr(layer, a, {})}


def lokr_rows(ratios: tuple[int, ...], unit: int, factor: int) -> int:
    """The rows b of the shared w2: LyCORIS' factorisation of the smallest common size of every slot (the model
    width for Flux), so that b divides each part's rows."""
    from peft.tuners.lokr.layer import factorization

    common = math.gcd(*[r * unit for r in ratios])
    return factorization(common, factor)[1]


def _share_lokr(members: list, factor: int) -> None:
    """peft factorises each part's rows on its own (3072 and 12288 split differently), so w1 is re-made per part
    with rows/b rows (zeros, as peft starts it: step 0 is the base), and w2 is the first part's, re-made with b
    rows where its own factorisation differs."""
    layers = [m for _, _, m in members]
    first = layers[0]
    slot, ratios = members[0][0], members[0][1]
    unit = first.get_base_layer().out_features // ratios[slot]
    b = lokr_rows(ratios, unit, factor)
    w2 = "lokr_w2" if ADAPTER in first.lokr_w2 else "lokr_w2_a"
    old = getattr(first, w2)[ADAPTER]
    if old.shape[0] != b:
        fresh = nn.Parameter(old.new_empty((b,) + tuple(old.shape[1:])), requires_grad=old.requires_grad)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))  # as peft's reset_adapter_parameters starts w2
        getattr(first, w2)[ADAPTER] = fresh
    for layer in layers:
        if ADAPTER not in layer.lokr_w1:
            raise ValueError("LoKr on a fused layer needs a full w1 (decompose_both is off)")
        w1 = layer.lokr_w1[ADAPTER]
        rows = layer.get_base_layer().out_features // b
        if w1.shape[0] != rows:
            layer.lokr_w1[ADAPTER] = nn.Parameter(w1.new_zeros((rows,) + tuple(w1.shape[1:])),
                                                  requires_grad=w1.requires_grad)
    _share(layers, ("lokr_w2", "lokr_w2_a", "lokr_w2_b"))


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


__all__ = ["fused_groups", "lokr_rows", "share_fused", "whole_groups"]
