"""The Trainer: sets up a run (data, the family's model with LoRA, optimizer) and runs one step; the only
module that talks to accelerate. The loop around it, and the library API ``train(config)``, are in loop.py."""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from diffusers.optimization import get_scheduler
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..config import TrainConfig
from ..data.dataset import BucketBatchSampler, Collate, LoraDataset, build_items
from ..data.cache import (LatentCache, TextCache, latent_cache_plan, offload_plan, sample_latents, text_cache_plan,
                          vae_identity)
from ..data.check import dataset_warnings
from ..data.scan import scan_dataset
from ..dtypes import DTYPES
from ..errors import ConfigError, DatasetError, TrainingError
from .export import RunFacts, kohya_file_contents, save_kohya, tag_frequency
from ..families import LoadSettings, Model
from ..families.loading import load_base_model
from ..hashes import file_sha256, legacy_model_hash
from .adapters import adapter_scales, check_targets, choose_targets, inject_lora, is_adapter_param, lora_parameters
from .block_lr import block_groups, block_lr_problems
from .previews import PreviewSampler, plan_samples
from .validation import Validator, split_samples
from .optimizers import build_optimizer, is_schedule_free, optimizer_problems, weights_in_use
from .offload import (BlockOffloader, blocks_needed, choose_offloaded, free_device_bytes, parse_offload,
                      unit_bytes)
from .weight_storage import storage_problems, store_planned

log = logging.getLogger(__name__)
# How long a process waits for the others at a collective. NCCL's default of 10 minutes ends a healthy run where
# one process works alone: the main process filling the disk caches of a large dataset, or drawing previews and
# validation images, while the others wait for it.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
COMPILE_OPTIONS: dict = {}  # torch.compile arguments (tests pick a backend that needs no C compiler)


