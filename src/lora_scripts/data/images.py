"""Find a folder's images, open each the way a photo viewer shows it, then fit it to a bucket."""

from __future__ import annotations

import errno
import io
import logging
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

log = logging.getLogger(__name__)

# Formats Pillow registers but cannot decode by itself: stubs that need an external handler, and MPEG (video).
_NOT_PICTURES = {"BUFR", "GRIB", "HDF5", "WMF", "MPEG"}


def image_extensions() -> frozenset[str]:
    """Every file extension of a format this Pillow can open (.jfif, .jpe, .tga, .psd, .avif, … and those of
    plugins such as pillow-heif once registered). Not a short hard-coded list: such a list silently dropped
    every format it forgot. Not "open every file and see": that would read every caption and CSV, and a text
    file saved as .png would be skipped instead of named as a broken image."""
    registered = Image.registered_extensions()
    if _known[0] != len(registered):  # recomputed only when a plugin registers more
        _known[:] = [len(registered), frozenset(ext for ext, fmt in registered.items()
                                                if (fmt in Image.OPEN or fmt == "MPO")  # MPO opens via JPEG
                                                and fmt not in _NOT_PICTURES)]
    return _known[1]


_known: list = [-1, frozenset()]


IMAGE_EXTENSIONS = image_extensions()

# A 20000x20000 PNG is 1.2 GB decoded; PIL's default bomb limit (89 Mpx) only warns below 2x.
MAX_PIXELS = 64_000_000


def is_image_name(path: Path | str) -> bool:
    return Path(path).suffix.lower() in image_extensions()


# Pictures Pillow cannot read without a plugin: named rather than silently left out (an iPhone folder is HEIC).
_NEEDS_CONVERTING = {".heic": "HEIC (iPhone) images need the pillow-heif plugin",
                     ".heif": "HEIF images need the pillow-heif plugin", ".jxl": "JPEG XL images need a Pillow plugin",
                     ".svg": "SVG drawings are not pixel images",
                     **dict.fromkeys((".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf"),
                                     "camera RAW files need developing first")}


def unreadable_kind(path: Path | str) -> str | None:
    """Why a picture file of a format Pillow cannot open here is left out (None for any other file)."""
    ext = Path(path).suffix.lower()
    return None if ext in image_extensions() else _NEEDS_CONVERTING.get(ext)


# --- listing ----------------------------------------------------------------------------------------------------
@dataclass
class ImageListing:
    images: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # broken links, link loops, unreadable folders: one per path


def link_problem(path: Path) -> str | None:
    """Why a symbolic link cannot be followed (None when it can, or when it is not a link)."""
    if not os.path.islink(path) or os.path.exists(path):
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: link loop (the symbolic link leads back to itself); point it at the real file or folder"
    return (f"{path}: broken link (points to {os.readlink(path)}, which does not exist); "
            "fix or delete the link")


def find_images(folder: Path) -> ImageListing:
    """Every image under `folder`, sorted, following symbolic links to files and folders (a repeat folder
    linked in from elsewhere is trained like any other). Broken links and link loops are named as problems.
    Hidden files and folders are skipped, as kohya's glob does: they are caches, .ipynb_checkpoints copies
    and macOS '._' resource forks, not pictures the creator chose."""
    folder = Path(folder)
    out = ImageListing()
    # Real paths of the folders above each folder walked: a link back to one of them is a loop.
    above: dict[str, frozenset[str]] = {str(folder): frozenset({os.path.realpath(folder)})}

    def unreadable(exc: OSError) -> None:
        out.problems.append(f"{exc.filename}: cannot read this folder ({exc.strerror}); fix its permissions")

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        chain = above.pop(dirpath, frozenset())
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            sub = os.path.join(dirpath, d)
            real = os.path.realpath(sub)
            if real in chain:
                out.problems.append(f"{sub}: link loop (it leads back to {real}, a folder above it); "
                                    "point the link somewhere else or delete it")
                continue
            above[sub] = chain | {real}
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if not is_image_name(name):
                if unreadable_kind(name):
                    out.problems.append(f"{path}: cannot be read ({unreadable_kind(name)}); save it as PNG or JPEG")
                continue
            problem = link_problem(path)
            if problem:
                out.problems.append(problem)
            elif path.is_file():
                out.images.append(path)
    out.images.sort()
    return out


def list_images(folder: Path) -> list[Path]:
    """The images `find_images` finds, for callers that report nothing about links."""
    return find_images(folder).images


