"""`lora-scripts init DATA_DIR`: a starter YAML with values suited to that folder and a comment on every key."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from .config import TrainConfig
from .data.images import list_images

DEFAULT_BASE = "./models/Stable-diffusion/v1-5-pruned.safetensors"
# The nine keys every config has come first, in the order creators think about them.
CORE_KEYS = ("train_data_dir", "metadata_path", "base_model", "lora_rank", "batch_size", "epochs",
             "learning_rate", "output_dir", "save_steps")
# Extra keys worth showing in a starter file; everything else keeps its documented default.
EXTRA_KEYS = ("output_name", "lora_alpha", "lora_targets", "network_type", "optimizer", "resolution", "enable_bucket", "flip_aug",
              "mixed_precision", "gradient_checkpointing", "train_text_encoder", "lr_scheduler", "lr_warmup_steps",
              "noise_offset", "min_snr_gamma", "save_precision", "seed")
PRESET_SIZES = ("lora_targets file size at rank 16, SD1.5, fp16: kohya 13.6 MB (+5.3 MB with train_text_encoder), "
                "attn 6.4 MB (+2.4), qv 3.2 MB (+1.2); size grows linearly with lora_rank")


def _images(folder: Path) -> list[Path]:
    return list_images(folder)  # the one listing train and check use (links followed, hidden files skipped)


def _rel(path: Path, start: Path) -> str:
    """Paths in a config are relative to the config file; anything outside its folder is written absolute."""
    rel = os.path.relpath(path.resolve(), start.resolve())
    return str(path.resolve()) if rel.startswith("..") else f"./{rel}"


def _companions(base: Path | None) -> dict[str, Path | None]:
    """A base kept as several files (Flux.1): the others found beside it, by config key."""
    from .errors import ModelLoadError
    from .families.loading import base_family

    if base is None or not base.exists():
        return {}
    try:
        return base_family(base)[0].companion_files(base)
    except ModelLoadError:
        return {}


def _base_defaults(base: Path | None) -> tuple[int, str | None]:
    """(native resolution, prediction_type to write) for the base's family: SD1.x and SD2 512-base train at 512,
    SD2 768-v at 768. An SD2 file that does not say which it is gets prediction_type written for the user to
    set (training refuses to guess). A base that is not there yet, or not a model, gets SD1.x's 512."""
    from .errors import ModelLoadError
    from .families.loading import base_family

    if base is None or not base.exists():
        return 512, None
    try:
        family, metadata = base_family(base)
    except ModelLoadError:
        return 512, None  # `lora-scripts check` and training say what is wrong with it
    stated = family.stated_prediction_type(base, metadata)
    unknown = stated is None and family.resolution_for("v_prediction") != family.resolution_for("epsilon")
    return family.resolution_for(stated), ("auto" if unknown else None)


def _output_dir(data_dir: Path, yaml_dir: Path) -> str:
    """./output/NAME_lora beside the config, or beside the images when the config is written inside the image
    folder (outputs inside the dataset are refused: they would be read as training images)."""
    name = f"{data_dir.resolve().name}_lora"
    data, here = data_dir.resolve(), yaml_dir.resolve()
    if here == data or data in here.parents:
        return _rel(data.parent / "output" / name, yaml_dir)
    return f"./output/{name}"


