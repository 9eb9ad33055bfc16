"""peft LoRA state dicts -> the diffusers/peft file layout read by `load_lora_weights`."""

from __future__ import annotations

import json
from typing import Any

from torch import Tensor

# diffusers stores each component's LoraConfig here so the loader can rebuild lora_alpha exactly.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def peft_to_diffusers(
    states: dict[str, dict[str, Tensor]], lora_configs: dict[str, dict[str, Any]]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Keys become `unet.<module>.lora_A.weight` / `text_encoder.<module>...`; the alpha, which this layout
    has no tensor for, travels in the metadata as diffusers' own save_lora_weights writes it."""
    out = {f"{component}.{key}": value for component, state in states.items() for key, value in state.items()}
    packed = {f"{c}.{k}": v for c, cfg in lora_configs.items() for k, v in cfg.items()}
    return out, {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(packed, sort_keys=True)}
