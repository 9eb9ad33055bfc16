"""Decide a checkpoint's family from its key names and shapes, or a diffusers folder's from its configs.

diffusers' own sniffing calls anything it does not recognise SD1 and loads an SDXL file as SD1 without
complaint, so we decide ourselves: families we train recognise themselves; families we do not train yet are
named from markers only they have, so the message says what the file is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..errors import ModelLoadError
from ..formats.flux import BFL_PREFIX
from .flux import FAMILY as FLUX, IMG_IN_KEY
from .sd15 import FAMILY as SD15
from .sd2 import FAMILY as SD2
from .sdxl import FAMILY as SDXL, LABEL_EMB_KEY

# The trainable families in the order their markers are tested (the more specific first).
TRAINABLE = (FLUX, SDXL, SD2, SD15)

_UNET = "model.diffusion_model.input_blocks.0.0.weight"
_TRAINED = "this version trains Stable Diffusion 1.x, 2.x, SDXL and Flux.1 (dev, schnell)"
# Pipeline classes of families that are recognised but not trainable yet: their label.
_OTHER_PIPELINES = {"StableDiffusion3Pipeline": "an SD3", "FluxFillPipeline": "a Flux.1 Fill (inpainting)",
                    "FluxControlPipeline": "a Flux.1 Depth/Canny (control)", "FluxKontextPipeline": "a Flux.1 Kontext",
                    "Flux2Pipeline": "a Flux.2", "ChromaPipeline": "a Chroma"}
# Flux.1 variants told by the transformer's input width (img_in): text-to-image models take 64.
_FLUX_VARIANTS = {384: "a Flux.1 Fill (inpainting) model", 128: "a Flux.1 Depth or Canny (control) model"}
_REFINER = ("an SDXL refiner (it has only the OpenCLIP-bigG text encoder); LoRAs are trained on the SDXL base or a "
            "fine-tune of it (sd_xl_base_1.0.safetensors) and are used with the refiner's output as they are")


def _is_lora(keys: list[str]) -> bool:
    markers = ("lora_down", "lora_up", "lora_A", "lora_B", ".alpha", "hada_", "lokr_")
    return bool(keys) and all(any(m in k for m in markers) for k in keys[:50])


def detect_family(shapes: Mapping[str, tuple[int, ...]], path: str = "checkpoint",
                  metadata: Mapping[str, str] | None = None) -> str:
    """Return the family name ("sd15", "sd2", "sdxl"), or raise ModelLoadError saying what the file is instead."""
    keys = sorted(shapes)
    if not keys:
        raise ModelLoadError(f"{path} holds no tensors: it is empty or not a model checkpoint")
    if _is_lora(keys):
        raise ModelLoadError(
            f"{path} is a LoRA file, not a base model. Set base_model to the Stable Diffusion checkpoint the "
            "LoRA was trained on (e.g. v1-5-pruned.safetensors)."
        )
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and \
            not any(k.startswith("conditioner.embedders.1.") for k in keys):
        raise ModelLoadError(f"{path} is {_REFINER}.")
    if "edm_mean" in shapes or "edm_std" in shapes or any(k.startswith("edm_vpred.") for k in keys):
        # Keys ComfyUI reads the same way (comfy/supported_models.py): Playground v2.5 (edm_mean/edm_std, its own
        # latent scale) and EDM v-prediction files such as CosXL. SDXL's layout, another noise schedule.
        raise ModelLoadError(f"{path} is an EDM-schedule model in SDXL's layout (Playground v2.5 or CosXL: it has "
                             f"EDM keys); {_TRAINED} on SDXL's own schedule, and training this one on it would "
                             "teach the wrong noise levels. Train on an SDXL base or a fine-tune of it.")
    if any(".joint_blocks." in k for k in keys):
        raise ModelLoadError(f"{path} is an SD3 checkpoint; {_TRAINED}.")
    if any(k.endswith("single_stream_modulation.lin.weight") for k in keys):
        raise ModelLoadError(f"{path} is a Flux.2 transformer; {_TRAINED}.")
    if any(k.removeprefix(BFL_PREFIX).startswith("distilled_guidance_layer.") for k in keys):
        raise ModelLoadError(f"{path} is a Chroma transformer (Flux-like, without Flux's modulation layers); {_TRAINED}.")
    if FLUX.recognise(dict(shapes), {}):
        img_in = shapes.get(IMG_IN_KEY) or shapes.get(BFL_PREFIX + IMG_IN_KEY)
        if img_in and len(img_in) == 2 and img_in[1] != 64:
            what = _FLUX_VARIANTS.get(img_in[1], f"a Flux.1 variant with {img_in[1]} input channels")
            raise ModelLoadError(f"{path} is {what}; LoRAs are trained on Flux.1-dev or schnell (64 input "
                                 "channels) and used with it as they are.")
        if "kontext" in Path(path).name.lower():
            # Kontext's weights have dev's keys and shapes; only the name (as BFL and ComfyUI ship it) tells it.
            raise ModelLoadError(f"{path} is a Flux.1 Kontext (image editing) model by its name; {_TRAINED} "
                                 "(a Kontext LoRA is trained on image pairs). If this is a text-to-image Flux.1, "
                                 "rename the file.")
        return FLUX.name
    if any("double_blocks." in k for k in keys):
        raise ModelLoadError(f"{path} has Flux-style double_blocks but not Flux.1's layout; {_TRAINED}.")
    if _UNET in shapes and len(shapes[_UNET]) == 4 and shapes[_UNET][1] == 9:
        raise ModelLoadError(f"{path} is an inpainting checkpoint (9 input channels); {_TRAINED} text-to-image "
                             "models: train on the base model and use the LoRA with the inpainting model")
    if _UNET not in shapes:
        for family in TRAINABLE:  # one of a multi-file base's other files (Flux.1's clip_l, t5xxl, ae)
            key, what = family.file_kind(dict(shapes))
            if key is not None:
                raise ModelLoadError(f"{path} is {what}, one of {family.label}'s separate files, not a base model: "
                                     f"set {key} to it and base_model to the {family.label} {family.denoiser_label} file")
        raise ModelLoadError(
            f"{path} is not a Stable Diffusion checkpoint in the original (CompVis/LDM) layout: it has no "
            f"{_UNET!r}. Use a full single-file checkpoint such as v1-5-pruned.safetensors, or a diffusers folder."
        )
    if LABEL_EMB_KEY in shapes and \
            not any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelLoadError(f"{path} is an SDXL UNet without its text encoders (no conditioner.embedders.*): "
                             "use the full checkpoint (e.g. sd_xl_base_1.0.safetensors) or a diffusers folder.")
    if any(k.startswith("conditioner.embedders.") for k in keys) and not SDXL.recognise(dict(shapes), {}):
        # Only Stability's SGM layout (SDXL) has conditioner.embedders: never another family's file.
        raise ModelLoadError(f"{path}: an SDXL-layout checkpoint without both text encoders (conditioner.embedders.0"
                             ".transformer.* and conditioner.embedders.1.model.*) and label_emb; the file is incomplete.")
    for family in TRAINABLE:
        if family.recognise(dict(shapes), dict(metadata or {})):
            return family.name
    raise ModelLoadError(f"{path}: UNet found but no SD1.x CLIP text encoder (cond_stage_model.transformer.*); "
                         "the file is incomplete.")


def detect_folder_family(folder: Path) -> str:
    """A diffusers folder's family, from model_index.json and the component configs (never assumed)."""
    index = _read_json(folder / "model_index.json", folder)
    cls = index.get("_class_name", "")
    if cls in _OTHER_PIPELINES:
        raise ModelLoadError(f"{folder} is {_OTHER_PIPELINES[cls]} diffusers model ({cls}); {_TRAINED}.")
    configs = {name: _read_json(folder / name / "config.json", folder) for name in index
                if not name.startswith("_") and (folder / name / "config.json").is_file()}
    if cls == "FluxPipeline":
        missing = [n for n in FLUX.config_files if n != "scheduler" and n not in configs]
        if missing:
            raise ModelLoadError(f"{folder} is not a complete Flux diffusers model: {folder / missing[0] / 'config.json'} "
                                 "is missing; copy or download the whole folder again")
        width = configs["transformer"].get("in_channels", 64)
        if width != 64:
            raise ModelLoadError(f"{folder} is {_FLUX_VARIANTS.get(width, f'a Flux.1 variant ({width} inputs)')}; "
                                 "LoRAs are trained on Flux.1-dev or schnell and used with it as they are.")
        if FLUX.recognise_folder(index, configs):
            return FLUX.name
    if "unet" not in configs:
        raise ModelLoadError(f"{folder} is not a complete diffusers model: {folder / 'unet' / 'config.json'} is "
                             "missing; copy or download the whole folder again")
    if "text_encoder_2" in configs and index.get("text_encoder") in (None, [None, None]):
        raise ModelLoadError(f"{folder} is {_REFINER}.")
    if configs.get("unet", {}).get("addition_embed_type") == "text_time" and not {"text_encoder", "text_encoder_2"} <= set(configs):
        missing = sorted({"text_encoder", "text_encoder_2"} - set(configs))
        raise ModelLoadError(f"{folder} is not a complete SDXL diffusers model: {folder / missing[0] / 'config.json'} "
                             "is missing; copy or download the whole folder again")
    edm = _read_json(folder / "scheduler" / "scheduler_config.json", folder).get("_class_name", "") \
        if (folder / "scheduler" / "scheduler_config.json").is_file() else ""
    if edm.startswith("EDM") or configs.get("vae", {}).get("latents_mean") is not None:
        raise ModelLoadError(f"{folder} is an EDM-schedule model in SDXL's layout (Playground v2.5 or CosXL: "
                             f"{edm or 'its VAE has latents_mean'}); {_TRAINED} on SDXL's own schedule. Train on an "
                             "SDXL base or a fine-tune of it.")
    if configs.get("unet", {}).get("in_channels") == 9:
        raise ModelLoadError(f"{folder} is an inpainting model (9 input channels); {_TRAINED} text-to-image "
                             "models: train on the base model and use the LoRA with the inpainting model")
    for family in TRAINABLE:
        if family.recognise_folder(index, configs):
            return family.name
    act = configs.get("text_encoder", {}).get("hidden_act")
    raise ModelLoadError(f"{folder} is a diffusers {cls or 'model'} that is not Stable Diffusion 1.x, 2.x or SDXL "
                         f"(text encoder activation {act!r}); {_TRAINED}.")


def _read_json(path: Path, folder: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} is not a complete diffusers model: {path} is missing; copy or download "
                             "the whole folder again") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}; copy or download the diffusers folder again") from exc
