"""The rectified-flow (flow-matching) objective of Flux.1 and the DiT families after it (SD3, Flux.2, ...).

A sample at noise level sigma in [0, 1] is the straight line between image and noise,
x_sigma = (1 - sigma) x0 + sigma noise, and the model predicts the velocity along it, noise - x0.
Which sigmas training sees matters more than anything else here; the choices the field uses for Flux LoRAs
(sd-scripts' --timestep_sampling, diffusers' --weighting_scheme):

* flux_shift (default): sigmoid of a normal sample, then shifted towards noise by the image's token count
  exactly as FluxPipeline shifts its sampling schedule (mu from 0.5 at 256 tokens to 1.15 at 4096), so
  training sees the noise levels the pipeline will ask for at that resolution;
* shift: the same with a fixed shift (discrete_flow_shift, 3.0 as SD3/Flux schedulers);
* sigmoid: sigmoid(sigmoid_scale x normal), unshifted (logit-normal, SD3 paper);
* uniform: sigma uniform in [0, 1].

Per-sample loss weights (loss_weighting): none, sigma_sqrt, cosmap, from diffusers' training_utils.
The objective has the same methods as DiffusionObjective (sample, noisy, target, loss), so the trainer and
validation need no branch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_loss_weighting_for_sd3
from torch import Tensor

from .objective import NoisedBatch, sample_noise

TIMESTEP_SAMPLING = ("flux_shift", "shift", "sigmoid", "uniform")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
# FluxPipeline's dynamic shift (FlowMatchEulerDiscreteScheduler config of Flux.1): mu grows linearly with the
# number of image tokens (16-channel latents packed 2x2) from base_shift at 256 tokens to max_shift at 4096.
BASE_SEQ, MAX_SEQ, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15
VALIDATION_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed noise levels of the validation loss


def flux_mu(image_tokens: int) -> float:
    """FluxPipeline's calculate_shift: the shift exponent for an image of this many packed tokens."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ - BASE_SEQ)
    return image_tokens * slope + (BASE_SHIFT - slope * BASE_SEQ)


def shift_sigmas(sigmas: Tensor, mu: float) -> Tensor:
    """The time shift of FlowMatchEulerDiscreteScheduler (exponential form, as Flux uses it): more noise."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


class FlowMatchingObjective:
    prediction_type = "flow"  # what modelspec and messages call it
    num_timesteps = 1000  # sigma x 1000 is what the pipelines call a timestep

    def __init__(self, timestep_sampling: str = "flux_shift", sigmoid_scale: float = 1.0,
                 discrete_flow_shift: float = 3.0, loss_weighting: str = "none", patch: int = 2):
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling {timestep_sampling!r}; expected one of {TIMESTEP_SAMPLING}")
        if loss_weighting not in LOSS_WEIGHTING:
            raise ValueError(f"loss_weighting {loss_weighting!r}; expected one of {LOSS_WEIGHTING}")
        self.timestep_sampling = timestep_sampling
        self.sigmoid_scale = sigmoid_scale
        self.discrete_flow_shift = discrete_flow_shift
        self.loss_weighting = loss_weighting
        self.patch = patch  # latent cells per token side (Flux packs 2x2)

    def describe(self) -> str:
        how = {"flux_shift": "resolution-dependent shift as FluxPipeline",
               "shift": f"shift {self.discrete_flow_shift:g}", "sigmoid": f"logit-normal, scale {self.sigmoid_scale:g}",
               "uniform": "uniform"}[self.timestep_sampling]
        weight = "" if self.loss_weighting == "none" else f", {self.loss_weighting} loss weighting"
        return f"flow matching (timesteps: {how}{weight})"

    def image_tokens(self, latents: Tensor) -> int:
        return (latents.shape[-2] // self.patch) * (latents.shape[-1] // self.patch)

    def sample_sigmas(self, latents: Tensor, generator: torch.Generator) -> Tensor:
        n, device = latents.shape[0], latents.device
        if self.timestep_sampling == "uniform":
            return torch.rand((n,), generator=generator, device=device)
        sigmas = torch.sigmoid(self.sigmoid_scale * torch.randn((n,), generator=generator, device=device))
        if self.timestep_sampling == "shift":
            s = self.discrete_flow_shift
            return s * sigmas / (1 + (s - 1) * sigmas)
        if self.timestep_sampling == "flux_shift":
            return shift_sigmas(sigmas, flux_mu(self.image_tokens(latents)))
        return sigmas

    def sample(self, latents: Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> NoisedBatch:
        """Noise and sigmas drawn from `generator` only (a resumed run redraws the same)."""
        noise = sample_noise(latents, noise_offset, generator)
        return self.noisy(latents, noise, self.sample_sigmas(latents, generator))

    def noisy(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> NoisedBatch:
        """timesteps: sigmas in [0, 1], one per sample (what the Flux transformer is given as its timestep)."""
        s = timesteps.to(latents.device, latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
        return NoisedBatch(latents, noise, timesteps, (1 - s) * latents + s * noise)

    def target(self, batch: NoisedBatch) -> Tensor:
        return batch.noise - batch.latents

    def validation_timesteps(self) -> tuple[float, ...]:
        return VALIDATION_SIGMAS

    def loss(self, pred: Tensor, batch: NoisedBatch, min_snr_gamma: float | None = None) -> Tensor:
        """MSE in fp32, each sample weighted by loss_weighting. min_snr_gamma belongs to DDPM objectives (the
        config refuses it with a flow-matching base)."""
        per_sample = F.mse_loss(pred.float(), self.target(batch).float(), reduction="none")
        per_sample = per_sample.mean(dim=list(range(1, pred.ndim)))
        if self.loss_weighting == "none":
            return per_sample.mean()
        weight = compute_loss_weighting_for_sd3(self.loss_weighting, batch.timesteps.float().clamp(min=1e-4))
        return (per_sample * weight).mean()


__all__ = ["FlowMatchingObjective", "LOSS_WEIGHTING", "TIMESTEP_SAMPLING", "flux_mu", "shift_sigmas"]
