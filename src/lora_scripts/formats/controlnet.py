"""ControlNet files of the Stable Diffusion families: the original (lllyasviel, ``control_v11p_sd15_canny.pth``)
key layout <-> diffusers' ``ControlNetModel``, and what a file's keys say about it. Pure functions, no I/O.

diffusers ships an LDM -> diffusers converter (``convert_controlnet_checkpoint``), but it assumes the default
hint encoder (its last conv at ``input_hint_block.14``) and drops SDXL's ``label_emb``; the map here is one key
function, built from the target model's own keys, so it reads any hint-encoder depth and writes what it reads
(the tests write their tiny ControlNets in the layout users have).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .ldm import _unet_key

CONTROL_PREFIX = "control_model."  # ControlNet 1.0 files hold the ControlNet under it (beside the whole SD model)
_HINT = "controlnet_cond_embedding."


def controlnet_ldm_key(key: str, layers_per_block: int, hint_blocks: int, text_time: bool = False) -> str:
    """diffusers ControlNetModel key -> its key in the original layout (no prefix). The hint encoder there is one
    nn.Sequential of convs and SiLUs: conv_in at 0, block j at 2(j+1), conv_out after the last block."""
    stem, param = key.rsplit(".", 1)
    if stem == _HINT + "conv_in":
        return f"input_hint_block.0.{param}"
    if stem == _HINT + "conv_out":
        return f"input_hint_block.{2 * (hint_blocks + 1)}.{param}"
    if m := re.fullmatch(re.escape(_HINT) + r"blocks\.(\d+)", stem):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{param}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", stem):
        return f"zero_convs.{m[1]}.0.{param}"
    if stem == "controlnet_mid_block":
        return f"middle_block_out.0.{param}"
    # The encoder half of the UNet: the UNet's own names (no up blocks, so no upsampler slot to tell).
    return _unet_key(key, layers_per_block, {}, text_time)


def hint_block_count(keys: Iterable[str]) -> int:
    """Convs between the hint encoder's first and last, from diffusers-layout keys."""
    found = {int(m[1]) for k in keys if (m := re.match(re.escape(_HINT) + r"blocks\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def controlnet_to_ldm(state: Mapping[str, object], layers_per_block: int, text_time: bool = False) -> dict[str, object]:
    """A diffusers ControlNetModel state dict in the original single-file layout (as control_v11p_*.pth)."""
    blocks = hint_block_count(state)
    out = {controlnet_ldm_key(k, layers_per_block, blocks, text_time): v for k, v in state.items()}
    if len(out) != len(state):
        raise ValueError("two ControlNet keys map to the same original-layout key")
    return out


def strip_prefix(state: Mapping[str, object]) -> dict[str, object]:
    """The ControlNet's own keys: a 1.0 file's control_model.* (its SD model's keys dropped), else the file."""
    if any(k.startswith(CONTROL_PREFIX) for k in state):
        return {k[len(CONTROL_PREFIX):]: v for k, v in state.items() if k.startswith(CONTROL_PREFIX)}
    return dict(state)


def file_kind(keys: Iterable[str]) -> str:
    """What a file given as a ControlNet is, from its keys: "ldm" or "diffusers" (a ControlNet of the SD
    families, in either layout), "transformer" (diffusers' transformer ControlNet layout: double and single
    blocks, as InstantX publishes theirs), or what else it is, for the message that refuses it."""
    keys = list(keys)
    has = lambda *parts: any(any(p in k for p in parts) for k in keys)  # noqa: E731
    if has("input_hint_block.") and any(k.endswith((".up", ".down")) for k in keys):
        return "a Control-LoRA (Stability AI's low-rank ControlNet), which this tool does not run"
    if has("input_hint_block.") and has("zero_convs."):
        return "ldm"
    if has("controlnet_cond_embedding.") and has("controlnet_down_blocks."):
        return "diffusers"
    if has("image_proj.", "ip_adapter."):
        return "an IP-Adapter (give it to --ip-adapter)"
    if has("lora_unet_", "lora_te", ".lora_A.", ".lora_down."):
        return "a LoRA (use it as <lora:NAME:WEIGHT> in the prompt)"
    if has("lllite"):
        return "a ControlNet-LLLite (kohya's lightweight control), which this tool does not run"
    if has("controlnet_x_embedder.") and has("transformer_blocks."):
        return "transformer"  # diffusers' FluxControlNetModel layout (InstantX, Shakker-Labs)
    if has("controlnet_blocks.") and has("double_blocks."):
        return ("an XLabs-layout Flux ControlNet, which this tool does not read yet (a diffusers-layout one, as "
                "InstantX and Shakker-Labs publish, works)")
    if has("body.0.", "adapter.body"):
        return "a T2I-Adapter, which this tool does not run"
    if has("model.diffusion_model.", "first_stage_model."):
        return "a base model checkpoint, not a ControlNet"
    return "not a ControlNet this tool recognises"


def context_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The text width the ControlNet's cross-attention reads (768 SD1.x, 1024 SD2.x, 2048 SDXL), from any
    attn2.to_k weight; None where it has no cross-attention."""
    return next((shape[-1] for k, shape in shapes.items() if k.endswith("attn2.to_k.weight")), None)


def has_text_time(keys: Iterable[str]) -> bool:
    """SDXL's size/crop embedding (label_emb in the original layout, add_embedding in diffusers')."""
    return any(k.startswith(("label_emb.", "add_embedding.")) for k in keys)


def hint_channels(shapes: Mapping[str, tuple[int, ...]], layout: str) -> tuple[tuple[int, ...], int]:
    """(conditioning_embedding_out_channels, conditioning_channels) of the hint encoder: the first conv's output,
    then the output of every second block (the stride-2 ones); its input channels (3: an RGB map)."""
    if layout == "ldm":
        pattern = r"input_hint_block\.(\d+)\.weight"
    else:
        pattern = re.escape(_HINT) + r"(?:blocks\.)?(\d+|conv_in|conv_out)\.weight"
    order = {"conv_in": -1, "conv_out": 10**6}  # diffusers names the first and last convs, not by position
    convs = []
    for k, shape in shapes.items():
        if m := re.fullmatch(pattern, k):
            convs.append((order[m[1]] if m[1] in order else int(m[1]), shape))
    convs.sort()
    first, blocks = convs[0][1], [shape for _, shape in convs[1:-1]]
    return (first[0],) + tuple(shape[0] for shape in blocks[1::2]), first[1]


def transformer_depths(keys: Iterable[str], down_blocks: int, layers_per_block: int, layout: str) -> list[int]:
    """Transformer blocks per attention of each down block (SDXL's 1, 2, 10; smaller in its "mid"/"small"
    ControlNets), 0 where a block has none."""
    depth = [0] * down_blocks
    for k in keys:
        if layout == "ldm":
            m = re.match(r"input_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)\.", k)
            block = (int(m[1]) - 1) // (layers_per_block + 1) if m else None
        else:
            m = re.match(r"down_blocks\.(\d+)\.attentions\.\d+\.transformer_blocks\.(\d+)\.", k)
            block = int(m[1]) if m else None
        if m and block < down_blocks:
            depth[block] = max(depth[block], int(m[2]) + 1)
    return depth


def transformer_block_counts(keys: Iterable[str]) -> tuple[int, int]:
    """(double, single) transformer blocks of a transformer ControlNet (InstantX's Flux canny: 5, 10)."""
    keys = list(keys)
    count = lambda prefix: 1 + max((int(m[1]) for k in keys if (m := re.match(prefix + r"\.(\d+)\.", k))),  # noqa: E731
                                   default=-1)
    return count("transformer_blocks"), count("single_transformer_blocks")
