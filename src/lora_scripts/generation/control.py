"""ControlNet units at generation: what was asked (preprocessor, model, image, weight, start/end), checked before
the base model loads; the maps they draw with; their PNG-info entries, as A1111's ControlNet extension writes
them (so a picture says how to make it again, there and here)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import LoraScriptsError
from .control_maps import AS_IS_ALIASES, PREPROCESSORS, control_map

# Where A1111 (newer versions) and ComfyUI keep ControlNets: a bare name is looked up there.
DEFAULT_DIRS = (Path("models/ControlNet"), Path("models/controlnet"))
SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin")


@dataclass(frozen=True)
class ControlUnit:
    kind: str  # the preprocessor: canny | softedge | lineart | none
    model: Path  # a ControlNet file or diffusers folder
    image: Path
    weight: float = 1.0
    start: float = 0.0  # the share of the sampling steps the ControlNet acts in
    end: float = 1.0
    low: float = 100.0  # canny's thresholds (A1111's Threshold A / B)
    high: float = 200.0
    mode: int | None = None  # a union ControlNet's control type (InstantX's Flux union: 0 canny, 2 depth, ...)

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in PREPROCESSORS:
            problems.append(f"unknown preprocessor {self.kind!r}; use one of {', '.join(PREPROCESSORS)} (or "
                            f"{', '.join(AS_IS_ALIASES)} for a map made elsewhere, used as it is)")
        if not (math.isfinite(self.weight) and 0.0 <= self.weight <= 2.0):
            problems.append(f"--control-weight {self.weight:g}: use 0 to 2 (1 = as trained, 0 = off)")
        for flag, v in (("--control-start", self.start), ("--control-end", self.end)):
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                problems.append(f"{flag} {v:g}: use 0 to 1, the share of the sampling steps")
        if self.mode is not None and self.mode < 0:
            problems.append(f"--control-mode {self.mode}: a union ControlNet's modes count from 0")
        if not problems and self.start >= self.end:
            problems.append(f"--control-start {self.start:g} is not before --control-end {self.end:g}; the "
                            "ControlNet would never act")
        if problems:
            raise LoraScriptsError("; ".join(problems))

    def read_image(self) -> Image.Image:
        return read_rgb(self.image, "--control-image")

    def control_map(self, size: tuple[int, int]) -> Image.Image:
        """The map the ControlNet sees at this image size (width, height)."""
        return control_map(self.read_image(), self.kind, size, self.low, self.high)

    def infotext(self, size: tuple[int, int], model_hash: str) -> str:
        """This unit in PNG info; Processor Res: the short side, where this tool runs the filter."""
        name = self.model.stem if self.model.is_file() else self.model.name
        thresholds = (self.low, self.high) if self.kind == "canny" else (0.5, 0.5)
        return unit_infotext(PREPROCESSORS[self.kind][1], f"{name} [{model_hash}]" if model_hash else name,
                             self.weight, min(size), thresholds, self.start, self.end)


def unit_infotext(module: str, model: str, weight: float, processor_res: int,
                  thresholds: tuple[float, float] = (0.5, 0.5), start: float = 0.0, end: float = 1.0) -> str:
    """A unit as A1111's ControlNet extension writes it (v1.1.4xx: these 11 fields, in this order; floats as
    Python prints them). An IP-Adapter is such a unit too."""
    fields = [("Module", module), ("Model", model), ("Weight", float(weight)), ("Resize Mode", "Crop and Resize"),
              ("Processor Res", processor_res), ("Threshold A", float(thresholds[0])),
              ("Threshold B", float(thresholds[1])), ("Guidance Start", float(start)), ("Guidance End", float(end)),
              ("Pixel Perfect", False), ("Control Mode", "Balanced")]
    return ", ".join(f"{k}: {v}" for k, v in fields)


def read_rgb(path: Path, flag: str) -> Image.Image:
    """An image named on the command line, read as training reads images (data.images.open_rgb: EXIF-rotated,
    transparency on white), or a message naming the flag."""
    from ..data.images import open_rgb

    try:
        return open_rgb(path)
    except FileNotFoundError:
        raise LoraScriptsError(f"{flag} {path} does not exist") from None
    except IsADirectoryError:
        raise LoraScriptsError(f"{flag} {path} is a folder; give one image") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise LoraScriptsError(f"{flag} {path} is not a readable image ({exc})") from None

def model_hash(path: Path) -> str:
    """The extension's hash of a model (A1111's old 8-hex one); of a diffusers folder, its weights file's."""
    from ..hashes import legacy_model_hash

    if path.is_dir():
        weights = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        return legacy_model_hash(weights[0]) if weights else ""
    return legacy_model_hash(path)


