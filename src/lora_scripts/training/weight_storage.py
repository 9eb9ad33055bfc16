"""Frozen weights stored in a smaller dtype than they are computed in (base_weight_dtype,
text_encoder_weight_dtype): fp8 halves a bf16 UNet/transformer's memory (Flux.1-dev: 24 -> 12 GB); int8 does
too, through torchao's int8 weight-only quantisation (per-channel scales: finer than fp8's 3-bit mantissa), which
peft trains LoRA on; nf4 quarters it through bitsandbytes' 4-bit Linear (QLoRA's NormalFloat4, the layer
bitsandbytes and peft maintain; CUDA, and CPU in recent bitsandbytes). int8 and nf4 cover Linear layers only
(a UNet's convolutions stay in the compute dtype).

Each frozen Linear/Conv/Embedding keeps its weight in the storage dtype, and its forward computes with a copy in
the compute dtype. LoRA layers, norms, position/patch embeddings and a model's own precision-critical layers
(diffusers' default skip patterns, its _skip_layerwise_casting_patterns and _keep_in_fp32_modules; or, where a
family names them, its own: Family.unstored_layers), and the layer whose parameter gives the model its `dtype`,
are left in the compute dtype. The copy lives only while autograd needs it for the backward pass: with gradient
checkpointing one block at a time, without it every layer's until the backward pass (little saved at the peak).

Written here rather than taken from diffusers' layerwise casting, which is for inference: it swaps each
parameter's data to the compute dtype and back around the forward, so the parameter autograd saved for the
backward pass is fp8 again by then (measured: gradient checkpointing stops with "Recomputed values ... have
different metadata", float32 saved, float8_e4m3fn recomputed). Casting a copy inside forward, as sd-scripts'
fp8_base and OneTrainer do, gives autograd a tensor nobody changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig

STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": getattr(torch, "float8_e4m3fn", None)}
# Storage may drop precision against the compute dtype, never range: fp16 cannot hold every bf16 value.
_ALLOWED = {"bf16": (torch.float32, torch.bfloat16), "fp16": (torch.float32, torch.float16),
            "fp8": (torch.float32, torch.bfloat16, torch.float16), "int8": (torch.float32, torch.bfloat16, torch.float16),
            "nf4": (torch.float32, torch.bfloat16, torch.float16)}


def storage_plan(config: TrainConfig, family) -> dict[str, str]:
    """Component -> storage kind (bf16, fp16, fp8, int8), for the components the config stores otherwise."""
    plan = {}
    if config.base_weight_dtype != "auto":
        plan[family.denoiser] = config.base_weight_dtype
    if config.text_encoder_weight_dtype != "auto":
        plan.update({name: config.text_encoder_weight_dtype for name in family.text_encoders})
    return plan


def store_planned(config: TrainConfig, family, modules: dict[str, nn.Module], compute: torch.dtype) -> dict[str, str]:
    """Store each component the config names as its storage_plan says, keeping the family's unstored layers in
    `compute`; returns the plan (the trainer and check's estimate both store through here)."""
    plan = storage_plan(config, family)
    for name, kind in plan.items():
        store_frozen(modules[name], kind, compute, family.unstored_layers(name))
    return plan


def storage_problems(config: TrainConfig, compute: torch.dtype) -> list[str]:
    problems = []
    for key in ("base_weight_dtype", "text_encoder_weight_dtype"):
        value = getattr(config, key)
        if value == "auto":
            continue
        if value == "fp8" and STORAGE["fp8"] is None:
            problems.append(f"{key} = fp8: this torch ({torch.__version__}) has no float8 dtype; use int8 or bf16 (or "
                            "upgrade torch to 2.1 or newer)")
        elif value == "int8" and not _has("torchao"):
            problems.append(f"{key} = int8: torchao is not installed (pip install torchao, or lora-scripts[torchao]); "
                            "or use fp8, which needs no package")
        elif value == "nf4" and not _has("bitsandbytes"):
            problems.append(f"{key} = nf4: bitsandbytes is not installed (pip install bitsandbytes, or "
                            "lora-scripts[bitsandbytes]); or use int8 / fp8")
        elif compute not in _ALLOWED[value]:
            problems.append(f"{key} = {value} with mixed_precision: {config.mixed_precision}: {value} cannot hold "
                            f"every {str(compute).removeprefix('torch.')} weight; use {key}: fp8, or auto")
    if config.torch_compile and (config.base_weight_dtype != "auto"):
        problems.append(f"base_weight_dtype = {config.base_weight_dtype} with torch_compile: true: the casting "
                        "around every layer breaks the compiled graph; set torch_compile: false")
    return problems


def _has(package: str) -> bool:
    from importlib.util import find_spec

    return find_spec(package) is not None


def _linear(self, x):
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return F.linear(x, self.weight.to(self.compute_dtype), bias)


def _conv(self, x):
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return self._conv_forward(x, self.weight.to(self.compute_dtype), bias)


def _embedding(self, ids):
    return F.embedding(ids, self.weight.to(self.compute_dtype), self.padding_idx, self.max_norm, self.norm_type,
                       self.scale_grad_by_freq, self.sparse)


_FORWARDS = {nn.Linear: _linear, nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv, nn.Embedding: _embedding}


def _frozen_leaves(module: nn.Module, classes: tuple[type, ...],
                   keep: tuple[str, ...] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """The frozen layers of these exact classes (peft's LoRA wrappers are other classes) not kept in the compute
    dtype: `keep` (the family's patterns, Family.unstored_layers), or where it has none diffusers' default skip
    patterns (norms, position/patch embeddings) and the model's own (_skip_layerwise_casting_patterns); always
    the model's _keep_in_fp32_modules and LoRA layers."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    if keep is None:
        keep = DEFAULT_SKIP_MODULES_PATTERN + tuple(getattr(module, "_skip_layerwise_casting_patterns", None) or ())
    skip = tuple(keep) + tuple(getattr(module, "_keep_in_fp32_modules", None) or ()) + ("lora_",)
    first = _dtype_parameter(module)
    for name, leaf in module.named_modules():
        plain = name.replace(".base_layer", "")  # a layer peft wrapped for LoRA: matched by its own name
        if type(leaf) not in classes or any(re.search(p, plain) for p in skip):
            continue
        if first is not None and any(p is first for p in leaf.parameters(recurse=False)):
            continue
        if not any(p.requires_grad for p in leaf.parameters(recurse=False)):
            yield name, leaf


def _dtype_parameter(module: nn.Module) -> nn.Parameter | None:
    """The parameter a diffusers/transformers model reports as its `dtype` (the first floating-point one), which
    pipelines cast prompt embeddings and latents to: its layer stays in the compute dtype (a CLIP or T5 text
    encoder's token embedding; a UNet's conv_in). Stored in fp8, the previews' pipelines would build fp8 prompt
    embeddings ("Unexpected floating ScalarType" under autocast). None for a plain nn.Module (no such property)."""
    if not isinstance(getattr(type(module), "dtype", None), property):
        return None
    fp32 = getattr(module, "_keep_in_fp32_modules", None) or ()  # diffusers' get_parameter_dtype skips these
    return next((p for n, p in module.named_parameters() if p.is_floating_point() and not any(m in n for m in fp32)),
                None)


def store_frozen(module: nn.Module, kind: str, compute: torch.dtype, keep: tuple[str, ...] | None = None) -> int:
    """Keep `module`'s frozen layers stored as `kind`, computed in `compute`; its LoRA layers and trainable
    parameters are not touched, nor layers matching `keep` (see _frozen_leaves). Returns how many layers were
    converted."""
    if kind in ("int8", "nf4"):
        leaves = dict(_frozen_leaves(module, (nn.Linear,), keep))
        count = len(leaves)
        if any(p.is_meta for p in module.parameters()):
            for leaf in leaves.values():  # check's estimate, on the meta device where nothing quantises
                _stand_in(leaf, kind, compute)
        elif kind == "int8":
            _quantize_int8(module, leaves)
        else:
            _quantize_nf4(module, leaves, compute)
        return count
    storage = STORAGE[kind]
    if storage == compute:
        return 0
    converted = 0
    for _, leaf in list(_frozen_leaves(module, tuple(_FORWARDS), keep)):
        leaf.to(storage)
        leaf.compute_dtype = compute
        leaf.forward = MethodType(_FORWARDS[type(leaf)], leaf)
        converted += 1
    return converted


def _quantize_int8(module: nn.Module, leaves: dict[str, nn.Module]) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    chosen = {id(leaf) for leaf in leaves.values()}
    quantize_(module, Int8WeightOnlyConfig(), filter_fn=lambda leaf, fqn: id(leaf) in chosen)


def _quantize_nf4(module: nn.Module, leaves: dict[str, nn.Module], compute: torch.dtype) -> None:
    """Each Linear replaced by bitsandbytes' Linear4bit holding its weights (quantised when placed on a device),
    where it sits: inside a peft LoRA wrapper that is the wrapper's base layer. Consumes `leaves`: the dict would
    otherwise keep every replaced layer's full-precision weight until the last one is quantised."""
    import bitsandbytes as bnb

    while leaves:  # each replaced layer let go at once: its full-precision weight is freed layer by layer
        name, leaf = leaves.popitem()
        parent, _, child = name.rpartition(".")
        q = bnb.nn.Linear4bit(leaf.in_features, leaf.out_features, bias=leaf.bias is not None, compute_dtype=compute,
                              quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(leaf.weight.data.to(compute), requires_grad=False, quant_type="nf4", module=q)
        if leaf.bias is not None:
            q.bias = nn.Parameter(leaf.bias.data.to(compute), requires_grad=False)
        setattr(module.get_submodule(parent) if parent else module, child, q.to(leaf.weight.device))


_BITS = {"int8": 8, "nf4": 4}


class _Dequantizing(torch.autograd.Function):
    """bitsandbytes' 4-bit matmul (MatMul4Bit): the weight is dequantised for the product and again in the backward
    pass, so nothing of this layer is kept for it (the quantised weight is the parameter itself)."""

    @staticmethod
    def forward(ctx, x, shape, compute, bias):
        return F.linear(x, torch.empty(shape, dtype=compute, device=x.device), bias)

    @staticmethod
    def backward(ctx, grad):  # never called: the estimate only runs forward
        raise NotImplementedError


def _stand_in(leaf: nn.Linear, kind: str, compute: torch.dtype) -> None:
    """On the meta device: the layer's stored bytes (int8 1, nf4 half a byte per weight), and a forward that keeps
    for the backward pass what the real layer keeps (test_weight_storage compares them): torchao's int8 layer a
    compute-dtype copy of the weight, bitsandbytes' nf4 layer nothing."""
    leaf.weight = nn.Parameter(torch.empty(leaf.weight.numel() * _BITS[kind] // 8, dtype=torch.uint8, device="meta"),
                               requires_grad=False)
    shape, bias = (leaf.out_features, leaf.in_features), leaf.bias

    def forward(x):
        b = None if bias is None else bias.to(compute)
        if kind == "nf4":
            return _Dequantizing.apply(x, shape, compute, b)
        return F.linear(x, torch.empty(shape, dtype=compute, device="meta"), b)

    leaf.forward = forward
