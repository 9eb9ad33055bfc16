"""peft LoRA state dicts <-> kohya/A1111 LoRA keys.

kohya names a module by its diffusers path with dots turned into underscores, under `lora_unet_` or
`lora_te_`; A1111 and ComfyUI look these names up in their own tables, so a name that differs by one
character is silently not applied. Text-encoder names keep CLIP's `text_model.` level even though
transformers >= 5 flattened it away, because that is what A1111/ComfyUI expect.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
_PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight")
KOHYA_PARAMS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


class KeyConversionError(ValueError):
    pass


def kohya_module_name(component: str, module_path: str) -> str:
    """SD1.x/SD2.x names: the UNet by its diffusers path, the one text encoder under lora_te_."""
    if component == "unet":
        return UNET_PREFIX + module_path.replace(".", "_")
    if component == "text_encoder":
        return text_encoder_name(TE_PREFIX, module_path)
    raise KeyConversionError(f"unknown component {component!r}")


def text_encoder_name(prefix: str, module_path: str) -> str:
    """A CLIP text-encoder layer under a prefix (lora_te_, and SDXL's lora_te1_/lora_te2_), with the
    `text_model.` level A1111/ComfyUI expect."""
    from .ldm import with_text_model

    return prefix + with_text_model(module_path).replace(".", "_")


def unet_name_from_ldm(ldm_key: str) -> str:
    """A UNet layer named by its key in the original single-file layout, as sd-scripts names SDXL's
    (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q) and as ComfyUI also accepts for SD1."""
    from .ldm import UNET_PREFIX as LDM_UNET

    return UNET_PREFIX + ldm_key.removeprefix(LDM_UNET).removesuffix(".weight").replace(".", "_")


def _split_peft_key(key: str) -> tuple[str, str]:
    for suffix in _PEFT_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise KeyConversionError(f"{key!r} is not a peft LoRA key (expected *.lora_A.weight / *.lora_B.weight)")


def join_kohya(modules: dict[str, tuple[Tensor, Tensor, float]]) -> dict[str, Tensor]:
    """The one kohya writer: module name -> (down, up, alpha) as `NAME.lora_down.weight`, `NAME.lora_up.weight`
    and `NAME.alpha`. Every module gets its alpha: a file without one loads everywhere as alpha = rank,
    silently changing the strength."""
    out: dict[str, Tensor] = {}
    for name, (down, up, alpha) in modules.items():
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def split_kohya(state: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """The one kohya reader: keys grouped per module (name -> {"down", "up", "alpha"}, as the file has them),
    and the keys that are no kohya LoRA parameter (LyCORIS, DoRA scales, ...), for the caller to report."""
    parts: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        name, _, param = key.partition(".")
        if param in KOHYA_PARAMS and name.startswith((UNET_PREFIX, "lora_te")):
            parts.setdefault(name, {})[KOHYA_PARAMS[param]] = value
        else:
            unknown.append(key)
    return parts, unknown


def peft_to_kohya(states: dict[str, dict[str, Tensor]], alphas: dict[str, float],
                  name_of: Callable[[str, str], str] = kohya_module_name,
                  conv_alpha: float | None = None,
                  slot_of: Callable[[str, str], tuple[int, tuple[int, ...]] | None] | None = None) -> dict[str, Tensor]:
    """`states` maps component ("unet", "text_encoder") to its peft LoRA state dict; `alphas` gives each
    component's lora_alpha; `name_of(component, module path)` is the family's kohya name (Family.kohya_name);
    `conv_alpha` is the alpha of convolutions with a kernel wider than 1x1 (kohya's conv_alpha); `slot_of`
    (Family.fused_slot) says where a layer is one part of a fused kohya module (its index, and the row ratios
    of all parts): those parts are fused exactly (formats/fused.py)."""
    from .fused import fuse_slots

    modules: dict[str, tuple[Tensor, Tensor, float]] = {}
    fused: dict[str, tuple[tuple[int, ...], dict[int, tuple[Tensor, Tensor, float]]]] = {}
    for component, state in states.items():
        pairs: dict[str, dict[str, Tensor]] = {}
        for key, value in state.items():
            module, suffix = _split_peft_key(key)
            pairs.setdefault(module, {})[suffix] = value
        for module, pair in pairs.items():
            name = name_of(component, module)
            down = pair["lora_A.weight"]
            wide = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
            alpha = conv_alpha if wide and conv_alpha is not None else alphas[component]
            slot = slot_of(component, module) if slot_of else None
            if slot is not None:
                ratios, parts = fused.setdefault(name, (slot[1], {}))
                if slot[0] in parts:
                    raise KeyConversionError(f"two layers are part {slot[0]} of {name}")
                parts[slot[0]] = (down, pair["lora_B.weight"], alpha)
                continue
            if name in modules:
                raise KeyConversionError("two modules map to the same kohya name")
            modules[name] = (down, pair["lora_B.weight"], alpha)
    for name, (ratios, parts) in fused.items():
        modules[name] = fuse_slots(ratios, parts)
    return join_kohya(modules)


def kohya_to_peft(
    state: dict[str, Tensor], module_paths: dict[str, list[str]],
    name_of: Callable[[str, str], str] = kohya_module_name,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, float]]]:
    """Inverse of peft_to_kohya. Underscores are ambiguous (`to_q`, `transformer_blocks`), so the reverse
    map is derived from the model's real module paths per component. Unknown keys are an error."""
    reverse = {name_of(c, p): (c, p) for c, paths in module_paths.items() for p in paths}
    states: dict[str, dict[str, Tensor]] = {c: {} for c in module_paths}
    alphas: dict[str, dict[str, float]] = {c: {} for c in module_paths}
    parts, unknown = split_kohya(state)
    unknown += [f"{name}.{param}" for name in parts if name not in reverse for param in parts[name]]
    if unknown:
        raise KeyConversionError(f"{len(unknown)} keys match no module of the model, first: {sorted(unknown)[0]!r}")
    for name, p in parts.items():
        component, path = reverse[name]
        if "alpha" in p:
            alphas[component][path] = float(p["alpha"])
        if "down" in p:
            states[component][f"{path}.lora_A.weight"] = p["down"]
        if "up" in p:
            states[component][f"{path}.lora_B.weight"] = p["up"]
    return states, alphas
