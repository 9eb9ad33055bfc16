"""Pretrain the toy base model from scratch: `lora-scripts toy build-base` (about 20 minutes on 2 CPU cores).

An SD1.x pipeline in miniature - same diffusers/transformers classes, same LDM key layout, the real CLIP
tokenizer - trained on procedurally drawn base scenes only (never the neon style or the robotic arm), so a
LoRA's effect on it can be seen and measured. Deterministic for a seed on a given machine and thread count
(CPU float reductions are not bit-identical across thread counts).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..families.saving import save_ldm_checkpoint
from ..data.images import images_to_batch
from ..families import FAMILIES
from ..families.objective import DiffusionObjective
from ..families.clip_tokenizer import clip_tokenizer
from .scenes import COLOURS, NEON, POSITIONS, SHAPES, Scene, arm_items, generic_image, neon_items, random_scene, render

log = logging.getLogger(__name__)
SIZE = 32  # pixels; the VAE halves it to 16x16 latents
# `toy build-base --quick`: checks the whole build in seconds (what CI can afford); draws nothing.
QUICK_BUILD = {"vae_steps": 4, "unet_steps": 4, "n_latents": 64, "batch": 8}

_UNET = dict(block_out_channels=[32, 64, 64], layers_per_block=1, sample_size=SIZE // 2, cross_attention_dim=64,
             attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=32)
_VAE = dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32,
            sample_size=SIZE, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
_CLIP = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", bos_token_id=49406,
             eos_token_id=49407, pad_token_id=49407)


# SD1.5's betas, rescaled to zero terminal SNR, with v-prediction (Lin et al. 2023, "Common Diffusion Noise
# Schedules and Sample Steps are Flawed"). With SD1.5's own schedule the last timestep still holds 7 % of the
# image, so the model learns to read the background colour from the noise instead of the prompt, and from
# pure noise at sampling time it painted every background the same light beige. The schedule travels in the
# checkpoint's metadata, so LoRA training and sampling use it too.
_SCHEDULER = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")


def toy_configs(scaling_factor: float = 1.0) -> dict[str, dict[str, Any]]:
    configs = copy.deepcopy(FAMILIES["sd15"].embedded_configs())
    configs["unet"].update(_UNET)
    configs["vae"].update(_VAE, scaling_factor=scaling_factor)
    configs["text_encoder"].update(_CLIP)
    configs["scheduler"].update(_SCHEDULER)
    return configs


def train_vae(vae: AutoencoderKL, steps: int, batch: int, seed: int) -> None:
    """Half base scenes, half random generic shapes (neon colours, outlines, glow) so it can also draw what
    only the LoRAs will teach the UNet."""
    rng = random.Random(f"vae/{seed}")
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    for step in range(steps):
        ims = [render(random_scene(rng), SIZE, rng) if i % 2 else generic_image(rng, SIZE) for i in range(batch)]
        x = images_to_batch(ims)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            psnr = 10 * torch.log10(4.0 / F.mse_loss(recon.clamp(-1, 1), x)).item()
            log.info("vae step %d/%d loss %.4f psnr %.1f dB", step, steps, loss.item(), psnr)


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(f"latents/{seed}")
    scenes = [random_scene(rng) for _ in range(n)]
    latents = []
    for i in range(0, n, 256):
        chunk = scenes[i : i + 256]
        latents.append(vae.encode(images_to_batch([render(s, SIZE, rng) for s in chunk])).latent_dist.mean)
    return torch.cat(latents), [s.caption for s in scenes]


@torch.no_grad()
def center_latents(vae: AutoencoderKL, mean: torch.Tensor) -> None:
    """Shift the latent space to zero mean per channel without changing what the VAE does: subtract the mean
    in quant_conv's bias (the encoder's last layer) and add it back through post_quant_conv's bias (the
    decoder's first). Latents with large channel means (here up to -1.5) are what SD's noise schedule handles
    worst: the base then cannot reach black or white backgrounds and tints everything."""
    c = mean.numel()
    vae.quant_conv.bias[:c] -= mean
    vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mean


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_unet(unet, text_encoder, latents: torch.Tensor, captions: list[str], steps: int, batch: int,
               seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """UNet and text encoder trained jointly on the zero-terminal-SNR schedule (v-prediction), 10 % empty
    captions (for CFG) and an EMA of the weights."""
    tok = clip_tokenizer()
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    noise_sched = DDPMScheduler.from_config(toy_configs()["scheduler"])
    objective = DiffusionObjective(noise_sched)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=8e-4, weight_decay=1e-2)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[idx]
        batch_ids = ids[idx].clone()
        batch_ids[torch.rand(batch, generator=g) < 0.1] = empty
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, text_encoder(batch_ids)[0]).sample
        loss = F.mse_loss(pred, objective.target(objective.noisy(x0, noise, t)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warm.step()
        decay = min(0.999, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_te, text_encoder, decay)
        if step % 100 == 0 or step == steps - 1:
            log.info("unet step %d/%d loss %.4f", step, steps, loss.item())
    return ema_unet, ema_te


def toy_token_ids() -> set[int]:
    """Every token any toy caption uses (base, style and subject sets) plus the specials."""
    words = {w for cap in [s.caption for s in _all_scene_kinds()] + [c for _, c in neon_items(40, SIZE, 0)]
             + [c for _, c in arm_items(20, SIZE, 0)] for w in cap.replace(",", " , ").split()}
    tok = clip_tokenizer()
    return {i for w in words for i in tok(w).input_ids} | {tok.bos_token_id, tok.eos_token_id}


def _all_scene_kinds() -> list[Scene]:
    from .scenes import BACKGROUNDS

    return [Scene(s, c, b, p) for s in SHAPES + ("robotic arm",) for c in list(COLOURS) + list(NEON)
            for b in BACKGROUNDS for p in POSITIONS]


def build_base(out: Path, seed: int = 0, vae_steps: int = 1100, unet_steps: int = 3000, n_latents: int = 12000,
               batch: int = 32, reuse_vae: Path | None = None) -> Path:
    """reuse_vae: take the VAE of an earlier toy checkpoint instead of training one (saves ~10 minutes)."""
    started = time.time()
    torch.manual_seed(seed)
    configs = toy_configs()
    if reuse_vae:
        from ..families.loading import load_base_model

        vae = load_base_model(reuse_vae).vae
    else:
        vae = AutoencoderKL.from_config(configs["vae"])
        train_vae(vae, vae_steps, batch, seed)
    vae.eval().requires_grad_(False)
    latents, _ = encode_scenes(vae, min(n_latents, 2048), seed)
    center_latents(vae, latents.mean(dim=(0, 2, 3)))
    latents, captions = encode_scenes(vae, n_latents, seed)
    # SD's convention: scale latents to unit variance so the noise schedule means the same thing.
    scaling = float(1.0 / latents.std())
    configs = toy_configs(scaling)
    log.info("latent channel means %s, std %.3f -> scaling_factor %.4f",
             [round(v, 3) for v in latents.mean(dim=(0, 2, 3)).tolist()], 1 / scaling, scaling)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if k != "architectures"}))
    unet, text_encoder = train_unet(unet, text_encoder, latents * scaling, captions, unet_steps, batch, seed)
    vae.register_to_config(scaling_factor=scaling)
    # Rows of tokens no toy caption uses were never trained; zeroing them lets git compress the 49,408-row
    # embedding of the real CLIP vocabulary to almost nothing (the file itself stays loadable as is).
    keep = torch.zeros(_CLIP["vocab_size"], dtype=torch.bool)
    keep[list(toy_token_ids())] = True
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[~keep] = 0.0
    path = save_ldm_checkpoint(out, unet, vae, text_encoder, configs, torch.float16)
    log.info("wrote %s (%.1f MB) in %.1f min", path, path.stat().st_size / 1e6, (time.time() - started) / 60)
    return path
