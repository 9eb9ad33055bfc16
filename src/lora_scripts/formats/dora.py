"""DoRA (weight-decomposed LoRA) in kohya files: a `dora_scale` key beside `lora_down`/`lora_up`/`alpha`, and
the weight A1111 and ComfyUI compute from it.

Both loaders agree only for a magnitude on the input axis (dora_scale shaped (1, in), (1, in, 1, 1) for a
convolution; LyCORIS' wd_on_out=False): with V = W0 + (alpha / rank) · up @ down,

    W' = dora_scale ⊙ V / ‖V‖_col        ‖V‖_col: one norm per input channel, over every other axis

and strength s gives W0 + s · (W' − W0) in both (A1111's network.py apply_weight_decompose, ComfyUI's
weight_adapter weight_decompose; ComfyUI adds its compute dtype's eps to the norm). An output-axis magnitude
(peft's use_dora, LyCORIS' default since 2025) is read by the two differently, so we neither train nor write it.
"""

from __future__ import annotations

from torch import Tensor

# Where training keeps the magnitude: a ParameterDict on peft's LoRA layer, <path>.lora_dora_scale in its state dict.
PEFT_KEY = "lora_dora_scale"


def column_norm(weight: Tensor) -> Tensor:
    """One norm per input channel (axis 1) over every other axis, as a 1-D tensor of length in."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def file_shape(scale: Tensor, weight_dim: int) -> Tensor:
    """A 1-D magnitude as the file holds it: (1, in) for a Linear layer, (1, in, 1, 1) for a convolution."""
    return scale.reshape(1, -1, *([1] * (weight_dim - 2)))


def dora_weight(base: Tensor, lora_delta: Tensor, dora_scale: Tensor) -> Tensor:
    """W' at strength 1 in fp32: base is W0, lora_delta is (alpha / rank) · up @ down shaped like W0, dora_scale
    the file's magnitude (any shape holding `in` values)."""
    merged = base.float() + lora_delta.float()
    norm = column_norm(merged)
    factor = dora_scale.float().reshape(-1) / norm
    return merged * factor.reshape(1, -1, *([1] * (merged.dim() - 2)))
