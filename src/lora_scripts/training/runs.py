"""One output folder per run: never train over another run's files by accident.

`run.json` in output_dir records the hash of the resolved config. Starting a run where another one lives stops
with the choices: --resume, a new output_dir (templating such as ./output/sci_lab_{lora_rank}_{epochs} makes
one per config version), or --overwrite. A run holds a lock on its output_dir from its first check to its last
file (runlock.py), so a second run started at the same moment is refused instead of mixing files with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from ..atomic import atomic_write_text
from .checkpoints import latest_checkpoint
from ..config import TrainConfig
from ..errors import OutputDirError

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
# Keys that change where or how often files are written, not what is learned.
_NOT_HASHED = {"save_steps", "save_every_n_epochs", "save_last_n", "save_format", "logging_dir",
               "dataloader_workers", "output_dir", "sample_prompts", "sample_every_n_steps", "sample_every_n_epochs",
               "sample_steps", "sample_sampler", "sample_cfg", "validate_every_n_steps", "verify_after_training",
               "cache_latents", "cache_latents_to_disk", "cache_dir", "cache_text_encoder_outputs",
               "cache_text_encoder_outputs_to_disk",
               "channels_last", "torch_compile"}


def _hashed(config: TrainConfig) -> dict:
    return {k: v for k, v in config.to_yaml_dict().items() if k not in _NOT_HASHED}


def hashed_config(config: TrainConfig) -> dict:
    """The settings that decide what is learned, as run.json and each checkpoint record them."""
    return _hashed(config)


def config_hash(config: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(_hashed(config), sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _previous_run(out: Path) -> dict | None:
    """run.json of the run that lives in `out`; an unreadable one (cut short by a crash, or edited) counts as a
    run whose settings are unknown rather than as a traceback."""
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(record, dict) and isinstance(record.get("config"), dict) and "config_hash" in record:
            return record
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    log.warning("%s cannot be read; treating the folder as holding a run with unknown settings", path)
    return {"config_hash": None, "config": {}, "unreadable": True}


def _holds_results(out: Path, config: TrainConfig) -> bool:
    return any((out / p).exists() for p in (f"{config.name}.safetensors", "checkpoints", "loss.csv"))


# A LoRA's shape and meaning: a checkpoint cannot continue under other values (its tensors would not fit, or
# the same weights would be scaled differently); block_lr decides the optimizer's parameter groups its state fills.
FIXED_ON_RESUME = ("lora_rank", "lora_alpha", "lora_targets", "train_text_encoder", "network_type", "lokr_factor",
                   "block_lr")
# Held in the optimizer and scheduler state; a resume puts the new values in place (trainer.restore).
OPTIMIZER_KEYS = ("learning_rate", "text_encoder_lr", "weight_decay", "lr_scheduler", "lr_warmup_steps", "epochs",
                  "max_train_steps", "max_grad_norm")


def resume_changes(saved: dict, config: TrainConfig) -> list[str]:
    """Compare the config a checkpoint was trained with to this one: refuse what cannot change, and list what
    does (every other key takes effect from the resumed step on)."""
    if not saved:
        return []
    now = _hashed(config)
    # A key an older checkpoint's config lacks had its default then (a setting added since)
    was = {k: saved[k] if k in saved else _default(k) for k in FIXED_ON_RESUME}
    fixed = [f"{k}: {was[k]!r} -> {now.get(k)!r}" for k in FIXED_ON_RESUME if was[k] != now.get(k)]
    if fixed:
        raise OutputDirError("cannot resume: the checkpoint's LoRA was made with other settings (" + "; ".join(fixed)
                             + "). Set them back to resume, or start a new run in another output_dir.")
    return _differences(saved, now)


def _default(key: str):
    """A setting's default as run.json holds values (TrainConfig.to_yaml_dict's form)."""
    default = TrainConfig.model_fields[key].default
    return default if isinstance(default, (str, int, float, bool, dict, list, type(None))) else str(default)


def check_output_dir(config: TrainConfig, resume: Path | bool | None, overwrite: bool) -> Path | None:
    """Judge output_dir without touching it: the checkpoint folder to resume from (or None), or an error.
    Runs before the dataset and model are loaded, so a wrong choice costs seconds, not a model load."""
    out = config.output_dir
    check_writable(out)
    lora = out / f"{config.name}.safetensors"
    if lora.is_dir():  # found now, not as a failed save after the whole run
        raise OutputDirError(f"{lora} is a folder, and the LoRA is written under that name; move it away or set "
                             "output_name to another name")
    previous = _previous_run(out)
    if resume:
        checkpoint = latest_checkpoint(out) if resume is True else Path(resume)
        if checkpoint is None or not (checkpoint / "training_state.pt").is_file():
            raise OutputDirError(f"nothing to resume: no complete checkpoint in {out / 'checkpoints'}"
                                 if resume is True else f"{checkpoint} is not a checkpoint folder (no training_state.pt)")
        return checkpoint
    # A run.json alone is a run stopped before its first checkpoint or step: nothing there to lose.
    if _holds_results(out, config) and not overwrite:
        raise OutputDirError(_occupied_message(out, config, previous))
    return None


def saved_config(checkpoint: Path) -> dict:
    """The (hashed) config a checkpoint was trained with: stored in its state since format 2, else the run.json of
    the run folder it belongs to."""
    from .checkpoints import load_state

    try:
        state = load_state(checkpoint / "training_state.pt")
    except Exception as exc:  # a damaged pickle raises anything
        raise OutputDirError(f"cannot read {checkpoint / 'training_state.pt'} ({type(exc).__name__}: {exc}); the "
                             "checkpoint is damaged: resume from an earlier one (--resume PATH) or start over") from None
    if isinstance(state.get("config"), dict):
        return state["config"]
    record = _previous_run(checkpoint.parent.parent) or {}
    return record.get("config") or {}


def report_resume(config: TrainConfig, checkpoint: Path) -> list[str]:
    """Refuse a resume whose LoRA settings differ; say which other settings change and that they take effect."""
    changes = resume_changes(saved_config(checkpoint), config)
    run_dir = checkpoint.parent.parent
    if run_dir.resolve() != config.output_dir.resolve():
        log.warning("continuing %s (from run folder %s) in a new output_dir %s", checkpoint.name, run_dir,
                    config.output_dir)
    if changes:
        applied = [c for c in changes if c.split(":", 1)[0] in OPTIMIZER_KEYS]
        log.warning("resuming with a changed config; these take effect from the resumed step on: %s"
                    + ("" if applied == changes else " (the continued run is not what an unbroken run would have been)"),
                    "; ".join(changes))
    return changes


def record_run(config: TrainConfig, checkpoint: Path | None, overwrite: bool, changes: list[str] | None = None) -> None:
    """Claim output_dir for this run (main process only, after every check passed): clear an overwritten run's
    (or a run stopped before its first step's) results, write run.json with the config hash."""
    out = config.output_dir
    # Only our own files go: those of an overwritten run, or of a run of ours stopped before its first step
    # (it left run.json). A folder the user made, with their own logs/, keeps everything.
    if checkpoint is None and (overwrite or (out / RUN_FILE).is_file()):
        for p in ("checkpoints", "logs", "loss.csv", "loss.png", f"{config.name}.safetensors", "summary.json"):
            target = out / p
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    record = {"config_hash": config_hash(config), "config": _hashed(config), "started_at": time.time(),
              "resumed_from": str(checkpoint) if checkpoint else None, "changed_on_resume": changes or []}
    atomic_write_text(out / RUN_FILE, json.dumps(record, indent=2, default=str))


def check_writable(out: Path) -> None:
    """The nearest existing folder on the way to output_dir must take a file, or every save would fail later.
    A real probe file, not os.access: that says yes to root on a read-only mount."""
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"output_dir {out}: {existing} is a file, not a folder; choose another output_dir")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
    except OSError as exc:
        raise OutputDirError(f"output_dir {out}: cannot write in {existing} ({exc.strerror}); choose a folder you "
                             "own, e.g. output_dir: ./output/NAME, or fix its permissions") from None
    os.close(fd)
    os.unlink(probe)


