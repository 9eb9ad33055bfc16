"""The training step of diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py, restated as the
reference our SDXL step is timed against (benchmarks/train_step.py --model sdxl).

What it does, in the example's order: UNet LoRA rank = alpha = 4 with gaussian init on to_k/to_q/to_v/to_out.0
(`unet.add_adapter`), the UNet and both text encoders in the weight dtype and the VAE in fp32 (the example's
default without a fixed VAE, "to avoid NaN losses"), AdamW lr 1e-4 / betas 0.9, 0.999 / weight decay 1e-2 /
eps 1e-8 over the trainable parameters; per step: VAE encode + sample, scaled and cast to the weight dtype,
randn_like noise, randint timesteps, add_noise, time ids = original size + crop top-left + target size per
image, both text encoders every step (penultimate hidden states concatenated, the second's pooled output),
the UNet with added_cond_kwargs, fp32 MSE to the epsilon or v target, gather for logging, backward,
clip_grad_norm_ 1.0, optimizer and scheduler step, zero_grad. Written here, not copied: the upstream file is
Apache-2.0; this module restates its step for measurement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ReferenceSDXLLoop:
    def __init__(self, model, accelerator, rank: int = 4, learning_rate: float = 1e-4):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.accelerator = accelerator
        self.unet, self.vae = model.modules["unet"], model.modules["vae"]
        self.text_encoders = [model.modules["text_encoder"], model.modules["text_encoder_2"]]
        self.noise_scheduler = model.schedule
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.requires_grad_(False)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        self.unet.to(accelerator.device, dtype=self.weight_dtype)
        self.vae.to(accelerator.device, dtype=torch.float32)
        for te in self.text_encoders:
            te.to(accelerator.device, dtype=self.weight_dtype)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        if accelerator.mixed_precision == "fp16":
            cast_training_params(self.unet, dtype=torch.float32)
        self.params = list(filter(lambda p: p.requires_grad, self.unet.parameters()))
        optimizer = torch.optim.AdamW(self.params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-08)
        scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10**6)
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(self.unet, optimizer, scheduler)

    def _time_ids(self, original_size, crop_top_left, resolution: int) -> torch.Tensor:
        ids = torch.tensor([list(original_size) + list(crop_top_left) + [resolution, resolution]])
        return ids.to(self.accelerator.device, dtype=self.weight_dtype)

    def _encode_prompt(self, ids_list):
        embeds, pooled = [], None
        for te, ids in zip(self.text_encoders, ids_list):
            out = te(ids.to(te.device), output_hidden_states=True, return_dict=False)
            pooled = out[0]
            embeds.append(out[-1][-2])
        hidden = torch.concat(embeds, dim=-1)
        return hidden, pooled.view(hidden.shape[0], -1)

    def step(self, batch: dict) -> float:
        acc, unet, vae, sched = self.accelerator, self.unet, self.vae, self.noise_scheduler
        unet.train()
        with acc.accumulate(unet):
            model_input = vae.encode(batch["pixel_values"].to(torch.float32)).latent_dist.sample()
            model_input = (model_input * vae.config.scaling_factor).to(self.weight_dtype)
            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), device=model_input.device).long()
            noisy = sched.add_noise(model_input, noise, timesteps)
            resolution = batch["pixel_values"].shape[-1]
            time_ids = torch.cat([self._time_ids(s, c, resolution)
                                  for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"])])
            hidden, pooled = self._encode_prompt([batch["input_ids_one"], batch["input_ids_two"]])
            added = {"time_ids": time_ids, "text_embeds": pooled}
            pred = unet(noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
            if sched.config.prediction_type == "epsilon":
                target = noise
            elif sched.config.prediction_type == "v_prediction":
                target = sched.get_velocity(model_input, noise, timesteps)
            else:
                raise ValueError(f"Unknown prediction type {sched.config.prediction_type}")
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            train_loss = acc.gather(loss.repeat(bsz)).mean().item()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return train_loss
