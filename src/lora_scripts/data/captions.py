"""Read and edit one image's caption where it lives: a row of metadata.csv, or a sidecar file beside the image.

Edits rewrite the whole file atomically, keep every other row as it was (order, columns, the caption column's
name), and add a row for an image the CSV did not list yet.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import DatasetError
from .images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    caption: str
    key: str  # the CSV's file_name for it, or the sidecar's path relative to the data folder


def _csv_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]], str]:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if "file_name" not in columns:
        raise DatasetError([f"{csv_path}: no 'file_name' column (columns: {columns})"],
                           "metadata.csv needs a header line: file_name,text")
    text_col = next((c for c in ("text", "caption") if c in columns), "text")
    if text_col not in columns:
        columns.append(text_col)
    return columns, rows, text_col


def _image_key(image: Path, data_dir: Path, csv_path: Path) -> str:
    base = csv_path.parent if image.is_relative_to(csv_path.parent) else data_dir
    return image.relative_to(base).as_posix()


def list_images(data_dir: Path) -> list[Path]:
    return sorted(p for p in Path(data_dir).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(data_dir).parts))


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
    out = []
    for im in images:
        side = im.with_suffix(extension)
        text = side.read_text(encoding="utf-8-sig").strip() if side.is_file() else ""
        out.append(CaptionedImage(im, text, side.relative_to(data_dir).as_posix()))
    return out


def set_caption(image: Path, caption: str, data_dir: Path, csv_path: Path | None, extension: str = ".txt") -> Path:
    """Write `caption` for `image`; returns the file that was rewritten."""
    caption = " ".join(caption.split())  # one line: a newline would end the CSV row or the sidecar's caption
    if csv_path is None:
        return atomic_write_text(Path(image).with_suffix(extension), caption + "\n")
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
