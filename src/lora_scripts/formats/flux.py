"""Flux.1's original (Black Forest Labs) transformer layout <-> diffusers' FluxTransformer2DModel.

ComfyUI, Forge and sd-scripts read flux1-dev.safetensors in the BFL layout and name LoRA modules by it
(`lora_unet_double_blocks_0_img_attn_qkv`). Where BFL has one Linear, diffusers sometimes has several: a
double block's image and text q/k/v are one `qkv` Linear each, a single block's q/k/v and MLP input are one
`linear1`. diffusers ships only the BFL -> diffusers direction (its single-file loader); the other direction,
which naming a LoRA and writing test models need, is this table.

Everything here is pure renaming: the functions take tensors or shapes (stand-ins for tensors) alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

BFL_PREFIX = "model.diffusion_model."  # ComfyUI's full checkpoints; flux1-dev.safetensors has none
KOHYA_PREFIX = "lora_unet_"

# diffusers path inside transformer_blocks.{i} -> (BFL module inside double_blocks.{i}, part of the fused Linear)
_DOUBLE: dict[str, tuple[str, int | None]] = {
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
}
_SINGLE: dict[str, tuple[str, int | None]] = {
    "norm.linear": ("modulation.lin", None), "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None),
}
# Parameters that are not Linear layers (RMSNorm scales of the q/k normalisation).
_DOUBLE_NORMS = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                 "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                 "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                 "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
_TOP: dict[str, str] = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# diffusers orders the final modulation (scale, shift), BFL (shift, scale): the halves swap (diffusers'
# converter does the same). A LoRA on it would need its up rows swapped too; it is not a LoRA target here.
SWAPPED = "norm_out.linear"
# Row blocks of each fused BFL Linear, in units of the model width: q, k, v (and a single block's MLP input,
# FluxSingleTransformerBlock's mlp_ratio 4).
FUSED_RATIOS = {"qkv": (1, 1, 1), "linear1": (1, 1, 1, 4)}


class FluxLayoutError(ValueError):
    pass


def bfl_module(path: str) -> tuple[str, int | None]:
    """A diffusers module path of the transformer -> (its BFL module, which part of a fused Linear it is)."""
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", path)
    if m:
        table, block = (_DOUBLE, "double_blocks") if m[1] == "transformer_blocks" else (_SINGLE, "single_blocks")
        if m[3] not in table:
            raise FluxLayoutError(f"{path}: no such layer in a Flux {block[:-1]}")
        bfl, part = table[m[3]]
        return f"{block}.{m[2]}.{bfl}", part
    if path in _TOP:
        return _TOP[path], None
    raise FluxLayoutError(f"{path}: not a layer of the Flux transformer")


def fused_parts(bfl: str) -> int:
    """How many diffusers Linears make up this BFL module (1 where it is not fused)."""
    return len(FUSED_RATIOS.get(bfl.rsplit(".", 1)[-1], (1,)))


def kohya_name(path: str) -> str:
    """sd-scripts' (and ComfyUI's) name of the LoRA module holding this diffusers layer."""
    return KOHYA_PREFIX + bfl_module(path)[0].replace(".", "_")


def _bfl_key(key: str) -> tuple[str, int | None]:
    """A diffusers parameter key -> (BFL key, part of a fused tensor)."""
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", key)
    if m:
        norms = _DOUBLE_NORMS if m[1] == "transformer_blocks" else _SINGLE_NORMS
        block = "double_blocks" if m[1] == "transformer_blocks" else "single_blocks"
        if m[3] in norms:
            return f"{block}.{m[2]}.{norms[m[3]]}", None
    module, _, param = key.rpartition(".")
    bfl, part = bfl_module(module)
    return f"{bfl}.{param}", part


def transformer_to_bfl(state: dict[str, Any], cat: Callable[[list[Any]], Any] | None = None,
                       swap: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """A FluxTransformer2DModel state dict in the BFL layout (no prefix). Fused tensors are concatenated in row
    order (q, k, v[, mlp]); `cat` and `swap` default to the tensor operations, shapes pass their own."""
    import torch

    cat = cat or (lambda parts: torch.cat(parts, dim=0))
    swap = swap or (lambda t: torch.cat(t.chunk(2, dim=0)[::-1], dim=0))
    out: dict[str, Any] = {}
    fused: dict[str, dict[int, Any]] = {}
    for key, value in state.items():
        bfl, part = _bfl_key(key)
        if key.startswith(SWAPPED + "."):
            value = swap(value)
        if part is None:
            if bfl in out:
                raise FluxLayoutError(f"two keys map to {bfl}")
            out[bfl] = value
        else:
            fused.setdefault(bfl, {})[part] = value
    for bfl, parts in fused.items():
        want = fused_parts(bfl.rsplit(".", 1)[0])
        if sorted(parts) != list(range(want)):
            raise FluxLayoutError(f"{bfl}: {len(parts)} of its {want} diffusers parts are present")
        out[bfl] = cat([parts[i] for i in range(want)])
    return out


def bfl_to_transformer(state: dict[str, Any], width: int) -> dict[str, Any]:
    """The inverse of transformer_to_bfl for tensors: a BFL state dict (prefix already removed) in diffusers'
    names; fused tensors split by FUSED_RATIOS x width (the model's inner dimension). diffusers' own single-file
    converter hard-codes Flux.1's width (3072), so it cannot load a model of another size (our test models)."""
    import torch

    names: dict[str, tuple[str, int | None]] = {}
    for block, count, table, norms in (("transformer_blocks", _count(state, "double_blocks."), _DOUBLE, _DOUBLE_NORMS),
                                       ("single_transformer_blocks", _count(state, "single_blocks."), _SINGLE,
                                        _SINGLE_NORMS)):
        for i in range(count):
            for path in table:
                for param in ("weight", "bias"):
                    key = f"{block}.{i}.{path}.{param}"
                    names[key] = _bfl_key(key)
            for key in norms:
                names[f"{block}.{i}.{key}"] = _bfl_key(f"{block}.{i}.{key}")
    for path in _TOP:
        for param in ("weight", "bias"):
            names[f"{path}.{param}"] = _bfl_key(f"{path}.{param}")
    out: dict[str, Any] = {}
    for key, (bfl, part) in names.items():
        if bfl not in state:
            continue
        value = state[bfl]
        if part is not None:
            ratios = FUSED_RATIOS[bfl.rsplit(".", 2)[-2]]
            value = torch.split(value, [r * width for r in ratios], dim=0)[part]
        if key.startswith(SWAPPED + "."):
            value = torch.cat(value.chunk(2, dim=0)[::-1], dim=0)
        out[key] = value
    used = {bfl for bfl, _ in names.values()}
    extra = sorted(k for k in state if k not in used)
    if extra:
        raise FluxLayoutError(f"{len(extra)} keys are not Flux.1 transformer weights (first: {extra[0]})")
    return out


def _count(state: dict[str, Any], prefix: str) -> int:
    blocks = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(blocks) + 1 if blocks else 0


def transformer_shapes_to_bfl(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """transformer_to_bfl for key -> shape (a diffusers folder's header, no weights read)."""
    return transformer_to_bfl(shapes, cat=lambda parts: (sum(p[0] for p in parts),) + tuple(parts[0][1:]),
                              swap=lambda s: s)


__all__ = ["BFL_PREFIX", "FUSED_RATIOS", "FluxLayoutError", "KOHYA_PREFIX", "SWAPPED", "bfl_module", "bfl_to_transformer",
           "fused_parts", "kohya_name", "transformer_shapes_to_bfl", "transformer_to_bfl"]
