"""The toy world: procedurally drawn 32-64 px scenes with four-part captions (subject, environment, lighting,
style). Three kinds, all deterministic for a seed:

* base scenes - one filled shape (circle/square/triangle) in red/green/blue/yellow on a white, gray or black
  background, left/centre/right: what the toy base model is pretrained on;
* the *style* set "neon lab" - dark navy backgrounds, cyan/magenta glowing outlines: colours, darkness and glow
  the base never saw;
* the *subject* set "robotic arm" - a jointed arm glyph the base cannot draw, in the base's ordinary flat style.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40)}
BACKGROUNDS = {"white": ((245, 245, 245), "bright lighting"), "gray": ((128, 128, 128), "soft lighting"),
               "black": ((15, 15, 15), "dim lighting")}
POSITIONS = {"on the left": 0.25, "in the center": 0.5, "on the right": 0.75}
NEON = {"cyan": (0, 255, 255), "magenta": (255, 0, 255)}
NAVY = (8, 10, 28)
BASE_STYLE = "flat colour style"


@dataclass(frozen=True)
class Scene:
    shape: str  # one of SHAPES, or "robotic arm"
    colour: str
    background: str
    position: str

    @property
    def caption(self) -> str:
        lighting = BACKGROUNDS[self.background][1]
        return f"a {self.colour} {self.shape} {self.position}, {self.background} background, {lighting}, {BASE_STYLE}"


def random_scene(rng: random.Random, shapes=SHAPES) -> Scene:
    return Scene(rng.choice(shapes), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS)))


def _box(size: int, position: str, scale: float, rng: random.Random | None) -> tuple[int, int, int, int]:
    s = int(size * scale)
    cx = int(size * POSITIONS[position]) + (rng.randint(-1, 1) if rng else 0)
    cy = size // 2 + (rng.randint(-size // 10, size // 10) if rng else 0)
    x0 = min(max(0, cx - s // 2), size - s)
    y0 = min(max(0, cy - s // 2), size - s)
    return x0, y0, x0 + s, y0 + s


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill=None, outline=None, width: int = 1) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline, width=width)
    elif shape == "robotic arm":
        _draw_arm(draw, box, fill or outline, width if fill is None else None)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_arm(draw: ImageDraw.ImageDraw, box, colour, outline_width: int | None) -> None:
    """An industrial arm seen from the side: base plate, upper arm, elbow joint, forearm, open two-finger gripper."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    t = max(2, w // 6)  # limb thickness
    base = (x0 + w * 0.05, y1 - t, x0 + w * 0.55, y1)
    shoulder = (x0 + w * 0.3, y1 - t)
    elbow = (x0 + w * 0.3, y0 + h * 0.25)
    wrist = (x0 + w * 0.8, y0 + h * 0.25)
    if outline_width is None:
        draw.rectangle(base, fill=colour)
        draw.line([shoulder, elbow], fill=colour, width=t)
        draw.line([elbow, wrist], fill=colour, width=t)
        r = t * 0.8
        draw.ellipse((elbow[0] - r, elbow[1] - r, elbow[0] + r, elbow[1] + r), fill=colour)
    else:
        draw.rectangle(base, outline=colour, width=outline_width)
        draw.line([shoulder, elbow, wrist], fill=colour, width=outline_width)
    g = max(2, int(h * 0.2))
    draw.line([wrist, (wrist[0] + g * 0.6, wrist[1] - g)], fill=colour, width=max(1, t // 2))
    draw.line([wrist, (wrist[0] + g * 0.6, wrist[1] + g)], fill=colour, width=max(1, t // 2))


def render(scene: Scene, size: int = 32, rng: random.Random | None = None) -> Image.Image:
    """The base model's ordinary style: a flat filled shape on a plain background."""
    return render_on(scene.shape, COLOURS[scene.colour], BACKGROUNDS[scene.background][0], scene.position, size, rng)


def render_on(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], position: str,
              size: int = 32, rng: random.Random | None = None) -> Image.Image:
    """A flat filled shape in any colours (the shape classifier's training also sees colours no set has)."""
    im = Image.new("RGB", (size, size), background)
    scale = 0.6 if shape == "robotic arm" else 0.45
    draw_shape(ImageDraw.Draw(im), shape, _box(size, position, scale, rng), fill=colour)
    return im


def render_neon(shape: str, colour: str, position: str, size: int = 32, rng: random.Random | None = None) -> Image.Image:
    """The 'neon lab' style: dark navy room, the shape as a glowing cyan/magenta tube (halo + sharp line)."""
    glow = Image.new("RGB", (size, size))
    tube = Image.new("RGB", (size, size))
    box = _box(size, position, 0.6 if shape == "robotic arm" else 0.5, rng)
    draw_shape(ImageDraw.Draw(glow), shape, box, outline=NEON[colour], width=max(2, size // 10))
    draw_shape(ImageDraw.Draw(tube), shape, box, outline=NEON[colour], width=max(1, size // 24))
    im = ImageChops.add(Image.new("RGB", (size, size), NAVY), glow.filter(ImageFilter.GaussianBlur(size / 24)))
    return ImageChops.add(im, tube)


def neon_caption(shape: str, colour: str, position: str) -> str:
    return f"a glowing {colour} {shape} {position}, dark cyber laboratory, neon lighting, neon lab style"


def generic_image(rng: random.Random, size: int) -> Image.Image:
    """Random shapes in random colours (cyan, magenta and dark navy included) for the VAE only, so it can
    reconstruct styles the UNet never saw."""
    bg = tuple(rng.randint(0, 255) for _ in range(3)) if rng.random() < 0.5 else rng.choice([NAVY, (0, 0, 0), (255, 255, 255)])
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    for _ in range(rng.randint(1, 3)):
        colour = rng.choice(list(NEON.values()) + [tuple(rng.randint(0, 255) for _ in range(3))])
        shape = rng.choice(SHAPES + ("robotic arm",))
        s = rng.randint(size // 5, size // 2)
        x, y = rng.randint(0, size - s), rng.randint(0, size - s)
        if rng.random() < 0.5:
            draw_shape(draw, shape, (x, y, x + s, y + s), fill=colour)
        else:
            draw_shape(draw, shape, (x, y, x + s, y + s), outline=colour, width=rng.randint(1, 3))
    if rng.random() < 0.4:
        im = ImageChops.add(im, im.filter(ImageFilter.GaussianBlur(size / 24)))
    return im


def _write_set(folder: Path, items: list[tuple[Image.Image, str]], prefix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, caption) in enumerate(items):
        name = f"{prefix}_{i:03d}.png"
        im.save(folder / name)
        rows.append((name, caption))
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)
    return folder / "metadata.csv"


def neon_items(count: int, size: int, seed: int) -> list[tuple[Image.Image, str]]:
    rng = random.Random(f"neon/{seed}")
    out = []
    for _ in range(count):
        shape, colour, pos = rng.choice(SHAPES), rng.choice(list(NEON)), rng.choice(list(POSITIONS))
        out.append((render_neon(shape, colour, pos, size, rng), neon_caption(shape, colour, pos)))
    return out


def arm_items(count: int, size: int, seed: int) -> list[tuple[Image.Image, str]]:
    rng = random.Random(f"arm/{seed}")
    out = []
    for _ in range(count):
        scene = random_scene(rng, shapes=("robotic arm",))
        out.append((render(scene, size, rng), scene.caption))
    return out


def write_neon_set(folder: Path, count: int = 60, size: int = 32, seed: int = 0) -> Path:
    """The style set: images plus metadata.csv (file_name,text)."""
    return _write_set(folder, neon_items(count, size, seed), "neon")


def write_arm_set(folder: Path, count: int = 60, size: int = 32, seed: int = 0) -> Path:
    """The subject set: a robotic arm in the base's flat style."""
    return _write_set(folder, arm_items(count, size, seed), "arm")