def resolve_model(text: str, dirs: tuple[Path, ...] = DEFAULT_DIRS) -> Path:
    """A path, or a name (with or without suffix) in models/ControlNet or models/controlnet."""
    path = Path(text)
    if path.exists():
        return path
    for folder in dirs:
        for candidate in [folder / text] + [folder / f"{text}{s}" for s in SUFFIXES]:
            if candidate.exists():
                return candidate
    raise LoraScriptsError(f"ControlNet {text!r} not found: give its path, or put it in "
                           f"{' or '.join(str(d) for d in dirs)}")


def parse_units(specs: list[str], images: list[str] | None, weights: list[float] | None = None,
                starts: list[float] | None = None, ends: list[float] | None = None,
                thresholds: list[str] | None = None, modes: list[int] | None = None) -> list[ControlUnit]:
    """--control TYPE:MODEL (repeatable) with its --control-image, and per-unit options: each option given once
    applies to every unit, or once per unit in the same order."""
    if not specs:
        if images or weights or starts or ends or thresholds or modes:
            raise LoraScriptsError("--control-image/--control-weight/--control-start/--control-end need a --control "
                                   "TYPE:MODEL (e.g. --control canny:control_v11p_sd15_canny.pth)")
        return []
    images = images or []
    if len(images) != len(specs):
        raise LoraScriptsError(f"{len(specs)} --control given with {len(images)} --control-image; give one image per "
                               "ControlNet, in the same order")

    def per_unit(flag: str, values: list | None, default):
        if not values:
            return [default] * len(specs)
        if len(values) == 1:
            return values * len(specs)
        if len(values) != len(specs):
            raise LoraScriptsError(f"{flag} given {len(values)} times for {len(specs)} ControlNets; give it once (for "
                                   "all) or once per --control")
        return values

    lows_highs = [_thresholds(t) for t in per_unit("--canny-thresholds", thresholds, "100,200")]
    units = []
    for spec, image, w, s, e, (lo, hi), mode in zip(specs, images, per_unit("--control-weight", weights, 1.0),
                                                    per_unit("--control-start", starts, 0.0),
                                                    per_unit("--control-end", ends, 1.0), lows_highs,
                                                    per_unit("--control-mode", modes, None)):
        kind, sep, model = spec.partition(":")
        if not sep or not model:
            raise LoraScriptsError(f"--control {spec!r}: expected TYPE:MODEL, e.g. canny:control_v11p_sd15_canny.pth "
                                   f"(TYPE: {', '.join(PREPROCESSORS)})")
        kind = "none" if kind.lower() in AS_IS_ALIASES else kind.lower()
        units.append(ControlUnit(kind, resolve_model(model), Path(image), w, s, e, lo, hi, mode))
    return units


def _thresholds(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise LoraScriptsError(f"--canny-thresholds {text!r}: expected LOW,HIGH, e.g. 100,200") from None
    if not (1 <= low <= 255 and 1 <= high <= 255 and low <= high):
        raise LoraScriptsError(f"--canny-thresholds {text}: use 1 to 255, low first (A1111's default: 100,200)")
    return low, high


def check_mode(unit: ControlUnit, net) -> None:
    """A union ControlNet (several control types in one file) needs its mode; a plain one takes none."""
    modes = net.config.get("num_mode")
    name = unit.model.name
    if modes and unit.mode is None:
        raise LoraScriptsError(f"{name} is a union ControlNet with {modes} control types: choose one with "
                               "--control-mode N (InstantX/Shakker-Labs Flux union: 0 canny, 1 tile, 2 depth, 3 blur, "
                               "4 pose, 5 gray, 6 low quality)")
    if unit.mode is not None and not modes:
        raise LoraScriptsError(f"--control-mode {unit.mode}: {name} is not a union ControlNet; leave the mode out")
    if unit.mode is not None and unit.mode >= modes:
        raise LoraScriptsError(f"--control-mode {unit.mode}: {name} has control types 0 to {modes - 1}")
