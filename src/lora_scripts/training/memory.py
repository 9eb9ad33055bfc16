"""Peak GPU memory of a LoRA training step, estimated without a GPU and without the weights.

Basis, stated in every estimate:
* weights: parameter counts of this exact architecture (from its configs, built on PyTorch's meta device)
  times the bytes of the training dtype; the VAE in fp32 (bf16 with mixed_precision: bf16), as the trainer
  keeps it;
* LoRA: its fp32 parameters, their gradients and AdamW's two moments (4 copies);
* activations: the bytes of every tensor autograd keeps for the backward pass, counted by running the UNet
  (and the text encoder when trained) forward on the meta device with this resolution, batch, dtype,
  LoRA targets and gradient checkpointing (with it: each checkpointed block's inputs, what runs outside the
  blocks, and a block as the backward pass recomputes it, on top of what was kept before it), under CUDA
  autocast's casts (meta_autocast: norms in fp32, a cast copy per matmul). Attention is counted as PyTorch
  SDPA's flash/memory-efficient kernels keep it (q, k, v, output and a log-sum-exp), as on CUDA;
* a transient allowance of twice the largest saved tensor that gets a gradient (backward temporaries), and
  the VAE encode's peak when latents are encoded every step.
The same count under the CPU's autocast rules is compared with the allocations of real CPU training steps
(benchmarks/estimate_vs_cpu.py: SD1.5, SDXL and Flux.1 widths, bf16, fp8, LoHa, checkpointing).
It estimates `torch.cuda.max_memory_allocated`; the CUDA context (about 0.3-0.6 GB) comes on top in nvidia-smi.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..config import TrainConfig
from .meta_autocast import MetaAutocast, lower

GB = 1024**3
# Weights in a storage dtype: fp8, and the meta stand-ins' bytes of int8/nf4 (weight_storage._stand_in).
_STORED = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), torch.uint8) if d is not None)


@dataclass
class MemoryEstimate:
    weights: float  # bytes
    lora: float
    activations: float
    transient: float
    vae_encode: float
    basis: str
    caching: float = 0.0  # while the caches fill, before the denoiser joins: the encoders, the VAE and one encode
    blocks: tuple[int, ...] = ()  # stored bytes of each denoiser block a block swap can move (offload)
    stored: float = 0.0  # bytes of the denoiser's weights kept in a storage dtype (fp8/int8/nf4), cast as they run
    forward_flops: float = 0.0  # the trained networks' forward pass, counted (attention included)
    recompute_flops: float = 0.0  # of which gradient checkpointing runs again in the backward pass

    @property
    def total(self) -> float:
        step = self.weights + self.lora + self.activations + self.transient
        return max(step, self.weights + self.lora + self.vae_encode, self.caching)

    @property
    def total_gb(self) -> float:
        return self.total / GB

    def as_dict(self) -> dict:
        parts = {k: round(getattr(self, k) / GB, 3) for k in ("weights", "lora", "activations", "transient",
                                                              "vae_encode", "caching")}
        return {"total_gb": round(self.total_gb, 2), "parts_gb": parts, "basis": self.basis,
                "summary": f"estimated peak {self.total_gb:.2f} GB allocated (weights {parts['weights']:.2f}, "
                           f"activations {parts['activations']:.2f}, LoRA+optimizer {parts['lora']:.2f}); "
                           f"{self.basis}"}

    def advice(self) -> str:
        return ("lower batch_size (e.g. 2 or 1), set gradient_checkpointing: true, use mixed_precision: bf16 "
                "(or fp16), or lower resolution")


class _FlashLikeAttention(torch.autograd.Function):
    """What SDPA's flash kernel keeps for backward: q, k, v, the output and a per-row log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the estimate only runs forward
        raise NotImplementedError


