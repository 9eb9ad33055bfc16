"""IP-Adapters for the Stable Diffusion families (``ip-adapter_sd15.safetensors``, ``ip-adapter_sdxl.safetensors``,
the Plus variants; the original ``.bin`` too), with their CLIP vision encoder from a local folder, loaded through
diffusers' ``load_ip_adapter`` (which runs them). What it does not check, and we do first: that the adapter was
made for this base (its key/value projections read the base's text width, one pair per cross-attention layer)
and that the encoder is the one it was trained on (its projection width) - diffusers would report either as a
shape mismatch deep in loading, or not at all.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import LoraScriptsError

# The encoders the common files were trained with, for messages: by the projection width plain adapters read,
# and by the hidden width the Plus/full-face ones read.
_BY_PROJECTION = {1024: "ViT-H (models/image_encoder)", 1280: "ViT-bigG (sdxl_models/image_encoder)"}
_BY_HIDDEN = {1280: "ViT-H (models/image_encoder)", 1664: "ViT-bigG (sdxl_models/image_encoder)"}


class IpAdapterError(LoraScriptsError):
    pass


def read_ip_adapter(path: Path) -> dict[str, dict[str, Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} from a .safetensors file (prefixed keys) or a .bin (nested)."""
    if not path.is_file():
        raise IpAdapterError(f"IP-Adapter {path} does not exist; give the .safetensors or .bin file")
    if path.suffix == ".safetensors":
        from .loading import read_safetensors

        flat = read_safetensors(path, IpAdapterError)
        state = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
                 for part in ("image_proj", "ip_adapter")}
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable pickle gets the same answer
            raise IpAdapterError(f"{path}: cannot be read as an IP-Adapter ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        from ..formats.controlnet import file_kind

        keys = list(flat if path.suffix == ".safetensors" else state) if isinstance(state, dict) else []
        what = file_kind(keys) if keys else "not a file of named tensors"
        raise IpAdapterError(f"{path.name} is not an IP-Adapter (no image_proj/ip_adapter weights): "
                             f"{'a ControlNet (give it to --control TYPE:MODEL)' if what in ('ldm', 'diffusers') else what}")
    if any("faceid" in k.lower() for k in state["ip_adapter"]) or "faceid" in path.name.lower():
        raise IpAdapterError(f"{path.name}: FaceID IP-Adapters need a face-recognition model (insightface), which "
                             "this tool does not run; use a plain or Plus IP-Adapter")
    return state


def cross_attention_layers(unet: nn.Module) -> int:
    return sum(1 for name in unet.attn_processors if not name.endswith("attn1.processor"))


def check_fits(path: Path, state: dict[str, dict[str, Tensor]], unet: nn.Module, encoder: nn.Module, label: str) -> None:
    keys = state["ip_adapter"]
    widths = {tuple(v.shape)[-1] for k, v in keys.items() if k.endswith("to_k_ip.weight")}
    width = unet.config.cross_attention_dim
    if widths and widths != {width}:
        from . import family_by_width

        family = family_by_width(min(widths))
        made = family.label if family else f"a model with text width {min(widths)}"
        raise IpAdapterError(f"{path.name} is an IP-Adapter for {made}, but the base model is {label} (text width "
                             f"{width}); use an IP-Adapter made for {label}")
    pairs, layers = sum(1 for k in keys if k.endswith("to_k_ip.weight")), cross_attention_layers(unet)
    if pairs != layers:
        raise IpAdapterError(f"{path.name} has {pairs} attention layers, the base model's UNet {layers}; it was "
                             f"made for another {label} architecture")
    proj = state["image_proj"]
    wants = next((v.shape[-1] for k, v in proj.items() if k in ("proj.weight", "proj_in.weight", "proj.0.weight")), None)
    has = encoder.config.projection_dim if "proj.weight" in proj else encoder.config.hidden_size
    if wants is not None and wants != has:
        known = _BY_PROJECTION if "proj.weight" in proj else _BY_HIDDEN
        hint = f" ({known[wants]})" if wants in known else ""
        raise IpAdapterError(f"{path.name} reads image features of width {wants}; the image encoder given gives {has}. "
                             f"Give the encoder it was trained with{hint} via --ip-encoder")


def load_encoder(folder: Path, device, dtype) -> nn.Module:
    """The CLIP vision encoder from a local folder (config.json + weights, as in the IP-Adapter repository)."""
    from transformers import CLIPVisionModelWithProjection

    if not (folder / "config.json").is_file():
        raise IpAdapterError(f"image encoder folder {folder} has no config.json; give the folder that holds the CLIP "
                             "vision encoder's config.json and weights (models/image_encoder in the IP-Adapter "
                             "repository) with --ip-encoder")
    from .loading import quiet_loading

    try:
        with quiet_loading():
            encoder = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise IpAdapterError(f"image encoder {folder}: cannot be loaded as a CLIP vision encoder "
                             f"({str(exc).splitlines()[0][:200]})") from None
    return encoder.to(device, dtype).eval().requires_grad_(False)


def attach_ip_adapter(pipe, path: Path, encoder_folder: Path, unet: nn.Module, label: str) -> None:
    """Load the adapter into `pipe` (and so into every pipeline sharing its UNet)."""
    state = read_ip_adapter(path)
    encoder = load_encoder(encoder_folder, unet.device, unet.dtype)
    check_fits(path, state, unet, encoder, label)
    pipe.register_modules(image_encoder=encoder)
    from .loading import quiet_loading

    with quiet_loading():
        pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
