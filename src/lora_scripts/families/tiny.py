"""Tiny pipelines of each trainable family (same classes and key layout as the real ones, ~2 M parameters).

Randomly initialised from a seed: they prove the whole path (single-file loading, LoRA, export) in
seconds on a CPU. They cannot draw anything; the pretrained toy base model is built separately.
Each family states its tiny sizes (`Family.tiny_sizes`); everything else comes from its real configs.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn
from transformers import CLIPTokenizer

from ..atomic import atomic_save_safetensors
from . import FAMILIES
from .saving import save_single_file
from .t5_tokenizer import build_tiny_t5_tokenizer


def tiny_configs(family: str = "sd15", prediction_type: str | None = None, **denoiser: Any) -> dict[str, dict[str, Any]]:
    """The family's real configs with the sizes shrunk; everything else (scheduler, activations, SD2's linear
    projections and OpenCLIP gelu) stays the family's. denoiser: overrides of the denoiser's config."""
    fam = FAMILIES[family]
    configs = copy.deepcopy(fam.embedded_configs())
    for name, sizes in fam.tiny_sizes.items():
        configs[name].update(sizes)
    configs[fam.denoiser].update(denoiser)
    if prediction_type:
        configs["scheduler"]["prediction_type"] = prediction_type
    return configs


def build_tiny(seed: int = 0, family: str = "sd15", prediction_type: str | None = None, **denoiser: Any
               ) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """(networks by component name, configs), initialised from `seed`."""
    configs = tiny_configs(family, prediction_type, **denoiser)
    torch.manual_seed(seed)
    return FAMILIES[family].build_modules(configs), configs


def build_tiny_models(seed: int = 0, family: str = "sd15", prediction_type: str | None = None):
    """(unet, vae, text_encoder, configs) of a one-text-encoder family."""
    modules, configs = build_tiny(seed, family, prediction_type)
    return modules["unet"], modules["vae"], modules["text_encoder"], configs


def write_tiny_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, family: str = "sd15",
                          prediction_type: str | None = None) -> Path:
    """A single file in the family's original layout, its configs (and so its objective) in the metadata."""
    modules, configs = build_tiny(seed, family, prediction_type)
    return save_single_file(Path(path), modules, configs, dtype, family)


def write_tiny_folder(folder: Path, seed: int = 0, family: str = "sd15", prediction_type: str | None = None,
                      **sizes: Any) -> Path:
    """The same models as a diffusers folder (save_pretrained), as users download them."""
    import diffusers

    fam = FAMILIES[family]
    modules, configs = build_tiny(seed, family, prediction_type, **sizes)
    scratch = Path(folder) / "_tokenizers"
    tokenizers = {name: CLIPTokenizer.from_pretrained(path) for name, path in fam.write_tokenizers(scratch).items()}
    if "text_encoder_2" in fam.tokenizer_folders and "tokenizer_2" not in tokenizers:  # T5 (Flux): built in code
        tokenizers["tokenizer_2"] = build_tiny_t5_tokenizer()
    # A flow-matching family keeps its own scheduler; the DDPM families' tiny folders have always carried DDPM's.
    named = configs["scheduler"].get("_class_name", "")
    scheduler_cls = getattr(diffusers, named) if named.startswith("FlowMatch") else DDPMScheduler
    pipe = fam.pipeline_from_parts(modules, tokenizers, scheduler_cls.from_config(configs["scheduler"]))
    pipe.save_pretrained(str(folder))
    shutil.rmtree(scratch)
    return Path(folder)


