"""The training loop: the only module that talks to accelerate.

Library API: ``train(config) -> TrainResult``. Everything it needs comes from the typed config.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from peft.utils import get_peft_model_state_dict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .config import TrainConfig
from .data.dataset import BucketBatchSampler, Collate, LoraDataset, build_items
from .data.scan import scan_dataset
from .errors import TrainingError
from .export import RunFacts, kohya_file_contents, save_diffusers, save_kohya, tag_frequency
from .families.loading import BaseModel, load_base_model
from .hashes import file_sha256, legacy_model_hash
from .lora import inject_lora, lora_parameters, text_encoder_target_modules, unet_target_modules
from .losses import diffusion_loss, sample_noise, training_target
from .metrics import MetricsLogger

log = logging.getLogger(__name__)
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Consecutive non-finite losses tolerated (each step skipped) before the run stops.
_MAX_NONFINITE = 3


@dataclass
class TrainResult:
    lora_path: Path
    diffusers_path: Path | None
    output_dir: Path
    steps: int
    epochs: int
    final_loss: float
    losses: list[float]
    seconds: float
    num_images: int


def _uses_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel and accel.is_available())


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        # CPU runs (CI, and `accelerate launch --multi_gpu` with gloo on CPU) must say so explicitly, or
        # accelerate starts unsynchronised processes.
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            cpu=not _uses_accelerator(),
        )
        self.weight_dtype = _DTYPES[config.mixed_precision]

    # --- set-up ------------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        self.model = self.setup_model()
        self.setup_data(self.model)
        self.setup_optimizer(self.model)
        return self

    def fit(self) -> TrainResult:
        return _fit(self)

    def setup_data(self, model: BaseModel) -> None:
        cfg = self.config
        self.samples = scan_dataset(cfg)
        self.items = build_items(self.samples, cfg)
        self.sampler = BucketBatchSampler(self.items, cfg.batch_size, cfg.seed)
        loader = DataLoader(LoraDataset(self.items, cfg), batch_sampler=self.sampler,
                            collate_fn=Collate(model.tokenizer), num_workers=cfg.dataloader_workers)
        self.loader = self.accelerator.prepare(loader)

    def setup_model(self) -> BaseModel:
        cfg = self.config
        model = load_base_model(cfg.base_model)
        device = self.accelerator.device
        # Frozen weights only run forward, so fp16/bf16 is enough; LoRA weights stay fp32 (inject_lora).
        model.unet.to(device, self.weight_dtype)
        model.text_encoder.to(device, self.weight_dtype)
        # An fp16 VAE overflows to NaN on bright images (a known SD1.5 failure); keep it fp32 unless bf16.
        model.vae.to(device, torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32)
        model.vae.requires_grad_(False)
        self.unet_modules = unet_target_modules(model.unet, cfg.lora_targets)
        self.lora_configs = {"unet": inject_lora(model.unet, cfg, self.unet_modules)}
        self.te_modules: list[str] = []
        if cfg.train_text_encoder:
            self.te_modules = text_encoder_target_modules(model.text_encoder, cfg.lora_targets)
            self.lora_configs["text_encoder"] = inject_lora(model.text_encoder, cfg, self.te_modules)
        else:
            model.text_encoder.requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                model.text_encoder.gradient_checkpointing_enable()
        return model

    def setup_optimizer(self, model: BaseModel) -> None:
        cfg = self.config
        groups = [{"params": lora_parameters(model.unet), "lr": cfg.learning_rate}]
        if cfg.train_text_encoder:
            groups.append({"params": lora_parameters(model.text_encoder), "lr": cfg.te_lr})
        fused = self.accelerator.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused or None,
                                      foreach=None if fused else True)
        n = self.accelerator.num_processes
        batches = math.ceil(len(self.sampler) / n)
        self.steps_per_epoch = max(1, math.ceil(batches / cfg.gradient_accumulation_steps))
        self.max_steps = cfg.max_train_steps or cfg.epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        # The prepared scheduler steps once per process per optimizer step, hence the factor n.
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * n,
                                  num_training_steps=self.max_steps * n)
        prepared = [model.unet] + ([model.text_encoder] if cfg.train_text_encoder else []) + [optimizer, scheduler]
        out = self.accelerator.prepare(*prepared)
        self.unet = out[0]
        self.text_encoder = out[1] if cfg.train_text_encoder else model.text_encoder
        self.optimizer, self.lr_scheduler = out[-2], out[-1]

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
            tag_frequency=tag_frequency(by_dir), dataset_dirs=dirs,
        )

    # --- one step ------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        cfg, model = self.config, self.model
        vae = model.vae
        with torch.no_grad():
            pixels = batch["pixel_values"].to(self.accelerator.device, vae.dtype)
            latents = vae.encode(pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor
            latents = latents.float()
        noise = sample_noise(latents, cfg.noise_offset, generator)
        sched = model.noise_scheduler
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                                  device=latents.device).long()
        noisy = sched.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(cfg.train_text_encoder):
            hidden = self.text_encoder(batch["input_ids"].to(self.accelerator.device))[0]
        with self.accelerator.autocast():
            pred = self.unet(noisy.to(self.weight_dtype), timesteps, hidden.to(self.weight_dtype)).sample
        target = training_target(sched, latents, noise, timesteps)
        return diffusion_loss(pred, target, sched, timesteps, cfg.min_snr_gamma)

    def generator(self, step: int, micro: int) -> torch.Generator:
        # One generator per (seed, rank, step, micro-batch): noise and timesteps do not depend on how the run
        # was interrupted, so a resumed run draws exactly what an unbroken one would.
        seed = hash((self.config.seed, self.accelerator.process_index, step, micro)) & 0x7FFF_FFFF_FFFF
        return torch.Generator(self.accelerator.device).manual_seed(seed)

    # --- saving ----------------------------------------------------------------------------------------------
    def lora_states(self) -> dict[str, dict[str, torch.Tensor]]:
        unwrap = self.accelerator.unwrap_model
        states = {"unet": get_peft_model_state_dict(unwrap(self.unet))}
        if self.config.train_text_encoder:
            states["text_encoder"] = get_peft_model_state_dict(unwrap(self.text_encoder))
        return states

    def save_lora(self, path: Path, facts: RunFacts, step: int, epoch: int) -> Path:
        state, meta = kohya_file_contents(self.config, facts, self.lora_states(), step, epoch, self.max_steps)
        return save_kohya(path, state, meta)


def _lora_config_dicts(trainer: Trainer) -> dict[str, dict]:
    out = {}
    for component, cfg in trainer.lora_configs.items():
        d = cfg.to_dict()
        out[component] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()
                          if k in ("r", "lora_alpha", "target_modules", "lora_dropout", "use_dora", "use_rslora")}
    return out


def train(config: TrainConfig) -> TrainResult:
    """Train a LoRA as the config says; returns where the files are and how the loss went."""
    return Trainer(config).setup().fit()


class _Loop:
    """Mutable progress of one run (the config stays frozen)."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.last_loss = float("nan")
        self.nonfinite = 0


