"""Validation loss: the training objective on images the LoRA never trains on, with the noise and timesteps
fixed per image, so the number is comparable between steps of one run and between runs.

Latents come from the VAE's mean (no sampling) and are encoded once; captions are re-encoded each time
because the text encoder may be training. The loss is plain MSE to the prediction target (no Min-SNR
weighting), whatever the run's settings, so runs with different loss settings stay comparable.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.dataset import build_items
from ..data.images import fit_and_place, open_rgb, to_tensor
from ..data.scan import Sample, scan_dataset
from ..families import Model

def split_samples(samples: list[Sample], config: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """(train, validation). validation_split holds out a seed-chosen share (at least one image);
    validation_dir reads a separate folder with the same rules as the training folder."""
    if config.validation_dir:
        metadata = config.validation_dir / "metadata.csv"
        val_cfg = config.model_copy(update={"train_data_dir": config.validation_dir,
                                            "metadata_path": metadata if metadata.is_file() else None})
        return samples, scan_dataset(val_cfg)
    if not config.validation_split:
        return samples, []
    n = max(1, round(len(samples) * config.validation_split))
    if n >= len(samples):
        from ..errors import DatasetError

        raise DatasetError([f"validation_split {config.validation_split} of {len(samples)} images leaves none to train on"],
                           "Lower validation_split or add images.")
    held = set(random.Random(f"{config.seed}/validation").sample(range(len(samples)), n))
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


class Validator:
    """config, accelerator, the loaded model and the networks the step runs (`trained`: prepared where they
    train): what the loss needs, not the trainer."""

    def __init__(self, config: TrainConfig, accelerator, model: Model, trained: dict[str, torch.nn.Module],
                 samples: list[Sample], weight_dtype: torch.dtype):
        self.config, self.accelerator, self.model, self.trained = config, accelerator, model, trained
        self.weight_dtype = weight_dtype
        self.items = build_items([Sample(s.path, s.caption, 1, s.size) for s in samples], config)
        self._latents: list[torch.Tensor] | None = None
        self._placements: list[torch.Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def due(self, step: int) -> bool:
        every = self.config.validate_every_n_steps
        return bool(self.items and every and step % every == 0)

    @torch.no_grad()
    def _encode(self) -> list[torch.Tensor]:
        if self._latents is None:
            vae, device = self.model.vae, self.accelerator.device
            self._latents = []
            for item in self.items:
                im, place = fit_and_place(open_rgb(item.sample.path), item.bucket, None)
                pixels = to_tensor(im, flip=False)
                self._placements.append(place.ids()[None].to(device))
                dist = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist
                self._latents.append(self.model.family.latents(vae, dist.mean.float()))
        return self._latents

    @torch.no_grad()
    def loss(self) -> float:
        model, acc, family = self.model, self.accelerator, self.model.family
        nets = {n: acc.unwrap_model(m) for n, m in self.trained.items() if n != family.autoencoder}
        was = {n: m.training for n, m in nets.items()}
        for m in nets.values():
            m.eval()
        encoders = {n: nets[n] for n in family.text_encoders}
        total, count = 0.0, 0
        try:
            for i, (item, latents) in enumerate(zip(self.items, self._encode())):
                tokens = family.tokenize(model.tokenizers, [item.sample.caption], model.token_chunks)
                cond = family.encode(encoders, tokens, acc.device)
                for ts in model.objective.validation_timesteps():
                    g = torch.Generator().manual_seed(hash((self.config.seed, i, ts)) & 0x7FFF_FFFF)
                    noise = torch.randn(latents.shape, generator=g).to(latents.device)
                    step = torch.tensor([ts], device=latents.device)
                    noised = model.objective.noisy(latents, noise, step)
                    with acc.autocast():
                        pred = family.predict(nets[family.denoiser], noised.noisy.to(self.weight_dtype), step,
                                              cond.to(acc.device, self.weight_dtype), self._placements[i],
                                              **model.predict_options)
                    total += F.mse_loss(pred.float(), model.objective.target(noised).float()).item()
                    count += 1
        finally:
            for n, m in nets.items():
                m.train(was[n])
        return total / count