def write_tiny_flux_files(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes: Any
                          ) -> dict[str, Path]:
    """A tiny Flux.1 as ComfyUI users keep it: the transformer in BFL layout (its configs in the metadata), and
    clip_l, t5xxl and ae files in the layouts ComfyUI's own are in; plus a T5 tokenizer folder (what a
    ComfyUI install or a diffusers download provides). Returns the config keys -> paths.
    sizes: transformer config overrides (guidance_embeds=False: a schnell-like model)."""
    from ..formats.ldm import vae_to_ldm, with_text_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules, configs = build_tiny(seed, "flux1", **sizes)
    cast = lambda state: {k: v.detach().to(dtype).contiguous() for k, v in state.items()}  # noqa: E731
    paths = {"base_model": save_single_file(folder / "flux1-tiny.safetensors", modules, configs, dtype, "flux1"),
             "clip_l": folder / "clip_l.safetensors", "t5xxl": folder / "t5xxl.safetensors", "ae": folder / "ae.safetensors",
             "tokenizer_dir": folder / "t5_tokenizer"}
    atomic_save_safetensors(cast({with_text_model(k): v for k, v in modules["text_encoder"].state_dict().items()}),
                            paths["clip_l"])
    t5 = {k: v for k, v in modules["text_encoder_2"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    atomic_save_safetensors(cast(t5), paths["t5xxl"])
    atomic_save_safetensors(cast({k.removeprefix("first_stage_model."): v
                                  for k, v in vae_to_ldm(modules["vae"].state_dict()).items()}), paths["ae"])
    build_tiny_t5_tokenizer().save_pretrained(str(paths["tokenizer_dir"]))
    return paths


def build_tiny_controlnet(unet: nn.Module, seed: int = 0) -> nn.Module:
    """A ControlNet from a tiny UNet (diffusers' from_unet), its hint encoder downsampling as the tiny VAE does
    (by 2), and its zero-initialised output convs set to small random values: a fresh ControlNet changes nothing,
    a trained one does, and tests need the second."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        for name, p in net.named_parameters():
            # The map's way in (hint encoder's last conv) stronger than the residuals' way out, so that the map
            # decides more than the ControlNet's mere presence does.
            if name.startswith("controlnet_cond_embedding.conv_out"):
                p.normal_(0.0, 1.0) if name.endswith("weight") else p.zero_()
            elif name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.normal_(0.0, 0.3) if name.endswith("weight") else p.zero_()
    return net


def write_tiny_controlnet(path: Path, unet: nn.Module, seed: int = 0, text_time: bool = False) -> Path:
    """A tiny ControlNet as users have them: the original layout (.pth or .safetensors, as control_v11p_*), a
    diffusers-layout single file (a name containing "diffusers"), or a diffusers folder (no suffix)."""
    from ..formats.controlnet import controlnet_to_ldm

    net = build_tiny_controlnet(unet, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.suffix:
        net.save_pretrained(str(path))
        return path
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if "diffusers" not in path.name:
        state = controlnet_to_ldm(state, unet.config.layers_per_block, text_time)
    if path.suffix == ".pth":
        torch.save(state, path)
        return path
    return atomic_save_safetensors(state, path)


def write_tiny_ip_adapter(path: Path, unet: nn.Module, seed: int = 0, projection_dim: int = 16) -> Path:
    """A tiny plain IP-Adapter for this UNet as users keep it: the .safetensors file (image_proj.*, and
    ip_adapter.N.to_k_ip/to_v_ip for the N-th cross-attention layer, N = 1, 3, 5, ...), and beside it the
    image_encoder folder (a tiny CLIP vision tower with projection, in transformers' layout)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        projection_dim=projection_dim))
    encoder.save_pretrained(str(Path(path).parent / "image_encoder"))
    width, channels = unet.config.cross_attention_dim, list(unet.config.block_out_channels)
    state = {"image_proj.proj.weight": torch.randn(4 * width, projection_dim) * 0.3,
             "image_proj.proj.bias": torch.zeros(4 * width),
             "image_proj.norm.weight": torch.ones(width), "image_proj.norm.bias": torch.zeros(width)}
    cross = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
    for k, name in enumerate(cross):
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = channels[::-1][int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        for proj in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * k + 1}.{proj}.weight"] = torch.randn(hidden, width) * 0.3
    return atomic_save_safetensors(state, Path(path))


def write_tiny_flux_controlnet(path: Path, transformer: nn.Module, seed: int = 0, num_mode: int | None = None) -> Path:
    """A tiny Flux ControlNet in diffusers' layout (as InstantX publishes theirs): one double and one single
    block from the tiny transformer, its zero-initialised input and output projections set to random values.
    A folder where `path` has no suffix, else the weights file alone."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    cfg = transformer.config
    net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                               attention_head_dim=cfg.attention_head_dim,
                                               num_attention_heads=cfg.num_attention_heads)
    if num_mode:  # a union ControlNet: one learned embedding per control type
        net = FluxControlNetModel.from_config({**{k: v for k, v in net.config.items() if not k.startswith("_")},
                                               "num_mode": num_mode})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_x_embedder", "controlnet_blocks", "controlnet_single_blocks",
                                "controlnet_mode_embedder")):
                p.normal_(0.0, 0.3) if name.endswith("weight") else p.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.suffix:
        net.save_pretrained(str(path))
        return path
    return atomic_save_safetensors({k: v.contiguous() for k, v in net.state_dict().items()}, path)
