"""Stable Diffusion 2.x (2.0/2.1, 512-base epsilon and 768-v v-prediction, and fine-tunes): OpenCLIP ViT-H
text encoder used at its penultimate layer, 1024-d cross-attention, linear transformer projections."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError
from ..formats.open_clip import OPEN_CLIP_PREFIX, open_clip_shapes_to_ldm, open_clip_to_ldm
from .base import ModuleEntry
from .stable_diffusion import StableDiffusionFamily, open_clip_attention_problems, open_clip_entry

_UNET = "model.diffusion_model.input_blocks.0.0.weight"
_CROSS_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


class SD2(StableDiffusionFamily):
    name = "sd2"
    lora_label = "sd2"  # what `inspect` calls a LoRA file of this family
    label = "Stable Diffusion 2.x"
    base_model_version = "sd_v2"
    v2 = True
    modelspec_architecture = "stable-diffusion-v2-512/lora"
    config_package = "lora_scripts.families.configs.sd2"
    text_encoder_act = "gelu"
    cross_attention_dim = 1024
    default_resolution = 512  # 768 for 768-v models: see resolution_for
    # OpenCLIP pads with "!" (id 0), not with the end token as OpenAI's CLIP does; SD2 was trained that way.
    pad_token = "!"

    def recognise(self, shapes, metadata) -> bool:
        if _UNET not in shapes:
            return False
        return any(k.startswith(OPEN_CLIP_PREFIX) for k in shapes) or shapes.get(_CROSS_K, (0, 0))[-1] == 1024

    def resolution_for(self, prediction_type: str | None) -> int:
        return 768 if prediction_type == "v_prediction" else 512

    def unknown_prediction_type(self, path: Path) -> tuple[str, str]:
        # 512-base (epsilon) and 768-v (v) files have the same keys and shapes; guessing wrong trains a LoRA
        # against the wrong target without any error, so we ask.
        raise ModelLoadError(
            f"{path} is a Stable Diffusion 2.x checkpoint, and its file does not say whether it predicts epsilon "
            "(512-base, e.g. v2-1_512-ema-pruned) or v (768-v, e.g. v2-1_768-ema-pruned): set prediction_type: "
            "v_prediction for a 768-v model or prediction_type: epsilon for a 512-base model in the config")

    def text_encoder_entry(self, component: str, path: str, shape: tuple[int, ...]) -> ModuleEntry:
        return open_clip_entry(path, shape)

    def text_encoder_to_ldm(self, state, component="text_encoder"):
        return open_clip_to_ldm(state)

    def text_encoder_shapes_to_ldm(self, shapes, component="text_encoder"):
        return open_clip_shapes_to_ldm(shapes)

    def lora_metadata(self, prediction_type: str, variant: str = "") -> dict[str, str]:
        # As sd-scripts writes them (library/train_util.py, sai_model_spec.py). A1111 lists a LoRA under an SD2
        # model only when ss_v2 is exactly "True".
        if prediction_type != "v_prediction":
            return super().lora_metadata(prediction_type)
        return {"ss_base_model_version": "sd_v2_v", "ss_v2": str(self.v2),
                "modelspec.architecture": "stable-diffusion-v2-768-v/lora"}

    def target_problems(self, component: str, modules: list[str]) -> list[str]:
        return open_clip_attention_problems(self.label, modules) if component == "text_encoder" else []


FAMILY = SD2()
