"""Injecting peft LoRA adapters into a family's networks, and checking an explicit list of target layers
(which layers a preset means is the family's: families/*.py)."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from diffusers import ModelMixin
from peft import LoraConfig, inject_adapter_in_model

from ..config import TrainConfig
from ..errors import ConfigError
from ..formats.dora import PEFT_KEY as DORA_KEY, column_norm
from ..formats.lycoris import is_adapter_param
from .fused_adapters import share_fused, whole_groups

def check_targets(family, modules: dict[str, nn.Module], config: TrainConfig, chosen: dict[str, list[str]]) -> None:
    """An explicit lora_targets list is checked name by name before anything is injected, so a typo or a list
    made for the other model is a config error naming the key, not a peft ValueError. chosen: the modules each
    trained component got from the list."""
    targets = config.lora_targets
    names = family.trainable(config.train_text_encoder)
    loaders = [p for n in names for p in family.target_problems(n, chosen[n])]
    if loaders:
        raise ConfigError("the config", loaders)
    if isinstance(targets, str):
        return
    layers = [n for c in (family.denoiser,) + family.text_encoders for n in family.target_layers(c, modules[c])]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    problems = []
    if unknown:
        problems.append(f"lora_targets = {targets!r}: {', '.join(map(repr, unknown))} names no layer of the model. "
                        + family.target_hint)
    elif not chosen[family.denoiser]:
        problems.append(f"lora_targets = {targets!r}: no {family.denoiser_label} layer is named, and the "
                        f"{family.denoiser_label} is what a LoRA trains first; add its names or use a preset. "
                        + family.target_hint)
    elif any(not chosen[n] for n in names[1:]):
        problems.append(f"lora_targets = {targets!r}: train_text_encoder is true, but no name in the list is a "
                        "text-encoder layer; add its names, or set train_text_encoder: false. " + family.target_hint)
    if problems:
        raise ConfigError("the config", problems)


def choose_targets(family, component: str, module: nn.Module, config: TrainConfig,
                   chosen: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(every module of this component that gets LoRA, the 3x3 convolutions among them that take conv_rank):
    lora_targets' modules (`chosen`, when already found), plus with conv_rank those of the ResNet blocks and
    samplers (Family.conv_targets)."""
    if chosen is None:
        chosen = family.target_modules(component, module, config.lora_targets)
    if config.network_type in ("dora", "lokr"):  # they change the whole fused weight: every part of it trains
        chosen = whole_groups(family, component, module, chosen)
    if config.conv_rank is None:
        return chosen, []
    linear, conv = family.conv_targets(component, module)
    return sorted(set(chosen) | set(linear) | set(conv)), conv


def lora_config(config: TrainConfig, modules: list[str], conv: list[str] = ()):
    """The peft config of config.network_type: LoraConfig (lora, locon), LoHaConfig, LoKrConfig."""
    if config.network_type in ("loha", "lokr"):
        return _lycoris_config(config, modules, conv)
    # peft's default init is kohya's: lora_A kaiming-uniform, lora_B zeros, so step 0 equals the base model.
    # Full module paths as patterns: peft matches a pattern at the end of a path, and a full path only itself.
    return LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
                      target_modules=modules, init_lora_weights=True,
                      rank_pattern={m: config.conv_rank for m in conv},
                      alpha_pattern={m: config.conv_alpha_value for m in conv})


def _lycoris_config(config: TrainConfig, modules: list[str], conv: list[str]):
    """peft's LoHa/LoKr, which follow LyCORIS' factor shapes (formats/lycoris.py writes them under LyCORIS' keys).
    Chosen over the lycoris-lora package because the rest of the pipeline (injection into diffusers and
    transformers models, state dicts, resume, previews' strength) already runs on peft's adapter layers.
    Convolutions stay flattened (no Tucker cores: use_effective_conv2d false), the form every loader reads; step 0
    equals the base model (one factor starts at zero)."""
    from peft import LoHaConfig, LoKrConfig

    common = dict(r=config.lora_rank, alpha=config.alpha, target_modules=modules, init_weights=True,
                  rank_pattern={m: config.conv_rank for m in conv},
                  alpha_pattern={m: config.conv_alpha_value for m in conv}, use_effective_conv2d=False)
    if config.network_type == "loha":
        return LoHaConfig(**common)
    return LoKrConfig(**common, decompose_factor=config.lokr_factor, decompose_both=False)


def adapter_scales(model: nn.Module) -> dict[str, tuple[int, float]]:
    """Module path -> (r, alpha) of each LoHa/LoKr layer, as the file's alpha keys need them."""
    from peft.tuners.lycoris_utils import LycorisLayer

    return {path: (m.r["default"], float(m.alpha["default"])) for path, m in model.named_modules()
            if isinstance(m, LycorisLayer) and "default" in m.r}


