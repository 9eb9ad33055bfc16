"""The denoising objective of DDPM-trained families (SD1.x, SD2.x, SDXL): timesteps, noise, the prediction
target (epsilon or v) and the loss weighting. Written once; the trainer and validation both use it.

A family with another objective (flow matching, with the first DiT family) provides another class with the
same methods: `sample`, `noisy`, `target`, `loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)  # of 1000; spread over the schedule, the same for every run


@dataclass(frozen=True)
class NoisedBatch:
    latents: Tensor  # clean latents x0
    noise: Tensor
    timesteps: Tensor
    noisy: Tensor  # what the denoiser sees


class DiffusionObjective:
    """schedule: the family's DDPM noise schedule (betas, alphas_cumprod) with the prediction type set."""

    def __init__(self, schedule: DDPMScheduler):
        kind = schedule.config.prediction_type
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {kind!r}; expected one of {PREDICTION_TYPES}")
        self.schedule = schedule

    @property
    def prediction_type(self) -> str:
        return self.schedule.config.prediction_type

    @property
    def num_timesteps(self) -> int:
        return self.schedule.config.num_train_timesteps

    def describe(self) -> str:
        zsnr = " with a zero-terminal-SNR schedule" if self.schedule.config.get("rescale_betas_zero_snr") else ""
        return f"{'v-prediction' if self.prediction_type == 'v_prediction' else 'epsilon'}{zsnr}"

    def sample(self, latents: Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> NoisedBatch:
        """Uniform timesteps and Gaussian noise, all drawn from `generator` (a resumed run redraws the same)."""
        noise = sample_noise(latents, noise_offset, generator)
        timesteps = torch.randint(0, self.num_timesteps, (latents.shape[0],), generator=generator,
                                  device=latents.device).long()
        return self.noisy(latents, noise, timesteps)

    def noisy(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> NoisedBatch:
        return NoisedBatch(latents, noise, timesteps, self.schedule.add_noise(latents, noise, timesteps))

    def validation_timesteps(self) -> tuple[int, ...]:
        """The fixed noise levels the validation loss is measured at."""
        return VALIDATION_TIMESTEPS

    def target(self, batch: NoisedBatch) -> Tensor:
        if self.prediction_type == "epsilon":
            return batch.noise
        return self.schedule.get_velocity(batch.latents, batch.noise, batch.timesteps)

    def snr(self, timesteps: Tensor) -> Tensor:
        alphas_cumprod = self.schedule.alphas_cumprod.to(timesteps.device)[timesteps].float()
        return alphas_cumprod / (1.0 - alphas_cumprod)

    def loss(self, pred: Tensor, batch: NoisedBatch, min_snr_gamma: float | None = None) -> Tensor:
        """MSE in fp32. With Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556) each sample is weighted by
        min(SNR, gamma)/SNR for epsilon targets (min(SNR, gamma)/(SNR+1) for v), which stops easy low-noise
        timesteps from dominating the gradient. A zero-terminal-SNR schedule has SNR 0 at its last step: the
        epsilon weight there would divide by zero, so it is clamped (that step's epsilon target is degenerate
        anyway, which is why such schedules are used with v-prediction)."""
        target = self.target(batch)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        if min_snr_gamma is None:
            return per_sample.mean()
        s = self.snr(batch.timesteps)
        clipped = torch.clamp(s, max=min_snr_gamma)
        if self.prediction_type == "v_prediction":
            weight = clipped / (s + 1)
        else:
            weight = clipped / s.clamp(min=1e-8)
        return (per_sample * weight).mean()


def sample_noise(latents: Tensor, noise_offset: float, generator: torch.Generator) -> Tensor:
    """Gaussian noise, plus a per-channel constant (offset noise, Guttenberg 2023) so the model can learn to
    shift the mean brightness of an image, which plain noise never teaches it."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, device=latents.device,
                                                   dtype=latents.dtype)
    return noise
