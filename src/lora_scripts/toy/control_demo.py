"""The seed's scenario on the toy world: a trained style LoRA drawn on a given layout. The layouts are flat
scenes (a shape somewhere); the prompt names one place for every row (a glowing cyan circle in the centre), so
where the picture puts its shape shows who decides: the prompt alone, or the layout through the toy ControlNet.

Measured per column: how often the shape lands where the layout has it, how closely its outlines follow the
layout's edges (edge F1), and the neon pixel fraction (does the style survive the ControlNet?).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..generation.control import ControlUnit
from ..generation.render import Renderer, Settings
from .scenes import Scene, neon_caption, render
from .stats import edge_agreement, neon_fraction, shape_position

LAYOUTS = (Scene("square", "red", "white", "on the left"), Scene("triangle", "blue", "gray", "on the right"),
           Scene("square", "green", "black", "on the right"), Scene("triangle", "yellow", "white", "on the left"))
PROMPT = neon_caption("circle", "cyan", "in the center")
SEEDS = (1, 2, 3)
SETTINGS = Settings(steps=25, cfg=5.0, scheduler="ddim")


@dataclass
class ControlReport:
    grid: list[list[Image.Image]]  # rows: layout x seed; columns: map, then one per COLUMN
    rows: list[str]
    columns: list[str]
    stats: dict[str, dict[str, float]]


def columns(lora: str) -> list[tuple[str, float, bool]]:
    """(label, LoRA strength, with the ControlNet)."""
    return [("base", 0.0, False), ("base + ControlNet", 0.0, True), (f"<lora:{lora}:0.5>", 0.5, False),
            (f"<lora:{lora}:0.5> + ControlNet", 0.5, True), (f"<lora:{lora}:1> + ControlNet", 1.0, True)]


def control_report(base: Path, controlnet: Path, lora_name: str, lora_path: Path, folder: Path,
                   layouts=LAYOUTS, seeds=SEEDS) -> ControlReport:
    """folder: where the layout pictures are written (a layout is a file, as a user's would be)."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = columns(lora_name)
    grid = [[] for _ in range(len(layouts) * len(seeds))]
    maps, positions, units = [], [], []
    for i, scene in enumerate(layouts):
        path = folder / f"layout-{i}.png"
        render(scene, 32).save(path)
        units.append(ControlUnit("canny", controlnet, path))
        maps.append(units[-1].control_map((32, 32)))
        positions.append(scene.position)
        for j in range(len(seeds)):
            grid[i * len(seeds) + j].append(maps[-1])
    plain = Renderer(base, [], SETTINGS)
    # One ControlNet renderer per layout, for every controlled column (its LoRA strength is set per prompt).
    guided = [Renderer(base, [], SETTINGS, controls=[unit]) for unit in units]
    for renderer in [plain, *guided]:
        renderer.add_lora(lora_name, lora_path)
    stats = {}
    for label, strength, controlled in plan:
        images: list[tuple[int, Image.Image]] = []
        for i in range(len(layouts)):
            renderer = guided[i] if controlled else plain
            prompt = f"{PROMPT}, <lora:{lora_name}:{strength:g}>" if strength else PROMPT
            for j, r in enumerate(renderer.render(prompt, list(seeds))):
                grid[i * len(seeds) + j].append(r.image)
                images.append((i, r.image))
        stats[label] = {"at_layout_position": sum(shape_position(im) == positions[i] for i, im in images) / len(images),
                        "edge_f1": sum(edge_agreement(im, maps[i]) for i, im in images) / len(images),
                        "neon_fraction": neon_fraction([im for _, im in images])}
    rows = [f"{s.shape} {s.position} (seed {seed})" for s in layouts for seed in seeds]
    return ControlReport(grid, rows, ["layout (canny map)"] + [label for label, _, _ in plan], stats)
