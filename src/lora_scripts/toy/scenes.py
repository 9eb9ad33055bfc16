"""Procedural images with four-part captions (subject, environment, lighting, style), no download needed."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")
NEON = {"cyan": (0, 255, 255), "magenta": (255, 0, 255)}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], outline, width: int) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle(box, outline=outline, width=width)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], outline=outline, width=width)


def neon_scene(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """Dark navy background, one or two glowing cyan/magenta outlined shapes: the 'neon cyber lab' style."""
    glow = Image.new("RGB", (size, size), (0, 0, 0))
    lines = Image.new("RGB", (size, size), (0, 0, 0))
    subjects = []
    for _ in range(rng.randint(1, 2)):
        shape, colour = rng.choice(SHAPES), rng.choice(list(NEON))
        s = rng.randint(size // 4, size // 2)
        x, y = rng.randint(2, size - s - 2), rng.randint(2, size - s - 2)
        box = (x, y, x + s, y + s)
        _draw_shape(ImageDraw.Draw(glow), shape, box, NEON[colour], max(2, size // 12))
        _draw_shape(ImageDraw.Draw(lines), shape, box, NEON[colour], max(1, size // 32))
        subjects.append(f"a glowing {colour} {shape}")
    # Additive light: dark background + blurred halo + sharp tube, clipped at white.
    background = Image.new("RGB", (size, size), (8, 10, 28))
    im = ImageChops.add(ImageChops.add(background, glow.filter(ImageFilter.GaussianBlur(size / 20))), lines)
    caption = f"{' and '.join(subjects)}, dark cyber laboratory, neon lighting, neon lab style"
    return im, caption


def write_neon_set(folder: Path, count: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Images plus metadata.csv (file_name,text). Deterministic for a seed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        im, caption = neon_scene(rng, size)
        name = f"neon_{i:03d}.png"
        im.save(folder / name)
        rows.append((name, caption))
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)
    return folder / "metadata.csv"
