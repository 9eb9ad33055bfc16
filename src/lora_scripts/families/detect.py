"""Decide a checkpoint's family from its key names and shapes.

diffusers' own sniffing calls anything it does not recognise SD1 and loads an SDXL file as SD1 without
complaint, so we decide ourselves, from markers that only one family has.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ModelLoadError

_SD1_UNET = "model.diffusion_model.input_blocks.0.0.weight"
_SD1_CLIP = "cond_stage_model.transformer."
_SD2_CLIP = "cond_stage_model.model.transformer.resblocks."
_CROSS_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _is_lora(keys: list[str]) -> bool:
    markers = ("lora_down", "lora_up", "lora_A", "lora_B", ".alpha", "hada_", "lokr_")
    return bool(keys) and all(any(m in k for m in markers) for k in keys[:50])


def detect_family(shapes: Mapping[str, tuple[int, ...]], path: str = "checkpoint") -> str:
    """Return the family name ("sd15", "sd2"), or raise ModelLoadError saying what the file is instead."""
    keys = sorted(shapes)
    if not keys:
        raise ModelLoadError(f"{path} holds no tensors: it is empty or not a model checkpoint")
    if _is_lora(keys):
        raise ModelLoadError(
            f"{path} is a LoRA file, not a base model. Set base_model to the Stable Diffusion checkpoint the "
            "LoRA was trained on (e.g. v1-5-pruned.safetensors)."
        )
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelLoadError(f"{path} is an SDXL checkpoint; this version trains SD1.x only (SDXL support is planned).")
    if any(".joint_blocks." in k for k in keys):
        raise ModelLoadError(f"{path} is an SD3 checkpoint; this version trains SD1.x only.")
    if any("double_blocks." in k for k in keys):
        raise ModelLoadError(f"{path} is a Flux checkpoint; this version trains SD1.x only.")
    if _SD1_UNET not in shapes:
        raise ModelLoadError(
            f"{path} is not a Stable Diffusion checkpoint in the original (CompVis/LDM) layout: it has no "
            f"{_SD1_UNET!r}. Use a full single-file checkpoint such as v1-5-pruned.safetensors, or a diffusers folder."
        )
    if any(k.startswith(_SD2_CLIP) for k in keys) or shapes.get(_CROSS_K, (0, 0))[-1] == 1024:
        return "sd2"
    if any(k.startswith(_SD1_CLIP) for k in keys):
        return "sd15"
    raise ModelLoadError(f"{path}: UNet found but no SD1.x CLIP text encoder ({_SD1_CLIP}*); the file is incomplete.")