def _fit(trainer: "Trainer") -> TrainResult:
    config, acc, out = trainer.config, trainer.accelerator, trainer.config.output_dir
    started = time.time()
    # Only the main process writes files, so only it hashes the base model (seconds for a 4 GB file).
    facts = trainer.run_facts() if acc.is_main_process else None
    metrics = _start_outputs(trainer) if acc.is_main_process else None
    loop = _Loop()
    bar = tqdm(total=trainer.max_steps, disable=not acc.is_main_process, unit="step", dynamic_ncols=True)
    while loop.step < trainer.max_steps:
        _run_epoch(trainer, loop, facts, metrics, bar, started)
        loop.epoch += 1
        n = config.save_every_n_epochs
        if n and loop.epoch % n == 0 and loop.step < trainer.max_steps and acc.is_main_process:
            trainer.save_lora(out / f"{config.name}-{loop.epoch:06d}.safetensors", facts, loop.step, loop.epoch)
    bar.close()
    acc.wait_for_everyone()
    lora_path, diffusers_path = out / f"{config.name}.safetensors", None
    if acc.is_main_process:
        trainer.save_lora(lora_path, facts, loop.step, loop.epoch)
        if config.save_format == "diffusers":
            diffusers_path = save_diffusers(out / "pytorch_lora_weights.safetensors", config, trainer.lora_states(),
                                            _lora_config_dicts(trainer))
        metrics.close()
    acc.wait_for_everyone()
    return TrainResult(lora_path, diffusers_path, out, loop.step, loop.epoch, loop.last_loss,
                       metrics.losses if metrics else [], time.time() - started, len(trainer.samples))


