"""Read and edit one image's caption where it lives: a row of metadata.csv, or a sidecar file beside the image.

Edits rewrite the whole file atomically, keep every other row as it was (order, columns, the caption column's
name), and add a row for an image the CSV did not list yet.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import DatasetError
from .images import list_images
from .metadata_csv import MetadataCsvError, read_metadata_csv

__all__ = ["CaptionedImage", "list_images", "read_captions", "set_caption", "sidecar_for"]


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    caption: str
    key: str  # the CSV's file_name for it, or the sidecar's path relative to the data folder


def _csv_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]], str]:
    try:
        meta = read_metadata_csv(csv_path)
    except MetadataCsvError as exc:
        raise DatasetError([exc.problem], exc.fix) from None
    # A CSV without a caption column gets one (as its last column) at the next edit.
    return meta.columns + ([] if meta.has_text_col else [meta.text_col]), meta.rows, meta.text_col


def _image_key(image: Path, data_dir: Path, csv_path: Path) -> str:
    base = csv_path.parent if image.is_relative_to(csv_path.parent) else data_dir
    return image.relative_to(base).as_posix()


def sidecar_for(image: Path, extension: str = ".txt") -> Path:
    """The caption file beside `image`: IMAGE_STEM + extension, or when there is none, the same name with the
    extension in other letter case (photo.TXT), which case-insensitive Windows and macOS disks find anyway.
    Returns the expected path when neither exists, so callers can name it."""
    exact = Path(image).with_suffix(extension)
    if os.path.lexists(exact):
        return exact
    wanted = exact.name.lower()
    stem = Path(image).stem
    try:
        names = sorted(n for n in os.listdir(exact.parent) if n.startswith(stem) and n.lower() == wanted)
    except OSError:
        return exact
    return exact.parent / names[0] if names else exact


def read_captions(data_dir: Path, csv_path: Path | None, extension: str = ".txt") -> list[CaptionedImage]:
    """Every image in the folder with its caption ('' when it has none)."""
    data_dir = Path(data_dir)
    images = list_images(data_dir)
    if csv_path is not None:
        texts = {}
        if Path(csv_path).is_file():
            _, rows, col = _csv_rows(csv_path)
            texts = {(r.get("file_name") or "").strip(): (r.get(col) or "").strip() for r in rows}
        out = []
        for im in images:
            key = _image_key(im, data_dir, csv_path)
            out.append(CaptionedImage(im, texts.get(key, texts.get(im.relative_to(data_dir).as_posix(), "")), key))
        return out
    out, problems = [], []
    for im in images:
        side = sidecar_for(im, extension)
        text, problem = read_sidecar(side)
        if problem:
            problems.append(problem)
        out.append(CaptionedImage(im, text, side.relative_to(data_dir).as_posix()))
    if problems:  # shown as empty, the next edit would overwrite the creator's own words
        raise DatasetError(problems, "Fix these caption files (or delete them), then reload.")
    return out


def read_sidecar(path: Path) -> tuple[str, str | None]:
    """(caption, problem): '' and None when there is no caption file; a problem names a caption file that exists
    but cannot be read (not UTF-8, a folder, a broken link, no permission)."""
    from .images import link_problem

    if os.path.islink(path) and not os.path.exists(path):
        return "", link_problem(path)
    if not os.path.lexists(path):
        return "", None
    if path.is_dir():
        return "", f"{path}: is a folder, not a caption file; rename or remove it"
    try:
        return path.read_text(encoding="utf-8-sig").strip(), None
    except UnicodeDecodeError as exc:
        # Guessing a legacy code page would silently garble accented words into the captions.
        return "", (f"{path}: caption file is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at position "
                    f"{exc.start}); re-save it as UTF-8")
    except OSError as exc:
        return "", f"{path}: cannot read the caption file ({exc.strerror}); fix its permissions"


def set_caption(image: Path, caption: str, data_dir: Path, csv_path: Path | None, extension: str = ".txt") -> Path:
    """Write `caption` for `image`; returns the file that was rewritten."""
    caption = " ".join(caption.split())  # one line: a newline would end the CSV row or the sidecar's caption
    if csv_path is None:
        return atomic_write_text(sidecar_for(Path(image), extension), caption + "\n")
    csv_path = Path(csv_path)
    key = _image_key(Path(image), Path(data_dir), csv_path)
    columns, rows, col = (["file_name", "text"], [], "text") if not csv_path.is_file() else _csv_rows(csv_path)
    for row in rows:
        if (row.get("file_name") or "").strip() in (key, Path(image).relative_to(data_dir).as_posix()):
            row[col] = caption
            break
    else:
        rows.append({"file_name": key, col: caption})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(csv_path, buf.getvalue())
