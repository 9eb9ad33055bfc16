"""LyCORIS' own modules (the lycoris-lora package, what sd-scripts users train LoHa/LoKr/DoRA with) as a second,
independent reading of a file, for `verify`: the weight change a module's training forward applies.

We train through peft and read files by A1111/ComfyUI's rule (formats/lycoris.py, formats/dora.py); diffusers
reads none of these types, so LyCORIS is the independent implementation a file is checked against, as diffusers
is for plain LoRA. Its `get_weight` (what its forward adds) is used, not `get_diff_weight`: in lycoris-lora
4.1.3 the latter multiplies LoHa's and a decomposed LoKr's alpha / r in twice (measured: LoHa off by that
factor, LoKr with two full factors, whose scale is 1, equal). Input-axis DoRA (wd_on_out=False) is built
directly: its make_module_from_state_dict assumes an output-axis magnitude.
"""

from __future__ import annotations

from importlib import metadata

import torch
from torch import Tensor, nn


def version() -> str | None:
    """lycoris-lora's version, or None where it is not installed (the optional extra `lycoris`)."""
    try:
        return metadata.version("lycoris-lora")
    except metadata.PackageNotFoundError:
        return None


def _layer(weight: Tensor) -> nn.Module:
    """A bias-free Linear or Conv2d holding W0, the shape LyCORIS builds its module around."""
    if weight.dim() == 4:
        layer = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight.detach().float().cpu().clone()
    return layer


def _rank(tensors: dict[str, Tensor]) -> float:
    """The rank the loaders take as alpha where a file has none (formats/lycoris' rule; 1 for a LoKr of two full
    factors, whose scale is 1 whatever alpha is)."""
    from ..formats import lycoris

    if "lora_down.weight" in tensors:
        return float(tensors["lora_down.weight"].shape[0])
    kind = lycoris.kind_of(set(tensors))
    rank = tensors["hada_w1_b"].shape[0] if kind == "loha" else lycoris.lokr_rank(tensors)
    return float(rank or 1)


@torch.no_grad()
def reference_change(name: str, tensors: dict[str, Tensor], weight: Tensor) -> Tensor:
    """The change LyCORIS' module for this file module (its keys without the name: hada_w1_a, lokr_w1, ...,
    lora_down.weight + dora_scale, alpha) makes to W0 = `weight` at strength 1, in fp32."""
    from lycoris.modules import get_module, make_module
    from lycoris.modules.locon import LoConModule

    layer = _layer(weight)
    tensors = {k: v.float().cpu() for k, v in tensors.items()}
    alpha = float(tensors["alpha"]) if "alpha" in tensors else _rank(tensors)  # no alpha: every loader's is rank
    if "dora_scale" in tensors:
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        module = LoConModule(name, layer, 1, down.shape[0], alpha, weight_decompose=True, wd_on_out=False)
        module.lora_down.weight.copy_(down.reshape(module.lora_down.weight.shape))
        module.lora_up.weight.copy_(up.reshape(module.lora_up.weight.shape))
        module.dora_scale.copy_(tensors["dora_scale"].reshape(module.dora_scale.shape))
        merged = module.get_merged_weight(multiplier=1, shape=layer.weight.shape)[0]
        return merged.float() - layer.weight
    tensors["alpha"] = torch.tensor(alpha)  # LyCORIS' loader needs it as a number
    kind, params = get_module({f"{name}.{k}": v for k, v in tensors.items()}, name)
    if kind is None:
        raise ValueError(f"{name}: LyCORIS recognises no module type in its keys ({', '.join(sorted(tensors))})")
    module = make_module(kind, params, name, layer)
    if module is None:
        raise ValueError(f"{name}: LyCORIS cannot build a {kind.__name__} from its keys")
    return module.get_weight(tuple(layer.weight.shape)).float()


__all__ = ["reference_change", "version"]
