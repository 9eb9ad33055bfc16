"""The module table of a base model: for every layer a LoRA can target, its kohya name (what A1111 and
ComfyUI look up), its diffusers path (what peft uses) and its key in the original single-file checkpoint.

Built from the component configs on the meta device: no weights are read, so the SD1.5 table costs about a
second and needs no checkpoint on disk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formats.kohya import kohya_module_name
from ..formats.ldm import CLIP_PREFIX, UNET_PREFIX, _unet_key


@dataclass(frozen=True)
class Entry:
    component: str  # "unet" or "text_encoder"
    path: str  # diffusers / transformers module path
    ldm_key: str  # the weight's key in a single-file (A1111/ComfyUI) checkpoint
    shape: tuple[int, ...]  # the weight's shape


def _layers(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _up_has_attention(unet: nn.Module) -> dict[int, bool]:
    return {i: hasattr(block, "attentions") for i, block in enumerate(unet.up_blocks)}


@lru_cache(maxsize=8)
def _table(configs_json: str) -> dict[str, Entry]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = json.loads(configs_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        te_cfg = {k: v for k, v in configs["text_encoder"].items() if k != "architectures"}
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    table: dict[str, Entry] = {}
    lpb, up_attn = unet.config.layers_per_block, _up_has_attention(unet)
    for path, shape in _layers(unet).items():
        ldm = UNET_PREFIX + _unet_key(f"{path}.weight", lpb, up_attn)
        table[kohya_module_name("unet", path)] = Entry("unet", path, ldm, shape)
    for path, shape in _layers(text_encoder).items():
        inner = path if path.startswith("text_model.") else f"text_model.{path}"
        table[kohya_module_name("text_encoder", path)] = Entry("text_encoder", path, f"{CLIP_PREFIX}{inner}.weight", shape)
    return table


def module_table(configs: dict[str, Any]) -> dict[str, Entry]:
    """kohya name -> Entry, for the architecture these component configs describe."""
    return _table(json.dumps({k: configs[k] for k in ("unet", "text_encoder")}, sort_keys=True))


def sd15_table() -> dict[str, Entry]:
    from ..families import FAMILIES

    return module_table(FAMILIES["sd15"].embedded_configs())


def base_configs(path: Path) -> dict[str, Any]:
    """The component configs of a base: a diffusers folder's own; a single-file checkpoint's metadata (ours carry
    them); else the family's embedded ones (real SD1.x files)."""
    from ..families import FAMILIES
    from ..families.loading import ARCHITECTURE_KEY, read_checkpoint_info

    path = Path(path)
    if path.is_dir():
        _require_supported(path, base_shapes(path))
        return _folder_configs(path)
    info = read_checkpoint_info(path)
    if ARCHITECTURE_KEY in info.metadata:
        return json.loads(info.metadata[ARCHITECTURE_KEY])
    return FAMILIES[_require_supported(path, info.shapes)].embedded_configs()


def _require_supported(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    from ..errors import ModelLoadError
    from ..families import FAMILIES, detect_family

    family = FAMILIES[detect_family(shapes, str(path))]
    if not family.supported:
        raise ModelLoadError(f"{path} is a {family.label} checkpoint; only SD1.x is supported for now.")
    return family.name


def base_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a base in the single-file (LDM) layout, the names A1111 and ComfyUI resolve a LoRA's
    modules against. A diffusers folder's UNet and text-encoder names are converted in memory; only file
    headers are read where the weights are safetensors."""
    from ..families.loading import read_checkpoint_info

    path = Path(path)
    if not path.is_dir():
        return read_checkpoint_info(path).shapes
    from ..errors import ModelLoadError
    from ..formats.ldm import LdmConversionError, clip_to_ldm, unet_to_ldm

    configs = _folder_configs(path)
    try:
        # unet_to_ldm/clip_to_ldm only rename keys, so shapes can stand in for the tensors.
        shapes = unet_to_ldm(_component_shapes(path / "unet"), configs["unet"]["layers_per_block"])
    except LdmConversionError as exc:
        raise ModelLoadError(f"{path / 'unet'} is not a Stable Diffusion 1.x/2.x UNet ({exc}); give an SD1.x "
                             "diffusers folder or single-file checkpoint") from exc
    shapes.update(clip_to_ldm(_component_shapes(path / "text_encoder")))
    return shapes


def _folder_configs(folder: Path) -> dict[str, Any]:
    from ..errors import ModelLoadError

    configs = {}
    for name, file in (("unet", "config.json"), ("text_encoder", "config.json"), ("vae", "config.json"),
                       ("scheduler", "scheduler_config.json")):
        cfg = folder / name / file
        if not cfg.is_file():
            if name in ("vae", "scheduler"):  # not needed to name a LoRA's layers
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
    if not kohya_name.startswith("lora_unet_"):
        return None
    by_ldm = {re.sub(r"\.weight$", "", e.ldm_key.removeprefix(UNET_PREFIX)).replace(".", "_"): name
              for name, e in table.items() if e.component == "unet"}
    return by_ldm.get(kohya_name.removeprefix("lora_unet_"))
