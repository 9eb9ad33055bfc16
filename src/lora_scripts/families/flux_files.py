"""Reading Flux.1's weights from the files ComfyUI users keep: the transformer, clip_l, t5xxl and ae as separate
files (fp8 and ComfyUI's fp8_scaled included) or one all-in-one checkpoint holding them all, each part read on its
own and filled into a model built on the meta device (one copy of the weights in memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn

from ..errors import ModelLoadError

# A ComfyUI all-in-one checkpoint (its CheckpointSave node; Comfy-Org's flux1-dev-fp8.safetensors) holds the other
# files too, under these prefixes (comfy/supported_models.py: Flux's text_encoder_key_prefix and vae_key_prefix);
# the transformer is under model.diffusion_model.
EMBEDDED = {"clip_l": "text_encoders.clip_l.transformer.", "t5xxl": "text_encoders.t5xxl.transformer.", "ae": "vae."}
_NOT_TRANSFORMER = ("text_encoders.", "vae.")


def _torch_state(path: Path) -> dict[str, Tensor]:
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return state.get("state_dict", state)


def embedded_parts(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """The other files an all-in-one checkpoint holds: config key -> key prefix."""
    return {kind: prefix for kind, prefix in EMBEDDED.items() if any(k.startswith(prefix) for k in shapes)}


def _under(shapes: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k.removeprefix(prefix): v for k, v in shapes.items() if k.startswith(prefix)}


def _read_state(path: Path, prefix: str = "", keep=lambda key: True) -> dict[str, Tensor]:
    """The tensors under `prefix` (removed) that `keep` accepts: an all-in-one file's one part is read alone,
    never the whole 17-24 GB file at once."""
    if path.suffix != ".safetensors":
        return _under({k: v for k, v in _torch_state(path).items() if keep(k)}, prefix)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix) and keep(k)}


def _dequantize_scaled_fp8(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """ComfyUI's "fp8_scaled" files store fp8 weights with a per-tensor `scale_weight` beside each (and a
    `scaled_fp8` marker): the real weight is their product."""
    if "scaled_fp8" not in state:
        return state
    out = {}
    for key, value in state.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale = state.get(key.removesuffix(".weight") + ".scale_weight") if key.endswith(".weight") else None
        out[key] = value.to(torch.float32) * scale.to(torch.float32) if scale is not None else value
    return out


def _text_model_from_file(source: tuple[Path, str], cls: str, config: dict[str, Any], dtype: torch.dtype | None,
                          rename) -> nn.Module:
    """A transformers text encoder from a ComfyUI-style single file (transformers-4 key names), or the part of an
    all-in-one file under a prefix (source: (file, prefix)), built on the meta device and filled in `dtype`."""
    import transformers

    plain = {k: v for k, v in config.items() if k != "architectures"}
    config_cls = transformers.CLIPTextConfig if cls == "CLIPTextModel" else transformers.T5Config
    with init_empty_weights(include_buffers=False):
        model = getattr(transformers, cls)(config_cls(**plain))
    path = source[0]
    state = _dequantize_scaled_fp8(_read_state(*source))
    own = set(model.state_dict())
    renamed = {}
    for key, value in state.items():
        name = key.removeprefix("text_model.") if rename else key
        if name in own:
            renamed[name] = value.to(dtype or torch.float32)
    if cls == "T5EncoderModel":  # files hold the tied embedding once, under either name
        shared = renamed.get("shared.weight", renamed.get("encoder.embed_tokens.weight"))
        if shared is not None:
            renamed["shared.weight"] = renamed["encoder.embed_tokens.weight"] = shared
    _assign(model, renamed, path, required=own)
    return model


def _assign(model: nn.Module, state: dict[str, Tensor], path: Path, required: set[str] | None = None) -> None:
    """Fill a meta-device model; any parameter the file lacks is an error, never a tensor left on meta."""
    required = required if required is not None else set(model.state_dict())
    missing = sorted(required - set(state))
    if missing:
        raise ModelLoadError(f"{path} lacks {len(missing)} weights of {type(model).__name__} (first: {missing[0]}); "
                             "the file is incomplete or a different model")
    model.load_state_dict(state, strict=False, assign=True)
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if leftover:
        raise ModelLoadError(f"{path}: {len(leftover)} weights of {type(model).__name__} were not in the file "
                             f"(first: {leftover[0]})")
    model.eval()