def _forget_mixed_precision_of_an_earlier_run(mixed_precision: str) -> None:
    """accelerate keeps its precision in a process-wide singleton and refuses a second Accelerator with another
    one, so a notebook or script training fp32 and then bf16 would fail. Only that part is reset; the
    distributed set-up (PartialState: ranks, process group) is kept."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    current = state.get("_mixed_precision", mixed_precision)
    if state and getattr(current, "value", current) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _main_first(acc: Accelerator, to_disk: bool):
    """A cache kept on disk is written by the main process while the others wait, then read by them; one kept in
    memory is filled by every process at once on its own device (in turn, the others would wait twice as long
    for nothing)."""
    return acc.main_process_first() if to_disk else contextlib.nullcontext()


def smallest_across(acc: Accelerator, value: int) -> int:
    """The smallest of `value` over the processes (each process calls it)."""
    if acc.num_processes == 1:
        return value
    return int(acc.gather(torch.tensor([value], device=acc.device)).min())


def _uses_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel and accel.is_available())


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        _forget_mixed_precision_of_an_earlier_run(config.mixed_precision)
        # CPU runs (CI, and `accelerate launch --multi_gpu` with gloo on CPU) must say so explicitly, or
        # accelerate starts unsynchronised processes.
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            cpu=not _uses_accelerator(),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
        )
        refuse_sharding(self.accelerator.distributed_type)
        self.weight_dtype = DTYPES[config.mixed_precision]
        # Settings that cannot work here, named before minutes of loading the model.
        problems = optimizer_problems(config, self.accelerator.device) + storage_problems(config, self.weight_dtype)
        if problems:
            raise ConfigError("the config", problems)
        self.grads_finite = True
        self.offloader = None
        # LoRA init draws from the global RNGs: same seed, same starting weights (on every process).
        set_seed(config.seed)

    # --- set-up ------------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        self.check_data()  # seconds; before a base-model load that takes a minute on a real checkpoint
        self.check_fits()
        self.model = self.setup_model()
        self.setup_loader(self.model)
        self.setup_optimizer(self.model)
        self.previews = PreviewSampler(self.config, self.accelerator, self.model, self.trained)
        self.validator = Validator(self.config, self.accelerator, self.model, self.trained, self.val_samples,
                                   self.weight_dtype)
        return self

    def close(self) -> None:
        """The run is over (finished, stopped or failed): the block swap's page-locked host memory is released."""
        if self.offloader is not None:
            try:
                self.offloader.close()
            except Exception as exc:  # e.g. CUDA already failed: never hide the error that ended the run
                log.warning("offload: could not release the block swap's host memory: %s", exc)

    def check_fits(self) -> None:
        """On a GPU, the memory estimate against its free memory, before minutes of loading (a few seconds); under
        several processes against the smallest free memory of their GPUs (each must hold the step)."""
        acc = self.accelerator
        if acc.device.type != "cuda":
            return
        free = smallest_across(acc, free_device_bytes(acc.device))  # a collective: every process takes part
        if not acc.is_main_process:
            return
        from .memory import too_big

        try:
            advice = too_big(self.config, free)
        except Exception as exc:  # the estimate is advice: it never stops a run
            log.info("no memory estimate before loading: %s", exc)
            return
        if advice:
            log.warning("this run may not fit on %s: %s", acc.device, advice)

    def check_data(self) -> None:
        cfg = self.config
        plan_samples(cfg)  # a bad sample prompt is a config error now, not a crash at the first preview
        scanned = scan_dataset(cfg)
        if self.accelerator.is_main_process:
            findings = dataset_warnings(scanned, cfg)  # what `lora-scripts check` would say; not fatal
            for finding in findings[:5]:
                log.warning("check: %s", finding.message)
            if len(findings) > 5:
                log.warning("check: %d more warnings; `lora-scripts check --config ...` lists them all", len(findings) - 5)
        self.samples, self.val_samples = split_samples(scanned, cfg)
        self.items = build_items(self.samples, cfg)
        if cfg.batch_size > len(self.items):
            raise DatasetError([f"batch_size {cfg.batch_size} is larger than the dataset ({len(self.items)} images "
                                "counting repeats)"], f"Lower batch_size to {len(self.items)} or less, or add images "
                               "(or repeats: a folder named 10_name repeats its images 10 times per epoch).")

    def setup_caches(self, model: Model) -> None:
        """Encode latents and text embeddings once where that gives the same training (see data/cache.py)."""
        cfg, acc = self.config, self.accelerator
        self.latent_cache, self.text_cache = None, None
        disk = cfg.cache_dir or cfg.train_data_dir / ".lora-scripts-cache"
        use, why = latent_cache_plan(cfg)
        if use:
            self.latent_cache = LatentCache(vae_identity(model.vae), disk if cfg.cache_latents_to_disk else None)
            flips = (False, True) if cfg.flip_aug else (False,)
            with _main_first(acc, cfg.cache_latents_to_disk):
                self.latent_cache.fill(self.items, flips, model.vae, acc.device, acc.is_main_process)
        elif cfg.cache_latents:
            log.info("latent cache off: %s", why)
        use, why = text_cache_plan(cfg)
        if use:
            self.text_cache = TextCache(disk if cfg.cache_text_encoder_outputs_to_disk else None)
            with _main_first(acc, cfg.cache_text_encoder_outputs_to_disk):
                self.text_cache.fill([i.sample.caption for i in self.items], model, acc.device, acc.is_main_process)
        # Previews and validation still need both models; otherwise they leave the GPU.
        vae_off, text_off = offload_plan(cfg)  # each true only where its cache was filled above
        if vae_off:
            model.vae.to("cpu")
        if text_off:
            for encoder in model.text_encoders.values():
                encoder.to("cpu")

    def setup_loader(self, model: Model) -> None:
        cfg = self.config
        self.setup_caches(model)
        self.offloader = self.setup_offload(model)
        if self.offloader is None:
            model.denoiser.to(self.accelerator.device)
        self.sampler = BucketBatchSampler(self.items, cfg.batch_size, cfg.seed)
        loader = DataLoader(LoraDataset(self.items, cfg, self.latent_cache), batch_sampler=self.sampler,
                            collate_fn=Collate(model.family, model.tokenizers, model.token_chunks),
                            num_workers=cfg.dataloader_workers)
        self.loader = self.accelerator.prepare(loader)

    def setup_offload(self, model: Model) -> BlockOffloader | None:
        """offload: blocks:N / auto -> the block swap, which also puts the rest of the denoiser on the device."""
        cfg, acc = self.config, self.accelerator
        units = model.family.offload_units(model.denoiser) if cfg.offload != "none" else []
        count = parse_offload(cfg.offload)
        if count == "auto":
            count = self._auto_offload(model, units)
        if not count:
            return None
        if count > len(units):
            log.warning("offload: blocks:%d, but the %s has %d blocks: all of them are swapped", count,
                        model.family.denoiser_label, len(units))
        offloaded = choose_offloaded(units, min(count, len(units)))
        offloader = BlockOffloader(model.denoiser, units, offloaded, acc.device)
        if acc.is_main_process:
            swapped = sum(unit_bytes(units[i]) for i in offloaded) / 1024**3
            log.info("offload: %d of %d %s blocks (%.2f GB of frozen weights) stay in host memory and are copied "
                     "in as they run", len(offloaded), len(units), model.family.denoiser_label, swapped)
        return offloader

    def _auto_offload(self, model: Model, units: list) -> int:
        """offload: auto — on a GPU, the fewest blocks that make the step's estimate fit its free memory (with a
        tenth spare); none elsewhere."""
        acc = self.accelerator
        if acc.device.type != "cuda":
            log.info("offload: auto swaps nothing on %s (it sizes the swap to a GPU's free memory)", acc.device.type)
            return 0
        from .memory import estimate_memory

        step = estimate_memory(self.config)
        resident = sum(p.numel() * p.element_size() for p in model.denoiser.parameters())
        need = resident + step.lora + step.activations + step.transient - 0.9 * free_device_bytes(acc.device)
        # Each process sizes its own swap (its GPU's free memory); DDP leaves the frozen weights alone, so the
        # processes need not agree.
        count = blocks_needed([unit_bytes(u) for u in units], need)
        if count is None:
            if acc.is_main_process:
                log.warning("offload: auto: even with every block swapped the step is estimated not to fit; "
                            "swapping all")
            count = len(units)
        return count

    def setup_model(self) -> Model:
        cfg = self.config
        # Frozen weights are read straight in the training dtype: one copy in host RAM, never an fp32 one first
        # (the VAE is then cast back to fp32 below, where it must be).
        dtype = None if self.weight_dtype == torch.float32 else self.weight_dtype
        model = load_base_model(cfg.base_model, load_settings(cfg, dtype))
        model.token_chunks = cfg.max_token_length // 75
        check_objective_options(cfg, model)
        if self.accelerator.is_main_process:
            log.info("%s, objective %s (%s)", model.family.label, model.objective.describe(), model.objective_reason)
        family, device = model.family, self.accelerator.device
        # Frozen weights only run forward, so fp16/bf16 is enough; LoRA weights stay fp32 (inject_lora). The
        # denoiser joins the GPU after the caches are filled (setup_loader), as sd-scripts does: encoding with
        # the VAE and the text encoders is then the only thing there (SDXL: 1.7 GB instead of 6.5 GB of weights).
        model.denoiser.to(self.weight_dtype)
        for encoder in model.text_encoders.values():  # to the device once stored (below)
            encoder.to(self.weight_dtype)
        # An fp16 VAE overflows to NaN on bright images (a known SD1.5 failure); keep it fp32 unless bf16.
        model.vae.to(device, torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32)
        model.vae.requires_grad_(False)
        names = family.trainable(cfg.train_text_encoder)
        if cfg.text_encoder_2_lr is not None and len(names) < 3 and self.accelerator.is_main_process:
            log.warning("text_encoder_2_lr is set, but %s trains no second text encoder: it is not used", family.label)
        listed = {n: family.target_modules(n, model.modules[n], cfg.lora_targets) for n in names}
        check_targets(family, model.modules, cfg, listed)
        chosen = {n: choose_targets(family, n, model.modules[n], cfg, listed[n]) for n in names}
        if cfg.conv_rank is not None and not any(c[1] for c in chosen.values()):
            if cfg.network_type != "locon":  # conv_rank asked for by name: say it cannot apply
                raise ConfigError("the config", [f"conv_rank = {cfg.conv_rank}: the {family.label} "
                                                 f"{family.denoiser_label} has no 3x3 convolutions to train; remove "
                                                 "conv_rank (and conv_alpha)"])
            if self.accelerator.is_main_process:  # as LyCORIS' locon on a transformer: LoRA on its Linear layers
                log.warning("network_type locon: the %s %s has no 3x3 convolutions, so locon trains what lora "
                            "trains (its Linear layers)", family.label, family.denoiser_label)
        grown = [m for n in names for m in sorted(set(chosen[n][0]) - set(listed[n]))
                 if family.fused_slot(n, m) is not None]
        if grown and self.accelerator.is_main_process:
            log.info("network_type %s: %d more layers train, the other parts of fused %s layers the targets are in "
                     "(its change spans the whole fused weight; e.g. %s)", cfg.network_type, len(grown), family.label,
                     grown[0])
        self.target_modules = {n: c[0] for n, c in chosen.items()}
        self.lora_configs = {n: inject_lora(model.modules[n], cfg, *chosen[n], family=family, component=n)
                             for n in names}
        for n in names:  # in the file (as sd-scripts writes them) but never reached by the loss: not trained, and
            # not handed to DDP, which refuses parameters without a gradient
            idle = tuple(f"{m}." for m in family.idle_modules(n, model.modules[n], self.target_modules[n]))
            for path, p in model.modules[n].named_parameters():
                if is_adapter_param(path) and path.startswith(idle):
                    p.requires_grad_(False)
        problems = block_lr_problems(family, family.denoiser, model.denoiser, cfg.block_lr) if cfg.block_lr else []
        if problems:
            raise ConfigError("the config", problems)
        for name in family.text_encoders:
            if name not in names:
                model.modules[name].requires_grad_(False)
        if cfg.channels_last:
            # Convolutions pick their layout from the weights, so inputs need no conversion.
            model.denoiser.to(memory_format=torch.channels_last)
            model.vae.to(memory_format=torch.channels_last)
        stored = store_planned(cfg, family, model.modules, self.weight_dtype)
        for encoder in model.text_encoders.values():
            # Stored first: with text_encoder_weight_dtype they reach the GPU in fp8/int8/nf4, never at full size
            # (Flux.1's T5-XXL: 4.8 GB, not 9.5 GB, while the caches fill).
            encoder.to(device)
        if family.denoiser in stored and not cfg.gradient_checkpointing and self.accelerator.is_main_process:
            log.warning("base_weight_dtype: %s without gradient_checkpointing saves little at the peak: each layer's "
                        "%s copy is kept for the backward pass; set gradient_checkpointing: true",
                        cfg.base_weight_dtype, str(self.weight_dtype).removeprefix("torch."))
        if cfg.torch_compile:
            # In place (Module.compile), so parameter names and peft's state dicts stay as they are.
            model.denoiser.compile(**COMPILE_OPTIONS)
        if cfg.gradient_checkpointing:
            model.denoiser.enable_gradient_checkpointing()
            for name in names[1:]:
                checkpoint_text_encoder(model.modules[name])
        return model

    def setup_optimizer(self, model: Model) -> None:
        cfg = self.config
        names = model.family.trainable(cfg.train_text_encoder)
        # The denoiser's LoRA at learning_rate (times block_lr's multipliers, a group each), the text encoders' at
        # text_encoder_lr (SDXL's second: text_encoder_2_lr).
        groups = [{"params": lora_parameters(model.modules[n]), "lr": cfg.lr_of(i)} for i, n in enumerate(names)]
        if cfg.block_lr:
            groups[:1] = block_groups(model.family, names[0], model.modules[names[0]], cfg.block_lr, cfg.lr_of(0))
        optimizer = build_optimizer(cfg, groups, self.accelerator.device)
        n = self.accelerator.num_processes
        batches = math.ceil(len(self.sampler) / n)
        self.steps_per_epoch = max(1, math.ceil(batches / cfg.gradient_accumulation_steps))
        self.max_steps = cfg.max_train_steps or cfg.epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        # The prepared scheduler steps once per process per optimizer step, hence the factor n.
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * n,
                                  num_training_steps=self.max_steps * n)
        placement = [True] * (len(names) + 2)
        if self.offloader is not None:  # the swap placed the denoiser: prepare must not move its swapped weights
            placement[0] = False
        for name in names:
            # Frozen weights are read from the same file by every process: DistributedDataParallel is to neither
            # broadcast nor check them. It cannot broadcast int8 (torchao) tensors, nor fp8 ones over gloo, and
            # swapped weights are in host memory.
            module = model.modules[name]
            DDP._set_params_and_buffers_to_ignore_for_model(
                module, [n for n, p in module.named_parameters() if not p.requires_grad])
        out = self.accelerator.prepare(*[model.modules[n] for n in names], optimizer, scheduler,
                                       device_placement=placement)
        # The networks the step runs: prepared (DDP-wrapped) where they train, the model's own where frozen.
        self.trained = {**model.modules, **dict(zip(names, out[:len(names)]))}
        self.optimizer, self.lr_scheduler = out[-2], out[-1]
        if is_schedule_free(self.optimizer):
            self.optimizer.train()  # it refuses to step in its (initial) eval mode

    def set_train_mode(self) -> None:
        """Training mode (LoRA dropout on) for the networks that train; frozen text encoders stay in eval."""
        family = self.model.family
        for name in (family.denoiser,) + family.text_encoders:
            self.trained[name].train(name in self.lora_configs)

    def run_facts(self) -> RunFacts:
        cfg, model = self.config, self.model
        by_dir: dict[str, list[str]] = defaultdict(list)
        dirs: dict[str, dict[str, int]] = {}
        for s in self.samples:
            d = s.path.parent.name
            by_dir[d].append(s.caption)
            dirs.setdefault(d, {"n_repeats": s.repeats, "img_count": 0})["img_count"] += 1
        base = Path(cfg.base_model)
        is_file = base.is_file()  # a diffusers folder has no file hash
        return RunFacts(
            family=model.family, base_model_name=base.stem,
            base_model_hash=file_sha256(base) if is_file else "",
            base_model_legacy_hash=legacy_model_hash(base) if is_file else "",
            num_train_images=len(self.items), num_batches_per_epoch=len(self.sampler),
            tag_frequency=tag_frequency(by_dir), dataset_dirs=dirs, prediction_type=model.prediction_type,
            variant=model.variant,
        )

    # --- one step ------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        cfg, model = self.config, self.model
        family, vae, device = model.family, model.vae, self.accelerator.device
        with torch.no_grad():
            if "latent_mean" in batch:
                mean = batch["latent_mean"].to(device, vae.dtype)
                dist = sample_latents(mean, batch["latent_logvar"].to(device, vae.dtype), generator)
            else:
                dist = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist.sample(generator=generator)
            latents = family.latents(vae, dist).float()
        noised = model.objective.sample(latents, generator, cfg.noise_offset)
        if self.text_cache is not None:
            cond = self.text_cache.get(batch["captions"]).to(device)
        else:
            with torch.set_grad_enabled(cfg.train_text_encoder):
                encoders = {n: self.trained[n] for n in family.text_encoders}
                cond = family.encode(encoders, batch["tokens"], device)
        with self.accelerator.autocast():
            pred = family.predict(self.trained[family.denoiser], noised.noisy.to(self.weight_dtype), noised.timesteps,
                                  cond.to(device, self.weight_dtype), batch["placement"].to(device),
                                  **model.predict_options)
        return model.objective.loss(pred, noised, cfg.min_snr_gamma)

    def micro_step(self, batch: dict, step: int, micro: int, window: int | None = None) -> float:
        """One batch: forward and backward; at an accumulation boundary, the optimizer step, unless a gradient
        is NaN/inf (checked after DDP averaged them, so every process decides alike; such a step never reaches
        the weights and `grads_finite` says so). Returns the batch's loss.

        window: how many batches this optimizer step really accumulates. accelerate divides every loss by
        gradient_accumulation_steps, but the last step of an epoch may gather fewer batches (6 batches with
        accumulation 4: 4, then 2); its gradient is then scaled back up so it is a mean over the batches it has."""
        acc = self.accelerator
        n = self.config.gradient_accumulation_steps
        # Every network that trains (DDP-wrapped): between accumulation boundaries none of them all-reduces.
        with acc.accumulate(*(self.trained[name] for name in self.lora_configs)):
            loss = self.compute_loss(batch, self.step_rng(step, micro))
            acc.backward(loss * (n / window) if window and window != n else loss)
            if acc.sync_gradients:
                self._optimizer_step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float().item()

    def _optimizer_step(self) -> None:
        acc, cfg = self.accelerator, self.config
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if acc.scaler is not None:
            # fp16 on a GPU: overflowing gradients are expected while the GradScaler searches for its scale; it
            # skips such an update and lowers the scale itself, so the step must reach it (skipping it here would
            # keep the scale too high and every later step would overflow). Its skips are not failures.
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.grads_finite = True
            return
        # One reduction instead of a check (and a device sync) per tensor: the total norm is finite exactly
        # when every gradient is. Clipping divides by that norm; a non-finite step is discarded anyway.
        if cfg.max_grad_norm:
            norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            norm = _total_norm([p.grad for p in params if p.grad is not None])
        self.grads_finite = bool(torch.isfinite(norm))
        if self.grads_finite:
            self.optimizer.step()
            self.lr_scheduler.step()

    def step_rng(self, step: int, micro: int) -> torch.Generator:
        """Every random draw of a step derives from (seed, rank, step, micro-batch): noise and timesteps from
        the returned generator, LoRA dropout from the global RNG seeded here. Nothing depends on what ran
        before (data-loader iterators also draw from the global RNG), so a resumed run is bit-identical."""
        seed = hash((self.config.seed, self.accelerator.process_index, step, micro)) & 0x7FFF_FFFF_FFFF
        torch.manual_seed(seed)
        return torch.Generator(self.accelerator.device).manual_seed(seed)

    # --- saving ----------------------------------------------------------------------------------------------
    def lora_states(self) -> dict[str, dict[str, torch.Tensor]]:
        unwrap = self.accelerator.unwrap_model
        return {n: get_peft_model_state_dict(unwrap(self.trained[n])) for n in self.lora_configs}

    def save_lora(self, path: Path, facts: RunFacts, step: int, epoch: int) -> Path:
        with weights_in_use(self.optimizer):  # a schedule-free optimizer's averaged weights
            states = self.lora_states()
            bad = [k for s in states.values() for k, v in s.items() if not torch.isfinite(v).all()]
            if bad:  # the step guard should make this impossible; a NaN file would load and silently break images
                raise TrainingError(f"refusing to write {path.name}: {len(bad)} LoRA tensors hold NaN/inf (e.g. {bad[0]})")
            unwrap = self.accelerator.unwrap_model
            scales = {n: adapter_scales(unwrap(self.trained[n])) for n in self.lora_configs}
            state, meta = kohya_file_contents(self.config, facts, states, step, epoch, self.max_steps, scales)
        return save_kohya(path, state, meta)

    def restore(self, state: dict) -> None:
        """Put LoRA weights, optimizer and scheduler back as a checkpoint holds them, with this config's learning
        rates, weight decay and schedule: those may change on resume, and the log and the files record them."""
        unwrap = self.accelerator.unwrap_model
        models = {n: unwrap(m) for n, m in self.trained.items()}
        current = self.lora_states()
        for component, weights in state["lora"].items():
            _check_fits(component, weights, current.get(component))
            set_peft_model_state_dict(models[component], weights)
        self.optimizer.load_state_dict(state["optimizer"])
        schedule = self.lr_scheduler.scheduler  # accelerate's wrapper around the LambdaLR
        new_base_lrs = list(schedule.base_lrs)  # this config's learning rates (the checkpoint holds the old ones)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        # The schedule's shape (warm-up, total steps) comes from this config's functions; the step from the state.
        schedule.base_lrs = new_base_lrs
        lrs = [base * f(schedule.last_epoch) for base, f in zip(new_base_lrs, schedule.lr_lambdas)]
        for group, base, lr in zip(self.optimizer.param_groups, new_base_lrs, lrs):
            group.update(initial_lr=base, lr=lr, weight_decay=self.config.weight_decay)
        schedule._last_lr = lrs