def _start_outputs(trainer: "Trainer") -> MetricsLogger:
    config = trainer.config
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
    log.info("%d images (%d with repeats), %d steps per epoch, %d steps, %d UNet + %d text-encoder LoRA modules",
             len(trainer.samples), len(trainer.items), trainer.steps_per_epoch, trainer.max_steps,
             len(trainer.unet_modules), len(trainer.te_modules))
    return MetricsLogger(out, config.log_dir, f"{config.name}: rank {config.lora_rank}, lr {config.learning_rate:g}")


def _run_epoch(trainer: "Trainer", loop: _Loop, facts: RunFacts | None, metrics: MetricsLogger | None, bar,
               started: float) -> None:
    config, acc = trainer.config, trainer.accelerator
    trainer.sampler.set_epoch(loop.epoch)
    trainer.unet.train()
    trainer.text_encoder.train(config.train_text_encoder)
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    accum_loss, micro = 0.0, 0
    for batch in trainer.loader:
        with acc.accumulate(trainer.unet):
            loss = trainer.compute_loss(batch, trainer.generator(loop.step, micro))
            micro += 1
            acc.backward(loss)
            # Gradients are checked after DDP averaged them, so every process takes the same decision.
            if acc.sync_gradients and _grads_finite(params):
                if config.max_grad_norm:
                    acc.clip_grad_norm_(params, config.max_grad_norm)
                trainer.optimizer.step()
                trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            accum_loss += loss.detach().float().item() / config.gradient_accumulation_steps
        if not acc.sync_gradients:
            continue
        loop.step += 1
        # The mean over processes decides, so every process stops (or carries on) together.
        loop.last_loss = acc.gather(torch.tensor([accum_loss], device=acc.device)).mean().item()
        accum_loss, micro = 0.0, 0
        _guard_nonfinite(loop)
        lr = trainer.lr_scheduler.get_last_lr()[0]
        if metrics:
            metrics.log(loop.step, loop.epoch, loop.last_loss, lr, time.time() - started)
        bar.update(1)
        bar.set_postfix(epoch=f"{loop.epoch + 1}/{trainer.num_epochs}", loss=f"{loop.last_loss:.4f}", lr=f"{lr:.2e}")
        if config.save_steps and loop.step % config.save_steps == 0 and loop.step < trainer.max_steps:
            _save_checkpoint(trainer, facts, metrics, loop.step, loop.epoch)
        if loop.step >= trainer.max_steps:
            return


def _guard_nonfinite(loop: _Loop) -> None:
    if math.isfinite(loop.last_loss):
        loop.nonfinite = 0
        return
    loop.nonfinite += 1
    log.warning("step %d: loss is %s; step skipped. Usual causes: learning_rate too high, or fp16 overflow "
                "(use mixed_precision: bf16).", loop.step, loop.last_loss)
    if loop.nonfinite >= _MAX_NONFINITE:
        raise TrainingError(
            f"loss was NaN/inf for {_MAX_NONFINITE} steps in a row (at step {loop.step}); stopped without saving NaN "
            "weights. Lower learning_rate (e.g. halve it) or switch mixed_precision to bf16.")


def _grads_finite(params: list[torch.nn.Parameter]) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def _save_checkpoint(trainer: Trainer, facts: RunFacts | None, metrics: MetricsLogger | None, step: int, epoch: int) -> None:
    acc = trainer.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        folder = trainer.config.output_dir / "checkpoints" / f"step-{step}"
        trainer.save_lora(folder / f"{trainer.config.name}.safetensors", facts, step, epoch)
        if metrics:
            metrics.plot()
    acc.wait_for_everyone()
