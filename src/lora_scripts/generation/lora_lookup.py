"""Find LoRA files by the name a prompt uses (`<lora:NAME:0.8>`), the way A1111 does: the file's stem, looked
up in our output folders and any A1111 `models/Lora` folder."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from ..errors import LoraScriptsError

DEFAULT_DIRS = (Path("output"), Path("models/Lora"))
# Inside a run's output_dir: resumable checkpoints repeat the final file's name; they are not separate LoRAs.
_SKIPPED_PARTS = {"checkpoints", "samples", "logs"}
_NOT_LORAS = {"pytorch_lora_weights"}  # diffusers' fixed file name: found by folder, not by this name


def index_loras(dirs: list[Path], skip: Callable[[Path], bool] | None = None) -> dict[str, Path]:
    """name -> file. With two files of one name the shallower path wins (a run's final file over copies). skip:
    files that take no name (default: full base checkpoints, by their header)."""
    skip = skip or is_base_checkpoint
    found: dict[str, Path] = {}
    for root in dirs:
        root = Path(root)
        if root.is_file():
            found.setdefault(root.stem, root)
            continue
        if not root.is_dir():
            continue
        files = sorted(root.rglob("*.safetensors"), key=lambda p: (len(p.parts), str(p)))
        for path in files:
            if _SKIPPED_PARTS.intersection(path.relative_to(root).parts[:-1]) or path.stem in _NOT_LORAS:
                continue
            if path.stem not in found and not skip(path):
                found[path.stem] = path
    return found


_BASE_PREFIXES = ("model.diffusion_model.", "conditioner.embedders.", "cond_stage_model.", "first_stage_model.")


def is_base_checkpoint(path: Path) -> bool:
    """A full model kept beside the LoRAs (a base `xl.safetensors` next to the run `output/xl/`) must not take a
    LoRA's name. Only the header is read; a file that cannot be read is kept, for the loader to name."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return any(k.startswith(_BASE_PREFIXES) for k in f.keys())
    except Exception:
        return False


def resolve(name: str, index: dict[str, Path], dirs: list[Path]) -> Path:
    if name in index:
        return index[name]
    close = difflib.get_close_matches(name, list(index), n=3, cutoff=0.5)
    where = ", ".join(str(d) for d in dirs) or "(no folders given)"
    missing = [str(d) for d in dirs if not Path(d).exists()]
    if missing:
        where += f" ({', '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist)"
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    if index:
        names = sorted(index)
        more = f" and {len(names) - 20} more" if len(names) > 20 else ""
        hint += f" Available: {', '.join(names[:20])}{more}."
    else:
        hint += " No LoRA files (.safetensors) were found there."
    raise LoraScriptsError(f"<lora:{name}:...>: no LoRA named {name!r} in {where}.{hint} "
                           "Add its folder with --lora-dir.")
