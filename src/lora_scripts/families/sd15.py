"""Stable Diffusion 1.x (1.4, 1.5 and fine-tunes): CLIP ViT-L/14 text encoder, 768-d cross-attention."""

from .base import Family

FAMILY = Family(
    name="sd15",
    label="Stable Diffusion 1.x",
    supported=True,
    base_model_version="sd_v1",
    v2=False,
    modelspec_architecture="stable-diffusion-v1/lora",
    config_package="lora_scripts.families.configs.sd15",
)
