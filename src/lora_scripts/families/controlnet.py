"""ControlNets for the Stable Diffusion families, loaded offline from the files users have: lllyasviel's
original layout (``control_v11p_sd15_canny.pth``, ControlNet 1.0's ``control_model.*`` inside a whole
checkpoint), diffusers-layout single files (``diffusers_xl_canny_full.safetensors``) and diffusers folders.

A single file carries no config: the ControlNet's is the base UNet's encoder half (what diffusers'
``ControlNetModel.from_unet`` copies), with the hint encoder's widths and the transformer depths read from the
file's shapes. So it loads for any base size (real or tiny) and a ControlNet made for another family is told
apart by its keys (cross-attention width, SDXL's size embedding) before any shape mismatch.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers.configuration_utils import FrozenDict
from torch import Tensor, nn

from ..errors import LoraScriptsError
from ..formats import controlnet as keys



class ControlNetError(LoraScriptsError):
    pass


def read_state(path: Path) -> dict[str, Tensor]:
    """Tensors of a ControlNet file (.safetensors, or a pickled .pth/.ckpt read without running code)."""
    if path.suffix == ".safetensors":
        from .loading import read_safetensors

        return read_safetensors(path, ControlNetError)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable pickle gets the same answer
        raise ControlNetError(f"{path}: cannot be read as a ControlNet ({str(exc).splitlines()[0][:200]}); "
                              "give the .safetensors or .pth file as downloaded") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ControlNetError(f"{path}: holds no tensors by name; it is not a ControlNet file")
    return state


def _refuse_leftovers(path: Path, leftover: list[str]) -> None:
    """Weights the layout has no place for belong to a variant (xinsir's union ControlNets, ...): drawing without
    them would be a wrong picture with no error."""
    if leftover:
        raise ControlNetError(f"{path.name} holds {len(leftover)} weights a plain ControlNet has no place for (e.g. "
                              f"{leftover[0]}): a variant (a union ControlNet?) this tool does not run")


def _made_for(width: int | None, text_time: bool) -> str:
    if text_time:
        return "SDXL" if width in (None, 2048) else f"an SDXL-like model (cross-attention width {width})"
    from . import family_by_width

    family = family_by_width(width)
    return family.label if family else f"a model with cross-attention width {width}"


def check_family(path: Path, width: int | None, text_time: bool, unet: nn.Module, label: str) -> None:
    """A ControlNet of another family is refused by name, before a shape mismatch would say it less clearly."""
    base_width = unet.config.cross_attention_dim
    base_time = unet.config.get("addition_embed_type") == "text_time"
    if (width is not None and width != base_width) or text_time != base_time:
        raise ControlNetError(f"{path.name} is a ControlNet for {_made_for(width, text_time)}, but the base model is "
                              f"{label} (cross-attention width {base_width}); use a ControlNet made for {label}")


def load_controlnet(path: Path, unet: nn.Module, label: str) -> nn.Module:
    """The ControlNet in `path` (file or diffusers folder) for this base UNet, in its dtype and on its device."""
    from diffusers import ControlNetModel

    path = Path(path)
    if not path.exists():
        raise ControlNetError(f"ControlNet {path} does not exist; give a .safetensors/.pth file or a diffusers folder")
    if path.is_dir():
        net = _from_folder(path, ControlNetModel, label)
        check_family(path, net.config.cross_attention_dim, net.config.get("addition_embed_type") == "text_time",
                     unet, label)
    else:
        state = keys.strip_prefix(read_state(path))
        layout = keys.file_kind(state)
        if layout == "transformer":
            raise ControlNetError(f"{path.name} is a ControlNet for Flux.1, but the base model is {label}; use a "
                                  f"ControlNet made for {label}")
        if layout not in ("ldm", "diffusers"):
            raise ControlNetError(f"{path.name} is {layout}")
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        check_family(path, keys.context_width(shapes), keys.has_text_time(state), unet, label)
        net = _from_state(path, state, shapes, layout, unet, ControlNetModel)
    return net.to(unet.device, unet.dtype).eval().requires_grad_(False)


def _from_folder(path: Path, cls, label: str):
    """A diffusers folder of this class (its config.json says which), refused by name before loading otherwise."""
    import json

    config = path / "config.json"
    if not config.is_file():
        raise ControlNetError(f"{path} is a folder without config.json; give a diffusers ControlNet folder or the "
                              "ControlNet file itself")
    try:
        kind = json.loads(config.read_text()).get("_class_name", "?")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise ControlNetError(f"{config} is not a readable diffusers config") from None
    if kind != cls.__name__:
        made = {"ControlNetModel": "SD1.x/SD2.x/SDXL", "FluxControlNetModel": "Flux.1"}.get(kind)
        what = f"a ControlNet for {made}" if made else f"a {kind}, which this tool does not run"
        raise ControlNetError(f"{path.name} is {what}; the base model is {label}")
    from .loading import quiet_loading

    try:
        with quiet_loading():
            return cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ControlNetError(f"{path}: cannot be loaded as a diffusers {kind} ({str(exc).splitlines()[0][:200]})") from None


def _from_state(path: Path, state: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], layout: str,
                unet: nn.Module, cls) -> nn.Module:
    cfg = unet.config
    channels, conditioning = keys.hint_channels(shapes, layout)
    depths = keys.transformer_depths(state, len(cfg.block_out_channels), cfg.layers_per_block, layout)
    base_depths = cfg.get("transformer_layers_per_block", 1)
    base_depths = [base_depths] * len(depths) if isinstance(base_depths, int) else list(base_depths)
    depths = [d or b for d, b in zip(depths, base_depths)]
    # The UNet's own config, as it was before an IP-Adapter (loaded into the same UNet) set its image projection.
    stand_in = SimpleNamespace(config=FrozenDict({**cfg, "encoder_hid_dim_type": None, "encoder_hid_dim": None}
                                                 if cfg.get("encoder_hid_dim_type") == "ip_image_proj" else cfg))
    with torch.device("meta"):
        template = cls.from_unet(stand_in, load_weights_from_unet=False, conditioning_embedding_out_channels=channels,
                                 conditioning_channels=conditioning)
        net = cls.from_config({**template.config, "transformer_layers_per_block": depths})
    text_time = cfg.get("addition_embed_type") == "text_time"
    blocks = keys.hint_block_count(net.state_dict())
    wanted, missing, wrong = {}, [], []
    for k, target in net.state_dict().items():
        source = k if layout == "diffusers" else keys.controlnet_ldm_key(k, cfg.layers_per_block, blocks, text_time)
        if source not in state:
            missing.append(source)
        elif tuple(state[source].shape) != tuple(target.shape):
            wrong.append(f"{source} {tuple(state[source].shape)} (expected {tuple(target.shape)})")
        else:
            wanted[k] = state[source]
    if missing or wrong:
        problem = f"{len(missing)} expected keys missing (e.g. {missing[0]})" if missing else \
            f"{len(wrong)} keys of other shapes (e.g. {wrong[0]})"
        raise ControlNetError(f"{path.name} does not fit this base model's ControlNet layout: {problem}. If it is a "
                              "variant with its own config (an SDXL 'mid'/'small' ControlNet), give its diffusers "
                              "folder (config.json beside the weights)")
    used = set(wanted) if layout == "diffusers" else {
        keys.controlnet_ldm_key(k, cfg.layers_per_block, blocks, text_time) for k in wanted}
    _refuse_leftovers(path, [k for k in state if k not in used])
    net.load_state_dict(wanted, strict=True, assign=True)
    return net


def load_flux_controlnet(path: Path, transformer: nn.Module, label: str) -> nn.Module:
    """A Flux ControlNet in diffusers' layout (a folder, or its weights file alone: the block counts, guidance,
    union modes and hint encoder are read from the keys, the rest is the base transformer's)."""
    from diffusers import FluxControlNetModel

    path = Path(path)
    if not path.exists():
        raise ControlNetError(f"ControlNet {path} does not exist; give a .safetensors file or a diffusers folder")
    if path.is_dir():
        net = _from_folder(path, FluxControlNetModel, label)
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    else:
        state = read_state(path)
        layout = keys.file_kind(state)
        if layout in ("ldm", "diffusers"):
            stripped = keys.strip_prefix(state)
            shapes = {k: tuple(v.shape) for k, v in stripped.items()}
            made = _made_for(keys.context_width(shapes), keys.has_text_time(stripped))
            raise ControlNetError(f"{path.name} is a ControlNet for {made}, but the base model is {label}; use a "
                                  f"ControlNet made for {label}")
        if layout != "transformer":
            raise ControlNetError(f"{path.name} is {layout}")
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        net = None
    cfg = transformer.config
    width, text = cfg.num_attention_heads * cfg.attention_head_dim, cfg.joint_attention_dim
    has = (shapes["x_embedder.weight"][0], shapes["context_embedder.weight"][1])
    if has != (width, text):
        raise ControlNetError(f"{path.name} is a Flux ControlNet of width {has[0]} reading text of width {has[1]}; "
                              f"this {label} base has {width} and {text}: it was made for another model")
    if net is None:
        double, single = keys.transformer_block_counts(state)
        hint = shapes.get("input_hint_block.conv_out.weight")
        # Without diffusers' bookkeeping keys: `_use_default_values` would put the defaults back over these.
        config = {**{k: v for k, v in cfg.items() if not k.startswith("_")}, "num_layers": double, "num_single_layers": single,
                  "guidance_embeds": any("guidance_embedder" in k for k in state),
                  "num_mode": shapes["controlnet_mode_embedder.weight"][0] if "controlnet_mode_embedder.weight" in shapes
                  else None, "conditioning_embedding_channels": hint[0] if hint else None}
        with torch.device("meta"):
            net = FluxControlNetModel.from_config(config)
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        missing = [k for k in expected if k not in state]
        wrong = [f"{k} {shapes[k]} (expected {expected[k]})" for k in expected if k in state and shapes[k] != expected[k]]
        if missing or wrong:
            problem = f"{len(missing)} expected keys missing (e.g. {missing[0]})" if missing else \
                f"{len(wrong)} keys of other shapes (e.g. {wrong[0]})"
            raise ControlNetError(f"{path.name} does not fit this {label} base's ControlNet layout: {problem}")
        _refuse_leftovers(path, [k for k in state if k not in expected])
        net.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    return net.to(transformer.device, transformer.dtype).eval().requires_grad_(False)
