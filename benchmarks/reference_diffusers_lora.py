"""The training step of diffusers' examples/text_to_image/train_text_to_image_lora.py, statement by statement,
as the reference our trainer is timed against (benchmarks/train_step.py).

Mirrors huggingface/diffusers at commit 58eb52c0803ea9af3abec60841c2a093bdf1f951 (the file was last changed
in c56add8081be60b7e8794e011f1790d0e37aeced): set-up lines 519-545 and 567 (freeze, weight_dtype, LoraConfig
rank=alpha=4 with gaussian init on to_k/to_q/to_v/to_out.0, cast to weight_dtype, add_adapter,
cast_training_params for fp16, trainable-parameter filter), the AdamW of lines 586-592 with the script's
defaults (lr 1e-4, betas 0.9/0.999, weight decay 1e-2, eps 1e-8), and the loop body of lines 866-934 (VAE
encode + sample every step, randn_like noise, randint timesteps, add_noise, text encoder every step,
epsilon/v target, unet forward, fp32 MSE, gather for logging, backward, clip_grad_norm_ 1.0, optimizer and
scheduler step, zero_grad). Only the torchvision transforms (Resize bilinear, RandomCrop, ToTensor,
Normalize 0.5) are replaced by PIL/numpy equivalents, run before the timed region. Written here, not copied:
the upstream file is Apache-2.0; this module restates its step for measurement.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def reference_pixels(path, resolution: int, rng: random.Random) -> torch.Tensor:
    """transforms.Resize(resolution, BILINEAR) + RandomCrop(resolution) + ToTensor + Normalize([0.5], [0.5])."""
    im = Image.open(path).convert("RGB")
    scale = resolution / min(im.size)
    im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
                   Image.Resampling.BILINEAR)
    left, top = rng.randint(0, im.width - resolution), rng.randint(0, im.height - resolution)
    im = im.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return (torch.from_numpy(arr.transpose(2, 0, 1).copy()) - 0.5) / 0.5


class ReferenceLoop:
    def __init__(self, model, accelerator, rank: int = 4, learning_rate: float = 1e-4):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.accelerator = accelerator
        self.unet, self.vae, self.text_encoder = model.unet, model.vae, model.text_encoder
        self.noise_scheduler = model.noise_scheduler
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.weight_dtype = torch.float32
        if accelerator.mixed_precision == "fp16":
            self.weight_dtype = torch.float16
        elif accelerator.mixed_precision == "bf16":
            self.weight_dtype = torch.bfloat16
        unet_lora_config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                      target_modules=["to_k", "to_q", "to_v", "to_out.0"])
        self.unet.to(accelerator.device, dtype=self.weight_dtype)
        self.vae.to(accelerator.device, dtype=self.weight_dtype)
        self.text_encoder.to(accelerator.device, dtype=self.weight_dtype)
        self.unet.add_adapter(unet_lora_config)
        if accelerator.mixed_precision == "fp16":
            cast_training_params(self.unet, dtype=torch.float32)
        self.lora_layers = list(filter(lambda p: p.requires_grad, self.unet.parameters()))
        optimizer = torch.optim.AdamW(self.lora_layers, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2,
                                      eps=1e-08)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10**6)
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(self.unet, optimizer, lr_scheduler)
        self.train_batch_size = None

    def step(self, batch: dict) -> float:
        acc, unet, vae, noise_scheduler = self.accelerator, self.unet, self.vae, self.noise_scheduler
        unet.train()
        with acc.accumulate(unet):
            latents = vae.encode(batch["pixel_values"].to(dtype=self.weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
            timesteps = timesteps.long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = self.text_encoder(batch["input_ids"], return_dict=False)[0]
            if noise_scheduler.config.prediction_type == "epsilon":
                target = noise
            elif noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            avg_loss = acc.gather(loss.repeat(bsz)).mean()
            train_loss = avg_loss.item()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.lora_layers, 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return train_loss
