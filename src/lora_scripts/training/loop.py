"""Library API ``train(config) -> TrainResult``, and the fit loop around a set-up Trainer: epochs, steps,
logging, checkpoints, resume and Ctrl-C."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..config import TrainConfig
from .checkpoints import Position, checkpoint_dir, latest_checkpoint, load_state, prune_checkpoints, restore_rng, save_state
from ..errors import TrainingError, TrainingInterrupted
from .export import RunFacts, save_diffusers
from .metrics import MetricsLogger
from .optimizers import effective_lr, weights_in_use
from .runlock import OutputLock
from .runs import RESOLVED_MARK, check_output_dir, config_hash, hashed_config, record_run, report_resume, resolved_config_path
from .trainer import Trainer

log = logging.getLogger(__name__)
# Consecutive non-finite losses tolerated (each step skipped) before the run stops.
MAX_NONFINITE = 3


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
    verified: str | None = None  # the post-training self-test's summary (None: not run)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)


@dataclass(frozen=True)
class Progress:
    """What a live view shows after each optimizer step; rates count only this session's steps (not a resume's)."""

    step: int
    total: int
    epoch: int
    epochs: int
    loss: float
    lr: float
    steps_per_second: float
    eta_seconds: float
    saved: bool = False  # a checkpoint of this step was just written: a throttled live view must show it now

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


ProgressCallback = Callable[[Progress], None]


class _Loop:
    """Mutable progress of one run (the config stays frozen)."""

    def __init__(self, step: int = 0, epoch: int = 0, skip: int = 0) -> None:
        self.step = step
        self.epoch = epoch
        self.skip = skip  # batches of the current epoch already consumed before a resume
        self.consumed = skip
        self.last_loss = float("nan")
        self.nonfinite = 0  # non-finite steps in a row
        self.grads_finite = True
        self.stop_requested = False
        self.on_progress: ProgressCallback | None = None
        self.session_start = (step, time.time())  # (step, time) this process began at, for it/s and ETA

    def report(self, total: int, epochs: int, lr: float, saved: bool = False) -> None:
        if self.on_progress is None:
            return
        first_step, t0 = self.session_start
        rate = (self.step - first_step) / max(time.time() - t0, 1e-9)
        eta = (total - self.step) / rate if rate > 0 else float("nan")
        self.on_progress(Progress(self.step, total, self.epoch, epochs, self.last_loss, lr, rate, eta, saved))


class _StopSignals:
    """First Ctrl-C: finish the step, save a checkpoint, exit cleanly. Second: stop at once.

    SIGTERM is taken as a first Ctrl-C: it is how job schedulers, `docker stop` and `kill` ask a process to end,
    with a grace period before they kill it (`accelerate launch` forwards the terminal's Ctrl-C as SIGINT and
    waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s, before SIGKILL)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, loop: _Loop):
        self.loop = loop
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.loop.stop_requested:
            raise KeyboardInterrupt
        self.loop.stop_requested = True
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: saving a checkpoint after this step (press Ctrl-C again to stop at once)")
        else:
            log.warning("%s: saving a checkpoint after this step (a second signal stops at once)",
                        signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, previous in self.previous.items():
            if previous is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(s, previous)
        return False


def fit(trainer: Trainer, resume: Path | None = None, on_progress: ProgressCallback | None = None) -> TrainResult:
    config, acc, out = trainer.config, trainer.accelerator, trainer.config.output_dir
    started = time.time()
    loop = _resume(trainer, resume) if resume else _Loop()
    loop.on_progress = on_progress if acc.is_main_process else None
    # Only the main process writes files, so only it hashes the base model (seconds for a 4 GB file).
    facts = trainer.run_facts() if acc.is_main_process else None
    metrics = _start_outputs(trainer, loop.step) if acc.is_main_process else None
    loop.session_start = (loop.step, time.time())  # it/s and ETA count training, not the hashing above
    bar = tqdm(total=trainer.max_steps, initial=loop.step, disable=not acc.is_main_process, unit="step",
               dynamic_ncols=True)
    with _StopSignals(loop):
        while loop.step < trainer.max_steps:
            _run_epoch(trainer, loop, facts, metrics, bar, started)
            if loop.stop_requested:
                bar.close()
                _interrupt(trainer, loop, facts, metrics)
            if loop.step >= trainer.max_steps and loop.consumed < len(trainer.loader):
                break
            _end_epoch(trainer, loop, facts, metrics)
    bar.close()
    # The finished LoRA gets a last validation loss and preview images before the files are closed; all of it,
    # and the self-test, on the weights the file holds (a schedule-free optimizer's averaged ones).
    with weights_in_use(trainer.optimizer):
        _observe(trainer, loop, metrics, validate=bool(trainer.validator), sample=bool(trainer.previews.plans))
        lora_path, diffusers_path = _save_final(trainer, loop, facts, metrics)
        verified = _self_test(trainer, lora_path) if acc.is_main_process else None
    result = TrainResult(lora_path, diffusers_path, out, loop.step, loop.epoch, loop.last_loss,
                         metrics.losses if metrics else [], time.time() - started, len(trainer.samples), verified,
                         list(metrics.validation) if metrics else [])
    if acc.is_main_process:
        write_summary(result, config)
    return result


def write_summary(result: TrainResult, config) -> None:
    """summary.json: what `compare` and the web UI read about a finished run."""
    import json

    from .metrics import smooth

    best = min(result.validation, key=lambda sv: sv[1]) if result.validation else None
    summary = {
        "name": config.name, "lora": str(result.lora_path), "steps": result.steps, "epochs": result.epochs,
        "seconds": round(result.seconds, 1), "images": result.num_images,
        "final_loss": result.final_loss, "final_loss_smoothed": smooth(result.losses)[-1] if result.losses else None,
        "validation_loss": result.validation[-1][1] if result.validation else None,
        "best_validation": {"step": best[0], "loss": best[1]} if best else None,
        "validation": [{"step": s, "loss": v} for s, v in result.validation],
        "settings": {k: config.to_yaml_dict()[k] for k in ("lora_rank", "lora_alpha", "epochs", "learning_rate",
                                                           "batch_size", "resolution", "lora_targets")},
        "self_test": result.verified,
    }
    atomic_write_text(config.output_dir / "summary.json", json.dumps(summary, indent=2, default=str))


def _self_test(trainer: Trainer, lora_path: Path) -> str | None:
    """Reload the saved file the way diffusers and A1111/ComfyUI do; a file that loses keys fails the run. The
    names are checked against the base file's header; the effect on the networks already in memory."""
    config = trainer.config
    if not config.verify_after_training:
        return None
    from ..interop.verify import verify

    unwrap = trainer.accelerator.unwrap_model
    networks = {n: unwrap(m) for n, m in trainer.trained.items() if n != trainer.model.family.autoencoder}
    report = verify(lora_path, config.base_model, loaded=(trainer.model, networks), files=config.component_files)
    if not report.ok:
        raise TrainingError(f"the LoRA was written but failed its self-test; please report this as a bug.\n"
                            f"{report.summary()}")
    (log.warning if report.notes else log.info)("self-test passed: %s", report.summary())
    return report.summary()


def _resume(trainer: Trainer, folder: Path) -> _Loop:
    state = load_state(folder / "training_state.pt")
    n = trainer.accelerator.num_processes
    if state["world_size"] != n:
        raise TrainingError(f"{folder} was saved by {state['world_size']} process(es); resume it with the same "
                            f"number (now {n}) so the data order matches.")
    trainer.restore(state)
    restore_rng(state["rng"])
    pos = Position(**state["position"])
    log.info("resuming from %s: step %d, epoch %d", folder, pos.step, pos.epoch + 1)
    return _Loop(pos.step, pos.epoch, pos.batches_in_epoch)


def _start_outputs(trainer: Trainer, resume_step: int) -> MetricsLogger:
    config = trainer.config
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    # Never over a config.yaml of the user's own (resolved_config_path then picks config.resolved.yaml).
    atomic_write_text(resolved_config_path(out),
                      f"{RESOLVED_MARK}\n" + yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
    modules = " + ".join(f"{len(m)} {name}" for name, m in trainer.target_modules.items())
    log.info("%d images (%d with repeats), %d steps per epoch, %d steps, LoRA modules: %s",
             len(trainer.samples), len(trainer.items), trainer.steps_per_epoch, trainer.max_steps, modules)
    return MetricsLogger(out, config.log_dir, f"{config.name}: rank {config.lora_rank}, lr {config.learning_rate:g}",
                         resume_step)


def _batches(trainer: Trainer, loop: _Loop):
    # accelerate's loader re-sets its batch sampler's epoch from its own iteration counter at every pass, so it
    # must be told the epoch too, or a resumed run would replay epoch 0's order.
    trainer.sampler.set_epoch(loop.epoch)
    trainer.loader.set_epoch(loop.epoch)
    if not loop.skip:
        loop.consumed = 0
        return trainer.loader
    # Resuming mid-epoch: the same batches in the same order, minus those already trained on.
    skip, loop.skip = loop.skip, 0
    loader = trainer.accelerator.skip_first_batches(trainer.loader, skip)
    loader.set_epoch(loop.epoch)
    return loader


def _run_epoch(trainer: Trainer, loop: _Loop, facts: RunFacts | None, metrics: MetricsLogger | None, bar,
               started: float) -> None:
    config, acc = trainer.config, trainer.accelerator
    trainer.set_train_mode()
    accum_loss, micro, window = 0.0, 0, 1
    per_epoch = len(trainer.loader)  # this process's batches in a full epoch (before any resume skip)
    for batch in _batches(trainer, loop):
        if micro == 0:  # a new optimizer step: how many batches it gathers (fewer at the end of an epoch)
            window = min(config.gradient_accumulation_steps, max(1, per_epoch - loop.consumed))
        loop.consumed += 1
        accum_loss += trainer.micro_step(batch, loop.step, micro, window) / window
        micro += 1
        loop.grads_finite = trainer.grads_finite
        if not acc.sync_gradients:
            continue
        loop.step += 1
        # The mean over processes decides, so every process stops (or carries on) together.
        loop.last_loss = acc.gather(torch.tensor([accum_loss], device=acc.device)).mean().item()
        accum_loss, micro = 0.0, 0
        _guard_nonfinite(loop, config.on_nonfinite, config.output_dir)
        lr = effective_lr(trainer.optimizer)  # Prodigy: its step-size estimate d x learning_rate
        if metrics:
            metrics.log(loop.step, loop.epoch, loop.last_loss, lr, time.time() - started)
        bar.update(1)
        loop.report(trainer.max_steps, trainer.num_epochs, lr)
        bar.set_postfix(epoch=f"{loop.epoch + 1}/{trainer.num_epochs}", loss=f"{loop.last_loss:.4f}", lr=f"{lr:.2e}")
        if config.save_steps and loop.step % config.save_steps == 0 and loop.step < trainer.max_steps:
            save_checkpoint(trainer, loop, facts, metrics)
            loop.report(trainer.max_steps, trainer.num_epochs, lr, saved=True)
        if loop.step < trainer.max_steps:
            _observe(trainer, loop, metrics, validate=trainer.validator.due(loop.step),
                     sample=trainer.previews.due(loop.step))
        if loop.step >= trainer.max_steps or _stop_requested(trainer, loop):
            return


def _stop_requested(trainer: Trainer, loop: _Loop) -> bool:
    # Every process must leave the epoch at the same step, so the main process's Ctrl-C decides for all.
    flag = torch.tensor([1.0 if loop.stop_requested else 0.0], device=trainer.accelerator.device)
    loop.stop_requested = bool(trainer.accelerator.reduce(flag, "max").item())
    return loop.stop_requested


def _observe(trainer: Trainer, loop: _Loop, metrics: MetricsLogger | None, validate: bool, sample: bool) -> None:
    """Validation loss and preview images: main process only, the others wait (nothing here trains)."""
    if not (validate or sample):
        return
    acc = trainer.accelerator
    if acc.is_main_process:
        with weights_in_use(trainer.optimizer):
            if validate and (not metrics.validation or metrics.validation[-1][0] != loop.step):
                metrics.log_validation(loop.step, trainer.validator.loss())
            if sample:
                trainer.previews.run(loop.step, metrics.tensorboard)
        metrics.plot()
    acc.wait_for_everyone()


def _end_epoch(trainer: Trainer, loop: _Loop, facts: RunFacts | None, metrics: MetricsLogger | None = None) -> None:
    config = trainer.config
    loop.epoch += 1
    loop.consumed = 0
    if loop.step < trainer.max_steps:
        every_epoch = bool(trainer.validator) and config.validate_every_n_steps is None
        _observe(trainer, loop, metrics, validate=every_epoch, sample=trainer.previews.due(loop.step, loop.epoch))
    n = config.save_every_n_epochs
    if n and loop.epoch % n == 0 and loop.step < trainer.max_steps and trainer.accelerator.is_main_process:
        path = config.output_dir / f"{config.name}-{loop.epoch:06d}.safetensors"
        trainer.save_lora(path, facts, loop.step, loop.epoch)


def _interrupt(trainer: Trainer, loop: _Loop, facts, metrics) -> None:
    folder = save_checkpoint(trainer, loop, facts, metrics)
    # The live view may have skipped the last steps (it is throttled): it must show the step that was saved.
    loop.report(trainer.max_steps, trainer.num_epochs, effective_lr(trainer.optimizer), saved=True)
    if metrics:
        metrics.close()
    raise TrainingInterrupted(
        f"stopped at step {loop.step}; checkpoint saved in {folder}. Continue with the same command plus --resume.")


def _guard_nonfinite(loop: _Loop, policy: str = "skip", output_dir: Path | None = None) -> None:
    """Called after each optimizer step: the update was already skipped if anything was NaN/inf; decide whether
    to go on (on_nonfinite: skip, up to MAX_NONFINITE in a row) or stop (on_nonfinite: stop)."""
    if math.isfinite(loop.last_loss) and loop.grads_finite:
        loop.nonfinite = 0
        return
    loop.nonfinite += 1
    what = f"loss is {loop.last_loss}" if not math.isfinite(loop.last_loss) else "a gradient is NaN/inf"
    causes = ("Usual causes: learning_rate too high (halve it), fp16 overflow (use mixed_precision: bf16, or no), "
              "or an fp16 VAE (this trainer keeps it fp32 unless bf16).")
    if policy == "skip" and loop.nonfinite < MAX_NONFINITE:
        log.warning("step %d: %s; step skipped, weights unchanged. %s", loop.step, what, causes)
        return
    last = latest_checkpoint(output_dir) if output_dir else None
    kept = f" The last good checkpoint is {last} (continue from it with --resume)." if last else ""
    run = f"for {MAX_NONFINITE} steps in a row" if policy == "skip" else "(on_nonfinite: stop)"
    raise TrainingError(f"step {loop.step}: {what} {run}; stopped without saving NaN weights.{kept} {causes}")


def save_checkpoint(trainer: Trainer, loop: _Loop, facts: RunFacts | None, metrics: MetricsLogger | None) -> Path:
    """The LoRA file first, the training state last: a folder is resumable only once both are complete."""
    acc, config = trainer.accelerator, trainer.config
    folder = checkpoint_dir(config.output_dir, loop.step)
    acc.wait_for_everyone()
    if acc.is_main_process:
        trainer.save_lora(folder / f"{config.name}.safetensors", facts, loop.step, loop.epoch)
        lora = {c: {k: v.detach().cpu().clone() for k, v in s.items()} for c, s in trainer.lora_states().items()}
        save_state(folder, Position(loop.step, loop.epoch, loop.consumed), lora, trainer.optimizer.state_dict(),
                   trainer.lr_scheduler.state_dict(), config_hash(config), acc.num_processes, hashed_config(config))
        prune_checkpoints(config.output_dir, config.save_last_n)
        if metrics:
            metrics.plot()
    acc.wait_for_everyone()
    return folder


def _save_final(trainer: Trainer, loop: _Loop, facts: RunFacts | None, metrics: MetricsLogger | None):

    acc, config, out = trainer.accelerator, trainer.config, trainer.config.output_dir
    acc.wait_for_everyone()
    lora_path, diffusers_path = out / f"{config.name}.safetensors", None
    if acc.is_main_process:
        trainer.save_lora(lora_path, facts, loop.step, loop.epoch)
        if config.save_format == "diffusers":
            diffusers_path = save_diffusers(out / "pytorch_lora_weights.safetensors", config, trainer.lora_states(),
                                            lora_config_dicts(trainer), trainer.model.family.lora_metadata(
                                                trainer.model.prediction_type, trainer.model.variant))
        metrics.close()
    acc.wait_for_everyone()
    return lora_path, diffusers_path


def train(config: TrainConfig, resume: Path | bool | None = None, overwrite: bool = False,
          on_progress: ProgressCallback | None = None) -> TrainResult:
    """Train a LoRA as the config says; returns where the files are and how the loss went.

    resume: True = the latest checkpoint in output_dir, a path = that checkpoint folder. overwrite: allow
    starting over in an output_dir that holds another run (its checkpoints and logs are removed).
    on_progress: called on the main process after every optimizer step (the web UI's live view)."""
    trainer = Trainer(config)
    acc = trainer.accelerator
    lock = _lock_output_dir(config, acc)
    try:
        try:
            # Order matters: every check (output_dir, dataset, base model) runs before the first file is written,
            # so a bad input leaves nothing behind. Judged before the others could see the main process's run.json.
            checkpoint = check_output_dir(config, resume, overwrite)
            changes = report_resume(config, checkpoint) if checkpoint else None
            acc.wait_for_everyone()
            trainer.setup()
        except KeyboardInterrupt:
            # Ctrl-C before the training loop took over (data check, model load, caching): nothing to save yet,
            # and nothing was written to output_dir.
            raise TrainingInterrupted("stopped before training began; nothing was written. Run the same command "
                                      "again to start.") from None
        if acc.is_main_process:
            record_run(config, checkpoint, overwrite, changes)
        acc.wait_for_everyone()
        return fit(trainer, checkpoint, on_progress)
    finally:
        try:
            trainer.close()
        finally:  # the lock goes even if a second Ctrl-C lands while the swap's memory is released
            if lock:
                lock.release()


def _lock_output_dir(config: TrainConfig, acc) -> OutputLock | None:
    """The main process locks output_dir for the whole run; every process stops if another run holds it."""
    from accelerate.utils import broadcast_object_list

    from ..errors import OutputDirError
    from .runs import check_writable

    lock, refusal = None, None
    if acc.is_main_process:
        try:
            check_writable(config.output_dir)  # its own message for a folder we may not write in
            lock = OutputLock(config.output_dir).acquire()
        except OutputDirError as exc:
            refusal = str(exc)
        except OSError as exc:
            refusal = f"output_dir {config.output_dir}: cannot create it ({exc.strerror}); choose another output_dir"
    refusal = broadcast_object_list([refusal])[0] if acc.num_processes > 1 else refusal
    if refusal:
        raise OutputDirError(refusal)
    return lock


def lora_config_dicts(trainer: Trainer) -> dict[str, dict]:
    """Each component's LoraConfig as diffusers stores it in a LoRA file's metadata."""
    out = {}
    for component, cfg in trainer.lora_configs.items():
        d = cfg.to_dict()
        out[component] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()
                          if k in ("r", "lora_alpha", "target_modules", "lora_dropout", "use_dora", "use_rslora")
                          or k in ("rank_pattern", "alpha_pattern") and v}  # conv_rank's 3x3 layers
    return out
