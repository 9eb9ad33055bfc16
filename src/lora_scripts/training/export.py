"""LoRA state dicts + run facts -> .safetensors files (kohya/A1111 layout, and optionally diffusers')."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..atomic import atomic_save_safetensors
from ..config import TrainConfig
from ..dtypes import DTYPES
from ..families import Family
from ..formats.diffusers import peft_to_diffusers
from ..formats.kohya import peft_to_kohya
from ..formats.dora import PEFT_KEY as DORA_KEY, file_shape
from ..formats.lycoris import peft_to_lycoris
from ..hashes import modelspec_hash, sshs_hashes
from .optimizers import optimizer_label



@dataclass
class RunFacts:
    """What the metadata says about the run, beyond the config."""

    family: Family
    base_model_name: str
    base_model_hash: str  # A1111's full SHA-256 of the checkpoint file
    base_model_legacy_hash: str
    num_train_images: int
    num_batches_per_epoch: int
    tag_frequency: dict[str, dict[str, int]]
    dataset_dirs: dict[str, dict[str, int]]
    started_at: float = field(default_factory=time.time)
    session_id: int = 0
    prediction_type: str = "epsilon"  # the base's; "v_prediction" for v-models (SD2-768, zero-terminal-SNR bases)
    variant: str = ""  # the base's variant where the file names it (Flux.1: dev, schnell)


def tag_frequency(captions_by_dir: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per folder, how often each comma-separated tag occurs (A1111 shows it)."""
    return {d: dict(Counter(t.strip() for c in caps for t in c.split(",") if t.strip())) for d, caps in captions_by_dir.items()}


def network_args(config: TrainConfig) -> dict[str, Any]:
    """ss_network_args: the targets, and conv_dim/conv_alpha as sd-scripts records them (strings)."""
    args: dict[str, Any] = {"lora_targets": config.lora_targets}
    if config.conv_rank is not None:
        args.update(conv_dim=str(config.conv_rank), conv_alpha=f"{config.conv_alpha_value:g}")
    if config.network_type in LYCORIS_TYPES:  # as LyCORIS' kohya wrapper records them
        args["algo"] = config.network_type
        if config.network_type == "lokr":
            args["factor"] = str(config.lokr_factor)
    if config.block_lr:  # sd-scripts records its down/mid/up_lr_weight here too
        args["block_lr"] = config.block_lr
    if config.network_type == "dora":  # LyCORIS' LoCon with weight decomposition on the input axis
        args.update(algo="lora" if config.conv_rank is None else "locon", dora_wd="True", wd_on_output="False")
    return args


LYCORIS_TYPES = ("loha", "lokr")
DORA_SUFFIX = "." + DORA_KEY  # the magnitude's key in peft's state dict


def kohya_metadata(config: TrainConfig, facts: RunFacts, step: int, epoch: int, max_steps: int) -> dict[str, str]:
    base = facts.family.lora_metadata(facts.prediction_type, facts.variant)  # how A1111 files the LoRA: by its base
    ss: dict[str, Any] = {
        "ss_session_id": facts.session_id, "ss_training_started_at": facts.started_at,
        "ss_training_finished_at": time.time(), "ss_output_name": config.name,
        "ss_network_module": "lycoris.kohya" if config.network_type in LYCORIS_TYPES + ("dora",) else "networks.lora",
        "ss_network_dim": config.lora_rank, "ss_network_alpha": config.alpha,
        "ss_network_dropout": config.lora_dropout, "ss_network_args": json.dumps(network_args(config)),
        "ss_base_model_version": base["ss_base_model_version"], "ss_v2": base["ss_v2"],
        "ss_sd_model_name": facts.base_model_name, "ss_new_sd_model_hash": facts.base_model_hash,
        "ss_sd_model_hash": facts.base_model_legacy_hash, "ss_steps": step, "ss_epoch": epoch,
        "ss_num_epochs": config.epochs, "ss_max_train_steps": max_steps,
        "ss_num_train_images": facts.num_train_images, "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch, "ss_batch_size_per_device": config.batch_size,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_learning_rate": config.learning_rate, "ss_unet_lr": config.learning_rate,
        "ss_text_encoder_lr": config.te_lr if config.train_text_encoder else None,
        "ss_network_train_unet_only": not config.train_text_encoder,
        "ss_lr_scheduler": config.lr_scheduler, "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_optimizer": optimizer_label(config), "ss_max_grad_norm": config.max_grad_norm,
        "ss_mixed_precision": config.mixed_precision, "ss_full_fp16": False, "ss_seed": config.seed,
        "ss_resolution": f"({config.resolution}, {config.resolution})", "ss_enable_bucket": config.enable_bucket,
        "ss_min_bucket_reso": config.bucket_range[0], "ss_max_bucket_reso": config.bucket_range[1],
        "ss_flip_aug": config.flip_aug, "ss_random_crop": config.random_crop,
        "ss_shuffle_caption": config.shuffle_caption, "ss_keep_tokens": config.keep_tokens,
        "ss_caption_dropout_rate": config.caption_dropout, "ss_caption_tag_dropout_rate": config.caption_tag_dropout,
        "ss_noise_offset": config.noise_offset or None,
        "ss_min_snr_gamma": config.min_snr_gamma, "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_clip_skip": None, "ss_v_parameterization": facts.prediction_type == "v_prediction", "ss_cache_latents": False,
        "ss_tag_frequency": json.dumps(facts.tag_frequency), "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
    }
    if config.max_token_length > 75:  # as sd-scripts records it (left out at the default, as before)
        ss["ss_max_token_length"] = config.max_token_length
    ss.update(facts.family.training_metadata(config))  # the family's own keys (Flux: guidance, timestep sampling)
    return {k: str(v) for k, v in ss.items()}


