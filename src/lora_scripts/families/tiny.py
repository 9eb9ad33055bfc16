"""Tiny pipelines of each trainable family (same classes and key layout as the real ones, ~2 M parameters).

Randomly initialised from a seed: they prove the whole path (single-file loading, LoRA, export) in
seconds on a CPU. They cannot draw anything; the pretrained toy base model is built separately.
Each family states its tiny sizes (`Family.tiny_sizes`); everything else comes from its real configs.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn
from transformers import CLIPTokenizer

from . import FAMILIES
from .saving import save_single_file


def tiny_configs(family: str = "sd15", prediction_type: str | None = None) -> dict[str, dict[str, Any]]:
    """The family's real configs with the sizes shrunk; everything else (scheduler, activations, SD2's linear
    projections and OpenCLIP gelu) stays the family's."""
    fam = FAMILIES[family]
    configs = copy.deepcopy(fam.embedded_configs())
    for name, sizes in fam.tiny_sizes.items():
        configs[name].update(sizes)
    if prediction_type:
        configs["scheduler"]["prediction_type"] = prediction_type
    return configs


def build_tiny(seed: int = 0, family: str = "sd15", prediction_type: str | None = None
               ) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """(networks by component name, configs), initialised from `seed`."""
    configs = tiny_configs(family, prediction_type)
    torch.manual_seed(seed)
    return FAMILIES[family].build_modules(configs), configs


def build_tiny_models(seed: int = 0, family: str = "sd15", prediction_type: str | None = None):
    """(unet, vae, text_encoder, configs) of a one-text-encoder family."""
    modules, configs = build_tiny(seed, family, prediction_type)
    return modules["unet"], modules["vae"], modules["text_encoder"], configs


def write_tiny_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, family: str = "sd15",
                          prediction_type: str | None = None) -> Path:
    """A single file in the family's original layout, its configs (and so its objective) in the metadata."""
    modules, configs = build_tiny(seed, family, prediction_type)
    return save_single_file(Path(path), modules, configs, dtype, family)


def write_tiny_folder(folder: Path, seed: int = 0, family: str = "sd15", prediction_type: str | None = None) -> Path:
    """The same models as a diffusers folder (save_pretrained), as users download them."""
    fam = FAMILIES[family]
    modules, configs = build_tiny(seed, family, prediction_type)
    scratch = Path(folder) / "_tokenizers"
    tokenizers = {name: CLIPTokenizer.from_pretrained(path) for name, path in fam.write_tokenizers(scratch).items()}
    pipe = fam.pipeline_from_parts(modules, tokenizers, DDPMScheduler.from_config(configs["scheduler"]))
    pipe.save_pretrained(str(folder))
    shutil.rmtree(scratch)
    return Path(folder)