def refuse_sharding(distributed_type) -> None:
    """Only data parallelism (DDP, `--multi_gpu`) is supported. Under FSDP/DeepSpeed each process holds a shard of
    the weights, so the LoRA export, previews, validation and the self-test, which run on the main process alone,
    would read shards or wait forever for the others; accelerate runs FSDP only on GPUs, so no test here can prove
    otherwise. Stop before loading anything rather than after hours of training."""
    from accelerate.utils import DistributedType

    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ConfigError("the launch", [
            f"accelerate launched this run with {distributed_type.value}: sharded training is not supported (the "
            "LoRA file is written from the main process's full copy of the weights). Launch with --multi_gpu "
            "(each GPU holds the frozen model) or, on one GPU, lower the memory with mixed_precision: bf16, "
            "gradient_checkpointing: true and the text/latent caches"])


def checkpoint_text_encoder(module) -> None:
    """transformers' activation checkpointing: activation_checkpointing_enable from 5.x (gradient_checkpointing_enable
    is its deprecated alias there, removed in 6), gradient_checkpointing_enable before."""
    enable = getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable
    enable()


def load_settings(cfg: TrainConfig, dtype: torch.dtype | None = None) -> LoadSettings:
    """What the config says about loading the base model (its other files, objective options)."""
    return LoadSettings(cfg.prediction_type, cfg.zero_terminal_snr, dtype=dtype, files=cfg.component_files,
                        tokenizer_dir=cfg.tokenizer_dir, timestep_sampling=cfg.timestep_sampling,
                        sigmoid_scale=cfg.sigmoid_scale, discrete_flow_shift=cfg.discrete_flow_shift,
                        loss_weighting=cfg.loss_weighting, guidance_scale=cfg.guidance_scale,
                        max_sequence_length=cfg.max_sequence_length)


