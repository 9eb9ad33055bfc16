"""Command-line options for a base model kept as several files (Flux.1 as ComfyUI keeps it): the same names as
the config keys, so `--clip-l` here is `clip_l:` in a YAML."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from .config import FLUX_FILE_KEYS

log = logging.getLogger(__name__)


def add_base_file_args(p: argparse.ArgumentParser) -> None:
    what = {"clip_l": "CLIP-L text encoder file", "t5xxl": "T5-XXL text encoder file", "ae": "autoencoder file"}
    for key in FLUX_FILE_KEYS:
        p.add_argument(f"--{key.replace('_', '-')}", type=Path, help=f"Flux.1 as separate files: the {what[key]}")
    p.add_argument("--tokenizer-dir", type=Path, help="folder with Flux's T5 tokenizer (default: found beside the "
                   "model, in a ComfyUI install or the Hugging Face cache)")


def base_files(args: argparse.Namespace, fallback: dict | None = None,
               base: Path | None = None) -> tuple[dict[str, Path], Path | None]:
    """(the base's other files by config key, the tokenizer folder): the command line's, else `fallback`'s (a
    run's config), else, with `base`, those found where users keep them (with_companions)."""
    fallback = fallback or {}
    files = {}
    for key in FLUX_FILE_KEYS:
        value = getattr(args, key, None) or fallback.get(key)
        if value:
            files[key] = Path(value)
    tokenizer = getattr(args, "tokenizer_dir", None) or fallback.get("tokenizer_dir")
    if base is not None:
        files = with_companions(base, files)
    return files, Path(tokenizer) if tokenizer else None


def with_companions(base: Path, files: dict[str, Path],
                    allowed: Callable[[Path], bool] = lambda path: True) -> dict[str, Path]:
    """`files` and, for each of a multi-file base's other files not given, the one found beside the base or in
    its ComfyUI models/ tree (and `allowed`: the web UI reads only inside its workspace); the log names each.
    For drawing and checking only: training takes them from the config, so a run records what it trained on."""
    from .errors import ModelLoadError
    from .families.loading import base_family

    try:
        family = base_family(Path(base))[0]
    except ModelLoadError:
        return files  # the loader names what is wrong with the base
    found = dict(files)
    for key, path in family.companion_files(Path(base)).items():
        if key not in found and path is not None and allowed(path):
            found[key] = path
            log.info("%s: %s (found beside the base; --%s names another)", key, path, key.replace("_", "-"))
    return found
