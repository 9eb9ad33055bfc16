"""Find every (image, caption, repeats) in the training folder and check each one before training.

All problems are collected and reported at once: a creator fixes the whole list in one go instead of
restarting the run once per bad file.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..config import TrainConfig
from ..errors import DatasetError
from .captions import read_sidecar, sidecar_for
from .images import find_images, image_extensions, link_problem, open_rgb, unreadable_kind
from .metadata_csv import MetadataCsvError, read_metadata_csv

log = logging.getLogger(__name__)
# An image upscaled more than this teaches the LoRA blur; smaller ones are refused (or skipped).
MAX_UPSCALE = 4
# kohya repeat folders: `10_name`. Negative and decimal counts are matched too, so that they are named, not trained once.
_REPEATS_DIR = re.compile(r"^(-?\d+(?:\.\d+)?)_(.*)$")
# More repeats than this is a typo (99999999_name would build a hundred million items and never start).
MAX_REPEATS = 10_000


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int] = (0, 0)  # (width, height) after EXIF rotation


def _repeat_folder(path: Path, root: Path) -> str | None:
    """The folder directly under the data folder that holds `path` (where a kohya repeat count is read)."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 else None


def _repeats_of(folder: str | None) -> tuple[int, str | None]:
    """kohya convention: an image under `10_mysubject/` is seen 10 times per epoch; other folders once.
    Returns (repeats, problem); a count below 1 gives 0 repeats (the folder is skipped, as sd-scripts does)."""
    m = _REPEATS_DIR.match(folder or "")
    if not m:
        return 1, None
    count = m[1]
    if "." in count:
        return 0, (f"{folder}: repeat count {count} is not a whole number; rename the folder to "
                   f"{round(float(count)) or 1}_{m[2]} (a folder named 10_name repeats its images 10 times per epoch)")
    if int(count) > MAX_REPEATS:
        return 0, (f"{folder}: repeat count {int(count)} is too large (at most {MAX_REPEATS}; 5-20 is usual), a typo? "
                   f"Rename the folder, e.g. 10_{m[2]}")
    return max(0, int(count)), None


def _read_metadata(csv_path: Path) -> list[tuple[str, str]]:
    try:
        meta = read_metadata_csv(csv_path)
    except MetadataCsvError as exc:
        if isinstance(exc.__cause__, OSError):  # no permission, a vanished file: the CLI names the path and why
            raise exc.__cause__ from None
        raise DatasetError([exc.problem], exc.fix) from None
    if not meta.has_text_col:  # unlike the caption editor and label, training has no captions to fill one with
        raise DatasetError([f"{csv_path}: no caption column 'text' or 'caption' (columns: {meta.columns})"])
    return [((row.get("file_name") or "").strip(), (row.get(meta.text_col) or "").strip()) for row in meta.rows]


def _from_metadata(config: TrainConfig, problems: list[str]) -> list[Sample]:
    root = config.train_data_dir
    csv_name = config.metadata_path.name
    samples, seen = [], {}
    for line, (name, caption) in enumerate(_read_metadata(config.metadata_path), start=2):
        if not name:
            problems.append(f"{csv_name} line {line}: empty file_name; give the image's path relative to "
                            f"{config.metadata_path.parent}, or delete the row")
            continue
        path = _metadata_path(name, root, config.metadata_path.parent)
        if not _inside(path, root):
            problems.append(f"{csv_name} line {line}: file_name {name!r} points outside train_data_dir ({root}); "
                            "copy the image into that folder and give its path relative to it")
            continue
        key = os.path.normcase(os.path.normpath(path))
        if key in seen:
            problems.append(f"{csv_name} line {line}: {name} is listed again (first on line {seen[key]}); delete "
                            "one row (to show an image more often, put it in a repeat folder such as 10_name)")
            continue
        seen[key] = line
        samples.append(Sample(path, caption, 1))
    return samples


def _metadata_path(name: str, root: Path, csv_folder: Path) -> Path:
    """file_name relative to the data folder or to metadata.csv's folder; Windows backslashes are accepted."""
    names = [name] + ([name.replace("\\", "/")] if "\\" in name else [])
    candidates = [base / n for n in names for base in (root, csv_folder)]
    return next((p for p in candidates if os.path.lexists(p)), candidates[0])


def _inside(path: Path, root: Path) -> bool:
    """Lexically, so that a repeat folder linked in from elsewhere still counts as inside."""
    return Path(os.path.normpath(os.path.abspath(path))).is_relative_to(os.path.normpath(os.path.abspath(root)))


def _from_sidecars(config: TrainConfig, problems: list[str]) -> list[Sample]:
    listing = find_images(config.train_data_dir)
    problems.extend(listing.problems)
    samples = []
    for path in listing.images:
        caption, problem = read_sidecar(sidecar_for(path, config.caption_extension))
        if problem:
            problems.append(problem)
            continue
        samples.append(Sample(path, caption, 1))
    return samples


