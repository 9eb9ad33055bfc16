"""Read a dataset's metadata.csv (a file_name column, a caption column named text or caption) one way for every
command; each caller decides what it tolerates and turns MetadataCsvError into its own error type."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraScriptsError

# The caption column's accepted names, in order of preference; 'text' is what we write.
TEXT_COLUMNS = ("text", "caption")
NOT_UTF8_FIX = "Re-save it as UTF-8 (in Excel: Save As > CSV UTF-8)."
NOT_CSV_FIX = "metadata.csv needs a header line file_name,text and one row per image."
NO_FILE_NAME_FIX = "metadata.csv needs a header line: file_name,text"


class MetadataCsvError(LoraScriptsError):
    """Why a metadata.csv cannot be used: `problem` names the file and what is wrong, `fix` what to do. `kind`
    ('encoding', 'csv' or 'file_name') lets a command word the fix its own way."""

    def __init__(self, kind: str, problem: str, fix: str):
        super().__init__(f"{problem}\n{fix}")
        self.kind, self.problem, self.fix = kind, problem, fix


@dataclass(frozen=True)
class MetadataCsv:
    columns: list[str]  # the header as written, in order ('' for a column without a name)
    rows: list[dict[str, str]]  # in file order, duplicates included: what to make of them is the caller's call
    text_col: str  # the caption column; 'text' when the header has neither name

    @property
    def has_text_col(self) -> bool:
        return self.text_col in self.columns


def read_metadata_csv(path: Path, require_file_name: bool = True) -> MetadataCsv:
    """Every row of `path`. Raises MetadataCsvError when it is not UTF-8, cannot be parsed or read as a CSV
    (the OSError is its __cause__), or, with `require_file_name`, has no file_name column."""
    try:
        # utf-8-sig: Excel writes a byte-order mark that would otherwise become part of the first column name.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except UnicodeDecodeError as exc:
        # Guessing a legacy code page instead would silently garble accented words into the captions.
        raise MetadataCsvError("encoding", f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                               f"position {exc.start})", NOT_UTF8_FIX) from None
    except (csv.Error, OSError) as exc:
        raise MetadataCsvError("csv", f"{path}: cannot read it as a CSV file ({exc})", NOT_CSV_FIX) from exc
    if require_file_name and "file_name" not in columns:
        raise MetadataCsvError("file_name", f"{path}: no 'file_name' column (columns: {columns})", NO_FILE_NAME_FIX)
    text_col = next((c for c in TEXT_COLUMNS if c in columns), "text")
    return MetadataCsv(columns, rows, text_col)