def suggest(data_dir: Path, base: str | None, yaml_dir: Path) -> dict[str, Any]:
    """Values for this folder: ~1500 image views in total (the article's 10-15 epochs for 50-100 images),
    and 512 px unless the images are smaller."""
    images = _images(data_dir)
    n = max(1, len(images))
    sides = []
    for p in images[:200]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except OSError:
            continue
    native, prediction = _base_defaults(Path(base) if base else None)
    median = statistics.median(sides) if sides else native
    resolution = native if median >= native else max(64, int(median) // 64 * 64)
    metadata = data_dir / "metadata.csv"
    extra = {"prediction_type": prediction} if prediction else {}
    companions = _companions(Path(base) if base else None)
    extra.update({"_companions": {k: _rel(v, yaml_dir) if v else None for k, v in companions.items()}})
    return {**extra, 
        "train_data_dir": _rel(data_dir, yaml_dir),
        "metadata_path": _rel(metadata, yaml_dir) if metadata.exists() else None,
        "base_model": _rel(Path(base), yaml_dir) if base else DEFAULT_BASE,
        "lora_rank": 16,
        "batch_size": 4,
        "epochs": int(min(30, max(5, math.ceil(1500 / n)))),
        "learning_rate": 2e-4,
        "output_dir": _output_dir(data_dir, yaml_dir),
        "save_steps": 100,
        "resolution": resolution,
        "_image_count": len(images),
    }


def _line(key: str, value: Any) -> str:
    field = TrainConfig.model_fields[key]
    dumped = yaml.safe_dump({key: value}, default_flow_style=True).strip()[1:-1] if value is not None else f"{key}:"
    extra = field.json_schema_extra or {}
    typical = f" [typical: {extra['typical']}]" if isinstance(extra, dict) and "typical" in extra else ""
    return f"{dumped:<58} # {field.description}{typical}"


def _memory_fit(data_dir: Path, base: str | None, values: dict[str, Any], companions: dict[str, Any],
                yaml_dir: Path, vram_gb: float) -> tuple[dict[str, Any], str]:
    """The settings the memory ladder adds for `vram_gb` (check --vram's), and the comment that says so."""
    from .config import validate_config
    from .training.memory import fitting_settings

    if not base or not Path(base).exists():
        return {}, f"# --vram {vram_gb:g}: give --base to estimate the memory of this model"
    raw = {"train_data_dir": data_dir, "base_model": Path(base), "output_dir": yaml_dir / "output",
           **{k: values[k] for k in ("lora_rank", "batch_size", "resolution")},
           **{k: yaml_dir / v for k, v in companions.items() if v}}
    if (data_dir / "metadata.csv").exists():
        raw["metadata_path"] = data_dir / "metadata.csv"
    changes, estimate, fits = fitting_settings(validate_config(raw), vram_gb)
    if not changes:
        return {}, f"# Memory: estimated peak {estimate.total_gb:.1f} GB, within --vram {vram_gb:g} as it is"
    said = "fits" if fits else "does NOT fit even with the settings below; lower resolution as well"
    return changes, (f"# Memory: {said} --vram {vram_gb:g} (estimated peak {estimate.total_gb:.1f} GB with them; "
                     "`lora-scripts check --vram` re-checks and says what each costs a step)")


def starter_yaml(data_dir: Path, base: str | None = None, yaml_dir: Path = Path("."), vram_gb: float | None = None) -> str:
    values = suggest(data_dir, base, yaml_dir)
    count = values.pop("_image_count")
    companions = values.pop("_companions")
    fitted, memory_note = _memory_fit(data_dir, base, values, companions, yaml_dir, vram_gb) if vram_gb else ({}, "")
    values.update(fitted)
    lines = [
        f"# LoRA training config for {data_dir.name} ({count} images). Run: lora-scripts train --config THIS_FILE",
        "# Paths are relative to this file. Every key has a one-line note; delete a line to use its default.",
        "",
    ]
    lines += [_line(k, values.get(k)) for k in CORE_KEYS]
    if companions:
        missing = [k for k, v in companions.items() if v is None]
        lines += ["", "# The base is a Flux.1 transformer: its other files" + (
            f" (SET THIS: {', '.join(missing)} not found beside it)" if missing else " (found beside it)")]
        lines += [_line(k, v) for k, v in companions.items()]
        # T5-XXL encodes a caption in about the time a step takes: keep its states for the next run too.
        lines.append(_line("cache_text_encoder_outputs_to_disk", True))
    if "prediction_type" in values:
        lines += ["", "# SET THIS: the base is an SD2 file that does not say what it predicts: epsilon for a 512-base "
                  "model, v_prediction for a 768-v model", _line("prediction_type", values["prediction_type"])]
    if memory_note:
        lines += ["", memory_note]
        lines += [_line(k, v) for k, v in fitted.items() if k not in CORE_KEYS and k not in EXTRA_KEYS]
    lines += ["", "# --- optional: the defaults below are what you get if you delete the line ---",
              f"# {PRESET_SIZES}"]
    defaults = TrainConfig.model_fields
    for k in EXTRA_KEYS:
        value = values.get(k, defaults[k].default)
        lines.append(_line(k, value))
    return "\n".join(lines) + "\n"