def check_objective_options(cfg: TrainConfig, model: Model) -> None:
    """Options of one objective set for a model trained with the other: an error naming the key, never ignored."""
    flow = not hasattr(model.objective, "snr")  # flow matching has no SNR (and no Min-SNR weighting)
    problems = []
    if flow and cfg.max_token_length != 75:
        problems.append(f"max_token_length = {cfg.max_token_length}: CLIP's 75-token windows (SD, SDXL); "
                        f"{model.family.label} reads captions with T5, up to max_sequence_length tokens (512 for dev): "
                        "remove it")
    if flow and cfg.min_snr_gamma is not None:
        problems.append(f"min_snr_gamma = {cfg.min_snr_gamma:g}: Min-SNR weighting is for DDPM models (SD1/SD2/SDXL); "
                        f"{model.family.label} trains with flow matching: remove it, or use loss_weighting")
    if not flow:
        defaults = {"timestep_sampling": "flux_shift", "loss_weighting": "none", "guidance_scale": 1.0,
                    "max_sequence_length": None}
        problems += [f"{k} = {getattr(cfg, k)!r}: a flow-matching (Flux.1) option; {model.family.label} trains with "
                     f"DDPM noise, so it would do nothing: remove it" for k, v in defaults.items() if getattr(cfg, k) != v]
        problems += [f"{k}: a Flux.1 component file, but base_model is {model.family.label}: remove it"
                     for k in cfg.component_files]
    if problems:
        raise ConfigError("the config", problems)


def _check_fits(component: str, saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor] | None) -> None:
    """A checkpoint of another rank or other target layers cannot be loaded; say which, not 130 size errors."""
    if current is None:
        raise TrainingError(f"the checkpoint trains a {component} LoRA and this config does not "
                            "(train_text_encoder changed?); set it back to resume, or start a new run")
    if set(saved) != set(current):
        raise TrainingError(f"the checkpoint's {component} LoRA covers {len(saved) // 2} layers, this config's "
                            f"{len(current) // 2} (lora_targets changed?); set it back to resume, or start a new run")
    for key, tensor in saved.items():
        if tensor.shape != current[key].shape:
            axis = 0 if "lora_A" in key else 1  # lora_A: (rank, in), lora_B: (out, rank)
            rank, now = tensor.shape[axis], current[key].shape[axis]
            raise TrainingError(f"the checkpoint's LoRA has rank {rank}, this config's lora_rank is {now}; set "
                                f"lora_rank: {rank} to resume, or start a new run")


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