def _with_repeats(raw: list[Sample], root: Path, problems: list[str], notes: list[str]) -> list[Sample]:
    """Each sample with its folder's repeat count; one message per repeat folder that trains nothing."""
    out, by_folder, told = [], Counter(_repeat_folder(s.path, root) for s in raw), set()
    for s in raw:
        folder = _repeat_folder(s.path, root)
        repeats, problem = _repeats_of(folder) if folder and (root / folder).is_dir() else (1, None)
        if folder not in told and problem:
            problems.append(f"{root}{os.sep}{problem}")  # the folder named in full, like every file
        elif folder not in told and repeats == 0:
            m = _REPEATS_DIR.match(folder)
            n = by_folder[folder]
            notes.append(f"{root / folder}: repeat count {m[1]}, so its {n} image{'s' * (n != 1)} {'are' if n != 1 else 'is'} not trained "
                         f"(kohya's sd-scripts skips such folders too); rename it to 1_{m[2]} or more to train them")
        told.add(folder)
        if repeats:
            out.append(Sample(s.path, s.caption, repeats, s.size))
    return out


def _check(sample: Sample, config: TrainConfig) -> tuple[Sample | None, str | None]:
    where = sample.path
    problem = _not_a_file(where)
    if problem:
        return None, problem
    if not sample.caption:
        source = config.metadata_path.name if config.metadata_path else sidecar_for(where, config.caption_extension).name
        return None, f"{where}: empty or missing caption (in {source})"
    try:
        with Image.open(sample.path) as im:
            frames = getattr(im, "n_frames", 1)
        if frames > 1:
            log.warning("%s is animated (%d frames); only the first frame is used", where, frames)
        im = open_rgb(sample.path)  # full decode: catches truncated files that Image.verify() lets through
    except Image.DecompressionBombError as exc:
        return None, f"{where}: image too large ({exc}); downscale it first"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        kind = str(exc) or type(exc).__name__
        if isinstance(exc, UnidentifiedImageError):
            kind = unreadable_kind(where) or "not an image or unsupported format"
        if "truncated" in kind.lower() or isinstance(exc, EOFError):  # PIL words it differently per format
            kind = "file is truncated: an interrupted copy or download?"
        return None, f"{where}: unreadable image ({kind})"
    shortest = min(im.size)
    if shortest * MAX_UPSCALE < config.resolution:
        return None, (f"{where}: too small ({im.width}x{im.height}); it would be upscaled "
                      f"{config.resolution / shortest:.0f}x to {config.resolution} px and teach blur. Use images of at "
                      f"least {config.resolution // MAX_UPSCALE} px, ideally {config.resolution} px or more")
    return Sample(sample.path, sample.caption, sample.repeats, im.size), None


def _not_a_file(path: Path) -> str | None:
    """Why `path` cannot be read as an image file at all (missing, a link to nowhere, a folder, empty)."""
    if os.path.islink(path) and not os.path.exists(path):
        return link_problem(path)
    if not path.exists():
        return f"{path}: file not found"
    if path.is_dir():
        return f"{path}: is a folder, not an image file"
    if path.stat().st_size == 0:
        return f"{path}: empty file (0 bytes): an interrupted copy or download? Copy the image again"
    return None


def collect(config: TrainConfig, notes: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """(usable samples with their sizes, one message per unusable file). Raises DatasetError only when the
    caption source itself is unreadable (metadata.csv without its columns, not UTF-8). `notes` receives what
    is skipped on purpose (folders with 0 repeats)."""
    problems: list[str] = []
    notes = [] if notes is None else notes
    raw = _from_metadata(config, problems) if config.metadata_path else _from_sidecars(config, problems)
    samples = []
    for sample in _with_repeats(raw, config.train_data_dir, problems, notes):
        ok, problem = _check(sample, config)
        if problem:
            problems.append(problem)
        else:
            samples.append(ok)
    return samples, problems


def scan_dataset(config: TrainConfig) -> list[Sample]:
    """Checked samples, each with its size. Raises DatasetError listing every problem (unless skip_bad_images)."""
    notes: list[str] = []
    samples, problems = collect(config, notes)
    for note in notes:
        log.warning("%s", note)
    if problems and not config.skip_bad_images:
        raise DatasetError(problems, "Fix or remove these files, or set skip_bad_images: true to train without them.")
    for p in problems:
        log.warning("skipped: %s", p)
    small = [s for s in samples if min(s.size) < config.resolution]
    if small:
        log.warning("%d of %d images are smaller than resolution %d and will be upscaled (e.g. %s, %dx%d)",
                    len(small), len(samples), config.resolution, small[0].path.name, *small[0].size)
    if not samples:
        raise DatasetError([no_images_message(config)] + notes, no_images_hint(config))
    return samples


def no_images_message(config: TrainConfig) -> str:
    return f"no usable images found in {config.metadata_path or config.train_data_dir}"


def no_images_hint(config: TrainConfig) -> str:
    return (f"Images need a caption: a row in metadata.csv or a {config.caption_extension} file beside them. "
            f"Image files are found in sub-folders too (hidden ones are skipped), in every format Pillow opens: "
            f"{readable_formats()}.")


def readable_formats() -> str:
    common = [".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".psd"]
    known = image_extensions()
    return ", ".join(e for e in common if e in known) + f" and {len(known - set(common))} more"
