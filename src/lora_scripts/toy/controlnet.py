"""A canny ControlNet for the toy base: `lora-scripts toy build-controlnet` (minutes on 2 CPU cores).

Trained as lllyasviel trained his: the base frozen, a copy of its encoder (diffusers' ControlNetModel.from_unet)
learning to steer it from the canny map of the picture being denoised. Pictures: the base's own scenes (never the
neon style nor the arm), a fifth of them with an empty caption so the map alone has to place the shape. Maps:
exactly what `generate --control canny:...` computes at the toy's 32 px. Written as users have ControlNets: the
original layout (control_v11p_sd15_canny.pth's keys) in a .safetensors file, so it loads through the same code.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_save_safetensors
from ..data.images import images_to_batch
from ..families.loading import load_base_model
from ..formats.controlnet import controlnet_to_ldm
from ..generation.control_maps import control_map
from .pretrain import SIZE
from .scenes import random_scene, render

log = logging.getLogger(__name__)
QUICK_BUILD = {"steps": 3, "n_scenes": 32, "batch": 4}


def canny_map(image) -> torch.Tensor:
    """(3, H, W) in [0, 1]: the map the ControlNet pipeline passes for this picture (as generate computes it)."""
    arr = np.asarray(control_map(image, "canny", image.size), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


@torch.no_grad()
def _dataset(model, n: int, seed: int):
    rng = random.Random(f"controlnet/{seed}")
    scenes = [random_scene(rng) for _ in range(n)]
    images = [render(s, SIZE, rng) for s in scenes]
    captions = [s.caption if rng.random() >= 0.2 else "" for s in scenes]
    latents = model.vae.encode(images_to_batch(images)).latent_dist.mean * model.vae.config.scaling_factor
    maps = torch.stack([canny_map(im) for im in images])
    tok = model.tokenizers["tokenizer"]
    unique = sorted(set(captions))
    ids = tok(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    states = model.modules["text_encoder"](ids)[0]
    text = states[[unique.index(c) for c in captions]]
    return latents, maps, text


def build_controlnet(out: Path, base: Path, steps: int = 1500, n_scenes: int = 4096, batch: int = 32, seed: int = 0,
                     lr: float = 3e-4) -> Path:
    from diffusers import ControlNetModel

    started = time.time()
    torch.manual_seed(seed)
    model = load_base_model(base)
    unet = model.denoiser.requires_grad_(False).eval()
    latents, maps, text = _dataset(model, n_scenes, seed)
    # The hint encoder downsamples as the toy VAE does (32 px -> 16 latents): one stride-2 stage.
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).train()
    objective = model.objective
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0, cond, hint = latents[idx], text[idx], maps[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, model.schedule.config.num_train_timesteps, (batch,), generator=g)
        noisy = objective.noisy(x0, noise, t)
        down, mid = net(noisy.noisy, t, cond, controlnet_cond=hint, return_dict=False)
        pred = unet(noisy.noisy, t, cond, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, objective.target(noisy))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("controlnet step %d/%d loss %.4f", step, steps, loss.item())
    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in controlnet_to_ldm(net.state_dict(), unet.config.layers_per_block).items()}
    path = atomic_save_safetensors(state, Path(out))
    log.info("wrote %s (%.1f MB) in %.1f min", path, path.stat().st_size / 1e6, (time.time() - started) / 60)
    return path
