"""Stable Diffusion XL (base 1.0 and every fine-tune of its architecture: Pony, Illustrious, NoobAI, ...).

What differs from SD1/SD2 (stable_diffusion.py holds the rest):
* two text encoders, CLIP ViT-L and OpenCLIP ViT-bigG, both read at their penultimate layer and
  concatenated (768 + 1280 = 2048 wide); bigG's projected end-of-text embedding ("pooled") goes to the
  UNet beside them;
* size conditioning: the UNet is told each training image's original size, where the crop starts and the
  crop's size (`data.images.Placement`): the real numbers of every crop, as the SDXL paper and diffusers'
  training example define them (sd-scripts passes the offset of the whole image letterboxed into the bucket
  instead, and no offset for random crops);
* the original single-file layout is Stability's SGM one (`conditioner.embedders.0/1`, `label_emb`), and
  sd-scripts names LoRA modules by it: `lora_unet_input_blocks_4_1_…`, `lora_te1_…`, `lora_te2_…`;
* v-prediction fine-tunes (NoobAI-XL v-pred and others) mark themselves with `v_pred` and `ztsnr` keys.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
from torch import Tensor, nn

from ..formats.kohya import UNET_PREFIX as KOHYA_UNET, kohya_module_name, text_encoder_name, unet_name_from_ldm
from ..formats.ldm import UNET_PREFIX, _unet_key, clip_to_ldm
from ..formats.open_clip import open_clip_with_projection_shapes_to_ldm, open_clip_with_projection_to_ldm
from .base import Conditioning, ModuleEntry
from .long_prompts import join_windows
from .stable_diffusion import (StableDiffusionFamily, clip_ids, clip_ldm_entry, open_clip_attention_problems,
                               open_clip_entry)

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIG_G_PREFIX = "conditioner.embedders.1.model."
LABEL_EMB_KEY = "model.diffusion_model.label_emb.0.0.weight"  # the SGM UNet's pooled-text/size embedding
# The keys NoobAI-XL v-pred (and others after it) add to say how they were trained; ComfyUI reads them too.
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"
_KOHYA_TE = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


class SDXL(StableDiffusionFamily):
    name = "sdxl"
    lora_label = "sdxl"
    label = "Stable Diffusion XL"
    text_encoders = ("text_encoder", "text_encoder_2")
    config_files = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")
    config_package = "lora_scripts.families.configs.sdxl"
    tokenizer_folders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    text_encoder_classes = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    pipeline_class = StableDiffusionXLPipeline
    control_pipeline_class = StableDiffusionXLControlNetPipeline
    model_index = _MODEL_INDEX
    text_time = True
    # As sd-scripts writes them (library/sdxl_train_util.py, sai_model_spec.py): one architecture id for
    # epsilon and v-prediction SDXL; modelspec.prediction_type tells them apart.
    base_model_version = "sdxl_base_v1-0"
    v2 = False
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    text_encoder_act = "quick_gelu"  # the first (CLIP-L) encoder's
    cross_attention_dim = 2048
    default_resolution = 1024
    # Tiny test sizes: the real block structure (so the SGM key map is the real one), unequal encoder widths
    # (equal ones make diffusers' single-file loader swap the encoders silently) and 10 layers in the second
    # (diffusers recognises an SDXL file by a key in its block 9).
    tiny_sizes = {
        "unet": dict(block_out_channels=[32, 32, 64], layers_per_block=2, sample_size=32,
                     transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 2, 4], cross_attention_dim=96,
                     addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 48, norm_num_groups=32),
        "vae": dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                    sample_size=64, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
        "text_encoder_2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
                               projection_dim=48),
    }

    # --- recognising ----------------------------------------------------------------------------------------
    def recognise(self, shapes, metadata) -> bool:
        return (LABEL_EMB_KEY in shapes and any(k.startswith(CLIP_L_PREFIX) for k in shapes)
                and any(k.startswith(BIG_G_PREFIX) for k in shapes))

    def recognise_folder(self, index, configs) -> bool:
        return "text_encoder" in configs and self.recognise_configs(configs)

    def recognise_configs(self, configs) -> bool:
        return "text_encoder_2" in configs and configs.get("unet", {}).get("addition_embed_type") == "text_time"

    # --- loading --------------------------------------------------------------------------------------------
    def _pipeline_extras(self) -> dict[str, Any]:
        # No invisible watermark on previews (diffusers adds one where the package is installed).
        return {"add_watermarker": False}

    def pad_for(self, encoder: str) -> str:
        # OpenAI's CLIP-L pads with its end token, OpenCLIP-bigG with "!" (id 0): SDXL was trained that way.
        return "!" if encoder == "text_encoder_2" else "<|endoftext|>"

    def file_prediction_type(self, path: Path, metadata: dict[str, str]) -> tuple[str | None, str]:
        kind, why = self.prediction_type_in_file(metadata)
        if kind:
            return kind, why
        if V_PRED_KEY in self._marker_keys(path):
            return "v_prediction", f"the checkpoint carries a {V_PRED_KEY!r} key (a v-prediction fine-tune)"
        return None, ""

    def file_zero_terminal_snr(self, path: Path, metadata: dict[str, str]) -> str:
        # As ComfyUI reads the markers (comfy/supported_models.py): ztsnr counts only beside v_pred.
        if {V_PRED_KEY, ZTSNR_KEY} <= self._marker_keys(path):
            return f"its {ZTSNR_KEY!r} key says it was trained with zero terminal SNR"
        return ""

    @staticmethod
    def _marker_keys(path: Path) -> frozenset[str]:
        if path.is_dir():
            return frozenset()
        return _markers(str(path), path.stat().st_mtime)

    def unknown_prediction_type(self, path: Path) -> tuple[str, str]:
        return "epsilon", ("SDXL base and most fine-tunes are epsilon-prediction (v-prediction ones carry a v_pred "
                           "key; set prediction_type for one that does not)")

    def resolution_for(self, prediction_type: str | None) -> int:
        return 1024

    # --- conditioning and prediction ------------------------------------------------------------------------
    def tokenize(self, tokenizers: dict[str, Any], captions: list[str], chunks: int = 1) -> dict[str, Tensor]:
        return {"input_ids": clip_ids(tokenizers["tokenizer"], captions, chunks),
                "input_ids_2": clip_ids(tokenizers["tokenizer_2"], captions, chunks)}

    def encode(self, text_encoders: dict[str, nn.Module], tokens: dict[str, Tensor], device) -> Conditioning:
        """Both encoders' penultimate hidden states side by side, and bigG's projected end-of-text embedding,
        as StableDiffusionXLPipeline.encode_prompt computes them (clip_skip unset). A long caption's windows are
        joined (long_prompts.py); its pooled embedding is the first window's, as sd-scripts takes it."""
        ids, ids_2 = tokens["input_ids"], tokens["input_ids_2"]
        batch, windowed = ids.shape[0], ids.dim() == 3
        first = text_encoders["text_encoder"](ids.flatten(0, ids.dim() - 2).to(device), output_hidden_states=True)
        second = text_encoders["text_encoder_2"](ids_2.flatten(0, ids_2.dim() - 2).to(device), output_hidden_states=True)
        h1, h2, pooled = first.hidden_states[-2], second.hidden_states[-2], second.text_embeds
        if windowed:
            h1, h2, pooled = join_windows(h1, batch), join_windows(h2, batch), pooled.reshape(batch, -1, pooled.shape[-1])[:, 0]
        return Conditioning(torch.cat([h1, h2], dim=-1), {"pooled": pooled})

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning,
                placement: Tensor | None = None) -> Tensor:
        """placement: (batch, 6) original size, crop top-left and target size of each crop (Placement.ids)."""
        if placement is None:
            raise ValueError("SDXL needs each image's size conditioning (placement)")
        # fp32, never the bf16 of the hidden states: bf16 holds integers above 256 only roughly (1531 -> 1528);
        # the UNet embeds them in float and casts the embedding itself.
        added = {"text_embeds": cond.extras["pooled"], "time_ids": placement.to(noisy.device, torch.float32)}
        return denoiser(noisy, timesteps, cond.hidden, added_cond_kwargs=added).sample

    def blank_tokens(self, batch: int, device) -> dict[str, Tensor]:
        ids = torch.zeros(batch, 77, dtype=torch.long, device=device)
        return {"input_ids": ids, "input_ids_2": ids.clone()}

    def blank_conditioning(self, configs, batch: int, dtype, device) -> Conditioning:
        width = configs["unet"]["cross_attention_dim"]
        pooled = configs["text_encoder_2"]["projection_dim"]
        return Conditioning(torch.empty(batch, 77, width, dtype=dtype, device=device),
                            {"pooled": torch.empty(batch, pooled, dtype=dtype, device=device)})

    # --- LoRA targets and names -----------------------------------------------------------------------------
    def kohya_name(self, component: str, module_path: str) -> str:
        """sd-scripts' SDXL names: the UNet by its key in the SGM single file, the encoders as lora_te1_/lora_te2_."""
        if component == "unet":
            lpb, up_attn = self._unet_layout
            return unet_name_from_ldm(UNET_PREFIX + _unet_key(f"{module_path}.weight", lpb, up_attn, text_time=True))
        if component in _KOHYA_TE:
            return text_encoder_name(_KOHYA_TE[component], module_path)
        return kohya_module_name(component, module_path)

    @cached_property
    def _unet_layout(self) -> tuple[int, dict[int, bool]]:
        """layers_per_block and which up blocks have attention: the same for every SDXL (tiny test models
        keep the real block structure), so a name needs no config."""
        cfg = self.embedded_configs()["unet"]
        return cfg["layers_per_block"], {i: t.startswith("CrossAttn") for i, t in enumerate(cfg["up_block_types"])}

    def text_encoder_entry(self, component: str, path: str, shape: tuple[int, ...]) -> ModuleEntry:
        if component == "text_encoder":
            return clip_ldm_entry(path, shape, component, CLIP_L_PREFIX)
        return open_clip_entry(path, shape, component, BIG_G_PREFIX)

    def idle_modules(self, component: str, module: nn.Module, targets: list[str]) -> list[str]:
        """CLIP-L's last layer: SDXL reads the layer before it. sd-scripts still writes its modules (the 264 names,
        with zero updates); they stay at their initial zero update here too."""
        if component != "text_encoder":
            return []
        last = f"encoder.layers.{module.config.num_hidden_layers - 1}."
        return [t for t in targets if last in f"{t}."]

    def target_problems(self, component: str, modules: list[str]) -> list[str]:
        return open_clip_attention_problems(self.label, modules) if component == "text_encoder_2" else []

    def ldm_alias(self, kohya_name: str, table: dict[str, ModuleEntry]) -> str | None:
        """ComfyUI and A1111 also apply SDXL UNet modules named by their diffusers path
        (lora_unet_down_blocks_1_attentions_0_…): the SGM name of such a module."""
        if not kohya_name.startswith(KOHYA_UNET):
            return None
        by_path = {kohya_module_name("unet", e.path): name for name, e in table.items() if e.component == "unet"}
        return by_path.get(kohya_name)

    # --- single files ---------------------------------------------------------------------------------------
    def text_encoder_to_ldm(self, state, component: str = "text_encoder"):
        if component == "text_encoder":
            return clip_to_ldm(state, CLIP_L_PREFIX)
        return open_clip_with_projection_to_ldm(state, BIG_G_PREFIX)

    def text_encoder_shapes_to_ldm(self, shapes, component: str = "text_encoder"):
        if component == "text_encoder":
            return clip_to_ldm(shapes, CLIP_L_PREFIX)
        return open_clip_with_projection_shapes_to_ldm(shapes, BIG_G_PREFIX)


@lru_cache(maxsize=4)
def _markers(path: str, mtime: float) -> frozenset[str]:
    """The marker keys a file holds (read once per file version: a .ckpt header read is a full load)."""
    from .loading import read_checkpoint_info

    return frozenset(k for k in read_checkpoint_info(Path(path)).shapes if k in (V_PRED_KEY, ZTSNR_KEY))


FAMILY = SDXL()

__all__ = ["FAMILY", "LABEL_EMB_KEY", "SDXL", "V_PRED_KEY", "ZTSNR_KEY"]
