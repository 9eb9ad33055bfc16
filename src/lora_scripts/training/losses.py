"""Diffusion training objective: noise, targets and Min-SNR weighting. Pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor


def sample_noise(latents: Tensor, noise_offset: float, generator: torch.Generator) -> Tensor:
    """Gaussian noise, plus a per-channel constant (offset noise, Guttenberg 2023) so the model can learn to
    shift the mean brightness of an image, which plain noise never teaches it."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, device=latents.device,
                                                   dtype=latents.dtype)
    return noise


def training_target(scheduler: DDPMScheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def snr(scheduler: DDPMScheduler, timesteps: Tensor) -> Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def diffusion_loss(pred: Tensor, target: Tensor, scheduler: DDPMScheduler, timesteps: Tensor,
                   min_snr_gamma: float | None) -> Tensor:
    """MSE in fp32. With Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556) each sample is weighted by
    min(SNR, gamma)/SNR for epsilon targets (min(SNR, gamma)/(SNR+1) for v), which stops easy low-noise
    timesteps from dominating the gradient."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    if min_snr_gamma is None:
        return per_sample.mean()
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=min_snr_gamma)
    weight = clipped / (s + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / s
    return (per_sample * weight).mean()
