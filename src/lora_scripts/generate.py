"""Generate images from a base model with any number of LoRAs at their own strengths.

LoRA files are loaded by diffusers' own `load_lora_weights` (which reads kohya files as they are), so what
we show is what a diffusers user gets; A1111/ComfyUI apply the same `W + w * scale * up @ down`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionPipeline)
from PIL import Image

from .families.loading import BaseModel, quiet_loading

SCHEDULERS = {"ddim": DDIMScheduler, "euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler,
              "dpm++": DPMSolverMultistepScheduler}


def make_pipeline(model: BaseModel, scheduler: str = "ddim") -> StableDiffusionPipeline:
    sched = SCHEDULERS[scheduler].from_config(model.noise_scheduler.config)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class LoraSet:
    """LoRA files loaded once into a pipeline as named adapters; `apply` sets the strengths per call."""

    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self.loaded: dict[str, Path] = {}
        self._stamps: dict[str, tuple[Path, float]] = {}

    def load(self, name: str, path: Path) -> None:
        """Load once; a name that now points at another file, or at a file changed on disk since (a run trained
        again), replaces its adapter."""
        stamp = (Path(path), Path(path).stat().st_mtime)
        if self._stamps.get(name) == stamp:
            return
        if name in self.loaded:
            self.pipe.delete_adapters(name)
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        with quiet_loading():
            self.pipe.load_lora_weights(str(path), adapter_name=name)
        self.loaded[name] = Path(path)
        self._stamps[name] = stamp

    def apply(self, weights: dict[str, float]) -> None:
        if not self.loaded:
            return
        active = {n: w for n, w in weights.items() if w != 0.0}
        if not active:
            # Strength 0 everywhere: switch the LoRA layers off, so the output is the base model's bit for bit.
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters(list(active), adapter_weights=list(active.values()))


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompt: str, seeds: Sequence[int], steps: int = 30,
             cfg: float = 5.0, negative: str = "", size: tuple[int, int] | None = None) -> list[Image.Image]:
    """One image per seed; each seed gets its own CPU generator, so results do not depend on batch size."""
    height, width = size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    # Zero-terminal-SNR models over-expose under plain CFG; Lin et al. (2023) rescale the guided prediction (0.7).
    rescale = 0.7 if pipe.scheduler.config.get("rescale_betas_zero_snr") else 0.0
    images = []
    for seed in seeds:
        g = torch.Generator("cpu").manual_seed(seed)
        out = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=cfg,
                   generator=g, height=height, width=width, output_type="pil", guidance_rescale=rescale)
        images.append(out.images[0])
    return images
