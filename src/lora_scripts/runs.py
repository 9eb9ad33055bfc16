"""One output folder per run: never train over another run's files by accident.

`run.json` in output_dir records the hash of the resolved config. Starting a run where another one lives stops
with the choices: --resume, a new output_dir (templating such as ./output/sci_lab_{lora_rank}_{epochs} makes
one per config version), or --overwrite.
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

from .atomic import atomic_write_text
from .checkpoints import latest_checkpoint
from .config import TrainConfig
from .errors import OutputDirError

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
# Keys that change where or how often files are written, not what is learned.
_NOT_HASHED = {"save_steps", "save_every_n_epochs", "save_last_n", "save_format", "logging_dir",
               "dataloader_workers", "output_dir", "sample_prompts", "sample_every_n_steps", "sample_every_n_epochs",
               "sample_steps", "sample_sampler", "sample_cfg", "validate_every_n_steps", "verify_after_training",
               "cache_latents", "cache_latents_to_disk", "cache_dir", "cache_text_encoder_outputs",
               "channels_last", "torch_compile"}


def _hashed(config: TrainConfig) -> dict:
    return {k: v for k, v in config.to_yaml_dict().items() if k not in _NOT_HASHED}


def config_hash(config: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(_hashed(config), sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _previous_run(out: Path) -> dict | None:
    path = out / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _holds_results(out: Path, config: TrainConfig) -> bool:
    return any((out / p).exists() for p in (f"{config.name}.safetensors", "checkpoints", "loss.csv"))


def check_output_dir(config: TrainConfig, resume: Path | bool | None, overwrite: bool) -> Path | None:
    """Judge output_dir without touching it: the checkpoint folder to resume from (or None), or an error.
    Runs before the dataset and model are loaded, so a wrong choice costs seconds, not a model load."""
    out = config.output_dir
    _check_writable(out)
    previous = _previous_run(out)
    if resume:
        checkpoint = latest_checkpoint(out) if resume is True else Path(resume)
        if checkpoint is None or not (checkpoint / "training_state.pt").is_file():
            raise OutputDirError(f"nothing to resume: no complete checkpoint in {out / 'checkpoints'}"
                                 if resume is True else f"{checkpoint} is not a checkpoint folder (no training_state.pt)")
        if previous and previous["config_hash"] != config_hash(config):
            log.warning("resuming with a changed config: %s", "; ".join(_differences(previous["config"], _hashed(config))))
        return checkpoint
    if (previous or _holds_results(out, config)) and not overwrite:
        raise OutputDirError(_occupied_message(out, config, previous))
    return None


def record_run(config: TrainConfig, checkpoint: Path | None, overwrite: bool) -> None:
    """Claim output_dir for this run (main process only, after every check passed): clear an overwritten run's
    results, write run.json with the config hash."""
    out = config.output_dir
    if overwrite and checkpoint is None:
        for p in ("checkpoints", "logs", "loss.csv", "loss.png", f"{config.name}.safetensors"):
            target = out / p
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    record = {"config_hash": config_hash(config), "config": _hashed(config), "started_at": time.time(),
              "resumed_from": str(checkpoint) if checkpoint else None}
    atomic_write_text(out / RUN_FILE, json.dumps(record, indent=2, default=str))


def _check_writable(out: Path) -> None:
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


def _occupied_message(out: Path, config: TrainConfig, previous: dict | None) -> str:
    same = previous is not None and previous["config_hash"] == config_hash(config)
    what = "an earlier run of this same config" if same else "another run"
    lines = [f"output_dir {out} already holds {what}; nothing was changed."]
    if previous and not same:
        lines.append("  it differs in: " + "; ".join(_differences(previous["config"], _hashed(config))[:8]))
    if latest_checkpoint(out):
        lines.append("  - continue it: add --resume")
    lines += ["  - keep both: set a new output_dir, e.g. output_dir: ./output/sci_lab_r{lora_rank}_e{epochs} "
              "(keys in braces are filled in)",
              "  - start over here: add --overwrite (its checkpoints and logs are deleted)"]
    return "\n".join(lines)
