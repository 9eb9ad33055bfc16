"""Contact sheets a person can read at a glance: a grid of images with row and column labels drawn on it,
so a screenshot of the PNG stands on its own."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def contact_sheet(grid: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str],
                  title: str = "", cell: int = 128, footer: Sequence[str] = ()) -> Image.Image:
    """grid[row][col]; small images are scaled up without smoothing so their pixels stay visible."""
    rows, cols = len(grid), len(grid[0])
    font, small = _font(14), _font(12)
    label_w, head_h, title_h = 230, 36, 30 if title else 0
    width = label_w + cols * (cell + 4) + 4
    footer = [part for line in footer for part in textwrap.wrap(line, max(20, width // 7))]
    foot_h = 18 * len(footer) + (8 if footer else 0)
    sheet = Image.new("RGB", (width, title_h + head_h + rows * (cell + 4) + foot_h + 4), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 6), title, fill="black", font=font)
    for c, label in enumerate(col_labels):
        x = label_w + c * (cell + 4) + 4
        # A label that fits stays whole: "<lora:neon_lab:0.5>" must not lose its ">" to a second line.
        fits = draw.textlength(label, font=small) <= cell
        lines = [label] if fits else textwrap.wrap(label, max(6, cell // 7), break_on_hyphens=False)[:2]
        draw.multiline_text((x, title_h + 4), "\n".join(lines), fill="black", font=small)
    for r, row in enumerate(grid):
        y = title_h + head_h + r * (cell + 4)
        draw.multiline_text((8, y + 4), "\n".join(textwrap.wrap(row_labels[r], 30)[:7]), fill="black", font=small)
        for c, im in enumerate(row):
            resample = Image.Resampling.NEAREST if im.width < cell else Image.Resampling.LANCZOS
            sheet.paste(im.convert("RGB").resize((cell, cell), resample), (label_w + c * (cell + 4) + 4, y))
    for i, line in enumerate(footer):
        draw.text((8, sheet.height - foot_h + 4 + 18 * i), line, fill="black", font=small)
    return sheet
