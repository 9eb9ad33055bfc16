"""Which layers get LoRA, and injecting peft adapters into the UNet and text encoder."""

from __future__ import annotations

from torch import nn

from diffusers import ModelMixin
from peft import LoraConfig, inject_adapter_in_model

from ..config import TrainConfig
from ..errors import ConfigError

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
_TE_PRESETS = {"kohya": _TE_ATTN + ("fc1", "fc2"), "attn": _TE_ATTN, "qv": ("q_proj", "v_proj")}
_UNET_SUFFIXES = {"attn": _ATTN, "qv": ("to_q", "to_v")}


def _is_linear_or_1x1(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))


def _transformer_scopes(unet: nn.Module) -> list[str]:
    return [name for name, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]


def unet_target_modules(unet: nn.Module, targets: str | list[str]) -> list[str]:
    """Full module names. `kohya` = every Linear and 1x1 Conv inside each Transformer2DModel, which is what
    sd-scripts' networks/lora.py targets for SD1.x (16 transformers x 12 = 192 modules in SD1.5)."""
    scopes = _transformer_scopes(unet)
    inside = [(n, m) for n, m in unet.named_modules() if any(n.startswith(s + ".") for s in scopes)]
    if targets == "kohya":
        names = [n for n, m in inside if _is_linear_or_1x1(m)]
    else:
        suffixes = _UNET_SUFFIXES[targets] if isinstance(targets, str) else tuple(targets)
        pool = inside if isinstance(targets, str) else list(unet.named_modules())
        names = [n for n, m in pool if _is_linear_or_1x1(m) and any(n == s or n.endswith("." + s) for s in suffixes)]
    return sorted(names)


def text_encoder_target_modules(text_encoder: nn.Module, targets: str | list[str]) -> list[str]:
    """`kohya` = the 6 Linears of each CLIP layer (q/k/v/out_proj, fc1, fc2): 72 modules for CLIP-L."""
    suffixes = _TE_PRESETS[targets] if isinstance(targets, str) else tuple(targets)
    return sorted(
        n for n, m in text_encoder.named_modules()
        if ".layers." in f".{n}" and isinstance(m, nn.Linear) and any(n.endswith("." + s) for s in suffixes)
    )


def check_targets(unet: nn.Module, text_encoder: nn.Module, config: TrainConfig, unet_modules: list[str],
                  te_modules: list[str]) -> None:
    """An explicit lora_targets list is checked name by name before anything is injected, so a typo or a list
    made for the other model is a config error naming the key, not a peft ValueError."""
    targets = config.lora_targets
    if isinstance(targets, str):
        return
    layers = [n for n, m in unet.named_modules() if _is_linear_or_1x1(m)]
    layers += [n for n, m in text_encoder.named_modules() if isinstance(m, nn.Linear)]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    hint = ("UNet layer names end in to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2; "
            "text-encoder ones in q_proj, k_proj, v_proj, out_proj, fc1, fc2. Or use a preset: kohya, attn, qv")
    problems = []
    if unknown:
        problems.append(f"lora_targets = {targets!r}: {', '.join(map(repr, unknown))} names no layer of the model. "
                        + hint)
    elif not unet_modules:
        problems.append(f"lora_targets = {targets!r}: no UNet layer is named, and the UNet is what a LoRA trains "
                        "first; add UNet names (to_q, to_k, to_v, to_out.0) or use a preset")
    elif config.train_text_encoder and not te_modules:
        problems.append(f"lora_targets = {targets!r}: train_text_encoder is true, but no name in the list is a "
                        "text-encoder layer; add q_proj, k_proj, v_proj, out_proj (fc1, fc2), or set "
                        "train_text_encoder: false")
    if problems:
        raise ConfigError("the config", problems)


def lora_config(config: TrainConfig, modules: list[str]) -> LoraConfig:
    # peft's default init is kohya's: lora_A kaiming-uniform, lora_B zeros, so step 0 equals the base model.
    return LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
                      target_modules=modules, init_lora_weights=True)


def inject_lora(model: nn.Module, config: TrainConfig, modules: list[str]) -> LoraConfig:
    """Freeze the model, add LoRA layers and keep them fp32 so tiny updates survive fp16/bf16 bases."""
    if not modules:
        raise ValueError(f"lora_targets = {config.lora_targets!r} matches no layer of {type(model).__name__}")
    model.requires_grad_(False)
    cfg = lora_config(config, modules)
    if isinstance(model, ModelMixin):
        # diffusers' own entry point: it also registers the adapter, so set_adapters()/disable_adapters() work.
        model.add_adapter(cfg)
    else:
        # transformers 5's CLIPTextModel.add_adapter demands peft >= 0.22, newer than the package index has;
        # peft's injector does the same job on any torch module.
        inject_adapter_in_model(cfg, model, adapter_name="default")
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    return cfg


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
