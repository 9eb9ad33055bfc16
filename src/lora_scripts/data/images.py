"""Open an image the way a photo viewer shows it, then fit it to a bucket."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# A 20000x20000 PNG is 1.2 GB decoded; PIL's default bomb limit (89 Mpx) only warns below 2x.
MAX_PIXELS = 64_000_000


def open_rgb(path) -> Image.Image:
    """EXIF-rotated RGB. Transparency is composited on white (black would teach the LoRA dark halos)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"{im.width}x{im.height} is too large (over {MAX_PIXELS // 1_000_000} Mpx); downscale it first")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, im).convert("RGB")
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale: scale to 8 bits before RGB, or PIL clips everything above 255 to white.
            arr = np.asarray(im, dtype=np.float64) / (65535.0 if im.mode.startswith("I;16") else max(1, np.asarray(im).max()))
            return Image.fromarray((arr * 255).round().astype(np.uint8)).convert("RGB")
        return im.convert("RGB")


def fit_to_bucket(im: Image.Image, size: tuple[int, int], rng: random.Random | None) -> Image.Image:
    """Scale so the image covers (width, height), then crop: centred, or at random when rng is given."""
    bw, bh = size
    scale = max(bw / im.width, bh / im.height)
    new_w, new_h = max(bw, round(im.width * scale)), max(bh, round(im.height * scale))
    if (new_w, new_h) != im.size:
        im = im.resize((new_w, new_h), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    dx, dy = new_w - bw, new_h - bh
    left, top = (rng.randint(0, dx), rng.randint(0, dy)) if rng else (dx // 2, dy // 2)
    return im.crop((left, top, left + bw, top + bh))


def to_tensor(im: Image.Image, flip: bool) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the range the SD VAE was trained on."""
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def images_to_batch(images) -> torch.Tensor:
    """A list of PIL images of one size -> an NCHW float batch in [-1, 1]."""
    return torch.stack([to_tensor(im.convert("RGB"), flip=False) for im in images])
