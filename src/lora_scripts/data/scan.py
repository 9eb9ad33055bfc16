"""Find every (image, caption, repeats) in the training folder and check each one before training.

All problems are collected and reported at once: a creator fixes the whole list in one go instead of
restarting the run once per bad file.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..config import TrainConfig
from ..errors import DatasetError
from .images import IMAGE_EXTENSIONS, open_rgb

log = logging.getLogger(__name__)
# An image upscaled more than this teaches the LoRA blur; smaller ones are refused (or skipped).
MAX_UPSCALE = 4
_REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int] = (0, 0)  # (width, height) after EXIF rotation


def _repeats_for(path: Path, root: Path) -> int:
    """kohya convention: an image under `10_mysubject/` is seen 10 times per epoch."""
    try:
        first = path.relative_to(root).parts[0]
    except ValueError:
        return 1
    m = _REPEATS_DIR.match(first)
    return int(m[1]) if m and (root / first).is_dir() else 1


def _read_metadata(csv_path: Path) -> list[tuple[str, str]]:
    try:
        return _parse_metadata(csv_path)
    except UnicodeDecodeError as exc:
        raise DatasetError([f"{csv_path}: not UTF-8 text ({_decode_problem(exc)})"],
                           "Re-save it as UTF-8 (in Excel: Save As > CSV UTF-8).") from None
    except csv.Error as exc:
        raise DatasetError([f"{csv_path}: not a valid CSV file ({exc})"],
                           "metadata.csv needs a header line file_name,text and one row per image.") from None


def _decode_problem(exc: UnicodeDecodeError) -> str:
    return f"byte 0x{exc.object[exc.start]:02x} at position {exc.start}"


def _parse_metadata(csv_path: Path) -> list[tuple[str, str]]:
    # utf-8-sig: Excel writes a byte-order mark that would otherwise become part of the first column name.
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "file_name" not in columns:
            raise DatasetError([f"{csv_path}: no 'file_name' column (columns: {columns})"],
                               "metadata.csv needs a header line: file_name,text")
        text_col = next((c for c in ("text", "caption") if c in columns), None)
        if text_col is None:
            raise DatasetError([f"{csv_path}: no caption column 'text' or 'caption' (columns: {columns})"])
        return [((row.get("file_name") or "").strip(), (row.get(text_col) or "").strip()) for row in reader]


def _from_metadata(config: TrainConfig, problems: list[str]) -> list[Sample]:
    root = config.train_data_dir
    samples = []
    for line, (name, caption) in enumerate(_read_metadata(config.metadata_path), start=2):
        if not name:
            problems.append(f"{config.metadata_path.name} line {line}: empty file_name")
            continue
        candidates = [root / name, config.metadata_path.parent / name]
        path = next((p for p in candidates if p.is_file()), candidates[0])
        samples.append(Sample(path, caption, _repeats_for(path, root)))
    return samples


def _from_sidecars(config: TrainConfig, problems: list[str]) -> list[Sample]:
    root = config.train_data_dir
    samples = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        sidecar = path.with_suffix(config.caption_extension)
        try:
            caption = sidecar.read_text(encoding="utf-8-sig").strip() if sidecar.is_file() else ""
        except UnicodeDecodeError as exc:
            # Guessing a legacy code page would silently garble accented words into the captions.
            problems.append(f"{sidecar}: caption file is not UTF-8 ({_decode_problem(exc)}); re-save it as UTF-8")
            continue
        samples.append(Sample(path, caption, _repeats_for(path, root)))
    return samples


def _check(sample: Sample, config: TrainConfig) -> tuple[Sample | None, str | None]:
    where = sample.path
    if not sample.path.is_file():
        return None, f"{where}: file not found"
    if not sample.caption:
        source = "metadata.csv" if config.metadata_path else f"{sample.path.with_suffix(config.caption_extension).name}"
        return None, f"{where}: empty or missing caption (in {source})"
    try:
        with Image.open(sample.path) as im:
            frames = getattr(im, "n_frames", 1)
        if frames > 1:
            log.warning("%s is animated (%d frames); only the first frame is used", where, frames)
        im = open_rgb(sample.path)  # full decode: catches truncated files that Image.verify() lets through
    except Image.DecompressionBombError as exc:
        return None, f"{where}: image too large ({exc}); downscale it first"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        kind = "not an image or unsupported format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        if "truncated" in kind.lower():  # PIL words it differently per format
            kind = "file is truncated: an interrupted copy or download?"
        return None, f"{where}: unreadable image ({kind})"
    shortest = min(im.size)
    if shortest * MAX_UPSCALE < config.resolution:
        return None, (f"{where}: too small ({im.width}x{im.height}); it would be upscaled "
                      f"{config.resolution / shortest:.0f}x to {config.resolution} px and teach blur. Use images of at "
                      f"least {config.resolution // MAX_UPSCALE} px, ideally {config.resolution} px or more")
    return Sample(sample.path, sample.caption, sample.repeats, im.size), None


def collect(config: TrainConfig) -> tuple[list[Sample], list[str]]:
    """(usable samples with their sizes, one message per unusable file). Raises DatasetError only when the
    caption source itself is unreadable (metadata.csv without its columns, not UTF-8)."""
    problems: list[str] = []
    raw = _from_metadata(config, problems) if config.metadata_path else _from_sidecars(config, problems)
    samples = []
    for sample in raw:
        ok, problem = _check(sample, config)
        if problem:
            problems.append(problem)
        else:
            samples.append(ok)
    return samples, problems


def scan_dataset(config: TrainConfig) -> list[Sample]:
    """Checked samples, each with its size. Raises DatasetError listing every problem (unless skip_bad_images)."""
    samples, problems = collect(config)
    if problems and not config.skip_bad_images:
        raise DatasetError(problems, "Fix or remove these files, or set skip_bad_images: true to train without them.")
    for p in problems:
        log.warning("skipped: %s", p)
    small = [s for s in samples if min(s.size) < config.resolution]
    if small:
        log.warning("%d of %d images are smaller than resolution %d and will be upscaled (e.g. %s, %dx%d)",
                    len(small), len(samples), config.resolution, small[0].path.name, *small[0].size)
    if not samples:
        where = config.metadata_path or config.train_data_dir
        raise DatasetError([f"no usable images found in {where}"],
                           f"Images need a caption: a row in metadata.csv or a {config.caption_extension} file beside them.")
    return samples
