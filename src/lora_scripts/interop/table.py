"""The module table of a base model: for every layer a LoRA can target, its kohya name (what A1111 and
ComfyUI look up), its diffusers path (what peft uses) and its key in the original single-file checkpoint.

Built from the component configs on the meta device: no weights are read, so the SD1.5 table costs about a
second and needs no checkpoint on disk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formats.kohya import kohya_module_name
from ..formats.ldm import CLIP_PREFIX, UNET_PREFIX, _unet_key


@dataclass(frozen=True)
class Entry:
    component: str  # "unet" or "text_encoder"
    path: str  # diffusers / transformers module path
    ldm_key: str  # the weight's key in a single-file (A1111/ComfyUI) checkpoint
    shape: tuple[int, ...]  # the weight's shape


def _layers(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _up_has_attention(unet: nn.Module) -> dict[int, bool]:
    return {i: hasattr(block, "attentions") for i, block in enumerate(unet.up_blocks)}


@lru_cache(maxsize=8)
def _table(configs_json: str) -> dict[str, Entry]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = json.loads(configs_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        te_cfg = {k: v for k, v in configs["text_encoder"].items() if k != "architectures"}
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    table: dict[str, Entry] = {}
    lpb, up_attn = unet.config.layers_per_block, _up_has_attention(unet)
    for path, shape in _layers(unet).items():
        ldm = UNET_PREFIX + _unet_key(f"{path}.weight", lpb, up_attn)
        table[kohya_module_name("unet", path)] = Entry("unet", path, ldm, shape)
    for path, shape in _layers(text_encoder).items():
        inner = path if path.startswith("text_model.") else f"text_model.{path}"
        table[kohya_module_name("text_encoder", path)] = Entry("text_encoder", path, f"{CLIP_PREFIX}{inner}.weight", shape)
    return table


def module_table(configs: dict[str, Any]) -> dict[str, Entry]:
    """kohya name -> Entry, for the architecture these component configs describe."""
    return _table(json.dumps({k: configs[k] for k in ("unet", "text_encoder")}, sort_keys=True))


def sd15_table() -> dict[str, Entry]:
    from ..families import FAMILIES

    return module_table(FAMILIES["sd15"].embedded_configs())


def base_configs(path: Path) -> dict[str, Any]:
    """The component configs of a single-file base checkpoint (ours carry them; real SD1.x uses the embedded)."""
    from ..families import FAMILIES, detect_family
    from ..families.loading import ARCHITECTURE_KEY, read_checkpoint_info
    from ..errors import ModelLoadError

    info = read_checkpoint_info(Path(path))
    if ARCHITECTURE_KEY in info.metadata:
        return json.loads(info.metadata[ARCHITECTURE_KEY])
    family = FAMILIES[detect_family(info.shapes, str(path))]
    if not family.supported:
        raise ModelLoadError(f"{path} is a {family.label} checkpoint; only SD1.x is supported for now.")
    return family.embedded_configs()


def ldm_alias(kohya_name: str, table: dict[str, Entry]) -> str | None:
    """ComfyUI also accepts UNet names in the LDM layout (lora_unet_input_blocks_1_1_proj_in); its kohya name."""
    if not kohya_name.startswith("lora_unet_"):
        return None
    by_ldm = {re.sub(r"\.weight$", "", e.ldm_key.removeprefix(UNET_PREFIX)).replace(".", "_"): name
              for name, e in table.items() if e.component == "unet"}
    return by_ldm.get(kohya_name.removeprefix("lora_unet_"))
