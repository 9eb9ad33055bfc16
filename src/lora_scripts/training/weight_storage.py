"""Frozen weights stored in a smaller dtype than they are computed in (base_weight_dtype,
text_encoder_weight_dtype): fp8 halves a bf16 UNet/transformer's memory (Flux.1-dev: 24 -> 12 GB).

Each frozen Linear/Conv/Embedding keeps its weight in the storage dtype, and its forward computes with a copy in
the compute dtype. LoRA layers, norms, position/patch embeddings and a model's own precision-critical layers
(diffusers' default skip patterns, its _skip_layerwise_casting_patterns and _keep_in_fp32_modules) are left in
the compute dtype. The copy lives only while autograd needs it for the backward pass: with gradient
checkpointing one block at a time, without it every layer's until the backward pass (little saved at the peak).

Written here rather than taken from diffusers' layerwise casting, which is for inference: it swaps each
parameter's data to the compute dtype and back around the forward, so the parameter autograd saved for the
backward pass is fp8 again by then (measured: gradient checkpointing stops with "Recomputed values ... have
different metadata", float32 saved, float8_e4m3fn recomputed). Casting a copy inside forward, as sd-scripts'
fp8_base and OneTrainer do, gives autograd a tensor nobody changes.
"""

from __future__ import annotations

import re
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig

STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": getattr(torch, "float8_e4m3fn", None)}
# Storage may drop precision against the compute dtype, never range: fp16 cannot hold every bf16 value.
_ALLOWED = {"bf16": (torch.float32, torch.bfloat16), "fp16": (torch.float32, torch.float16),
            "fp8": (torch.float32, torch.bfloat16, torch.float16)}


def storage_plan(config: TrainConfig, family) -> dict[str, torch.dtype]:
    """Component -> storage dtype, for the components the config stores in another dtype than they compute."""
    plan = {}
    if config.base_weight_dtype != "auto":
        plan[family.denoiser] = STORAGE[config.base_weight_dtype]
    if config.text_encoder_weight_dtype != "auto":
        plan.update({name: STORAGE[config.text_encoder_weight_dtype] for name in family.text_encoders})
    return plan


def storage_problems(config: TrainConfig, compute: torch.dtype) -> list[str]:
    problems = []
    for key in ("base_weight_dtype", "text_encoder_weight_dtype"):
        value = getattr(config, key)
        if value == "auto":
            continue
        if STORAGE[value] is None:
            problems.append(f"{key} = fp8: this torch ({torch.__version__}) has no float8 dtype; use bf16 (or "
                            "upgrade torch to 2.1 or newer)")
        elif compute not in _ALLOWED[value]:
            problems.append(f"{key} = {value} with mixed_precision: {config.mixed_precision}: {value} cannot hold "
                            f"every {str(compute).removeprefix('torch.')} weight; use {key}: fp8, or auto")
    if config.torch_compile and (config.base_weight_dtype != "auto"):
        problems.append(f"base_weight_dtype = {config.base_weight_dtype} with torch_compile: true: the casting "
                        "hooks around every layer break the compiled graph; set torch_compile: false")
    return problems


def _linear(self, x):
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return F.linear(x, self.weight.to(self.compute_dtype), bias)


def _conv(self, x):
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return self._conv_forward(x, self.weight.to(self.compute_dtype), bias)


def _embedding(self, ids):
    return F.embedding(ids, self.weight.to(self.compute_dtype), self.padding_idx, self.max_norm, self.norm_type,
                       self.scale_grad_by_freq, self.sparse)


_FORWARDS = ((nn.Linear, _linear), (nn.Conv1d, _conv), (nn.Conv2d, _conv), (nn.Conv3d, _conv),
             (nn.Embedding, _embedding))


def store_frozen(module: nn.Module, storage: torch.dtype, compute: torch.dtype) -> int:
    """Keep `module`'s frozen layers in `storage`, computed in `compute`; its LoRA layers and trainable parameters
    are not touched. Returns how many layers were converted."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    if storage == compute:
        return 0
    skip = DEFAULT_SKIP_MODULES_PATTERN + tuple(getattr(module, "_skip_layerwise_casting_patterns", None) or ()) + \
        tuple(getattr(module, "_keep_in_fp32_modules", None) or ()) + ("lora_",)
    converted = 0
    for name, leaf in module.named_modules():
        forward = next((f for cls, f in _FORWARDS if type(leaf) is cls), None)  # exact classes: peft's are subclasses
        if forward is None or any(re.search(p, name) for p in skip):
            continue
        if any(p.requires_grad for p in leaf.parameters(recurse=False)):
            continue
        leaf.to(storage)
        leaf.compute_dtype = compute
        leaf.forward = MethodType(forward, leaf)
        converted += 1
    return converted
