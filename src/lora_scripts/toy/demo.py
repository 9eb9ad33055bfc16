"""`lora-scripts demo`: the whole workflow on the embedded toy world, offline, in a few minutes on a CPU.

Builds the "neon lab" style set, trains a style LoRA on the shipped toy base with the example YAML, then
draws a contact sheet (same prompts and seeds: base, <lora:neon_lab:0.5>, <lora:neon_lab:1.0>) and
measures the style statistic for each column and for the training set.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..atomic import atomic_write_text
from ..config import load_config
from ..generation.sheets import contact_sheet
from ..training.loop import TrainResult, train
from .assets import toy_base_path
from .evaluate import Sampler
from .scenes import neon_caption, neon_items, write_neon_set
from .stats import darkness, neon_fraction, progress, style_distance

DEMO_CONFIG = "demo_neon_lab.yaml"
SHEET_PROMPTS = [neon_caption("circle", "cyan", "in the center"), neon_caption("square", "magenta", "on the left"),
                 neon_caption("triangle", "cyan", "on the right"), neon_caption("square", "cyan", "in the center")]
SHEET_SEEDS = (1, 2)
STRENGTHS = (0.0, 0.5, 1.0)


@dataclass
class DemoResult:
    train: TrainResult
    sheet: Path
    stats: dict


def prepare_demo(folder: Path) -> Path:
    """Base model + style set + the example YAML in `folder`; returns the YAML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "models" / "toy-sd15.safetensors"
    if not base.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(toy_base_path(), base)
    data = folder / "data" / "neon_lab"
    if not (data / "metadata.csv").exists():
        write_neon_set(data, count=60, size=32, seed=0)
    config_path = folder / DEMO_CONFIG
    with resources.as_file(resources.files("lora_scripts.examples").joinpath(DEMO_CONFIG)) as src:
        shutil.copyfile(src, config_path)
    return config_path


def style_report(base: Path, lora: Path, name: str, cfg: float = 5.0) -> tuple[list[list], dict]:
    sampler = Sampler.open(base, {name: lora})
    columns = [sampler.images(SHEET_PROMPTS, SHEET_SEEDS, {name: w}, cfg=cfg) for w in STRENGTHS]
    train_set = [im for im, _ in neon_items(60, 32, seed=0)]
    stats = {"training_set": {"neon_fraction": neon_fraction(train_set), "darkness": darkness(train_set),
                              "style_distance": 0.0}}
    for w, ims in zip(STRENGTHS, columns):
        stats[f"strength_{w}"] = {"neon_fraction": neon_fraction(ims), "darkness": darkness(ims),
                                  "style_distance": style_distance(ims, train_set)}
    start = stats["strength_0.0"]["style_distance"]
    for w in STRENGTHS[1:]:
        # progress towards the training set's palette: 1 - remaining distance / the base model's distance
        stats[f"strength_{w}"]["progress"] = progress(stats[f"strength_{w}"]["style_distance"], start, 0.0)
    n = len(SHEET_SEEDS)
    grid = [[columns[c][r] for c in range(len(STRENGTHS))] for r in range(len(SHEET_PROMPTS) * n)]
    return grid, stats


def run_demo(folder: Path, overrides: list[str] | None = None) -> DemoResult:
    config = load_config(prepare_demo(folder), overrides)
    result = train(config, overwrite=True)  # the demo's own folder: a re-run replaces it
    grid, stats = style_report(config.base_model, result.lora_path, config.name)
    rows = [f"{p} (seed {s})" for p in SHEET_PROMPTS for s in SHEET_SEEDS]
    cols = ["base model"] + [f"<lora:{config.name}:{w}>" for w in STRENGTHS[1:]]
    footer = ["colour-histogram distance to the training set (0 = same palette): "
              + ", ".join(f"{c} {stats[f'strength_{w}']['style_distance']:.2f}" for c, w in zip(cols, STRENGTHS)),
              "neon pixel fraction: training set {:.3f}, ".format(stats["training_set"]["neon_fraction"])
              + ", ".join(f"{c} {stats[f'strength_{w}']['neon_fraction']:.3f}" for c, w in zip(cols, STRENGTHS))]
    sheet = contact_sheet(grid, rows, cols, title=f"{config.name}: same prompts and seeds, three strengths",
                          footer=footer)
    sheet_path = result.output_dir / "contact_sheet.png"
    sheet.save(sheet_path)
    atomic_write_text(result.output_dir / "stats.json", json.dumps(stats, indent=2))
    return DemoResult(result, sheet_path, stats)
