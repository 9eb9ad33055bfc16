"""peft LoRA state dicts <-> kohya/A1111 LoRA keys (SD1.x).

kohya names a module by its diffusers path with dots turned into underscores, under `lora_unet_` or
`lora_te_`; A1111 and ComfyUI look these names up in their own tables, so a name that differs by one
character is silently not applied. Text-encoder names keep CLIP's `text_model.` level even though
transformers >= 5 flattened it away, because that is what A1111/ComfyUI expect.
"""

from __future__ import annotations

import torch
from torch import Tensor

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
_PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


class KeyConversionError(ValueError):
    pass


def kohya_module_name(component: str, module_path: str) -> str:
    if component == "unet":
        return UNET_PREFIX + module_path.replace(".", "_")
    if component == "text_encoder":
        path = module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"
        return TE_PREFIX + path.replace(".", "_")
    raise KeyConversionError(f"unknown component {component!r}")


def _split_peft_key(key: str) -> tuple[str, str]:
    for suffix in _PEFT_TO_KOHYA:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise KeyConversionError(f"{key!r} is not a peft LoRA key (expected *.lora_A.weight / *.lora_B.weight)")


def peft_to_kohya(states: dict[str, dict[str, Tensor]], alphas: dict[str, float]) -> dict[str, Tensor]:
    """`states` maps component ("unet", "text_encoder") to its peft LoRA state dict; `alphas` gives each
    component's lora_alpha. Every module gets an `.alpha` key: a file without one loads everywhere as
    alpha = rank, silently changing the strength."""
    out: dict[str, Tensor] = {}
    for component, state in states.items():
        modules = set()
        for key, value in state.items():
            module, suffix = _split_peft_key(key)
            name = kohya_module_name(component, module)
            out[f"{name}.{_PEFT_TO_KOHYA[suffix]}"] = value
            modules.add(name)
        for name in modules:
            out[f"{name}.alpha"] = torch.tensor(float(alphas[component]))
    expected = sum(len(s) for s in states.values()) + sum(len({_split_peft_key(k)[0] for k in s}) for s in states.values())
    if len(out) != expected:
        raise KeyConversionError("two modules map to the same kohya name")
    return out


def kohya_to_peft(
    state: dict[str, Tensor], module_paths: dict[str, list[str]]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, float]]]:
    """Inverse of peft_to_kohya. Underscores are ambiguous (`to_q`, `transformer_blocks`), so the reverse
    map is derived from the model's real module paths per component. Unknown keys are an error."""
    reverse = {kohya_module_name(c, p): (c, p) for c, paths in module_paths.items() for p in paths}
    states: dict[str, dict[str, Tensor]] = {c: {} for c in module_paths}
    alphas: dict[str, dict[str, float]] = {c: {} for c in module_paths}
    unknown = []
    for key, value in state.items():
        name, _, param = key.partition(".")
        if name not in reverse:
            unknown.append(key)
            continue
        component, path = reverse[name]
        if param == "alpha":
            alphas[component][path] = float(value)
        elif param == "lora_down.weight":
            states[component][f"{path}.lora_A.weight"] = value
        elif param == "lora_up.weight":
            states[component][f"{path}.lora_B.weight"] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyConversionError(f"{len(unknown)} keys match no module of the model, first: {sorted(unknown)[0]!r}")
    return states, alphas
