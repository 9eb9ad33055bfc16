"""transformers' CLIP text-encoder state <-> the OpenCLIP text tower in the original SD2 single-file (LDM) layout.

SD2 checkpoints store OpenCLIP ViT-H/14's text tower under ``cond_stage_model.model.``: fused q/k/v
(``attn.in_proj_*``, as ``torch.nn.MultiheadAttention`` keeps them), ``ln_1``/``ln_2``/``mlp.c_fc``/
``mlp.c_proj`` per resblock, plus ``text_projection`` and ``logit_scale`` that SD2 never uses.

SD2 conditions on the *penultimate* resblock (then ``ln_final``), so diffusers' text encoder has 23
layers while real files hold 24. diffusers' loader (``convert_open_clip_checkpoint``) skips
``resblocks.23`` and ``text_projection`` by name, and silently skips any other key its model lacks.
A1111 and ComfyUI (read in their sources, not run here) build the full 24-block tower, take layer -2
and load non-strictly, so a file without block 23 leaves that block's weights uninitialised there.
We therefore write what a real file has, with a zero block 23: zero LayerNorm weights make the
block an exact identity, so "last layer" and "penultimate layer" give the same output.

Pure functions: tensors in, tensors out (or shapes in, shapes out, for planning a file).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from .ldm import LdmConversionError

OPEN_CLIP_PREFIX = "cond_stage_model.model."

_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# Per-layer modules that are renamed one to one (their .weight/.bias kept).
_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# Row order inside OpenCLIP's fused ``in_proj`` (torch.nn.MultiheadAttention): q, then k, then v.
_QKV = ("q_proj", "k_proj", "v_proj")
_FIXED_REVERSE = {v: k for k, v in _FIXED.items()}
_LAYER_REVERSE = {v: k for k, v in _LAYER.items()}
# Present in every real SD2 file, read by nothing that runs SD2.
_UNUSED = ("text_projection", "logit_scale")
# OpenCLIP clamps logit_scale at ln(100) and trained towers end there; SD2 never reads it.
_LOGIT_SCALE = math.log(100.0)

_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_RESBLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def _transformers5(state: dict) -> dict:
    """transformers 4 saved CLIP text encoders with a `text_model.` level and, in older versions, the position_ids
    buffer (every SD2 diffusers folder on the Hub was written so); transformers 5 has neither."""
    out = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    if len(out) != sum(not k.endswith("embeddings.position_ids") for k in state):
        raise LdmConversionError("the text encoder state has keys both with and without the text_model. prefix")
    return out


def _plan(keys) -> dict[str, tuple[str, ...]]:
    """LDM key (without prefix) -> the transformers keys it is made of, in concatenation order."""
    plan: dict[str, list[str | None]] = {}
    for key in keys:
        if key in _FIXED:
            plan[_FIXED[key]] = [key]
            continue
        m = _LAYER_KEY.fullmatch(key)
        if m is None:
            raise LdmConversionError(f"text encoder key {key!r} has no OpenCLIP equivalent")
        layer, module, param = m[1], m[2], m[3]
        block = f"transformer.resblocks.{layer}"
        if module in _LAYER:
            plan[f"{block}.{_LAYER[module]}.{param}"] = [key]
        elif module.startswith("self_attn.") and module[len("self_attn."):] in _QKV:
            slots = plan.setdefault(f"{block}.attn.in_proj_{param}", [None, None, None])
            slots[_QKV.index(module[len("self_attn."):])] = key
        else:
            raise LdmConversionError(f"text encoder key {key!r} has no OpenCLIP equivalent")
    for dst, parts in plan.items():
        if None in parts:
            missing = [_QKV[i] for i, p in enumerate(parts) if p is None]
            raise LdmConversionError(f"{dst} needs q, k and v projections; missing {missing}")
    return {dst: tuple(parts) for dst, parts in plan.items()}  # type: ignore[arg-type]


def _last_block(plan_keys) -> int:
    blocks = [int(m[1]) for k in plan_keys if (m := _RESBLOCK_KEY.fullmatch(k))]
    if not blocks:
        raise LdmConversionError("text encoder state has no encoder layers")
    return max(blocks)


def _renumber(key: str, block: int) -> str:
    m = _RESBLOCK_KEY.fullmatch(key)
    return f"transformer.resblocks.{block}.{m[2]}"  # type: ignore[index]


def open_clip_to_ldm(state: dict[str, Tensor], *, unused_last_block: bool = True) -> dict[str, Tensor]:
    """a transformers 5 CLIP text-encoder state (no ``text_model.`` prefix) -> SD2 single-file keys.

    ``unused_last_block`` appends the zero (identity) resblock real SD2 files carry after the
    layers SD2 uses; ``text_projection`` (identity, (width, width) like ViT-H's) and ``logit_scale``
    are always written, because real files have them and loaders size their models from the file.
    """
    state = _transformers5(state)
    plan = _plan(state)
    out = {}
    for dst, parts in plan.items():
        out[dst] = state[parts[0]] if len(parts) == 1 else torch.cat([state[p] for p in parts], dim=0)
    token = state["embeddings.token_embedding.weight"]
    width = token.shape[1]
    out["text_projection"] = torch.eye(width, dtype=token.dtype, device=token.device)
    out["logit_scale"] = torch.tensor(_LOGIT_SCALE, dtype=token.dtype, device=token.device)
    if unused_last_block:
        last = _last_block(plan)
        for k in [k for k in plan if k.startswith(f"transformer.resblocks.{last}.")]:
            out[_renumber(k, last + 1)] = torch.zeros_like(out[k])
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def open_clip_shapes_to_ldm(
    shapes: dict[str, tuple[int, ...]], *, unused_last_block: bool = True
) -> dict[str, tuple[int, ...]]:
    """The keys and shapes :func:`open_clip_to_ldm` writes, from the text encoder's shapes alone."""
    shapes = _transformers5(shapes)
    plan = _plan(shapes)
    out: dict[str, tuple[int, ...]] = {}
    for dst, parts in plan.items():
        first = tuple(shapes[parts[0]])
        out[dst] = first if len(parts) == 1 else (sum(shapes[p][0] for p in parts), *first[1:])
    width = shapes["embeddings.token_embedding.weight"][1]
    out["text_projection"] = (width, width)
    out["logit_scale"] = ()
    if unused_last_block:
        last = _last_block(plan)
        for k in [k for k in plan if k.startswith(f"transformer.resblocks.{last}.")]:
            out[_renumber(k, last + 1)] = out[k]
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def _split_key(key: str) -> list[str]:
    """One LDM key (without prefix) -> the transformers key(s) it holds, in row order."""
    if key in _FIXED_REVERSE:
        return [_FIXED_REVERSE[key]]
    m = _RESBLOCK_KEY.fullmatch(key)
    if m is None:
        raise LdmConversionError(f"OpenCLIP key {key!r} has no transformers equivalent")
    layer, rest = m[1], m[2]
    if mq := re.fullmatch(r"attn\.in_proj_(weight|bias)", rest):
        return [f"encoder.layers.{layer}.self_attn.{p}.{mq[1]}" for p in _QKV]
    module, _, param = rest.rpartition(".")
    if module not in _LAYER_REVERSE or param not in ("weight", "bias"):
        raise LdmConversionError(f"OpenCLIP key {key!r} has no transformers equivalent")
    return [f"encoder.layers.{layer}.{_LAYER_REVERSE[module]}.{param}"]


def ldm_to_open_clip(state: dict[str, Tensor], num_layers: int | None = None) -> dict[str, Tensor]:
    """SD2 single-file text-encoder keys -> a transformers 5 CLIP text-encoder state.

    ``num_layers`` (23 for SD2) drops the resblocks SD2 never runs; None keeps every block.
    ``text_projection`` and ``logit_scale`` are dropped: the transformers text encoder has neither.
    """
    out: dict[str, Tensor] = {}
    for full, value in state.items():
        if not full.startswith(OPEN_CLIP_PREFIX):
            raise LdmConversionError(f"key {full!r} is not under {OPEN_CLIP_PREFIX!r}")
        key = full[len(OPEN_CLIP_PREFIX):]
        if key in _UNUSED:
            continue
        m = _RESBLOCK_KEY.fullmatch(key)
        if m and num_layers is not None and int(m[1]) >= num_layers:
            continue
        targets = _split_key(key)
        # Clones, not views: safetensors refuses to save tensors that share storage.
        parts = [p.clone() for p in value.chunk(3, dim=0)] if len(targets) == 3 else [value]
        out.update(zip(targets, parts))
    return out


def open_clip_weight_of(module_path: str, prefix: str = OPEN_CLIP_PREFIX) -> tuple[str, int | None]:
    """Where a text-encoder Linear's weight lives in the single file (SD2's tower under cond_stage_model.model.,
    SDXL's bigG under conditioner.embedders.1.model.): (key, None), or (fused in_proj key, index 0/1/2 of
    q/k/v) for an attention projection that the file fuses with its two siblings."""
    m = re.fullmatch(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)", module_path)
    if m is None:
        raise LdmConversionError(f"{module_path!r} is not a layer of the text encoder's transformer")
    block, name = m.groups()
    prefix = f"{prefix}transformer.resblocks.{block}."
    attn = name.removeprefix("self_attn.")
    if attn in _QKV:
        return prefix + "attn.in_proj_weight", _QKV.index(attn)
    if name not in _LAYER:
        raise LdmConversionError(f"{module_path!r} has no weight in the OpenCLIP layout")
    return prefix + _LAYER[name] + ".weight", None


def open_clip_with_projection_to_ldm(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """a transformers 5 CLIP text encoder with its projection (SDXL's OpenCLIP-bigG) -> its single-file keys under
    ``prefix`` (SDXL: ``conditioner.embedders.1.model.``). Unlike SD2's: every block is used (SDXL takes the
    penultimate hidden state itself), so no unused block is added, and the trained projection is kept,
    transposed: OpenCLIP computes ``x @ P`` where nn.Linear computes ``x @ W.T``. At real size P is square
    (1280 x 1280), so a missing transpose would load without any error."""
    body = {k: v for k, v in state.items() if k != "text_projection.weight"}
    if "text_projection.weight" not in state:
        raise LdmConversionError("the text encoder state has no text_projection.weight (not a text encoder with a projection)")
    out = {k.removeprefix(OPEN_CLIP_PREFIX): v for k, v in open_clip_to_ldm(body, unused_last_block=False).items()}
    out["text_projection"] = state["text_projection.weight"].T.contiguous()
    return {prefix + k: v for k, v in out.items()}


def open_clip_with_projection_shapes_to_ldm(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    """The keys and shapes :func:`open_clip_with_projection_to_ldm` writes, from the encoder's shapes alone."""
    if "text_projection.weight" not in shapes:
        raise LdmConversionError("the text encoder state has no text_projection.weight (not a text encoder with a projection)")
    body = {k: v for k, v in shapes.items() if k != "text_projection.weight"}
    out = {k.removeprefix(OPEN_CLIP_PREFIX): v for k, v in open_clip_shapes_to_ldm(body, unused_last_block=False).items()}
    out["text_projection"] = tuple(reversed(shapes["text_projection.weight"]))
    return {prefix + k: v for k, v in out.items()}
