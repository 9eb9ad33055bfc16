"""Caption every image of a folder into metadata.csv (file_name,text), keeping captions that already exist."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..data.captions import read_sidecar, sidecar_for
from ..data.images import find_images
from ..data.metadata_csv import MetadataCsvError, read_metadata_csv
from ..errors import DatasetError, LoraScriptsError
from .basic import DEFAULT_TEMPLATE, basic_caption, check_template

SIDECARS = (".txt", ".caption")


@dataclass
class LabelResult:
    csv_path: Path
    written: int  # new captions
    kept: int  # existing captions kept
    failed: list[str]  # unreadable images (named, not captioned)


@dataclass
class _Existing:
    captions: dict[str, str]  # file_name -> caption
    columns: list[str]  # the CSV's columns, in order (file_name, text, and any others the creator added)
    rows: dict[str, dict[str, str]]  # file_name -> the CSV's whole row, so other columns survive a relabel
    text_col: str = "text"


def existing_captions(folder: Path, csv_path: Path, images: list[Path] | None = None) -> dict[str, str]:
    """Rows already in the CSV, then sidecar .txt/.caption files (the CSV wins)."""
    return _existing(folder, csv_path, images if images is not None else find_images(folder).images).captions


def _existing(folder: Path, csv_path: Path, images: list[Path]) -> _Existing:
    found: dict[str, str] = {}
    problems = []
    for image in images:
        for ext in SIDECARS:
            text, problem = read_sidecar(sidecar_for(image, ext))
            if problem:
                problems.append(problem)
            if text:
                found[_rel(image, folder)] = text
                break
    if problems:  # captioning over them would replace the creator's own words without a word
        raise DatasetError(problems, "Fix these caption files (or delete them), then label again.")
    existing = _read_csv(csv_path)
    for name, row in existing.rows.items():
        text = (row.get(existing.text_col) or "").strip()
        if text:
            found[name] = text
    existing.captions = found
    return existing


# How label words a metadata.csv problem: the fix inline, and the way out of keeping this CSV at all.
_CSV_FIXES = {"encoding": "re-save it as UTF-8 (in Excel: Save As > CSV UTF-8), or choose another --output",
              "csv": "fix it or choose another --output"}


def _read_csv(csv_path: Path) -> _Existing:
    if not csv_path.is_file():
        return _Existing({}, ["file_name", "text"], {})
    try:
        meta = read_metadata_csv(csv_path, require_file_name=False)  # an empty file is a fresh start
    except MetadataCsvError as exc:
        raise LoraScriptsError(f"{exc.problem}; {_CSV_FIXES[exc.kind]}") from None
    columns = [c for c in meta.columns if c]
    if columns and "file_name" not in columns:
        raise LoraScriptsError(f"{csv_path} has no file_name column (columns: {columns}); label would replace it. "
                               "Rename its image column to file_name, or choose another --output")
    columns = columns or ["file_name", "text"]
    if meta.text_col not in columns:
        columns.insert(1, meta.text_col)
    named = {(r.get("file_name") or "").strip(): r for r in meta.rows}
    return _Existing({}, columns, {k: v for k, v in named.items() if k}, meta.text_col)


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def make_captioner(backend: str, model: str | None, trigger: str, template: str, threshold: float
                   ) -> Callable[[Path, Path], str]:
    if backend == "basic":
        check_template(template)
        return lambda path, root: basic_caption(path, root, trigger, template)
    if model is None:
        raise LoraScriptsError(f"--backend {backend} needs --model PATH_OR_ID (a local folder or a cached model); "
                               "--backend basic needs no weights")
    from .models import BlipCaptioner, WD14Tagger

    inner = BlipCaptioner(model) if backend == "blip" else WD14Tagger(model, threshold)

    def caption(path: Path, root: Path) -> str:
        text = inner(path)
        return f"{trigger}, {text}" if trigger and text else (trigger or text)

    return caption


def _check_output(csv_path: Path) -> None:
    if csv_path.is_dir():
        raise LoraScriptsError(f"--output {csv_path} is a folder; give a file name, e.g. {csv_path / 'metadata.csv'}")
    if csv_path.suffix.lower() != ".csv":
        raise LoraScriptsError(f"--output {csv_path}: captions are written as a .csv file (file_name,text); "
                               f"give a name ending in .csv, e.g. {csv_path.with_suffix('.csv').name}")
    parent = next((p for p in [csv_path.parent, *csv_path.parent.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise LoraScriptsError(f"--output {csv_path}: {parent} is a file, not a folder; choose another --output")


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:  # NaN fails this too
        raise LoraScriptsError(f"--threshold {threshold}: a tag probability between 0 and 1 (0.35 is usual; higher "
                               "keeps fewer, surer tags)")


def _images_or_refuse(folder: Path) -> tuple[list[Path], list[str]]:
    from ..data.scan import readable_formats

    listing = find_images(folder)
    if not listing.images:
        problems = "".join(f"\n  {p}" for p in listing.problems)
        raise LoraScriptsError(f"no images found in {folder} (sub-folders included, hidden ones skipped); images "
                               f"are read in every format Pillow opens: {readable_formats()}{problems}")
    return listing.images, listing.problems


def label_folder(folder: Path, csv_path: Path | None = None, backend: str = "basic", model: str | None = None,
                 trigger: str = "", template: str = DEFAULT_TEMPLATE, overwrite: bool = False,
                 threshold: float = 0.35) -> LabelResult:
    folder = Path(folder)
    csv_path = Path(csv_path) if csv_path else folder / "metadata.csv"
    _check_output(csv_path)
    _check_threshold(threshold)
    if backend == "basic":
        check_template(template)  # before any work; model backends are checked as they load
    images, failed = _images_or_refuse(folder)
    existing = _existing(folder, csv_path, images)
    keep = {} if overwrite else existing.captions
    captioner = make_captioner(backend, model, trigger, template, threshold)
    rows, written = [], 0
    for image in tqdm(images, desc=f"captioning ({backend})", unit="img", dynamic_ncols=True):
        name = _rel(image, csv_path.parent) if image.is_relative_to(csv_path.parent) else _rel(image, folder)
        old = keep.get(_rel(image, folder)) or keep.get(name)
        if old:
            rows.append((name, old))
            continue
        try:
            text = captioner(image, folder)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            failed.append(f"{image}: {exc}")
            continue
        rows.append((name, text))
        written += 1
    _write_csv(csv_path, rows, existing)
    return LabelResult(csv_path, written, len(rows) - written, failed)


def _write_csv(csv_path: Path, rows: list[tuple[str, str]], existing: _Existing) -> None:
    """file_name,text plus any other columns the CSV already had, their values kept row by row."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=existing.columns, quoting=csv.QUOTE_MINIMAL, lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for name, text in rows:
        writer.writerow({**existing.rows.get(name, {}), "file_name": name, existing.text_col: text})
    try:
        atomic_write_text(csv_path, buf.getvalue())
    except LoraScriptsError:
        raise
    except OSError as exc:
        raise LoraScriptsError(f"cannot write {csv_path} ({exc.strerror or exc}); choose a folder you can write "
                               "in with --output") from None
