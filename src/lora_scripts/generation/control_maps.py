"""Control maps from images, with no model: the filters ControlNet users run before a canny, soft-edge or
lineart ControlNet, through OpenCV; and the crop-and-resize that fits any picture to the image size drawn.

Each returns an RGB PIL image of the size asked for: white strokes on black, as the ControlNets were trained.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from ..errors import LoraScriptsError


def _cv2():
    try:
        import cv2
    except ImportError:
        raise LoraScriptsError("the canny, softedge and lineart preprocessors need OpenCV: pip install "
                               "opencv-python-headless (or use the map as it is: --control none:MODEL)") from None
    return cv2


def crop_and_resize(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Scale to cover (width, height), then cut the middle: A1111's default "Crop and Resize". uint8 RGB."""
    return np.asarray(ImageOps.fit(image.convert("RGB"), size, Image.Resampling.LANCZOS))


def canny(rgb: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """OpenCV's Canny on the colour image (its gradient is the strongest channel's), thresholds as A1111's
    Threshold A / B (100 / 200)."""
    return _cv2().Canny(rgb, low, high)


def softedge(rgb: np.ndarray, low: float = 0, high: float = 0) -> np.ndarray:
    """Soft edges with no network (A1111's soft-edge preprocessors, HED and PiDiNet, need one): the Sobel
    gradient magnitude of the lightly blurred grey image, scaled so its 99th percentile is white. Unlike canny it
    keeps edge strength and width, which soft-edge ControlNets were trained to follow loosely."""
    cv2 = _cv2()
    grey = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.0)
    magnitude = cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3))
    top = float(np.percentile(magnitude, 99))
    return np.clip(magnitude * (255.0 / max(top, 1e-6)), 0, 255).astype(np.uint8)


def lineart(rgb: np.ndarray, low: float = 0, high: float = 0) -> np.ndarray:
    """Lines of a drawing on a light background (A1111's model-free "lineart_standard"): how much darker each
    pixel is than its wide neighbourhood (Gaussian, sigma 6), in the channel where it is least so, normalised by
    the median of the clearly dark pixels so faint and bold drawings give similar strokes."""
    cv2 = _cv2()
    image = rgb.astype(np.float32)
    darker = np.clip(cv2.GaussianBlur(image, (0, 0), 6.0) - image, 0, 255).min(axis=2)
    strokes = darker[darker > 8]
    scale = max(16.0, float(np.median(strokes)) if strokes.size else 16.0)
    return np.clip(darker / scale * 127, 0, 255).astype(np.uint8)


def as_is(rgb: np.ndarray, low: float = 0, high: float = 0) -> np.ndarray:
    """The image is the map (a depth or pose map made elsewhere, or a map written by --control-preview)."""
    return rgb


# Our name -> (filter, the preprocessor's name in A1111's ControlNet extension, for PNG info)
PREPROCESSORS: dict[str, tuple[Callable[..., np.ndarray], str]] = {
    "canny": (canny, "canny"),
    "softedge": (softedge, "softedge_sobel"),
    "lineart": (lineart, "lineart_standard (from white bg & black line)"),
    "none": (as_is, "none"),
}
# Map types users name that are given ready-made: used as they are.
AS_IS_ALIASES = ("depth", "pose", "openpose", "normal", "seg", "scribble", "image")


def control_map(image: Image.Image, kind: str, size: tuple[int, int], low: float = 100, high: float = 200
                ) -> Image.Image:
    """The control map for an image: fitted to size (width, height), then filtered."""
    fn = PREPROCESSORS[kind][0]
    out = fn(crop_and_resize(image, size), low, high)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return Image.fromarray(out, "RGB")
