"""Resumable checkpoints: `output_dir/checkpoints/step-N/` holds the LoRA as a kohya file (usable on its own)
and `training_state.pt` with everything needed to continue exactly: fp32 LoRA weights, optimizer and
scheduler state, step, epoch, batches consumed in that epoch, and the RNG states.

Data order, augmentation, noise and timesteps are all derived from (seed, epoch, step), so with these
states restored a resumed run draws exactly what an unbroken run would.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_torch_save

STATE_FILE = "training_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Position:
    step: int  # optimizer steps done
    epoch: int  # epoch in progress (0-based)
    batches_in_epoch: int  # batches this process has consumed in that epoch


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        # One state per GPU the saving process saw; a resume may see fewer (another machine, CUDA_VISIBLE_DEVICES),
        # where set_rng_state_all would fail. Nothing a step draws depends on them (Trainer.step_rng reseeds).
        for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step}"


def save_state(folder: Path, position: Position, lora: dict, optimizer: dict, scheduler: dict, config_hash: str,
               world_size: int, config: dict | None = None) -> Path:
    # format 2 adds the config the state was trained with, so a resume can say what changed (runs.py)
    state = {"position": position.__dict__, "lora": lora, "optimizer": optimizer, "lr_scheduler": scheduler,
             "rng": rng_states(), "config_hash": config_hash, "world_size": world_size, "format": 2,
             "config": config}
    # Written last and atomically: a folder without this file is an interrupted save and is never resumed from.
    return atomic_torch_save(state, folder / STATE_FILE)


def load_state(path: Path) -> dict:
    # Our own file, holding RNG states (numpy arrays, tuples): the full unpickler is needed.
    return torch.load(path, map_location="cpu", weights_only=False)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with a training state), oldest first."""
    root = output_dir / "checkpoints"
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()] \
        if root.is_dir() else []
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (save_last_n)."""
    if not keep_last:
        return []
    old = list_checkpoints(output_dir)[:-keep_last]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old
