"""Load a base model fully offline: a single-file LDM checkpoint (.safetensors/.ckpt) or a diffusers folder.

Single files go through diffusers' own ``from_single_file`` converter, fed with a config folder we
write from configs embedded in the package (or carried in the file's metadata, for the toy and test
models), so nothing is fetched from a hub.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import ModelLoadError
from .clip_tokenizer import write_clip_tokenizer_files
from . import FAMILIES, Family, detect_family

# Safetensors metadata key under which our own small checkpoints carry their component configs.
ARCHITECTURE_KEY = "lora_scripts.architecture"

_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
}


@dataclass
class BaseModel:
    family: Family
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    source: Path

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


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


def _write_config_folder(folder: Path, configs: dict[str, dict[str, Any]]) -> None:
    (folder / "model_index.json").write_text(json.dumps(_MODEL_INDEX))
    for name, cfg in configs.items():
        sub = folder / name
        sub.mkdir()
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        (sub / filename).write_text(json.dumps(cfg))
    write_clip_tokenizer_files(folder / "tokenizer")


def _check_no_meta(pipe: StableDiffusionPipeline, path: Path) -> None:
    # from_single_file leaves parameters missing from the file on the meta device instead of failing.
    for name in ("unet", "vae", "text_encoder"):
        missing = [n for n, p in getattr(pipe, name).named_parameters() if p.device.type == "meta"]
        if missing:
            raise ModelLoadError(
                f"{path} lacks {len(missing)} {name} weights (first: {missing[0]}); the checkpoint is incomplete "
                "or from a different architecture."
            )


def _load_single_file(path: Path, family: Family, configs: dict[str, dict[str, Any]]) -> StableDiffusionPipeline:
    with tempfile.TemporaryDirectory() as tmp:
        _write_config_folder(Path(tmp), configs)
        # diffusers logs every skipped EMA/optimizer key at WARNING; those are expected in pruned checkpoints.
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=tmp, local_files_only=True, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )
        except Exception as exc:
            raise ModelLoadError(f"diffusers could not load {path} as {family.label}: {exc}") from exc
    _check_no_meta(pipe, path)
    return pipe


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


def load_base_model(path: str | Path) -> BaseModel:
    with quiet_loading():
        return _load_base_model(Path(path))


def _load_base_model(path: Path) -> BaseModel:
    if not path.exists():
        raise ModelLoadError(f"base_model {path} does not exist. Point base_model at a .safetensors/.ckpt file or a diffusers folder.")
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"{path} is a folder but not a diffusers model (no model_index.json).")
        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
        family = FAMILIES["sd15"]
    else:
        info = read_checkpoint_info(path)
        family = FAMILIES[detect_family(info.shapes, str(path))]
        if not family.supported:
            raise ModelLoadError(f"{path} is a {family.label} checkpoint; this version trains SD1.x only.")
        configs = json.loads(info.metadata[ARCHITECTURE_KEY]) if ARCHITECTURE_KEY in info.metadata else family.embedded_configs()
        pipe = _load_single_file(path, family, configs)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return BaseModel(family, pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, noise_scheduler, path)
