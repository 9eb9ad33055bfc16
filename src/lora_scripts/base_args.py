"""Command-line options for a base model kept as several files (Flux.1 as ComfyUI keeps it): the same names as
the config keys, so `--clip-l` here is `clip_l:` in a YAML."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import FLUX_FILE_KEYS


def add_base_file_args(p: argparse.ArgumentParser) -> None:
    what = {"clip_l": "CLIP-L text encoder file", "t5xxl": "T5-XXL text encoder file", "ae": "autoencoder file"}
    for key in FLUX_FILE_KEYS:
        p.add_argument(f"--{key.replace('_', '-')}", type=Path, help=f"Flux.1 as separate files: the {what[key]}")
    p.add_argument("--tokenizer-dir", type=Path, help="folder with Flux's T5 tokenizer (default: found beside the "
                   "model, in a ComfyUI install or the Hugging Face cache)")


def base_files(args: argparse.Namespace, fallback: dict | None = None) -> tuple[dict[str, Path], Path | None]:
    """(the base's other files by config key, the tokenizer folder): the command line's, else `fallback`'s (a
    run's config)."""
    fallback = fallback or {}
    files = {}
    for key in FLUX_FILE_KEYS:
        value = getattr(args, key, None) or fallback.get(key)
        if value:
            files[key] = Path(value)
    tokenizer = getattr(args, "tokenizer_dir", None) or fallback.get("tokenizer_dir")
    return files, Path(tokenizer) if tokenizer else None
