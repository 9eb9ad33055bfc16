"""Arithmetic on LoRA files: resize by SVD, combine several into one, bake into a base checkpoint.

All products are computed in fp32 and cast back once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..atomic import atomic_save_safetensors
from .lora_file import LoraFile, LoraFileError, LoraModule, update_shape
from .table import Entry


@dataclass(frozen=True)
class Kept:
    """How much of a module's update survives a rank cut: the share of its squared singular values kept."""
    name: str
    rank_before: int
    rank_after: int
    energy: float  # in [0, 1]


def factorize(delta: Tensor, rank: int, like: LoraModule | None = None) -> tuple[LoraModule, float]:
    """Best rank-`rank` LoRA (Eckart-Young) for a weight change, with alpha = rank (scale 1); returns it and
    the kept energy. The singular values are split evenly (sqrt on each side) so up and down stay balanced
    for further training, as sd-scripts' resize does."""
    shape = delta.shape
    flat = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    rank = max(1, min(rank, s.numel()))
    total = float((s**2).sum())
    kept = float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if len(shape) == 4:
        up = up.reshape(shape[0], rank, 1, 1)
        down = down.reshape(rank, *shape[1:])
    return LoraModule(down, up, float(rank)), kept


def resize(lora: LoraFile, rank: int) -> tuple[LoraFile, list[Kept]]:
    """Every module cut (or kept) to at most `rank`; modules already at or below it are refactorised exactly."""
    if rank < 1:
        raise LoraFileError(f"rank {rank}: a LoRA's rank must be at least 1")
    modules, report = {}, []
    for name, m in sorted(lora.modules.items()):
        new, energy = factorize(m.delta(), min(rank, m.rank))
        modules[name] = new
        report.append(Kept(name, m.rank, new.rank, energy))
    return LoraFile(modules, dict(lora.metadata), lora.format, list(lora.unknown), lora.dtype), report


def combine(loras: list[tuple[LoraFile, float]], rank: int | None = None) -> tuple[LoraFile, list[Kept]]:
    """Several LoRAs at their strengths as ONE file. rank None: exact, by stacking the ranks (down rows
    concatenated, up columns scaled by strength x alpha/rank); a rank: the sum's best rank-R approximation,
    never above the stacked rank (the sum has no more non-zero singular values than that)."""
    check_same_shapes(loras)
    names = sorted({n for lora, _ in loras for n in lora.modules})
    modules, report = {}, []
    for name in names:
        parts = [(lora.modules[name], w) for lora, w in loras if name in lora.modules]
        stacked = sum(m.rank for m, _ in parts)
        if rank is None:
            down = torch.cat([m.down.float() for m, _ in parts])
            up = torch.cat([m.up.float() * (w * m.scale) for m, w in parts], dim=1)
            modules[name] = LoraModule(down, up, float(down.shape[0]))
            report.append(Kept(name, stacked, down.shape[0], 1.0))
        else:
            delta = sum(m.delta() * w for m, w in parts)
            modules[name], energy = factorize(delta, min(rank, stacked))
            report.append(Kept(name, stacked, modules[name].rank, energy))
    dtype = loras[0][0].dtype
    return LoraFile(modules, {}, loras[0][0].format, [], dtype), report


def check_same_shapes(loras: list[tuple[LoraFile, float]], labels: list[str] | None = None) -> None:
    """A module name in two files must change a layer of one shape: otherwise the files are for different
    models (SD1 vs SD2 vs SDXL) and no sum of them means anything."""
    labels = labels or [f"LoRA {i + 1}" for i in range(len(loras))]
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    for (lora, _), label in zip(loras, labels):
        for name, m in sorted(lora.modules.items()):
            shape = update_shape(m)
            first = seen.setdefault(name, (shape, label))
            if first[0] != shape:
                raise LoraFileError(f"{first[1]} and {label} change {name} with different shapes ({first[0]} vs "
                                    f"{shape}): they were trained on different base models and cannot be merged; "
                                    "merge only LoRAs of one model family")


