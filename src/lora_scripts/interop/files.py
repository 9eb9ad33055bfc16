"""File-level convert and resize: read a LoRA, transform it, write it with derived metadata. Shared by the
CLI (`lora-scripts convert/resize`) and the web UI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from ..atomic import atomic_save_safetensors
from ..dtypes import DTYPES
from ..errors import LoraScriptsError
from .describe import guess_family
from .lora_file import LoraFile, kohya_state, read_lora, require_finite, require_plain_lora, write_diffusers
from .metadata import derived_metadata
from .ops import Kept, resize



def table_for(base: Path | None, family: str):
    from .table import base_configs, family_table, module_table

    if base is not None:
        return module_table(base_configs(base))
    table = family_table(family)
    if table is None:
        raise LoraScriptsError(f"this LoRA is for {family}; give --base MODEL so its layers can be named")
    return table


def base_family(base: Path) -> str:
    """The LoRA-file label ("sd1", "sd2") of a base model's family."""
    from ..families.loading import base_family as family_of

    return family_of(Path(base))[0].lora_label


def refuse_overwrite(out: Path, force: bool) -> None:
    """Before any work: the output must be a .safetensors file name we may write (a folder, or a path under a
    file, would fail only after minutes of work; an existing file needs --force)."""
    out = Path(out)
    if out.is_dir():
        raise LoraScriptsError(f"output {out} is a folder; give a file name, e.g. {out / 'merged.safetensors'}")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise LoraScriptsError(f"output {out}: {blocker} is a file, not a folder, so nothing can be written "
                               "under it; choose another output path")
    if out.suffix.lower() != ".safetensors":
        # We always write safetensors; A1111 and ComfyUI list only files with the matching extension.
        raise LoraScriptsError(f"output {out}: give a file name ending in .safetensors (e.g. "
                               f"{out.with_suffix('.safetensors')}); A1111 and ComfyUI list models by that extension")
    if out.exists() and not force:
        raise LoraScriptsError(f"{out} already exists; choose another output or add --force to replace it")


def check_base(base: Path) -> Path:
    """A --base for convert/verify/merge: the base whose layers name the LoRA's modules, as a single-file
    checkpoint or a diffusers folder (training accepts both, so every tool does)."""
    base = Path(base)
    if base.is_dir() and not (base / "model_index.json").is_file():
        raise LoraScriptsError(f"--base {base} is a folder; give the single-file base checkpoint (.safetensors), "
                               "e.g. v1-5-pruned.safetensors, or a diffusers model folder (one holding "
                               "model_index.json)")
    if not base.exists():
        raise LoraScriptsError(f"--base {base} does not exist; give the base checkpoint (.safetensors) the LoRA "
                               "was trained on")
    return base


def ranks_text(ranks) -> str:
    """'8', or '2 to 8 (varies by module)' for files whose modules have different ranks."""
    ranks = sorted(set(ranks))
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]} (varies by module)"


def read_checked(path: Path, action: str = "converting") -> LoraFile:
    """A LoRA that tools may transform: readable, free of NaN/inf (we never write garbage), and holding only
    plain LoRA weights (anything else would be dropped from what we write without a word)."""
    lora = read_lora(Path(path))
    require_finite(lora, Path(path))
    if lora.unknown:
        raise LoraScriptsError(f"{path} holds {len(lora.unknown)} keys that are not plain LoRA weights "
                               f"(e.g. {lora.unknown[0]}); {action} would drop them, so nothing was written")
    return lora


def convert_file(src: Path, out: Path, to: str, base: Path | None = None, dtype: str | None = None) -> str:
    """kohya <-> diffusers, lossless; returns a one-line description of what was written."""
    lora = read_checked(src, "converting")
    require_plain_lora(lora, src, "convert")
    base = check_base(base) if base is not None else None
    family = base_family(base) if base else guess_family(lora)
    torch_dtype = DTYPES[dtype] if dtype else lora.dtype
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
    rank_before: int  # the input's highest rank
    rank: int  # the highest rank written (never above the input's: a LoRA cannot gain rank)
    kept: list[Kept]
    requested: int = 0

    @property
    def mean_energy(self) -> float:
        return sum(k.energy for k in self.kept) / len(self.kept)

    @property
    def worst(self) -> Kept:
        return min(self.kept, key=lambda k: k.energy)

    def rank_change(self) -> str:
        """What was written, from the written tensors: 'rank 8 -> 4', or why the rank stayed."""
        before = ranks_text(k.rank_before for k in self.kept)
        after = ranks_text(k.rank_after for k in self.kept)
        if self.requested > self.rank_before:
            return (f"kept rank {after} (the file's rank; a LoRA cannot gain rank, so --rank {self.requested} "
                    "changes nothing)")
        return f"rank {before} -> {after}"


def resize_file(src: Path, out: Path, rank: int, dtype: str | None = None) -> Resized:
    check_rank(rank)
    lora = read_checked(src, "resizing")
    require_plain_lora(lora, src, "resize")
    result, kept = resize(lora, rank)
    state = kohya_state(result, DTYPES[dtype] if dtype else lora.dtype)
    written = [state[k].shape[0] for k in state if k.endswith(".lora_down.weight")]
    energies = [k.energy for k in kept]
    note = (f"resized to rank {ranks_text(written)} by lora-scripts (kept energy mean "
            f"{sum(energies) / len(energies):.4f})")
    atomic_save_safetensors(state, Path(out), derived_metadata(lora, result, state, guess_family(lora), note))
    return Resized(Path(out), max(k.rank_before for k in kept), max(written), kept, rank)


def check_rank(rank: int | None) -> None:
    if rank is not None and rank < 1:
        raise LoraScriptsError(f"--rank {rank}: a rank must be a whole number of at least 1 (typical: 4 to 32)")