def modelspec_metadata(config: TrainConfig, facts: RunFacts, state: dict[str, Tensor]) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": facts.family.lora_metadata(facts.prediction_type, facts.variant)["modelspec.architecture"],
        "modelspec.implementation": "diffusers",
        "modelspec.title": config.name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(facts.started_at)),
        # The spec's values are "epsilon" and "v" (sd-scripts' sai_model_spec writes them so).
        "modelspec.prediction_type": "v" if facts.prediction_type == "v_prediction" else facts.prediction_type,
        "modelspec.hash_sha256": modelspec_hash(state),
    }


def kohya_file_contents(
    config: TrainConfig, facts: RunFacts, states: dict[str, dict[str, Tensor]], step: int, epoch: int, max_steps: int,
    scales: dict[str, dict[str, tuple[int, float]]] | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors cast to save_precision (alpha included, as kohya does) and the full metadata with its hashes.
    scales: for LoHa/LoKr, each layer's (r, alpha) (training.adapters.adapter_scales)."""
    dtype = DTYPES[config.save_precision]
    if config.network_type in LYCORIS_TYPES:
        kohya = peft_to_lycoris(states, scales or {}, facts.family.kohya_name, facts.family.fused_slot)
    else:
        dora = {c: {k: v for k, v in s.items() if k.endswith(DORA_SUFFIX)} for c, s in states.items()}
        plain = {c: {k: v for k, v in s.items() if not k.endswith(DORA_SUFFIX)} for c, s in states.items()}
        kohya = peft_to_kohya(plain, {c: config.alpha for c in states}, facts.family.kohya_name,
                              config.conv_alpha_value, facts.family.fused_slot)
        for component, scales in dora.items():  # input-axis magnitudes as A1111/ComfyUI read them
            for key, scale in scales.items():
                name = facts.family.kohya_name(component, key.removesuffix(DORA_SUFFIX))
                kohya[f"{name}.dora_scale"] = file_shape(scale, kohya[f"{name}.lora_down.weight"].dim())
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sorted(kohya.items())}
    meta = kohya_metadata(config, facts, step, epoch, max_steps)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sshs_hashes(state, meta)
    meta.update(modelspec_metadata(config, facts, state))
    return state, meta


def save_kohya(path: Path, state: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    return atomic_save_safetensors(state, path, metadata)


def save_diffusers(path: Path, config: TrainConfig, states: dict[str, dict[str, Tensor]],
                   lora_configs: dict[str, dict[str, Any]], base: dict[str, str] | None = None) -> Path:
    """base: the family's ss_base_model_version/modelspec keys, so `inspect` and `convert` know the family of a
    file whose names alone do not tell (diffusers reads only its own key)."""
    dtype = DTYPES[config.save_precision]
    tensors, meta = peft_to_diffusers(states, lora_configs)
    return atomic_save_safetensors({k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}, path,
                                   {**(base or {}), **meta})
