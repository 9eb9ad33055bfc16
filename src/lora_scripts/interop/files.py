"""File-level convert and resize: read a LoRA, transform it, write it with derived metadata. Shared by the
CLI (`lora-scripts convert/resize`) and the web UI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_save_safetensors
from ..errors import LoraScriptsError
from .describe import guess_family
from .lora_file import kohya_state, read_lora, write_diffusers
from .metadata import derived_metadata
from .ops import Kept, resize

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def table_for(base: Path | None, family: str):
    from .table import base_configs, module_table, sd15_table

    if base is not None:
        return module_table(base_configs(base))
    if family == "sd1":
        return sd15_table()
    raise LoraScriptsError(f"this LoRA is for {family}; give --base MODEL so its layers can be named")


def base_family(base: Path) -> str:
    from ..families import detect_family
    from ..families.loading import read_checkpoint_info

    name = detect_family(read_checkpoint_info(Path(base)).shapes, str(base))
    return {"sd15": "sd1"}.get(name, name)


def refuse_overwrite(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise LoraScriptsError(f"{out} already exists; choose another output or add --force to replace it")


def convert_file(src: Path, out: Path, to: str, base: Path | None = None, dtype: str | None = None) -> str:
    """kohya <-> diffusers, lossless; returns a one-line description of what was written."""
    lora = read_lora(Path(src))
    family = base_family(base) if base else guess_family(lora)
    torch_dtype = DTYPES[dtype] if dtype else lora.dtype
    if lora.unknown:
        raise LoraScriptsError(f"{src} holds {len(lora.unknown)} keys that are not plain LoRA weights "
                               f"(e.g. {lora.unknown[0]}); converting would drop them, so nothing was written")
    state = kohya_state(lora, torch_dtype)  # hashes describe the kohya form; a round trip gives them back
    meta = derived_metadata(lora, lora, state, family, f"converted from {lora.format} by lora-scripts")
    if to == "diffusers":
        write_diffusers(lora, Path(out), table_for(base, family), torch_dtype, meta)
        return (f"wrote {out} (diffusers/peft layout; each module's alpha kept in lora_adapter_metadata, so "
                "diffusers applies the same strength)")
    atomic_save_safetensors(state, Path(out), meta)
    return f"wrote {out} (kohya layout for A1111/ComfyUI; .alpha written for every module)"


@dataclass
class Resized:
    out: Path
    rank_before: int
    rank: int
    kept: list[Kept]

    @property
    def mean_energy(self) -> float:
        return sum(k.energy for k in self.kept) / len(self.kept)

    @property
    def worst(self) -> Kept:
        return min(self.kept, key=lambda k: k.energy)


def resize_file(src: Path, out: Path, rank: int, dtype: str | None = None) -> Resized:
    lora = read_lora(Path(src))
    result, kept = resize(lora, rank)
    state = kohya_state(result, DTYPES[dtype] if dtype else lora.dtype)
    energies = [k.energy for k in kept]
    note = f"resized to rank {rank} by lora-scripts (kept energy mean {sum(energies) / len(energies):.4f})"
    atomic_save_safetensors(state, Path(out), derived_metadata(lora, result, state, guess_family(lora), note))
    return Resized(Path(out), max(k.rank_before for k in kept), rank, kept)