@contextlib.contextmanager
def _flash_attention(count_flops=lambda flops: None):
    original = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        # Positional (the UNet's attention) or by name (diffusers' attention dispatch, as Flux calls it).
        q, k, v = (args[i] if i < len(args) else kwargs[name] for i, name in enumerate(("query", "key", "value")))
        q, k, v = lower(q, k, v)  # as autocast hands them to SDPA
        rows = q.numel() // q.shape[-1] * k.shape[-2]  # query x key pairs: q @ k^T, then the weights @ v
        count_flops(2 * rows * (q.shape[-1] + v.shape[-1]))
        return _FlashLikeAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _configs(config: TrainConfig) -> dict:
    """The base's component configs (with its family); the default family's real ones when the base is absent."""
    from ..families import FAMILY_KEY, default_family

    base = Path(config.base_model)
    if base.is_file() or (base / "model_index.json").is_file():
        from ..interop.table import base_configs

        return base_configs(base)
    family = default_family()
    return {**family.embedded_configs(), FAMILY_KEY: family.name}


class SavedTensors:
    """Bytes autograd keeps: every saved tensor once, except weights and views of weights (no extra memory).

    Under gradient checkpointing a region keeps only its inputs until the backward pass, which then runs its
    forward again and holds everything that region saves until its gradients are done. `checkpoint` stands in
    for the models' checkpoint function (diffusers' and transformers' call it as fn(block, *args)): it counts
    a region's tensor inputs as kept and what it saves inside as that region's recomputation. The backward
    pass meets the regions in reverse order, and by a region's turn everything saved after it in the forward
    pass is freed: the peak is the largest of (kept when a region began + what it saves), and of all that is
    kept when the backward pass starts. Without the regions the estimate would miss a recomputed block: for
    LoHa/LoKr it holds full-size fp32 weight changes (about 1.4 GB per Flux.1 double block); adding the largest
    region to everything kept instead errs high by what the later blocks keep (SDXL 1024: 0.12 GB against a
    measured CPU step)."""

    def __init__(self):
        self.kept = 0.0  # through the whole backward pass (checkpoint inputs, layers outside regions)
        self.recompute = 0.0  # the largest checkpointed region's saved bytes
        self._peak = 0.0  # the largest (kept when a region began + its saved bytes)
        self._kept: set[int] = set()  # ids of the tensors counted in `kept`
        self._forward_end = 0.0  # held as the forward pass ends, though nothing keeps them for the backward
        self.largest = 0.0  # the largest single tensor that gets a gradient (sizes the backward's temporaries)
        self._region: float | None = None  # bytes saved so far in the region now running
        # The aten ops' FLOPs (attention is added by _flash_attention); a dispatch mode that slows the count ~1.5x,
        # so only where asked for (step_costs).
        self._flop_counter = FlopCounterMode(display=False)
        self.attention_flops = 0.0
        self._excluded = 0.0
        self.recompute_flops = 0.0  # every region runs again in the backward pass
        self._seen: dict[int, torch.Tensor] = {}  # holds each counted tensor: its id is never reused meanwhile

    def pack(self, t, kept: bool = False):
        """Count t once (kept: as a region's input, which stays through the backward pass even where a region
        before saved it, and so was counted as recomputed)."""
        base = t._base if t._base is not None else t
        if isinstance(base, torch.nn.Parameter):
            return t
        size = t.numel() * t.element_size()
        if id(t) in self._seen:
            if kept and id(t) not in self._kept:
                self.kept += size
                self._kept.add(id(t))
            return t
        self._seen[id(t)] = t  # a branch's graph may be freed before the step ends: keep t, so its id stays t's
        if self._region is None or kept:
            self.kept += size
            self._kept.add(id(t))
        else:
            self._region += size
        if t.requires_grad:  # a tensor the backward pass makes a gradient of (not a frozen weight's copy)
            self.largest = max(self.largest, size)
        return t

    def checkpoint(self, fn, *args, **kwargs):
        for option in ("use_reentrant", "preserve_rng_state", "determinism_check", "debug", "context_fn"):
            kwargs.pop(option, None)  # torch.utils.checkpoint's own options, not the block's
        if self._region is not None:  # nested: part of the outer region
            return fn(*args, **kwargs)
        for t in _tensors((args, kwargs)):  # Flux passes its rotary embedding as a tuple
            self.pack(t, kept=True)
        self._region, start, before = 0.0, self.flops, self.kept
        try:
            return fn(*args, **kwargs)
        finally:
            self._peak = max(self._peak, before + self._region)
            self.recompute, self._region = max(self.recompute, self._region), None
            self.recompute_flops += self.flops - start

    def held_at_forward_end(self, tensors) -> None:
        """Tensors alive as the forward pass ends that no region keeps for the backward pass (autocast's cast
        copies of the trained weights, freed when its region exits): they add to that moment only."""
        self._forward_end += sum(t.numel() * t.element_size() for t in tensors if id(t) not in self._kept)

    @property
    def total(self) -> float:
        """At the step's peak: all that is kept as the backward pass starts (with what the forward pass still
        holds as it ends), or a region's recomputation on top of what was kept before that region. Not counted:
        gradients waiting for a kept tensor's producer (a UNet's skip connections: tens of MB at SDXL 1024)."""
        return max(self.kept + self._forward_end, self._peak)

    @property
    def flops(self) -> float:
        return self._flop_counter.get_total_flops() + self.attention_flops - self._excluded

    def exclude(self, since: float) -> None:
        """Leave out the FLOPs counted since `since` (a frozen module's forward pass)."""
        self._excluded += self.flops - since

    def add_attention(self, flops: float) -> None:
        self.attention_flops += flops