# The resolved config is written beside the LoRA with this first line; a config.yaml without it is the user's own
# and is never overwritten (ours then goes to RESOLVED_CONFIG_ASIDE).
RESOLVED_MARK = "# lora-scripts: the resolved config of this run (paths absolute). Train it again with --config"
RESOLVED_CONFIG, RESOLVED_CONFIG_ASIDE = "config.yaml", "config.resolved.yaml"


def _is_ours(path: Path) -> bool:
    """Written by a run: it opens with our mark, or (runs before the mark) it holds every config key."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.startswith(RESOLVED_MARK):
            return True
        loaded = yaml.safe_load(text)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(loaded, dict) and set(loaded) == set(TrainConfig.model_fields)


def resolved_config_path(out: Path) -> Path:
    """Where a run writes its resolved config: config.yaml, unless that is a file of the user's."""
    aside = out / RESOLVED_CONFIG_ASIDE
    main = out / RESOLVED_CONFIG
    if aside.is_file() or (main.exists() and not _is_ours(main)):
        return aside
    return main


def read_resolved_config_path(out: Path) -> Path:
    """Where a finished run's resolved config is, for readers (compare, the UI): the aside copy if there is one."""
    aside = out / RESOLVED_CONFIG_ASIDE
    return aside if aside.is_file() else out / RESOLVED_CONFIG


def _occupied_message(out: Path, config: TrainConfig, previous: dict | None) -> str:
    same = previous is not None and previous["config_hash"] == config_hash(config)
    what = "an earlier run of this same config" if same else "another run"
    lines = [f"output_dir {out} already holds {what}; nothing was changed."]
    if previous and previous.get("unreadable"):
        lines.append(f"  its {RUN_FILE} cannot be read, so its settings are unknown")
    elif previous and not same:
        lines.append("  it differs in: " + "; ".join(_differences(previous["config"], _hashed(config))[:8]))
    if latest_checkpoint(out):
        lines.append("  - continue it: add --resume")
    lines += ["  - keep both: set a new output_dir, e.g. output_dir: ./output/sci_lab_r{lora_rank}_e{epochs} "
              "(keys in braces are filled in)",
              "  - start over here: add --overwrite (its checkpoints and logs are deleted)"]
    return "\n".join(lines)
