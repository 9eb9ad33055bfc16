"""Write a pipeline's components as one single-file checkpoint in the family's original layout.

A1111 and ComfyUI read this layout; our toy and test models are written with it so that they are
loaded by exactly the code that loads a user's v1-5-pruned.safetensors or sd_xl_base_1.0.safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_save_safetensors
from .stable_diffusion import ARCHITECTURE_KEY


def ldm_state_dict(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, family: str = "sd15") -> dict[str, torch.Tensor]:
    from . import FAMILIES

    return FAMILIES[family].ldm_state_dict({"unet": unet, "vae": vae, "text_encoder": text_encoder})


def save_single_file(path: Path, modules: dict[str, nn.Module], configs: dict[str, dict[str, Any]] | None = None,
                     dtype: torch.dtype = torch.float32, family: str = "sd15") -> Path:
    """``configs`` (one per component, and the scheduler's) are stored in the metadata for non-standard sizes."""
    from . import FAMILIES

    state = {k: v.detach().to(dtype).contiguous() for k, v in FAMILIES[family].ldm_state_dict(modules).items()}
    metadata = {ARCHITECTURE_KEY: json.dumps(configs)} if configs else {}
    return atomic_save_safetensors(state, path, metadata)


def save_ldm_checkpoint(path: Path, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                        configs: dict[str, dict[str, Any]] | None = None, dtype: torch.dtype = torch.float32,
                        family: str = "sd15") -> Path:
    """save_single_file for a one-text-encoder family."""
    return save_single_file(path, {"unet": unet, "vae": vae, "text_encoder": text_encoder}, configs, dtype, family)