def _tensors(value):
    """The tensors in nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _checkpoint_with(modules, function) -> None:
    """Every checkpointing layer of these models (diffusers' and transformers' set `_gradient_checkpointing_func`
    where they enable it) calls `function` instead."""
    for model in modules:
        for m in model.modules():
            if getattr(m, "_gradient_checkpointing_func", None) is not None:
                m._gradient_checkpointing_func = function


def count_saved(run, checkpointed=(), flops: bool = True, frozen=()) -> SavedTensors:
    """What `run` keeps for its backward pass (.total at the peak, .largest single tensor, in bytes) and, with
    `flops`, its FLOPs (.flops, .recompute_flops), less those of the `frozen` modules' forward passes (a frozen
    text encoder beside a trained one: it has no backward pass, so it is no part of the step's 1 + 1.15)."""
    saved = SavedTensors()
    _checkpoint_with(checkpointed, saved.checkpoint)
    starts: list[float] = []
    hooks = [h for m in frozen for h in (m.register_forward_pre_hook(lambda m, a: starts.append(saved.flops)),
                                         m.register_forward_hook(lambda m, a, o: saved.exclude(starts.pop())))]
    try:
        with saved._flop_counter if flops else contextlib.nullcontext(), \
                torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), \
                _flash_attention(saved.add_attention if flops else lambda f: None):
            run()
    finally:
        for h in hooks:
            h.remove()
    return saved


