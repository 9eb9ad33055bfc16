"""Stable Diffusion 2.x: OpenCLIP ViT-H text encoder, 1024-d cross-attention. Detected, not yet trainable."""

from .base import Family

FAMILY = Family(
    name="sd2",
    label="Stable Diffusion 2.x",
    supported=False,
    base_model_version="sd_v2",
    v2=True,
    modelspec_architecture="stable-diffusion-v2/lora",
)
