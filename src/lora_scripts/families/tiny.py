"""Tiny pipelines of each trainable family (same classes and key layout as the real ones, ~2 M parameters).

Randomly initialised from a seed: they prove the whole path (single-file loading, LoRA, export) in
seconds on a CPU. They cannot draw anything; the pretrained toy base model is built separately.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import FAMILIES
from .clip_tokenizer import write_clip_tokenizer_files
from .saving import save_ldm_checkpoint

# Widths are multiples of 32 because LDM configs hard-code 32 GroupNorm groups.
_UNET = dict(
    block_out_channels=[32, 64], layers_per_block=2, sample_size=32, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    norm_num_groups=32,
)
_VAE = dict(
    block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
)
_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
    vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


def tiny_configs(family: str = "sd15", prediction_type: str | None = None) -> dict[str, dict[str, Any]]:
    """The family's real configs with the sizes shrunk; everything else (scheduler, activations, SD2's linear
    projections and OpenCLIP gelu) stays the family's."""
    configs = copy.deepcopy(FAMILIES[family].embedded_configs())
    configs["unet"].update(_UNET)
    configs["vae"].update(_VAE)
    configs["text_encoder"].update(_CLIP)
    if prediction_type:
        configs["scheduler"]["prediction_type"] = prediction_type
    return configs


def build_tiny_models(seed: int = 0, family: str = "sd15", prediction_type: str | None = None
                      ) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, dict[str, Any]]:
    configs = tiny_configs(family, prediction_type)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if k != "architectures"}))
    return unet, vae, text_encoder, configs


def write_tiny_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, family: str = "sd15",
                          prediction_type: str | None = None) -> Path:
    """A single file in the family's original layout, its configs (and so its objective) in the metadata."""
    unet, vae, text_encoder, configs = build_tiny_models(seed, family, prediction_type)
    return save_ldm_checkpoint(Path(path), unet, vae, text_encoder, configs, dtype, family)


def write_tiny_folder(folder: Path, seed: int = 0, family: str = "sd15", prediction_type: str | None = None) -> Path:
    """The same models as a diffusers folder (save_pretrained), as users download them."""
    unet, vae, text_encoder, configs = build_tiny_models(seed, family, prediction_type)
    tok_dir = write_clip_tokenizer_files(Path(folder) / "_tokenizer", pad_token=FAMILIES[family].pad_token)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                   unet=unet, scheduler=DDPMScheduler.from_config(configs["scheduler"]),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    shutil.rmtree(tok_dir)
    return Path(folder)