def estimate_memory(config: TrainConfig, configs: dict | None = None, flops: bool = False,
                    autocast: str = "cuda") -> MemoryEstimate:
    """configs: the base's component configs with its family (interop.table.base_configs); read from
    config.base_model when not given. flops: count the forward pass's FLOPs too (slower). autocast: whose
    mixed-precision rules the step runs under ('cuda', where users train; 'cpu' to compare with a CPU run)."""
    import logging

    from peft import inject_adapter_in_model

    from .adapters import add_dora, choose_targets, is_adapter_param, lora_config, train_in_fp32
    from .fused_adapters import share_fused
    from .offload import parse_offload, saved_bytes, unit_bytes
    from .weight_storage import store_planned

    from ..data.cache import latent_cache_plan, offload_plan
    from ..dtypes import DTYPES
    from ..families import family_for_configs

    from .trainer import checkpoint_text_encoder, load_settings

    logging.getLogger("diffusers").setLevel(logging.ERROR)  # it warns about .to(dtype) on a model without weights
    configs = configs or _configs(config)
    family = family_for_configs(configs)
    dtype = DTYPES[config.mixed_precision]
    modules = family.meta_modules(configs, dtype)
    vae = modules.pop(family.autoencoder)
    denoiser = modules[family.denoiser]
    vae_bytes = 2 if config.mixed_precision == "bf16" else 4
    vae_off, text_off = offload_plan(config)  # what the trainer moves off the GPU once its caches are full
    on_gpu = [m for n, m in modules.items() if not (text_off and n in family.text_encoders)]
    for m in modules.values():
        m.requires_grad_(False)
    store_planned(config, family, modules, dtype)  # fp8 frozen weights: 1 byte each
    weights = sum(p.numel() * p.element_size() for m in on_gpu for p in m.parameters()) \
        + (0 if vae_off else sum(p.numel() for p in vae.parameters()) * vae_bytes)
    blocks = tuple(unit_bytes(u) for u in _offload_units(family, denoiser))
    swapped = parse_offload(config.offload)
    if isinstance(swapped, int):  # those blocks' weights stay in host memory, all but the two in flight
        weights -= saved_bytes(list(blocks), min(swapped, len(blocks)))
    trained = family.trainable(config.train_text_encoder)
    with torch.device("meta"):
        for name in trained:
            targets, conv = choose_targets(family, name, modules[name], config)
            lora = lora_config(config, targets, conv)
            lora.init_lora_weights = False
            inject_adapter_in_model(lora, modules[name])
            if config.network_type == "dora":  # its magnitudes, and the scaled input each layer keeps
                add_dora(modules[name])
            share_fused(family, name, modules[name], config.network_type, config.lokr_factor)
            train_in_fp32(modules[name])  # as the trainer does (inject_lora)
    lora_params = sum(p.numel() for m in modules.values() for n, p in m.named_parameters() if is_adapter_param(n))
    if config.gradient_checkpointing:  # as the trainer enables it
        denoiser.enable_gradient_checkpointing()
        for name in trained[1:]:
            checkpoint_text_encoder(modules[name])
    denoiser.train()
    b, side = config.batch_size, config.resolution // family.vae_scale_factor

    mixed = contextlib.nullcontext() if config.mixed_precision == "no" else MetaAutocast(autocast, dtype)

    def step():
        with mixed:  # the trainer runs the denoiser, and the text encoders it trains, under autocast
            _step()

    def _step():
        if len(trained) > 1:
            cond = family.encode({n: modules[n] for n in family.text_encoders}, family.blank_tokens(b, "meta"), "meta")
        else:
            cond = family.blank_conditioning(configs, b, dtype, "meta")
        latents = torch.empty(b, family.latent_channels(configs), side, side, dtype=dtype, device="meta")
        size = torch.tensor([config.resolution] * 2 + [0, 0] + [config.resolution] * 2).expand(b, 6).to("meta")
        family.predict(denoiser, latents, torch.zeros(b, dtype=torch.long, device="meta"), cond.to("meta", dtype), size,
                       **family.predict_options(configs, load_settings(config)))

    saved = count_saved(step, [modules[n] for n in trained] if config.gradient_checkpointing else (), flops,
                        [modules[n] for n in family.text_encoders if n not in trained] if len(trained) > 1 else ())
    if isinstance(mixed, MetaAutocast):
        saved.held_at_forward_end(mixed.copies)
    cached = latent_cache_plan(config)[0]
    vae_peak = 0.0 if cached else _vae_encode_peak(vae, b, config.resolution)
    # The caches fill one image at a time with the VAE and the text encoders resident, the denoiser not yet.
    frozen = {n: m for n, m in modules.items() if n in family.text_encoders}
    caching = (sum(p.numel() * p.element_size() for m in frozen.values() for p in m.parameters())
               + sum(p.numel() for p in vae.parameters()) * vae_bytes + _vae_encode_peak(vae, 1, config.resolution)
               if cached else 0.0)
    basis = ("meta-device count of saved activations for this architecture, resolution, batch, precision and "
             "LoRA targets (" + ("fp32 throughout" if config.mixed_precision == "no"
                                 else f"{autocast.upper()} autocast's casts")
             + ("; each checkpointed block counted as the backward pass recomputes it"
                if config.gradient_checkpointing else "")
             + "), flash/memory-efficient SDPA assumed; CUDA context not included")
    if config.offload == "auto":
        basis += "; offload: auto is sized on the GPU at start (not counted here)"
    from .optimizers import SPECS

    # fp32 LoRA weights and gradients, and the optimizer's state (AdamW: two fp32 moments).
    per_param = 4 + 4 + SPECS[config.optimizer].state_bytes
    stored = sum(p.numel() * p.element_size() for p in denoiser.parameters() if p.dtype in _STORED)
    return MemoryEstimate(weights, lora_params * per_param, saved.total, 2 * saved.largest, vae_peak, basis, caching,
                          blocks, stored, saved.flops, saved.recompute_flops)


