"""Generate images from a base model with any number of LoRAs at their own strengths.

LoRA files are loaded by diffusers' own `load_lora_weights` (which reads kohya files as they are), so what
we show is what a diffusers user gets; A1111/ComfyUI apply the same `W + w * scale * up @ down`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)
from PIL import Image

from ..families import Family, Model
from ..families.loading import quiet_loading
from ..interop.lora_file import LoraFileError, read_lora, require_finite, shape_problems

SCHEDULERS = {"ddim": DDIMScheduler, "euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler,
              "dpm++": DPMSolverMultistepScheduler}


def make_pipeline(model: Model, scheduler: str = "ddim"):
    """The family's pipeline around the model's own networks, with one of our samplers."""
    return model.family.pipeline(model, sampler(model, scheduler))


def sampler(model: Model, name: str):
    """One of our samplers on the model's noise schedule. A zero-terminal-SNR schedule is sampled from its last
    (pure-noise) step: 'trailing' timestep spacing, as Lin et al. (2023) require; 'leading' would never start
    there and the image keeps a trace of the mean brightness the model was meant to unlearn."""
    if isinstance(model.schedule, FlowMatchEulerDiscreteScheduler):
        # A flow-matching model (Flux) is sampled with its own Euler flow scheduler and its resolution shift; the
        # DDPM samplers above do not apply to it.
        return FlowMatchEulerDiscreteScheduler.from_config(model.schedule.config)
    extra = {"timestep_spacing": "trailing"} if model.schedule.config.get("rescale_betas_zero_snr") else {}
    return SCHEDULERS[name].from_config(model.schedule.config, **extra)


class LoraSet:
    """LoRA files loaded once into a pipeline as named adapters; `apply` sets the strengths per call."""

    def __init__(self, pipe, family: Family, table: dict | None = None):
        """table: the base's module table (interop.table.module_table), for files diffusers cannot read itself."""
        self.pipe = pipe
        self.family = family
        self.table = table
        self.loaded: dict[str, Path] = {}
        self._stamps: dict[str, tuple[Path, float]] = {}
        self._layer_shapes: dict[str, tuple[int, ...]] | None = None
        self.patches = WeightPatches()  # LoHa/LoKr files, which diffusers does not load

    def load(self, name: str, path: Path) -> None:
        """Load once; a name that now points at another file, or at a file changed on disk since (a run trained
        again), replaces its adapter."""
        stamp = (Path(path), Path(path).stat().st_mtime)
        if self._stamps.get(name) == stamp:
            return
        lora = self.check(path)
        if name in self.loaded:
            if name in self.patches.deltas:
                self.patches.remove(name)
            else:
                self.pipe.delete_adapters(name)
            del self.loaded[name]  # a failed reload below must not leave a name without its adapter
            self._stamps.pop(name, None)
        if lora.by_rule:
            self._load_lycoris(name, Path(path), lora)
            self.loaded[name] = Path(path)
            self._stamps[name] = stamp
            return
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        try:
            with quiet_loading():
                self.pipe.load_lora_weights(str(path), adapter_name=name)
        except (ValueError, RuntimeError, KeyError, OSError, AssertionError) as exc:
            self._forget(name)
            self._load_converted(name, Path(path), lora, exc)
        self.loaded[name] = Path(path)
        self._stamps[name] = stamp

    def _load_converted(self, name: str, path: Path, lora, exc: Exception) -> None:
        """A valid kohya file diffusers cannot read itself (0.42.1: a text-encoder LoRA on q_proj/v_proj only;
        its Flux converter asserts Flux.1's real widths) is loaded through its exact diffusers-layout conversion,
        written to a temporary file, so it draws as A1111/ComfyUI would draw it."""
        import tempfile

        from ..interop.lora_file import KOHYA, write_diffusers

        if lora.format != KOHYA or self.table is None or any(n not in self.table for n in lora.modules):
            raise LoraFileError(_load_failure(path, exc)) from exc
        try:
            with tempfile.TemporaryDirectory() as tmp, quiet_loading():
                converted = write_diffusers(lora, Path(tmp) / "converted.safetensors", self.table)
                self.pipe.load_lora_weights(str(converted), adapter_name=name)
        except (ValueError, RuntimeError, KeyError, OSError) as again:
            self._forget(name)
            raise LoraFileError(_load_failure(path, again)) from again
        logging.getLogger(__name__).info("%s: diffusers cannot read it itself (%s); loaded its diffusers-layout "
                                         "conversion", path.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def _load_lycoris(self, name: str, path: Path, lora) -> None:
        """LoHa/LoKr/DoRA: each layer's weight change, by A1111/ComfyUI's rule, added to the weights at the
        strength asked for (as A1111 applies them); the original weights are kept to go back to."""
        if lora.lycoris and lora.modules:
            raise LoraFileError(f"{path} mixes LoRA and LyCORIS ({lora.network_type}) layers; this tool draws "
                                "either kind, not both in one file")
        self._shapes()
        modules = {**lora.lycoris, **lora.modules}  # a DoRA file's layers without a magnitude too
        missing = [n for n in modules if n not in self._layer_paths and n not in self._fused_paths]
        if missing:
            raise LoraFileError(f"{path}: {len(missing)} of its layers are not named as this tool names "
                                f"{self.family.label} layers (e.g. {missing[0]}); it cannot be drawn here")
        layers = {}
        for n, m in modules.items():
            weights = [self._weight(c, layer) for c, layer in self._fused_paths.get(n) or [self._layer_paths[n]]]
            # W0, not W0 + another file; a fused module (Flux's qkv) changes its layers' weights stacked in row order
            originals = [self.patches.originals.get(id(w), (w, w.data))[1] for w in weights]
            original = originals[0] if len(originals) == 1 else torch.cat(originals, dim=0)
            change = m.delta(tuple(original.shape)) if n in lora.lycoris else m.applied_delta(original)
            for i, (weight, rows) in enumerate(zip(weights, torch.split(change, [w.shape[0] for w in weights]))):
                layers[n if len(weights) == 1 else f"{n}#{i}"] = (weight, rows)
        self.patches.add(name, layers)

    def _weight(self, component: str, layer: str) -> torch.nn.Parameter:
        module = self.pipe.components[component].get_submodule(layer)
        return (module.get_base_layer() if hasattr(module, "get_base_layer") else module).weight

    def _forget(self, name: str) -> None:
        """A failed load may leave half an adapter (the UNet's) behind; a long-lived pipeline must not keep it."""
        try:
            self.pipe.delete_adapters(name)
        except (ValueError, KeyError, AttributeError):
            pass

    def check(self, path: Path):
        """Before diffusers sees the file: a readable LoRA, no NaN/inf (never draw garbage), and every module
        fitting a layer of this base model (a LoRA for SDXL or SD2 does not fit SD1)."""
        lora = read_lora(Path(path))
        require_finite(lora, Path(path))
        self._check_fits(lora, path)
        return lora

    def _check_fits(self, lora, path: Path) -> None:
        unmatched, wrong = shape_problems(lora, self._shapes())
        if wrong:
            raise LoraFileError(f"{path} does not fit this base model: {len(wrong)} modules have other shapes (e.g. "
                                f"{wrong[0]}); it was trained on another model family or size. Use it with the "
                                "base model it was made for")
        ldm_names = any(k in n for n in unmatched for k in ("_input_blocks_", "_middle_block_", "_output_blocks_"))
        count = len(lora.modules) + len(lora.lycoris)
        if unmatched and len(unmatched) == count and not ldm_names:  # LDM-layout names: diffusers maps them itself
            raise LoraFileError(f"{path}: none of its {count} modules names a layer of this base model "
                                f"(e.g. {unmatched[0]}); it was made for another model family (SDXL? SD2?) and "
                                "would change nothing")

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """kohya module name -> weight shape of every Linear/Conv2d layer a LoRA can target."""
        if self._layer_shapes is None:
            shapes = {}
            self._layer_paths: dict[str, tuple[str, str]] = {}  # kohya name -> (component, path) of an unfused layer
            self._fused_paths: dict[str, list[tuple[str, str]]] = {}  # kohya name -> its layers, in row order
            slots: dict[str, dict[int, tuple[str, str]]] = {}
            for component in (self.family.denoiser,) + self.family.text_encoders:
                for path, m in self.pipe.components[component].named_modules():
                    # A layer already wrapped by peft shows as `<path>.base_layer`; its lora_A/B are not layers.
                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in path:
                        layer = path.replace(".base_layer", "")
                        name, shape = self.family.kohya_name(component, layer), tuple(m.weight.shape)
                        slot = self.family.fused_slot(component, layer)
                        if slot is not None:
                            slots.setdefault(name, {})[slot[0]] = (component, layer)
                            if name in shapes:  # a fused kohya module (Flux's qkv): its layers' rows stacked
                                shape = (shapes[name][0] + shape[0],) + shape[1:]
                        else:
                            self._layer_paths[name] = (component, layer)
                        shapes[name] = shape
            self._fused_paths = {n: [parts[i] for i in sorted(parts)] for n, parts in slots.items()}
            self._layer_shapes = shapes
        return self._layer_shapes

    def apply(self, weights: dict[str, float]) -> None:
        if not self.loaded:
            return
        self.patches.apply({n: w for n, w in weights.items() if n in self.patches.deltas})
        weights = {n: w for n, w in weights.items() if n not in self.patches.deltas}
        if not any(n not in self.patches.deltas for n in self.loaded):
            return
        active = {n: w for n, w in weights.items() if w != 0.0}
        if not active:
            # Strength 0 everywhere: switch the LoRA layers off, so the output is the base model's bit for bit.
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters(list(active), adapter_weights=list(active.values()))


class WeightPatches:
    """Weight changes added straight to layers' weights at a strength: base + sum(strength x delta), computed
    from the kept originals each time, so strengths can change without drift and 0 gives the base bit for bit."""

    def __init__(self):
        self.deltas: dict[str, dict[str, tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        self.originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        self.strengths: dict[str, float] = {}

    def add(self, name: str, layers: dict[str, tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        for weight, delta in layers.values():
            self.originals.setdefault(id(weight), (weight, weight.data.clone()))
        # In the layer's own dtype and device: a LoHa/LoKr change is as large as the weight it changes.
        self.deltas[name] = {n: (w, d.to(w.device, w.dtype)) for n, (w, d) in layers.items()}
        self.strengths[name] = 0.0

    def remove(self, name: str) -> None:
        self.apply({**self.strengths, name: 0.0})
        del self.deltas[name], self.strengths[name]
        used = {id(w) for layers in self.deltas.values() for w, _ in layers.values()}
        self.originals = {k: v for k, v in self.originals.items() if k in used}

    def apply(self, strengths: dict[str, float]) -> None:
        wanted = {n: strengths.get(n, 0.0) for n in self.deltas}
        if wanted == self.strengths:
            return
        touched = {id(w) for layers in self.deltas.values() for w, _ in layers.values()}
        for key in touched:
            weight, original = self.originals[key]
            total = original.float()
            for n, layers in self.deltas.items():
                for w, d in layers.values():
                    if w is weight and wanted[n]:
                        total = total + wanted[n] * d.float()
            weight.data.copy_(total.to(weight.dtype))
        self.strengths = wanted


def _load_failure(path: Path, exc: Exception) -> str:
    """What our checks do not foresee, in diffusers' own words (first line), with what to do about it."""
    import diffusers

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "infer state dict type" in first:
        # Measured with diffusers 0.42.1: a kohya text-encoder LoRA on q_proj/v_proj only is refused.
        return (f"{path}: diffusers {diffusers.__version__} cannot read this kohya file itself ({first}); A1111 and "
                f"ComfyUI can. Convert it once: lora-scripts convert {path} {path.with_name(path.stem + '_diffusers')}"
                ".safetensors --to diffusers --base MODEL, and use the converted file")
    return (f"{path}: diffusers cannot load this LoRA into the base model ({first}); "
            f"`lora-scripts verify {path} --base MODEL` tells what is wrong with it")


@torch.no_grad()
def generate(pipe, prompt: str, seeds: Sequence[int], size: tuple[int, int], steps: int = 30, cfg: float = 5.0,
             negative: str = "", **extra) -> list[Image.Image]:
    """One image per seed; each seed gets its own CPU generator, so results do not depend on batch size.
    size: (height, width); a model's native size is `model.native_size`. extra: the pipeline's own arguments
    (a ControlNet pipeline's image and conditioning scales)."""
    height, width = size
    # Zero-terminal-SNR models over-expose under plain CFG; Lin et al. (2023) rescale the guided prediction (0.7).
    rescale = 0.7 if pipe.scheduler.config.get("rescale_betas_zero_snr") else 0.0
    native = "guidance_rescale" in inspect.signature(pipe.__call__).parameters
    images = []
    for seed in seeds:
        g = torch.Generator("cpu").manual_seed(seed)
        # guidance_rescale only where it applies: not every pipeline takes the argument.
        kwargs = {"guidance_rescale": rescale} if rescale and native else {}
        with rescaled_guidance(pipe, cfg, rescale if not native else 0.0):
            out = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=cfg,
                       generator=g, height=height, width=width, output_type="pil", **kwargs, **extra)
        images.append(out.images[0])
    return images


@contextmanager
def rescaled_guidance(pipe, cfg: float, phi: float):
    """Guidance rescale (Lin et al. 2023) for a pipeline without the argument (diffusers 0.42.1's ControlNet
    pipelines): the UNet's text-conditioned half is replaced by the prediction that makes the pipeline's own
    CFG sum, uncond + cfg (text - uncond), equal the rescaled one. Nothing changes where phi is 0 or there
    is no guidance (cfg <= 1: the pipeline runs one half only)."""
    if not phi or cfg <= 1:
        yield
        return

    def hook(module, args, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        uncond, text = sample.chunk(2)
        guided = uncond + cfg * (text - uncond)
        dims = list(range(1, sample.ndim))
        rescaled = guided * (text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        target = phi * rescaled + (1 - phi) * guided
        new = torch.cat([uncond, uncond + (target - uncond) / cfg])
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else type(output)(sample=new)

    denoiser = next(pipe.components[n] for n in ("unet", "transformer") if pipe.components.get(n) is not None)
    handle = denoiser.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
