"""The training step of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py, restated as the reference
our Flux step is timed against (benchmarks/train_step.py --model flux_reduced).

What it does, in the example's order: transformer LoRA rank = alpha = 4 with gaussian init on peft's
`to_k`/`to_q`/`to_v`/`to_out.0` (the attention projections of the double blocks, q/k/v of the single ones),
all frozen weights in the weight dtype (VAE included), AdamW lr 1e-4 / betas 0.9, 0.999 / weight decay 1e-4
/ eps 1e-8; per step with per-image captions: both text encoders (CLIP-L pooled, T5 hidden states, text ids
zero), VAE encode + sample, (x - shift) x scale, randn_like noise, timesteps drawn uniformly from the
scheduler's 1000 (static shift 3.0 of its config) and their sigmas, x_sigma = (1 - sigma) x + sigma noise,
2x2 packing with image ids, guidance 3.5, the transformer at timestep / 1000, unpack, fp32 MSE to
noise - x, backward, clip_grad_norm_ 1.0, optimizer and scheduler step, zero_grad. Written here, not copied:
the upstream file is Apache-2.0; this module restates its step for measurement.
"""

from __future__ import annotations

import copy

import torch


class ReferenceFluxLoop:
    def __init__(self, model, accelerator, rank: int = 4, learning_rate: float = 1e-4, guidance: float = 3.5,
                 max_sequence_length: int = 512):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.accelerator, self.guidance, self.max_len = accelerator, guidance, max_sequence_length
        self.transformer, self.vae = model.modules["transformer"], model.modules["vae"]
        self.clip, self.t5 = model.modules["text_encoder"], model.modules["text_encoder_2"]
        self.tokenizers = model.tokenizers
        # The example reads the scheduler from the folder: FlowMatchEuler with its config's static shift (3.0).
        self.schedule = copy.deepcopy(FlowMatchEulerDiscreteScheduler.from_config(model.schedule.config))
        for m in (self.transformer, self.vae, self.clip, self.t5):
            m.requires_grad_(False)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        for m in (self.transformer, self.vae, self.clip, self.t5):
            m.to(accelerator.device, dtype=self.weight_dtype)
        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        if accelerator.mixed_precision == "fp16":
            cast_training_params(self.transformer, dtype=torch.float32)
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10**6)
        self.transformer, self.optimizer, self.lr_scheduler = accelerator.prepare(self.transformer, optimizer, scheduler)

    def _encode(self, prompts: list[str]):
        dev = self.accelerator.device
        clip_ids = self.tokenizers["tokenizer"](prompts, padding="max_length", max_length=77, truncation=True,
                                                return_tensors="pt").input_ids.to(dev)
        t5_ids = self.tokenizers["tokenizer_2"](prompts, padding="max_length", max_length=self.max_len,
                                                truncation=True, return_tensors="pt").input_ids.to(dev)
        with torch.no_grad():
            pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output.to(self.weight_dtype)
            hidden = self.t5(t5_ids, output_hidden_states=False)[0].to(self.weight_dtype)
        return hidden, pooled, torch.zeros(hidden.shape[1], 3, device=dev, dtype=self.weight_dtype)

    def _sigmas(self, timesteps: torch.Tensor, dtype) -> torch.Tensor:
        sigmas = self.schedule.sigmas.to(self.accelerator.device, dtype)
        steps = self.schedule.timesteps.to(self.accelerator.device)
        index = [(steps == t).nonzero().item() for t in timesteps]
        return sigmas[index].flatten().view(-1, 1, 1, 1)

    def step(self, batch: dict) -> float:
        from diffusers import FluxPipeline

        acc, vae, net = self.accelerator, self.vae, self.transformer
        net.train()
        with acc.accumulate(net):
            hidden, pooled, text_ids = self._encode(batch["prompts"])
            x = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.sample()
            x = ((x - vae.config.shift_factor) * vae.config.scaling_factor).to(self.weight_dtype)
            b, c, h, w = x.shape
            image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, acc.device, self.weight_dtype)
            noise = torch.randn_like(x)
            u = torch.rand(b)  # the example's weighting_scheme "none": uniform
            timesteps = self.schedule.timesteps[(u * self.schedule.config.num_train_timesteps).long()].to(acc.device)
            sigmas = self._sigmas(timesteps, x.dtype)
            noisy = (1.0 - sigmas) * x + sigmas * noise
            packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
            guidance = torch.tensor([self.guidance], device=acc.device).expand(b)
            pred = net(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
                       encoder_hidden_states=hidden, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
            pred = pred.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
            loss = torch.mean(((pred.float() - (noise - x).float()) ** 2).reshape(b, -1), 1).mean()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return float(loss.detach())