def _offload_units(family, denoiser) -> list:
    try:
        return family.offload_units(denoiser)
    except NotImplementedError:
        return []


def _vae_encode_peak(vae, batch: int, resolution: int) -> float:
    """The encoder runs without grad: its peak is about its two largest live activations at once."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * o.element_size()))
             for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            vae.encoder(torch.empty(batch, 3, resolution, resolution, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    top = sorted(sizes)[-2:]
    return float(sum(top))


# Changes tried in this order, each kept as the next is added: roughly least slowdown first. bf16 is faster
# than fp32 on every GPU since Ampere; checkpointing recomputes the forward (about a third more work);
# stored weights cost a cast per layer (int8 less error than fp8, nf4 a dequantisation); batch 1 gives up
# throughput; the text encoders matter only while the caches fill.
# Block swap comes after int8 (it costs host-to-GPU copies every step, int8 only a dequantisation) and
# replaces it by fp8 (it moves plain weights), with the fewest blocks that fit; nf4 is tried only where no
# swap was needed or possible: its error is the largest of the three.
LADDER = (("mixed_precision", "bf16"), ("gradient_checkpointing", True), ("text_encoder_weight_dtype", "fp8"),
          ("base_weight_dtype", "fp8"), ("base_weight_dtype", "int8"), ("offload", "blocks"),
          ("base_weight_dtype", "nf4"), ("optimizer", "adamw8bit"), ("batch_size", 1))


def fitting_settings(config: TrainConfig, vram_gb: float, configs: dict | None = None,
                     estimate: MemoryEstimate | None = None) -> tuple[dict, MemoryEstimate, bool]:
    """The settings to add to `config` so that its estimate fits in `vram_gb`, the estimate with them, and whether
    it fits (False: every change on the ladder was not enough). Changes the machine cannot run (a package that
    is missing) are skipped. estimate: config's own, where the caller already has it."""
    from .optimizers import optimizer_problems
    from .weight_storage import storage_problems
    from ..dtypes import DTYPES

    configs = configs or _configs(config)
    changes: dict = {}
    estimate = estimate or estimate_memory(config, configs)
    if estimate.total_gb <= vram_gb:
        return changes, estimate, True
    checkable = not _invalid(config)  # a config that fails for its own reasons (a moved folder) refuses no change
    for key, value in LADDER:
        current = changes.get(key, getattr(config, key))
        if current == value or (key == "mixed_precision" and current != "no") or \
                (key == "batch_size" and current <= value):
            continue
        if key == "offload":
            if not estimate.blocks or current != "none":
                continue
            from .offload import blocks_needed

            count = blocks_needed(list(estimate.blocks), estimate.total - vram_gb * GB) or len(estimate.blocks)
            step = {"offload": f"blocks:{count}"}
            if changes.get("base_weight_dtype", config.base_weight_dtype) in ("int8", "nf4"):
                step["base_weight_dtype"] = "fp8"
            changes.update(step)
            estimate = estimate_memory(config.model_copy(update=changes), configs)
            if estimate.total_gb <= vram_gb:
                return _needed(config, changes, estimate, vram_gb, configs)
            continue
        if key == "base_weight_dtype" and value == "nf4" and changes.get("offload", config.offload) != "none":
            continue
        trial = config.model_copy(update={**changes, key: value})
        if checkable and _invalid(trial):  # e.g. int8/nf4 with DoRA, which the config refuses
            continue
        if key in ("base_weight_dtype", "text_encoder_weight_dtype") and \
                storage_problems(trial, DTYPES[trial.mixed_precision]):
            continue
        if key == "optimizer" and optimizer_problems(trial):  # installed? (its device is the user's GPU)
            continue
        changes[key] = value
        estimate = estimate_memory(trial, configs)
        if estimate.total_gb <= vram_gb:
            return _needed(config, changes, estimate, vram_gb, configs)
    return changes, estimate, False