def inject_lora(model: nn.Module, config: TrainConfig, modules: list[str], conv: list[str] = (), family=None,
                component: str = ""):
    """Freeze the model, add LoRA layers and keep them fp32 so tiny updates survive fp16/bf16 bases. conv: the
    3x3 convolutions among `modules`, at conv_rank / conv_alpha. family/component: where the family's file fuses
    layers (Flux), LoHa/LoKr/DoRA parts are tied into one fused module (training.fused_adapters)."""
    if not modules:
        raise ValueError(f"lora_targets = {config.lora_targets!r} matches no layer of {type(model).__name__}")
    model.requires_grad_(False)
    cfg = lora_config(config, modules, conv)
    if isinstance(model, ModelMixin):
        # diffusers' own entry point: it also registers the adapter, so set_adapters()/disable_adapters() work.
        model.add_adapter(cfg)
    else:
        # transformers 5's CLIPTextModel.add_adapter demands peft >= 0.22, newer than the package index has;
        # peft's injector does the same job on any torch module.
        inject_adapter_in_model(cfg, model, adapter_name="default")
    if config.network_type == "dora":
        add_dora(model)
    if family is not None:
        share_fused(family, component, model, config.network_type, config.lokr_factor)
    train_in_fp32(model)
    return cfg


def train_in_fp32(model: nn.Module) -> None:
    """The adapter's weights in fp32 and trainable, whatever the frozen weights' dtype: autocast then runs each
    adapter matmul in the compute dtype on a cast copy, while the optimizer updates fp32 weights."""
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            p.data = p.data.float()
            p.requires_grad_(True)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_adapter_param(n) and p.requires_grad]


# --- DoRA on the input axis (network_type: dora) ------------------------------------------------------------
# peft's use_dora puts the magnitude on the output axis, which A1111 and ComfyUI read differently (formats/dora.py);
# on the input axis the decomposed weight W' = V · diag(m / ‖V‖_col) is the LoRA layer applied to the input
# scaled per channel, so a forward pre-hook on peft's LoRA layer is all it takes: every LoRA path (state dicts,
# resume, previews, export of lora_down/lora_up) stays peft's.
def add_dora(model: nn.Module) -> int:
    """Give every LoRA layer of `model` an input-axis magnitude, initialised to its base weight's column norms (so
    step 0 equals the base model). Returns how many layers got one."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        weight = module.get_base_layer().weight
        magnitude = nn.Parameter(column_norm(weight.detach().float()).to(weight.device))
        setattr(module, DORA_KEY, nn.ParameterDict({"default": magnitude}))
        module.dora_strength = 1.0  # previews' strength (training.previews.lora_strength)
        module.register_forward_pre_hook(_dora_input)
        module.register_forward_hook(_dora_strength)
        count += 1
    return count


def _dora_input(module: nn.Module, args: tuple):
    """Scale the layer's input per channel by m / ‖W0 + scale · B @ A‖_col (the norm detached, as the DoRA paper
    and peft do: it saves a weight-sized tensor per layer for the backward pass and changes little)."""
    if module.disable_adapters or "default" not in module.active_adapters:
        return None
    group = getattr(module, "dora_group", None)  # the parts of a fused layer (training.fused_adapters)
    x = args[0]
    with torch.no_grad():
        norm = column_norm(_merged(module)) if group is None else _group_norm(group, x)
    factor = getattr(module, DORA_KEY)["default"] / norm
    shape = (-1,) if x.dim() == 2 or not isinstance(module.get_base_layer(), nn.Conv2d) else (1, -1, 1, 1)
    if module.dora_strength != 1.0:
        module.dora_unscaled = x  # for _dora_strength
    return (x * factor.reshape(shape).to(x.dtype),) + tuple(args[1:])


def _group_norm(group: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor:
    """The fused weight's column norms, over every part's rows. The parts of a fused layer read one input (Flux:
    q, k, v and the MLP input all take the block's normalised hidden states), so the norm is computed once per
    input tensor, by the first part to see it, and reused by the others."""
    first = group[0]
    factors = [t for m in group for t in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    state = tuple((t._version, t.data_ptr()) for t in factors)  # and the factors as they were (an in-place step)
    cached = first.__dict__.get("_dora_group_norm")
    if cached is not None and cached[0]() is x and cached[1] == state:
        return cached[2]
    norm = torch.stack([column_norm(_merged(m)) for m in group]).pow(2).sum(0).sqrt()
    first.__dict__["_dora_group_norm"] = (weakref.ref(x), state, norm)
    return norm


def _merged(module: nn.Module) -> torch.Tensor:
    """W0 + scale · B @ A of a LoRA layer, in fp32."""
    base = module.get_base_layer().weight
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    product = (b.float().flatten(1) @ a.float().flatten(1)).reshape(base.shape)
    return base.float() + module.scaling["default"] * product


def _dora_strength(module: nn.Module, args: tuple, output):
    """At strength s != 1 (previews), the loaders' W0 + s (W' - W0): s x this layer's output + (1 - s) x the
    base layer's on the unscaled input (scaling the LoRA product inside the norm would be another weight)."""
    x = module.__dict__.pop("dora_unscaled", None)
    if x is None:
        return None
    s = module.dora_strength
    return output * s + module.get_base_layer()(x) * (1 - s)