# --- opening ----------------------------------------------------------------------------------------------------
def open_rgb(path) -> Image.Image:
    """EXIF-rotated 8-bit RGB, as a photo viewer shows the file."""
    with Image.open(path) as im:
        im = _exif_transpose(im)
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"{im.width}x{im.height} is too large (over {MAX_PIXELS // 1_000_000} Mpx); downscale it first")
        return to_rgb(im)


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a damaged EXIF block: viewers show the picture unrotated, and so do we
        im.load()
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparency is composited on white (black would teach the LoRA dark halos);
    high-bit-depth and floating-point greys are scaled to 8 bits (a plain convert clips or blackens them)."""
    mode = im.mode
    if mode == "La":  # premultiplied alpha: Pillow converts it to LA only
        im, mode = im.convert("LA"), "LA"
    if mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in im.info and mode in ("1", "L", "P", "RGB"):
        im = _to_srgb(im, "RGBA") if mode == "RGBA" else im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if mode.startswith("I;16"):
        return _grey_to_rgb(np.asarray(im, dtype=np.float64) / 65535.0)  # the full 16-bit range, as viewers show it
    if mode in ("I", "F"):
        return _grey_to_rgb(_unit_range(np.asarray(im, dtype=np.float64), mode))
    if mode in ("RGB", "CMYK", "L"):
        return _to_srgb(im, "RGB")
    return im.convert("RGB")  # 1, P, YCbCr, LAB, HSV, RGBX: Pillow's conversions are the colorimetric ones


def _unit_range(arr: np.ndarray, mode: str) -> np.ndarray:
    """32-bit integer or float greys to 0..1. Integers: the smallest usual bit depth holding every value (8 or
    16 bits) is full scale, as for 16-bit files. Floats: 0..1 is the float convention, 0..255 holds 8-bit values;
    any other range (negative values, HDR, depth maps) is stretched from its minimum to its maximum, as image
    viewers show float data."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo >= 0:
        for full in (1.0, 255.0) if mode == "F" else (255.0, 65535.0):
            if hi <= full:
                return arr / full
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _grey_to_rgb(unit: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(unit, 0.0, 1.0) * 255).round().astype(np.uint8), "L").convert("RGB")


def _to_srgb(im: Image.Image, out_mode: str) -> Image.Image:
    """Apply an embedded colour profile (Display P3 phone photos, Adobe RGB, print CMYK) as colour-managed
    viewers do; without one, or when the profile is unusable, a plain conversion."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            return ImageCms.applyTransform(im, _transform(icc, im.mode, out_mode))
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
            log.debug("colour profile of %s not applied: %s", getattr(im, "filename", "image"), exc)
    return im.convert(out_mode)


@lru_cache(maxsize=16)
def _transform(icc: bytes, in_mode: str, out_mode: str) -> ImageCms.ImageCmsTransform:
    """One transform per profile: building it costs more than applying it, and images are opened every step."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), in_mode, out_mode)


@dataclass(frozen=True)
class Placement:
    """Where a training crop comes from: the image's size as opened, the crop's top-left corner in the image
    scaled to cover the bucket, and the crop's size. SDXL is conditioned on exactly these numbers (original
    size, crop top-left, target size), so they must be the real ones: a centred crop of a wide image is not at
    (0, 0)."""

    original: tuple[int, int]  # (height, width)
    crop_top_left: tuple[int, int]  # (top, left), in the scaled image
    target: tuple[int, int]  # (height, width): the bucket
    scaled_width: int  # of the image the crop is cut from

    def flipped(self) -> Placement:
        """The same crop after a horizontal flip: its left edge is now measured from the other side."""
        top, left = self.crop_top_left
        return Placement(self.original, (top, self.scaled_width - self.target[1] - left), self.target,
                         self.scaled_width)

    def ids(self) -> torch.Tensor:
        """(orig h, orig w, crop top, crop left, target h, target w): SDXL's add_time_ids order."""
        return torch.tensor([*self.original, *self.crop_top_left, *self.target], dtype=torch.long)


def crop_box(size: tuple[int, int], bucket: tuple[int, int], rng: random.Random | None
             ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((scaled width, scaled height), (left, top)): the image of `size` (width, height) scaled to cover the
    bucket (width, height), and where the crop starts: centred, or at random when rng is given."""
    bw, bh = bucket
    width, height = size
    scale = max(bw / width, bh / height)
    new_w, new_h = max(bw, round(width * scale)), max(bh, round(height * scale))
    dx, dy = new_w - bw, new_h - bh
    left, top = (rng.randint(0, dx), rng.randint(0, dy)) if rng else (dx // 2, dy // 2)
    return (new_w, new_h), (left, top)


def placement(size: tuple[int, int], bucket: tuple[int, int], rng: random.Random | None = None,
              flip: bool = False) -> Placement:
    """The Placement of the crop fit_to_bucket takes (the same rng draws), from the image's size alone."""
    (new_w, _), (left, top) = crop_box(size, bucket, rng)
    place = Placement((size[1], size[0]), (top, left), (bucket[1], bucket[0]), new_w)
    return place.flipped() if flip else place


def fit_to_bucket(im: Image.Image, size: tuple[int, int], rng: random.Random | None) -> Image.Image:
    """Scale so the image covers (width, height), then crop: centred, or at random when rng is given."""
    return fit_and_place(im, size, rng)[0]


def fit_and_place(im: Image.Image, size: tuple[int, int], rng: random.Random | None
                  ) -> tuple[Image.Image, Placement]:
    """fit_to_bucket, and where the crop came from (before any flip)."""
    bw, bh = size
    (new_w, new_h), (left, top) = crop_box(im.size, size, rng)
    original = (im.height, im.width)
    if (new_w, new_h) != im.size:
        scale = max(bw / im.width, bh / im.height)
        im = im.resize((new_w, new_h), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    return im.crop((left, top, left + bw, top + bh)), Placement(original, (top, left), (bh, bw), new_w)


def to_tensor(im: Image.Image, flip: bool) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the range the SD VAE was trained on."""
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def images_to_batch(images) -> torch.Tensor:
    """A list of PIL images of one size -> an NCHW float batch in [-1, 1]."""
    return torch.stack([to_tensor(im.convert("RGB"), flip=False) for im in images])