def _needed(config: TrainConfig, changes: dict, estimate: MemoryEstimate, vram_gb: float,
            configs: dict) -> tuple[dict, MemoryEstimate, bool]:
    """Fitting changes without text_encoder_weight_dtype where the estimate fits without it: with the caches the
    encoders leave the GPU before the steps, so storing them smaller lowers the peak only where their caching
    phase is it (Flux.1's T5-XXL), not where the steps are (SDXL's encoders: a change for nothing)."""
    if "text_encoder_weight_dtype" in changes:
        rest = {k: v for k, v in changes.items() if k != "text_encoder_weight_dtype"}
        without = estimate_memory(config.model_copy(update=rest), configs)
        if without.total_gb <= vram_gb:
            return rest, without, True
    return changes, estimate, True


def _invalid(config: TrainConfig) -> bool:
    """Whether the config's own rules refuse these settings together (model_copy does not run them)."""
    from pydantic import ValidationError

    try:
        TrainConfig.model_validate(config.model_dump())
    except (ValidationError, ValueError):
        return True
    return False


def fit_advice(config: TrainConfig, estimate: MemoryEstimate, vram_gb: float, configs: dict | None = None) -> str:
    """What to add to the config to fit `vram_gb` (the estimate exceeds it), from the memory ladder."""
    said = f"estimated peak {estimate.total_gb:.1f} GB exceeds the {vram_gb:.3g} GB available"
    try:
        changes, fitted, fits = fitting_settings(config, vram_gb, configs, estimate)
    except Exception:  # advice only
        return f"{said}; {estimate.advice()}"
    lines = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items())
    if fits and changes:
        return (f"{said}; with {lines} it is estimated at {fitted.total_gb:.1f} GB: add these to the config"
                + _costs(config, changes, configs))
    return (f"{said}; even with {lines} it is estimated at {fitted.total_gb:.1f} GB: lower resolution as well"
            if changes else f"{said}; {estimate.advice()}")


def _costs(config: TrainConfig, changes: dict, configs: dict | None) -> str:
    """'. What each costs a step ...' for fit_advice; '' where they cannot be counted (advice only)."""
    from .step_costs import step_costs

    fitted = config.model_copy(update=changes)
    try:
        costs = step_costs(fitted, changes, estimate_memory(fitted, configs, flops=True))
    except Exception:
        return ""
    return ". What each costs a step (counted, not timed): " + "; ".join(costs) if costs else ""


def too_big(config: TrainConfig, available_bytes: float, configs: dict | None = None) -> str | None:
    """Before anything loads: None when the estimate fits in `available_bytes` (the GPU's free memory), else
    what to change. A warning, not a refusal: the estimate is checked against measured CPU steps to a few per
    cent but not yet against a GPU (its kernels' temporaries, the caching allocator's fragmentation), and a run
    refused wrongly costs more than one that stops with out-of-memory."""
    estimate = estimate_memory(config, configs)
    if estimate.total <= available_bytes:
        return None
    if config.offload == "auto":  # sized at start to the free memory: enough where swapping every block is
        from .offload import saved_bytes

        if estimate.total - saved_bytes(list(estimate.blocks), len(estimate.blocks)) <= available_bytes:
            return None
    return fit_advice(config, estimate, available_bytes / GB, configs)  # unrounded: a rounded-up budget may 'fit'


if __name__ == "__main__":  # python -m lora_scripts.training.memory CONFIG.yaml
    import sys

    from ..config import load_config

    print(json.dumps(estimate_memory(load_config(sys.argv[1])).as_dict(), indent=2))