def bake(base: Path, loras: list[tuple[LoraFile, float]], table: dict[str, Entry], out: Path,
         metadata: dict[str, str] | None = None) -> tuple[Path, int]:
    """Write base + sum(strength x delta) as a single-file checkpoint in the base's own layout and dtype, every
    other tensor and the base's metadata unchanged. Returns the path and how many weights changed."""
    missing = sorted({n for lora, _ in loras for n in (*lora.modules, *lora.lycoris) if n not in table})
    if missing:
        raise LoraFileError(f"{len(missing)} LoRA modules match no layer of {base.name} (first: {missing[0]}); "
                            "is the LoRA for another model family? Nothing was written.")
    deltas: dict[str, Tensor] = {}
    base_meta, tensors = base_tensors(Path(base))
    for lora, w in loras:
        for name, m in {**lora.modules, **lora.lycoris}.items():  # LoHa/LoKr too: A1111/ComfyUI's rule
            entry = table[name]
            if name in lora.lycoris:
                d = m.delta(entry.shape) * w
            elif m.dora_scale is not None:  # DoRA's change depends on the base weight: read it now
                d = m.applied_delta(layer_weight(tensors, entry)) * w
            else:
                d = m.delta() * w
            if entry.rows is not None:  # one of the layers a single file fuses (SD2's q/k/v in_proj): its rows
                fused = torch.zeros(entry.ldm_shape, dtype=d.dtype)
                fused[entry.rows[0]:entry.rows[1]] = d
                d = fused
            key = entry.ldm_key
            deltas[key] = deltas[key] + d if key in deltas else d
    # A file may keep its layout under a prefix (ComfyUI's Flux checkpoints: model.diffusion_model.double_blocks...).
    deltas = {_in_file(k, tensors): d for k, d in deltas.items()}
    absent = sorted(k for k in deltas if k not in tensors)
    if absent:
        raise LoraFileError(f"{base.name} has no weight {absent[0]} (and {len(absent) - 1} more); nothing was written")
    state = {}
    for key, get in tensors.items():
        t = get()
        if key in deltas:
            if deltas[key].shape != t.shape:
                raise LoraFileError(f"{key}: LoRA update {tuple(deltas[key].shape)} does not fit the base weight "
                                    f"{tuple(t.shape)}; the LoRA was trained on a different model")
            t = (t.float() + deltas[key]).to(t.dtype)
        state[key] = t
    return atomic_save_safetensors(state, out, {**base_meta, **(metadata or {})}), len(deltas)


def layer_weight(tensors: dict, entry: Entry) -> Tensor:
    """A layer's weight W0 as the base file holds it (its rows of a fused weight), in fp32."""
    weight = tensors[_in_file(entry.ldm_key, tensors)]().float()
    return weight[entry.rows[0]:entry.rows[1]] if entry.rows is not None else weight.reshape(entry.shape)


def _in_file(key: str, tensors: dict) -> str:
    """The file's key for a layout key: itself, else the one key that ends with it after a prefix."""
    if key in tensors:
        return key
    found = [k for k in tensors if k.endswith("." + key)]
    return found[0] if len(found) == 1 else key


def base_tensors(base: Path) -> tuple[dict[str, str], dict]:
    """The base's metadata and key -> loader of each tensor, in the single-file (LDM) layout: a single file is
    read one tensor at a time; a diffusers folder is loaded and renamed to that layout, with its component
    configs in the metadata so that the written checkpoint loads at its own size."""
    if not base.is_dir():
        f = safe_open(str(base), "pt")
        return dict(f.metadata() or {}), {key: (lambda key=key: f.get_tensor(key)) for key in f.keys()}
    import json

    from ..families import LoadSettings
    from ..families.loading import ARCHITECTURE_KEY, load_base_model
    from .table import base_configs

    model = load_base_model(base, LoadSettings(weights_only=True))
    state = model.family.ldm_state_dict(model.modules)
    meta = {ARCHITECTURE_KEY: json.dumps(base_configs(base))}
    return meta, {key: (lambda t=t: t.detach().contiguous()) for key, t in state.items()}
