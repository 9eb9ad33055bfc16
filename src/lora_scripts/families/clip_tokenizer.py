"""CLIP ViT-L/14 tokenizer built offline.

Neither transformers nor diffusers ships the CLIP vocabulary, and the Hub is out of reach, so we ship
OpenAI's BPE merges file (``assets/clip/bpe_simple_vocab_16e6.txt.gz``, 1.4 MB, MIT, taken from the
open-clip-torch wheel; notice beside it) and rebuild the 49,408-entry vocabulary with OpenAI's recipe:
256 byte symbols, the same with ``</w>``, one entry per merge, then the two special tokens.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

# OpenAI's CLIP uses merges 1..48894 of the file (line 0 is a header): 512 + 48894 + 2 = 49408 ids.
_N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table that GPT-2/CLIP BPE is defined over."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    data = resources.files("lora_scripts.assets.clip").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(data).decode("utf-8").split("\n")[1 : _N_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_files(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json (the layout of an SD ``tokenizer/`` folder).
    pad_token: OpenAI's CLIP (SD1.x) pads with the end token; OpenCLIP (SD2.x) with "!" (id 0)."""
    vocab, merges = _vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The SD1.x tokenizer (openai/clip-vit-large-patch14), max length 77, padded with <|endoftext|>."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_clip_tokenizer_files(Path(tmp))
        # A folder with only vocab + merges would leave model_max_length at 1e30; the config pins 77.
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenizer_for(base_model: Path | str | None) -> CLIPTokenizer:
    """The tokenizer training will use: a diffusers folder's own `tokenizer/`, else the CLIP ViT-L/14 one that
    every SD1.x single-file checkpoint is loaded with (families/loading.py writes these same files)."""
    folder = Path(base_model) / "tokenizer" if base_model else None
    if folder is not None and folder.is_dir():
        try:
            return _folder_tokenizer(str(folder.resolve()))
        except (OSError, ValueError, TypeError):  # an incomplete folder: the model load names it later
            pass
    return clip_tokenizer()


@lru_cache(maxsize=4)
def _folder_tokenizer(folder: str) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
