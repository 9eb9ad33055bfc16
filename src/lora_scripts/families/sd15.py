"""Stable Diffusion 1.x (1.4, 1.5 and fine-tunes): CLIP ViT-L/14 text encoder, 768-d cross-attention."""

from __future__ import annotations

from pathlib import Path

from ..formats.ldm import clip_to_ldm
from .stable_diffusion import StableDiffusionFamily, clip_ldm_entry

_UNET = "model.diffusion_model.input_blocks.0.0.weight"
_CLIP = "cond_stage_model.transformer."


class SD15(StableDiffusionFamily):
    name = "sd15"
    lora_label = "sd1"  # what `inspect` calls a LoRA file of this family
    label = "Stable Diffusion 1.x"
    base_model_version = "sd_v1"
    v2 = False
    modelspec_architecture = "stable-diffusion-v1/lora"
    config_package = "lora_scripts.families.configs.sd15"
    text_encoder_act = "quick_gelu"
    cross_attention_dim = 768
    default_resolution = 512

    def recognise(self, shapes, metadata) -> bool:
        return _UNET in shapes and any(k.startswith(_CLIP) for k in shapes)

    def unknown_prediction_type(self, path: Path) -> tuple[str, str]:
        # Every SD1.x release is epsilon; the rare v-prediction fine-tune says so with prediction_type.
        return "epsilon", "SD1.x checkpoints are epsilon-prediction (set prediction_type for a v-prediction fine-tune)"

    def text_encoder_entry(self, component, path, shape):
        return clip_ldm_entry(path, shape)

    def text_encoder_to_ldm(self, state, component="text_encoder"):
        return clip_to_ldm(state)


FAMILY = SD15()
