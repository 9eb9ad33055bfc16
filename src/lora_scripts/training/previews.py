"""Preview images during training: the sample_prompts drawn with the LoRA as it is at that step, written to
output_dir/samples/ (with A1111 parameters) and to TensorBoard.

The pipeline wraps the models being trained, so nothing is copied or reloaded; a `<lora:OUTPUT_NAME:W>` tag
scales this run's LoRA for that image. Sampling never touches the training RNG streams or the weights, so a
run with previews ends bit-identical to one without.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SamplePrompt, TrainConfig
from ..errors import ConfigError
from ..generation.pipelines import generate, sampler
from ..generation.pnginfo import Parameters, save_png
from ..generation.prompts import parse_prompt
from ..families import LoadSettings, Model


@dataclass(frozen=True)
class PlannedSample:
    prompt: str  # as written, tags included
    text: str  # sent to the text encoder
    strength: float
    negative: str
    seed: int
    steps: int | None  # None: the family's default
    cfg: float | None
    size: int


def plan_samples(config: TrainConfig) -> list[PlannedSample]:
    """Checked before training starts: a tag naming another LoRA is a config error, not a crash at step 500."""
    plans, problems = [], []
    for i, sp in enumerate(config.sample_prompts):
        sp = sp if isinstance(sp, SamplePrompt) else SamplePrompt(prompt=sp)
        try:
            text, refs = parse_prompt(sp.prompt)
        except ValueError as exc:
            problems.append(f"sample_prompts.{i}: {exc}")
            continue
        others = [r.name for r in refs if r.name != config.name]
        if others:
            problems.append(f"sample_prompts.{i}: <lora:{others[0]}:...> is not this run; samples can only weight "
                            f"this run's LoRA, <lora:{config.name}:0.6>")
        strength = sum(r.weight for r in refs) if refs else 1.0
        plans.append(PlannedSample(sp.prompt, text, strength, sp.negative, config.seed + i if sp.seed is None else sp.seed,
                                   sp.steps or config.sample_steps, config.sample_cfg if sp.cfg is None else sp.cfg,
                                   sp.size or config.resolution))
    if problems:
        raise ConfigError("sample_prompts", problems)
    return plans


@contextlib.contextmanager
def lora_strength(models: list[torch.nn.Module], strength: float):
    """Scale every LoRA layer's output by `strength` for the duration (peft keeps alpha/r in `scaling`); DoRA
    layers give W0 + strength x (W' - W0), as A1111 and ComfyUI do."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer  # LoHa, LoKr: their delta weight is scaled by `scaling` too

    layers = [m for model in models for m in model.modules() if isinstance(m, (LoraLayer, LycorisLayer))]
    dora = [m for m in layers if hasattr(m, "dora_strength")]  # DoRA: W0 + s (W' - W0), as A1111/ComfyUI
    layers = [m for m in layers if not hasattr(m, "dora_strength")]
    saved = [dict(m.scaling) for m in layers]
    try:
        for m in layers:
            for name in m.scaling:
                m.scaling[name] *= strength
        for m in dora:
            m.dora_strength = strength
        yield
    finally:
        for m, s in zip(layers, saved):
            m.scaling.update(s)
        for m in dora:
            m.dora_strength = 1.0


class PreviewSampler:
    """config, accelerator, the loaded model and the networks being trained: what drawing needs, not the
    trainer. The family builds the pipeline around the LoRA-carrying networks."""

    def __init__(self, config: TrainConfig, accelerator, model: Model, trained: dict[str, torch.nn.Module]):
        self.config, self.accelerator, self.model, self.trained = config, accelerator, model, trained
        self.plans = plan_samples(config)
        self.folder = config.output_dir / "samples"
        self._pipe = None

    def due(self, step: int, epoch_end: int | None = None) -> bool:
        c = self.config
        if not self.plans:
            return False
        if epoch_end is not None:
            return bool(c.sample_every_n_epochs and epoch_end % c.sample_every_n_epochs == 0)
        return bool(c.sample_every_n_steps and step % c.sample_every_n_steps == 0)

    def _networks(self) -> dict[str, torch.nn.Module]:
        family = self.model.family
        return {n: self.accelerator.unwrap_model(self.trained[n]) for n in (family.denoiser,) + family.text_encoders}

    def pipe(self):
        if self._pipe is None:
            self._pipe = self.model.family.pipeline(self.model, sampler(self.model, self.config.sample_sampler),
                                                    self._networks())
        return self._pipe

    def _steps_and_cfg(self, s: PlannedSample) -> tuple[int, float]:
        """The prompt's own, the config's, else the family's defaults (Flux.1-dev 28 / 3.5), else 20 / 7."""
        defaults = {"steps": 20, "cfg": 7.0, **self.model.family.sample_defaults(self.model.variant)}
        return (s.steps if s.steps is not None else defaults["steps"], s.cfg if s.cfg is not None else defaults["cfg"])

    @torch.no_grad()
    def run(self, step: int, tensorboard=None) -> list[Path]:
        """Main process only. Models go to eval mode (no LoRA dropout) and back."""
        pipe, acc = self.pipe(), self.accelerator
        nets = list(self._networks().values())
        was_training = [m.training for m in nets]
        for m in nets:
            m.eval()
        written = []
        options = self.model.family.pipeline_options(self.model, LoadSettings(
            max_sequence_length=self.config.max_sequence_length))
        try:
            for i, s in enumerate(self.plans):
                steps, cfg = self._steps_and_cfg(s)
                with lora_strength(nets, s.strength), acc.autocast(), decode_in_own_dtype(self.model.vae):
                    image = generate(pipe, s.text, [s.seed], steps=steps, cfg=cfg, negative=s.negative,
                                     size=(s.size, s.size), **options)[0]
                params = Parameters(s.prompt, s.negative, steps, self.config.sample_sampler, cfg, s.seed,
                                    (s.size, s.size), Path(self.config.base_model).stem)
                written.append(save_png(image, self.folder / f"step-{step:06d}-{i:02d}.png", params))
                if tensorboard is not None:
                    tensorboard.add_image(f"samples/{i:02d}", _chw(image), step)
        finally:
            for m, was in zip(nets, was_training):
                m.train(was)
        return written


@contextlib.contextmanager
def decode_in_own_dtype(vae):
    """The VAE decodes in the dtype the trainer keeps it in, outside autocast: under fp16 mixed precision it is
    kept fp32 (an fp16 VAE overflows to NaN on bright images, SDXL's always), but the pipeline hands it fp16
    latents under autocast, which would run its convolutions in fp16 anyway (SDXL's pipeline upcasts only an
    fp16 VAE), and black previews would follow."""
    decode = vae.decode

    def in_own_dtype(z, *args, **kwargs):
        with torch.autocast(z.device.type, enabled=False):
            return decode(z.to(vae.dtype), *args, **kwargs)

    vae.decode = in_own_dtype
    try:
        yield
    finally:
        del vae.decode  # the class's method again


def _chw(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
