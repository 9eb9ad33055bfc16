"""The `basic` captioner: no model weights, ever. A four-part caption (subject, environment, lighting, style)
from the trigger word, the folder and file names, and what the pixels measure: dominant colours, brightness
and saturation. A starting point to edit by hand; the model backends describe content far better."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.images import open_rgb

# Named colours for "dominant colours"; the nearest name in RGB wins.
_COLOURS = {"black": (20, 20, 20), "white": (240, 240, 240), "grey": (128, 128, 128), "red": (200, 30, 30),
            "orange": (240, 140, 30), "yellow": (235, 220, 40), "green": (40, 170, 60), "cyan": (40, 220, 230),
            "blue": (40, 70, 210), "navy": (20, 25, 80), "purple": (120, 50, 170), "magenta": (230, 40, 200),
            "pink": (240, 150, 190), "brown": (120, 75, 40), "beige": (225, 205, 170)}
_NOISE_WORDS = {"img", "image", "photo", "dsc", "pic", "train", "training", "data", "dataset", "final", "copy"}
DEFAULT_TEMPLATE = "{trigger}, {subject}, {environment}, {lighting}, {style}"


def words_from_name(name: str) -> str:
    """'10_sci_lab_train' -> 'sci lab'; 'robot-arm_003' -> 'robot arm'."""
    parts = [w for w in re.split(r"[^a-zA-Z]+", name.lower()) if w and w not in _NOISE_WORDS and len(w) > 1]
    return " ".join(parts)


def dominant_colours(im: Image.Image, n: int = 2) -> list[str]:
    small = np.asarray(im.resize((32, 32), Image.Resampling.BOX), dtype=np.float32).reshape(-1, 3)
    names = list(_COLOURS)
    palette = np.array([_COLOURS[c] for c in names], dtype=np.float32)
    nearest = ((small[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(names))
    return [names[i] for i in counts.argsort()[::-1][:n] if counts[i] > 0.05 * len(small)]


def lighting_words(im: Image.Image) -> str:
    hsv = np.asarray(im.convert("HSV"), dtype=np.float32) / 255.0
    value, sat = hsv[..., 2], hsv[..., 1]
    luma = np.asarray(im.convert("L"), dtype=np.float32) / 255.0  # perceived brightness, not HSV's max channel
    mean = float(luma.mean())
    glowing = float(((sat > 0.5) & (value > 0.7)).mean())
    if mean < 0.3 and glowing > 0.02:
        return "neon lighting, dark scene"
    if mean < 0.25:
        return "dim low-key lighting"
    if mean > 0.75:
        return "bright high-key lighting"
    if float(luma.std()) > 0.3:
        return "high-contrast lighting"
    return "soft even lighting"


def style_words(im: Image.Image) -> str:
    small = np.asarray(im.resize((64, 64), Image.Resampling.NEAREST)).reshape(-1, 3)
    unique = len(np.unique(small // 16, axis=0))
    return "flat colour illustration" if unique < 24 else "detailed image"


FIELDS = ("trigger", "subject", "environment", "lighting", "style")


def check_template(template: str) -> None:
    """Refuse a --template that would fail on every image (an unknown {field}, an unclosed brace)."""
    from ..errors import LoraScriptsError

    try:
        template.format(**dict.fromkeys(FIELDS, "x"))
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        why = f"unknown field {{{exc.args[0]}}}" if isinstance(exc, KeyError) else f"not a valid template ({exc})"
        raise LoraScriptsError(f"--template {template!r}: {why}. Use the fields "
                               f"{', '.join('{' + f + '}' for f in FIELDS)} (write {{{{ and }}}} for literal braces)") from None


def basic_caption(path: Path, root: Path, trigger: str = "", template: str = DEFAULT_TEMPLATE) -> str:
    im = open_rgb(path)
    folder = path.parent if path.parent != root else root
    colours = dominant_colours(im)
    subject = words_from_name(path.stem) or "a scene"
    if colours:
        subject = f"{subject} in {' and '.join(colours)}"
    fields = {"trigger": trigger, "subject": subject, "environment": words_from_name(folder.name) or "an interior",
              "lighting": lighting_words(im), "style": style_words(im)}
    text = template.format(**fields)
    return re.sub(r"^[,\s]+|(?<=,)\s*,|[,\s]+$", "", re.sub(r"\s+", " ", text)).strip()
