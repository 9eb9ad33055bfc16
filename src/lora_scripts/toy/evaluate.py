"""Measure a LoRA on the toy world: sample grids at several strengths, the style/subject statistics, and a
held-out denoising loss with and without the LoRA."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import images_to_batch
from ..families.loading import load_base_model
from ..families.objective import DiffusionObjective
from ..generation.pipelines import LoraSet, generate, make_pipeline


@dataclass
class Sampler:
    """A toy pipeline with LoRAs loaded once; `images` renders every prompt x seed at the given strengths."""

    pipe: object
    loras: LoraSet
    size: tuple[int, int]  # (height, width) the base draws at

    @classmethod
    def open(cls, base: Path, loras: dict[str, Path] | None = None) -> "Sampler":
        model = load_base_model(base)
        pipe = make_pipeline(model)
        lora_set = LoraSet(pipe, model.family)
        for name, path in (loras or {}).items():
            lora_set.load(name, path)
        return cls(pipe, lora_set, model.native_size)

    def images(self, prompts: Sequence[str], seeds: Sequence[int], weights: dict[str, float],
               steps: int = 25, cfg: float = 5.0) -> list[Image.Image]:
        self.loras.apply(weights)
        return [im for p in prompts for im in generate(self.pipe, p, seeds, self.size, steps=steps, cfg=cfg)]

    @torch.no_grad()
    def denoising_loss(self, images: Sequence[Image.Image], captions: Sequence[str], weights: dict[str, float],
                       seed: int = 0, timesteps: Sequence[int] = (100, 300, 500, 700, 900)) -> float:
        """Mean MSE to the model's own prediction target (epsilon or v) over fixed noise and timesteps: the
        training loss on data the LoRA never saw."""
        self.loras.apply(weights)
        pipe = self.pipe
        latents = pipe.vae.encode(images_to_batch(images)).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(list(captions), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
        sched = pipe.scheduler
        objective = DiffusionObjective(sched)
        g = torch.Generator().manual_seed(seed)
        losses = []
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=g)
            tt = torch.full((len(images),), t, dtype=torch.long)
            alphas = sched.alphas_cumprod[tt].view(-1, 1, 1, 1)
            noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
            target = objective.target(objective.noisy(latents, noise, tt))
            losses.append(F.mse_loss(pipe.unet(noisy, tt, hidden).sample, target).item())
        return float(np.mean(losses))
