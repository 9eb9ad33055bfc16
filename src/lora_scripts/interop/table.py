"""The module table of a base model: for every layer a LoRA can target, its kohya name (what A1111 and
ComfyUI look up), its diffusers path (what peft uses) and its key in the original single-file checkpoint.

Built from the component configs on the meta device: no weights are read, so the SD1.5 table costs about a
second and needs no checkpoint on disk.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..families import FAMILY_KEY, ModuleEntry, default_family, family_by_label, family_for_configs


Entry = ModuleEntry  # kohya name -> component, module path, single-file key and shape


@lru_cache(maxsize=8)
def _table(configs_json: str) -> dict[str, Entry]:
    configs = json.loads(configs_json)
    return family_for_configs(configs).module_table(configs)


def module_table(configs: dict[str, Any]) -> dict[str, Entry]:
    """kohya name -> Entry, for the architecture these component configs describe (see base_configs)."""
    family = family_for_configs(configs)
    keep = (family.denoiser,) + family.text_encoders
    return _table(json.dumps({**{k: configs[k] for k in keep}, FAMILY_KEY: family.name}, sort_keys=True))


def family_table(label: str) -> dict[str, Entry] | None:
    """The table of a real model of the family a LoRA file is for (by its label, e.g. "sd2"), from the embedded
    configs: what a LoRA without a base is described and converted against. None for families we do not train."""
    family = family_by_label(label)
    if family is None:
        return None
    return module_table({**family.embedded_configs(), FAMILY_KEY: family.name})


def base_configs(path: Path) -> dict[str, Any]:
    """The component configs of a base, with its family under FAMILY_KEY: a diffusers folder's own; a
    single-file checkpoint's metadata (ours carry them); else the family's embedded ones (real files)."""
    from ..families.loading import base_family, read_checkpoint_info

    path = Path(path)
    family, _ = base_family(path)
    if path.is_dir():
        configs = _folder_configs(path, family)
    else:
        configs = family.file_configs(path, read_checkpoint_info(path).metadata)
    return {**configs, FAMILY_KEY: family.name}


def base_shapes(path: Path, files: dict[str, Path] | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a base in the single-file (LDM) layout, the names A1111 and ComfyUI resolve a LoRA's
    modules against. A diffusers folder's UNet and text-encoder names are converted in memory; only file
    headers are read where the weights are safetensors. files: a base's other files (Flux.1's clip_l)."""
    from ..errors import ModelLoadError
    from ..families.loading import base_family
    from ..formats.ldm import LdmConversionError

    path = Path(path)
    family, _ = base_family(path)
    if not path.is_dir():
        return family.base_shapes(path, files)
    configs = _folder_configs(path, family)
    networks = (family.denoiser,) + family.text_encoders
    try:
        # The converters only rename keys, so shapes can stand in for the tensors.
        return family.folder_shapes_to_ldm(configs, {c: _component_shapes(path / c) for c in networks})
    except LdmConversionError as exc:
        raise ModelLoadError(f"{path} does not have the {family.label} layout ({exc}); give a complete "
                             "diffusers folder or a single-file checkpoint") from exc


def _folder_configs(folder: Path, family) -> dict[str, Any]:
    from ..errors import ModelLoadError

    configs = {}
    networks = (family.denoiser,) + family.text_encoders
    for name in family.config_files:
        cfg = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if not cfg.is_file():
            if name not in networks:  # not needed to name a LoRA's layers
                continue
            raise ModelLoadError(f"{folder} is not a complete diffusers model: {cfg} is missing; copy or download "
                                 "the whole folder again")
        try:
            configs[name] = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {cfg}: {exc}; copy or download the diffusers folder again") from exc
    return configs


def _component_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape over a component's weight files: every shard and every variant (fp16, ...) holds the same
    names and shapes, so their union is the component's layout whichever file diffusers picks."""
    from ..errors import ModelLoadError
    from ..families.loading import read_checkpoint_info

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ModelLoadError(f"{folder} holds no weights (.safetensors or .bin); the diffusers folder is "
                             "incomplete: copy or download it again")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(read_checkpoint_info(file).shapes)
    return shapes


def ldm_alias(kohya_name: str, table: dict[str, Entry]) -> str | None:
    """ComfyUI also accepts UNet names in the LDM layout (lora_unet_input_blocks_1_1_proj_in); its kohya name."""
    return default_family().ldm_alias(kohya_name, table)
