"""diffusers -> original CompVis/LDM single-file key layout (SD1.x/SD2.x).

diffusers ships the LDM -> diffusers direction (``loaders/single_file_utils``) but no writer, and
A1111/ComfyUI read only the LDM layout. We need the writer for ``merge`` and for building test and
toy checkpoints that go through the *real* single-file loader. Pure functions: tensors in, tensors out.
"""

from __future__ import annotations

import re

from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# SDXL's size/crop conditioning MLP (addition_embed_type "text_time"). SD-upscale's class embedding also maps to
# label_emb in the SGM layout, so this is used only for text_time UNets, never as a fixed entry.
_TEXT_TIME = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class LdmConversionError(ValueError):
    pass


def _map_resnet(rest: str) -> str:
    layer, _, param = rest.partition(".")
    if layer not in _UNET_RESNET:
        raise LdmConversionError(f"unknown UNet resnet layer {layer!r}")
    return f"{_UNET_RESNET[layer]}.{param}"


def _unet_key(key: str, layers_per_block: int, up_has_attn: dict[int, bool], text_time: bool = False) -> str:
    """diffusers UNet2DConditionModel key -> its key in the original (LDM/SGM) layout. SDXL needs nothing more
    than text_time: its transformer depth stays inside `transformer_blocks.N` and the block index arithmetic
    holds for three down blocks as for four."""
    stem, param = key.rsplit(".", 1)
    if stem in _UNET_FIXED:
        return f"{_UNET_FIXED[stem]}.{param}"
    if text_time and stem in _TEXT_TIME:
        return f"{_TEXT_TIME[stem]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * (layers_per_block + 1) + j + 1
        return f"input_blocks.{idx}.0.{_map_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        idx = (int(m[1]) + 1) * (layers_per_block + 1)
        return f"input_blocks.{idx}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_map_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * (layers_per_block + 1) + j
        return f"output_blocks.{idx}.0.{_map_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        idx = i * (layers_per_block + 1) + layers_per_block
        slot = 2 if up_has_attn[i] else 1
        return f"output_blocks.{idx}.{slot}.conv.{m[2]}"
    raise LdmConversionError(f"UNet key {key!r} has no LDM equivalent")


def unet_to_ldm(state: dict[str, Tensor], layers_per_block: int, text_time: bool = False) -> dict[str, Tensor]:
    up_has_attn: dict[int, bool] = {}
    for k in state:
        if m := re.match(r"up_blocks\.(\d+)\.", k):
            i = int(m[1])
            up_has_attn[i] = up_has_attn.get(i, False) or ".attentions." in k
    out = {UNET_PREFIX + _unet_key(k, layers_per_block, up_has_attn, text_time): v for k, v in state.items()}
    if len(out) != len(state):
        raise LdmConversionError("two UNet keys map to the same LDM key")
    return out


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def _vae_key(key: str, n_up: int) -> tuple[str, bool]:
    """Return (ldm_key, is_attention_projection)."""
    fixed = {"conv_norm_out": "norm_out"}
    part, _, rest = key.partition(".")  # encoder / decoder / quant_conv / post_quant_conv
    if part in ("quant_conv", "post_quant_conv"):
        return key, False
    stem, _, tail = rest.partition(".")
    if stem in ("conv_in", "conv_out"):
        return key, False
    if stem in fixed:
        return f"{part}.{fixed[stem]}.{tail}", False
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{_vae_resnet(m[2])}", False
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        if m[1] not in _VAE_ATTN:
            raise LdmConversionError(f"VAE attention key {key!r} has no LDM equivalent")
        return f"{part}.mid.attn_1.{_VAE_ATTN[m[1]]}.{m[2]}", m[1] != "group_norm"
    raise LdmConversionError(f"VAE key {key!r} has no LDM equivalent")


def vae_to_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    n_up = 1 + max(int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for k, v in state.items():
        new, is_proj = _vae_key(k, n_up)
        # LDM's VAE mid-attention uses 1x1 convs where diffusers uses Linear layers.
        out[VAE_PREFIX + new] = v[..., None, None] if is_proj and v.ndim == 2 else v
    if len(out) != len(state):
        raise LdmConversionError("two VAE keys map to the same LDM key")
    return out


def with_text_model(key: str) -> str:
    """transformers >= 5 flattened CLIP's text tower (no ``text_model.`` level); single files, kohya names and
    A1111/ComfyUI keep that level."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def clip_to_ldm(state: dict[str, Tensor], prefix: str = CLIP_PREFIX) -> dict[str, Tensor]:
    """A CLIP text encoder's state in the single-file layout. prefix: where the encoder lives (SD1:
    cond_stage_model.transformer.; SDXL's CLIP-L: conditioner.embedders.0.transformer.)."""
    return {prefix + with_text_model(k): v for k, v in state.items()}
