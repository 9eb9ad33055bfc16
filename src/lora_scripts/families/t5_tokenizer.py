"""Finding the T5 tokenizer Flux.1 was trained with, offline.

CLIP's tokenizer is built in code (clip_tokenizer.py); T5's is a 32,000-piece SentencePiece model that no
package we can depend on ships, and which may not be fetched at run time. Users nearly always have a copy
already: in a diffusers Flux folder (tokenizer_2/), in a ComfyUI install (comfy/text_encoders/t5_tokenizer/),
or in the local Hugging Face cache (any model that uses it). We look there, in that order after the config's
own `tokenizer_dir`, and say exactly what to provide when none is found.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelLoadError

TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
# Hugging Face repos whose snapshots hold the tokenizer Flux uses (T5 v1.1's), and the sub-folder holding it.
_HUB_REPOS = (("models--black-forest-labs--FLUX.1-dev", "tokenizer_2"),
              ("models--black-forest-labs--FLUX.1-schnell", "tokenizer_2"),
              ("models--google--t5-v1_1-xxl", ""), ("models--comfyanonymous--flux_text_encoders", "t5_tokenizer"))
COMFY_SUBFOLDER = Path("comfy") / "text_encoders" / "t5_tokenizer"


def has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def comfy_candidates(files: list[Path]) -> list[Path]:
    """ComfyUI keeps models in <ComfyUI>/models/<kind>/: the install beside each given file."""
    out = []
    for f in files:
        for parent in Path(f).resolve().parents:
            if parent.name == "models":
                out.append(parent.parent / COMFY_SUBFOLDER)
                break
    return out


def hub_candidates() -> list[Path]:
    cache = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    out = []
    for repo, sub in _HUB_REPOS:
        snapshots = Path(cache) / repo / "snapshots"
        if snapshots.is_dir():
            out += [s / sub if sub else s for s in sorted(snapshots.iterdir(), reverse=True)]
    return out


def find_t5_tokenizer(tokenizer_dir: Path | None, folder: Path | None, files: list[Path]) -> Path:
    """The folder to load the T5 tokenizer from. tokenizer_dir: the config's key (used as given, and an error if
    it holds none); folder: a diffusers base; files: the separate model files (for a ComfyUI install)."""
    if tokenizer_dir is not None:
        if has_tokenizer(tokenizer_dir):
            return tokenizer_dir
        if has_tokenizer(tokenizer_dir / "tokenizer_2"):
            return tokenizer_dir / "tokenizer_2"
        raise ModelLoadError(f"tokenizer_dir {tokenizer_dir} holds no T5 tokenizer (tokenizer.json or "
                             "spiece.model); point it at a folder with one, e.g. a Flux diffusers folder's "
                             "tokenizer_2 or ComfyUI's comfy/text_encoders/t5_tokenizer")
    tried = ([folder / "tokenizer_2"] if folder else []) + comfy_candidates(files) + hub_candidates()
    for candidate in tried:
        if has_tokenizer(candidate):
            return candidate
    raise ModelLoadError(
        "Flux.1's T5 tokenizer was not found (it cannot be downloaded here, and no Python package ships it). "
        "Set tokenizer_dir to a folder holding tokenizer.json or spiece.model: the tokenizer_2 folder of a "
        "FLUX.1-dev diffusers download, ComfyUI's comfy/text_encoders/t5_tokenizer, or any copy of "
        "google/t5-v1_1-xxl's tokenizer. Looked in: " + (", ".join(map(str, tried)) or "nowhere (no candidates)"))


def load_t5_tokenizer(folder: Path, max_length: int):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises several types for a broken tokenizer folder
        raise ModelLoadError(f"cannot read the T5 tokenizer in {folder}: {exc}; copy it again") from exc
    tokenizer.model_max_length = max_length
    return tokenizer


TINY_WORDS = ("a photo of the sci lab glowing consoles neon lighting digital art cat dog red blue green sky "
              "portrait landscape city night").split()


def build_tiny_t5_tokenizer(words: tuple[str, ...] = TINY_WORDS):
    """A T5 (SentencePiece-unigram) tokenizer over a small vocabulary, built in memory for test models: the
    special tokens at T5's ids (pad 0, end 1, unknown 2), whole words, then single characters."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.-!?'"
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - i * 0.01) for i, w in enumerate(words)]
             + [("\u2581", -5.0)] + [(c, -10.0) for c in chars])
    return T5Tokenizer(vocab=vocab, extra_ids=0)


__all__ = ["build_tiny_t5_tokenizer", "find_t5_tokenizer", "load_t5_tokenizer"]
