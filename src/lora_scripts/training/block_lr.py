"""Learning rates per block of the denoiser (config block_lr): sd-scripts' down/mid/up_lr_weight idea on the block
names `inspect` already gives every family's LoRA modules (Family.lora_block), so it works for each family alike."""

from __future__ import annotations

from torch import nn

from ..formats.lycoris import ADAPTER_MARKERS, is_adapter_param


def _module_path(param_name: str) -> str:
    """The layer a LoRA parameter belongs to: its name up to the adapter's own part (lora_A, hada_w1_a, ...)."""
    cut = min((i for marker in ADAPTER_MARKERS if (i := param_name.find("." + marker)) >= 0), default=len(param_name))
    return param_name[:cut]


def covers(key: str, block: str) -> bool:
    """Whether a block_lr key names this block: the name itself, or its start up to a '_' or '.' (unet.down covers
    unet.down_1; unet.input_1 does not cover unet.input_10)."""
    return block == key or (block.startswith(key) and block[len(key)] in "_.")


def multiplier(block: str | None, multipliers: dict[str, float]) -> float:
    """The block's multiplier: the longest key covering it; 1 for a layer outside every block or key."""
    keys = [k for k in multipliers if block is not None and covers(k, block)]
    return multipliers[max(keys, key=len)] if keys else 1.0


def lora_blocks(family, component: str, model: nn.Module) -> dict[str, str | None]:
    """Trainable LoRA parameter name -> the block its layer lies in (None: outside the blocks)."""
    out = {}
    for name, p in model.named_parameters():  # tied parameters (fused Flux layers) once, as the optimizer has them
        if is_adapter_param(name) and p.requires_grad:
            out[name] = family.lora_block(family.kohya_name(component, _module_path(name)))
    return out


def block_lr_problems(family, component: str, model: nn.Module, multipliers: dict[str, float]) -> list[str]:
    """A key that names no block of this model, with the names it has."""
    blocks = sorted({b for b in lora_blocks(family, component, model).values() if b is not None})
    unknown = [k for k in multipliers if not any(covers(k, b) for b in blocks)]
    if not unknown:
        return []
    return [f"block_lr: {', '.join(map(repr, unknown))} names no block the {family.label} LoRA trains; its blocks "
            f"are {', '.join(blocks) or 'none'} (a key may be the start of a name, e.g. unet.down)"]


def block_groups(family, component: str, model: nn.Module, multipliers: dict[str, float], lr: float) -> list[dict]:
    """The component's optimizer groups: learning_rate first (what the log and Prodigy's estimate read), then one
    group per other multiplier, in increasing order."""
    params = dict(model.named_parameters())
    by_factor: dict[float, list] = {}
    for name, block in lora_blocks(family, component, model).items():
        by_factor.setdefault(multiplier(block, multipliers), []).append(params[name])
    order = sorted(by_factor, key=lambda f: (f != 1.0, f))
    return [{"params": by_factor[f], "lr": lr * f} for f in order]


__all__ = ["block_groups", "block_lr_problems", "covers", "lora_blocks", "multiplier"]
