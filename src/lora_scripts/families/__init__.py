"""Model families. A new family is a new module registered here; nothing outside this package branches on one."""

from __future__ import annotations

from typing import Any

from .base import Conditioning, Family, LoadSettings, Model, ModuleEntry
from .detect import TRAINABLE, detect_family, detect_folder_family

FAMILIES: dict[str, Family] = {f.name: f for f in TRAINABLE}
# Where a set of component configs (interop.table.base_configs) names the family it belongs to.
FAMILY_KEY = "family"


def default_family() -> Family:
    """The family a LoRA file is described against when no base model is given: the most common one."""
    return FAMILIES["sd15"]


def family_for_configs(configs: dict[str, Any]) -> Family:
    """The family of a set of component configs: the one they name, else the one they look like."""
    if FAMILY_KEY in configs:
        return FAMILIES[configs[FAMILY_KEY]]
    return next((f for f in FAMILIES.values() if f.recognise_configs(configs)), default_family())


# LoRA files of families we recognise but do not train yet: their label and how sd-scripts files them.
_OTHER_LORA_FAMILIES: dict[str, dict[str, str]] = {}


def family_by_label(label: str) -> Family | None:
    """The trainable family a LoRA-file label ("sd1", "sd2") stands for, if any."""
    return next((f for f in FAMILIES.values() if f.lora_label == label), None)


def family_by_width(width: int | None):
    """The family whose real text encoder has this cross-attention width (768 SD1, 1024 SD2, 2048 SDXL), or None."""
    return next((f for f in FAMILIES.values() if width and getattr(f, "cross_attention_dim", None) == width), None)


def guess_lora_family(module_names: list[str], cross_attention_widths: list[int],
                      metadata: dict[str, str] | None = None) -> str:
    """The label of the family a LoRA file was trained on, from its module names and the input width of its
    cross-attention key projections (the text encoder's width: 768 SD1, 1024 SD2, 2048 SDXL); for a model of
    another size (fine-tuned architectures, our tiny test models) from what its metadata says."""
    if any(n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for n in module_names):
        return "flux1"  # Flux.1's BFL block names (its CLIP-L is lora_te1_ too, so this comes first)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in module_names):
        return "sdxl"
    width = cross_attention_widths[0] if cross_attention_widths else None
    family = family_by_width(width)
    if family is not None:
        return family.lora_label
    version = (metadata or {}).get("ss_base_model_version", "")
    said = next((f for f in FAMILIES.values() if version and (f.lora_metadata("epsilon")["ss_base_model_version"] == version
                 or f.lora_metadata("v_prediction")["ss_base_model_version"] == version)), None)
    if said:
        return said.lora_label
    return f"unknown (cross-attention width {width})" if width else "unknown (no cross-attention layer)"


def lora_metadata_for(label: str, prediction_type: str = "epsilon") -> dict[str, str]:
    """The ss_*/modelspec keys that say which base a LoRA of this family label is for ({} if unknown)."""
    family = family_by_label(label)
    if family is not None:
        return family.lora_metadata(prediction_type)
    return dict(_OTHER_LORA_FAMILIES.get(label, {}))


__all__ = ["family_by_label", "guess_lora_family", "lora_metadata_for", "Conditioning", "FAMILIES", "FAMILY_KEY", "Family", "LoadSettings", "Model", "ModuleEntry",
           "default_family", "detect_family", "detect_folder_family", "family_for_configs"]
