"""One training job in its own process: `python -m lora_scripts.ui.worker JOB_DIR CONFIG [--resume]`.

Runs the library's `train` exactly as `lora-scripts train` does, and leaves what the server reads: progress.json
after each step (at most four times a second, and always at the last step and at every checkpoint, Stop's
included) and exit.json at the end. SIGINT (the
UI's Stop button) reaches the trainer's Ctrl-C handler, which saves a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..atomic import atomic_write_text


class ProgressFile:
    def __init__(self, path: Path, min_interval: float = 0.25):
        self.path = path
        self.min_interval = min_interval
        self._last = 0.0

    def phase(self, phase: str, **extra) -> None:
        atomic_write_text(self.path, json.dumps({"phase": phase, "time": time.time(), **extra}))

    def __call__(self, progress) -> None:
        now = time.time()
        if progress.step < progress.total and not progress.saved and now - self._last < self.min_interval:
            return
        self._last = now
        self.phase("training", **progress.to_dict())


def run(job_dir: Path, config_path: Path, resume: bool) -> int:
    from ..cli import _quiet_libraries
    from ..config import load_config
    from ..errors import LoraScriptsError, TrainingInterrupted
    from ..trainer import train

    _quiet_libraries()
    progress = ProgressFile(job_dir / "progress.json")
    exit_path = job_dir / "exit.json"
    output_dir = None
    try:
        progress.phase("preparing")  # checking the dataset, loading the base model, caching latents
        config = load_config(config_path)
        output_dir = str(config.output_dir)
        result = train(config, resume=resume or None, on_progress=progress)
    except TrainingInterrupted as exc:
        _write_exit(exit_path, "stopped", str(exc), output_dir)
        return 130
    except KeyboardInterrupt:
        _write_exit(exit_path, "stopped", "stopped before training began (no checkpoint yet)", output_dir)
        return 130
    except LoraScriptsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _write_exit(exit_path, "failed", str(exc), output_dir)
        return 2
    except Exception as exc:
        import traceback

        traceback.print_exc()
        _write_exit(exit_path, "failed", f"unexpected error: {exc!r} (the log has the traceback)", output_dir)
        return 1
    _write_exit(exit_path, "done", None, str(result.output_dir), str(result.lora_path), result.verified)
    return 0


def _write_exit(path: Path, status: str, error: str | None, output_dir: str | None, lora: str | None = None,
                verified: str | None = None) -> None:
    atomic_write_text(path, json.dumps({"status": status, "error": error, "output_dir": output_dir, "lora": lora,
                                        "self_test": verified}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("job_dir", type=Path)
    p.add_argument("config", type=Path)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    return run(args.job_dir, args.config, args.resume)


if __name__ == "__main__":
    sys.exit(main())
