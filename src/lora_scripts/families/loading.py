"""Load a base model fully offline: a single-file checkpoint (.safetensors/.ckpt) or a diffusers folder.

The family is decided here (detect.py); how it loads is the family's (e.g. stable_diffusion.py feeds
diffusers' own single-file converter a config folder written from embedded configs, so nothing is fetched).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError
from . import FAMILIES, Family, LoadSettings, Model, detect_family, detect_folder_family
from .stable_diffusion import ARCHITECTURE_KEY

__all__ = ["ARCHITECTURE_KEY", "CheckpointInfo", "base_family", "component_kind", "load_base_model", "quiet_loading",
           "read_checkpoint_info"]


@dataclass(frozen=True)
class CheckpointInfo:
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def read_checkpoint_info(path: Path) -> CheckpointInfo:
    """Key names, shapes and metadata, without loading the weights (safetensors) where possible."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                return CheckpointInfo(shapes, dict(f.metadata() or {}))
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Pre-2020 .ckpt files use the legacy (non-zip) format, which cannot be memory-mapped.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        return CheckpointInfo({k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}, {})
    except Exception as exc:  # safetensors/pickle raise many types for a damaged file
        if path.suffix != ".safetensors" and "weights_only" in str(exc):
            raise ModelLoadError(
                f"{path} contains pickled Python objects besides the weights, which are not loaded for safety. "
                "Use the .safetensors release of this model instead."
            ) from exc
        raise ModelLoadError(
            f"cannot read {path}: {type(exc).__name__}: {exc}. The file is corrupt, truncated (an interrupted "
            "download?) or not a model checkpoint; download it again."
        ) from exc


@contextmanager
def quiet_loading():
    """Loading takes seconds; per-component bars from diffusers and transformers would bury our own output."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    was = d_logging.is_progress_bar_enabled(), t_logging.is_progress_bar_enabled()
    d_logging.disable_progress_bar()
    t_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            d_logging.enable_progress_bar()
        if was[1]:
            t_logging.enable_progress_bar()


def read_safetensors(path: Path, error: type[Exception]) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors, or `error` saying the file is incomplete (safetensors' own error is no
    OSError): what a ControlNet or IP-Adapter file cut short by a download looks like."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise error(f"{path}: not a complete .safetensors file ({str(exc)[:160]}); an interrupted download or "
                    "copy? Download it again") from None


def load_base_model(path: str | Path, settings: LoadSettings | None = None) -> Model:
    """Recognise the family of a single file or diffusers folder and load it fully offline."""
    with quiet_loading():
        family, metadata = base_family(Path(path))
        return family.load(Path(path), metadata, settings or LoadSettings())


def component_kind(path: Path) -> str | None:
    """The config key a .safetensors file is given as where it is one of a multi-file base's other files
    (Flux.1's clip_l, t5xxl, ae); None for a base model or anything else. Reads the header only."""
    from .detect import TRAINABLE

    if path.suffix != ".safetensors":
        return None
    try:
        shapes = read_checkpoint_info(path).shapes
        detect_family(shapes, str(path))
        return None  # a base model (an SD checkpoint holds a CLIP too)
    except ModelLoadError:
        pass
    return next((key for family in TRAINABLE if (key := family.file_kind(shapes)[0]) is not None), None)


def base_family(path: Path) -> tuple[Family, dict[str, str]]:
    """The family of a base model (and a single file's metadata), or a ModelLoadError saying what it is."""
    if not path.exists():
        raise ModelLoadError(f"base_model {path} does not exist. Point base_model at a .safetensors/.ckpt file or a diffusers folder.")
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"{path} is a folder but not a diffusers model (no model_index.json).")
        return FAMILIES[detect_folder_family(path)], {}
    info = read_checkpoint_info(path)
    return FAMILIES[detect_family(info.shapes, str(path), info.metadata)], info.metadata
