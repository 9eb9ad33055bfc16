"""`lora-scripts demo`: the whole workflow on the embedded toy world, offline, in about a minute on a CPU."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from ..config import load_config
from ..trainer import TrainResult, train
from .scenes import write_neon_set
from .tiny import write_tiny_checkpoint

DEMO_CONFIG = "demo_neon_lab.yaml"


def prepare_demo(folder: Path) -> Path:
    """Base model + dataset + the example YAML in `folder`; returns the YAML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "models" / "tiny-sd15.safetensors"
    if not base.exists():
        write_tiny_checkpoint(base, seed=0)
    data = folder / "data" / "neon_lab"
    if not (data / "metadata.csv").exists():
        write_neon_set(data, count=24, size=64, seed=0)
    config_path = folder / DEMO_CONFIG
    with resources.as_file(resources.files("lora_scripts.examples").joinpath(DEMO_CONFIG)) as src:
        shutil.copyfile(src, config_path)
    return config_path


def run_demo(folder: Path, overrides: list[str] | None = None) -> TrainResult:
    config = load_config(prepare_demo(folder), overrides)
    return train(config)
