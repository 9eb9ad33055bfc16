"""The shipped toy base model: gzip-compressed in the package (git and wheels stay small), unpacked once to a
cache folder as a plain single-file LDM .safetensors, loadable like any v1-5-pruned.safetensors."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

from ..atomic import atomic_write_bytes

ASSET = "toy-sd15.safetensors.gz"
INFO = "toy-sd15.json"  # sha256 of the unpacked file, and how it was built


def cache_dir() -> Path:
    root = os.environ.get("LORA_SCRIPTS_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lora-scripts")
    return Path(root).expanduser()


def toy_base_info() -> dict:
    return json.loads(resources.files("lora_scripts.assets.toy").joinpath(INFO).read_text())


def toy_base_path() -> Path:
    info = toy_base_info()
    out = cache_dir() / f"toy-sd15-{info['sha256'][:12]}.safetensors"
    if out.exists():
        return out
    data = gzip.decompress(resources.files("lora_scripts.assets.toy").joinpath(ASSET).read_bytes())
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise RuntimeError(f"the packaged {ASSET} does not match its recorded sha256; reinstall lora-scripts")
    return atomic_write_bytes(out, data)


def pack_toy_base(src: Path, dest_dir: Path, build: dict) -> Path:
    """Write the gzip (mtime 0, so the same weights give the same bytes) and its info file."""
    data = Path(src).read_bytes()
    dest_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest_dir / ASSET, gzip.compress(data, compresslevel=9, mtime=0))
    info = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "build": build}
    atomic_write_bytes(dest_dir / INFO, (json.dumps(info, indent=2) + "\n").encode())
    return dest_dir / ASSET


CONTROLNET = "toy-controlnet-canny.safetensors"  # 1.3 MB in fp16: shipped as it is, in the original layout


def toy_controlnet_asset() -> Path:
    """The shipped toy canny ControlNet (`lora-scripts toy build-controlnet --install` writes it)."""
    return Path(str(resources.files("lora_scripts.assets.toy").joinpath(CONTROLNET)))
