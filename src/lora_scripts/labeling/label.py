"""Caption every image of a folder into metadata.csv (file_name,text), keeping captions that already exist."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..data.images import IMAGE_EXTENSIONS
from .basic import DEFAULT_TEMPLATE, basic_caption

SIDECARS = (".txt", ".caption")


@dataclass
class LabelResult:
    csv_path: Path
    written: int  # new captions
    kept: int  # existing captions kept
    failed: list[str]  # unreadable images (named, not captioned)


def existing_captions(folder: Path, csv_path: Path) -> dict[str, str]:
    """Rows already in the CSV, then sidecar .txt/.caption files (the CSV wins)."""
    found: dict[str, str] = {}
    for image in _images(folder):
        for ext in SIDECARS:
            side = image.with_suffix(ext)
            if side.is_file():
                text = side.read_text(encoding="utf-8-sig").strip()
                if text:
                    found[_rel(image, folder)] = text
                    break
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                text = (row.get("text") or row.get("caption") or "").strip()
                if row.get("file_name") and text:
                    found[row["file_name"]] = text
    return found


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def make_captioner(backend: str, model: str | None, trigger: str, template: str, threshold: float
                   ) -> Callable[[Path, Path], str]:
    if backend == "basic":
        return lambda path, root: basic_caption(path, root, trigger, template)
    if model is None:
        from ..errors import LoraScriptsError

        raise LoraScriptsError(f"--backend {backend} needs --model PATH_OR_ID (a local folder or a cached model); "
                               "--backend basic needs no weights")
    from .models import BlipCaptioner, WD14Tagger

    inner = BlipCaptioner(model) if backend == "blip" else WD14Tagger(model, threshold)

    def caption(path: Path, root: Path) -> str:
        text = inner(path)
        return f"{trigger}, {text}" if trigger and text else (trigger or text)

    return caption


def label_folder(folder: Path, csv_path: Path | None = None, backend: str = "basic", model: str | None = None,
                 trigger: str = "", template: str = DEFAULT_TEMPLATE, overwrite: bool = False,
                 threshold: float = 0.35) -> LabelResult:
    folder = Path(folder)
    csv_path = Path(csv_path) if csv_path else folder / "metadata.csv"
    keep = {} if overwrite else existing_captions(folder, csv_path)
    captioner = make_captioner(backend, model, trigger, template, threshold)
    rows, written, failed = [], 0, []
    for image in tqdm(_images(folder), desc=f"captioning ({backend})", unit="img", dynamic_ncols=True):
        name = _rel(image, csv_path.parent) if image.is_relative_to(csv_path.parent) else _rel(image, folder)
        old = keep.get(_rel(image, folder)) or keep.get(name)
        if old:
            rows.append((name, old))
            continue
        try:
            text = captioner(image, folder)
        except (OSError, ValueError) as exc:
            failed.append(f"{image}: {exc}")
            continue
        rows.append((name, text))
        written += 1
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerow(["file_name", "text"])
    writer.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
    return LabelResult(csv_path, written, len(rows) - written, failed)
