"""One training job in its own process:
`python -m lora_scripts.ui.worker JOB_DIR CONFIG --workspace ROOT [--resume]`.

Runs the library's `train` exactly as `lora-scripts train` does, and leaves what the server reads: progress.json
after each step (at most four times a second, and always at the last step and at every checkpoint, Stop's
included) and exit.json at the end. SIGINT (the UI's Stop button) reaches the trainer's Ctrl-C handler, which
saves a checkpoint; a SIGINT that arrives while the worker is still starting ends it as stopped too.

CONFIG is the job's validated copy; the worker checks once more that every path it reads or writes stays in the
workspace ROOT (the server checked it at submit time, but a file can be edited after that).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from ..atomic import atomic_write_text  # light: no torch

# Nothing heavy at the top: main() installs the Stop handler below before any library is imported.

# Written in the job's folder by the server before it sends SIGINT. A SIGINT that arrives before main() has
# installed its handler is lost where the worker inherited SIGINT ignored (a server started in the background
# by a non-interactive shell, or under pytest-xdist: the job then trained on as if never stopped); the file
# is there whenever such a signal was sent, so the worker reads it once its handler is in place.
STOP_REQUESTED = "stop-requested"


class StartupStop:
    """SIGINT (the UI's Stop) before the trainer's own Ctrl-C handler is in place.

    While the libraries are imported it is only remembered: a KeyboardInterrupt raised inside an import can be
    swallowed by a library's bare `except:` (the job then trained on as if never stopped; seen once in ~20
    runs under load) or end the process with code 1. After the imports it raises KeyboardInterrupt, which ends
    the start-up as 'stopped'. If that too was swallowed somewhere, the first progress report sends the signal
    again, now to the trainer's handler, which saves a checkpoint and stops."""

    def __init__(self) -> None:
        self.importing = True
        self.pending = False

    def __call__(self, signum, frame) -> None:
        self.pending = True
        if not self.importing:
            raise KeyboardInterrupt

    def imports_done(self) -> None:
        self.importing = False
        if self.pending:
            raise KeyboardInterrupt

    def redeliver(self) -> None:
        if self.pending:
            self.pending = False
            os.kill(os.getpid(), signal.SIGINT)


class ProgressFile:
    def __init__(self, path: Path, min_interval: float = 0.25, stop: StartupStop | None = None):
        self.path = path
        self.min_interval = min_interval
        self._last = 0.0
        self.stop = stop

    def phase(self, phase: str, **extra) -> None:
        atomic_write_text(self.path, json.dumps({"phase": phase, "time": time.time(), **extra}))

    def __call__(self, progress) -> None:
        if self.stop is not None:
            self.stop.redeliver()  # a Stop that start-up lost: the trainer's handler takes it from here
        now = time.time()
        if progress.step < progress.total and not progress.saved and now - self._last < self.min_interval:
            return
        self._last = now
        self.phase("training", **progress.to_dict())


class Refused(Exception):
    """The config names a path outside the workspace."""


def _confine(config, workspace: Path) -> None:
    from .workspace import config_escapes

    problems = config_escapes(config, workspace)
    if problems:
        raise Refused("refused: this job's config leaves the workspace " + f"({workspace}):\n"
                      + "\n".join(problems.values()))


def run(job_dir: Path, config_path: Path, resume: bool, workspace: Path, stop: StartupStop | None = None) -> int:
    stop = stop or StartupStop()
    if (job_dir / STOP_REQUESTED).exists():  # Stop was pressed before the handler was in place
        stop.pending = True
    progress = ProgressFile(job_dir / "progress.json", stop=stop)
    exit_path = job_dir / "exit.json"
    output_dir = None
    try:
        # Imports inside the try: Stop can arrive while torch is still loading.
        from ..cli import _quiet_libraries
        from ..config import load_config
        from ..training.loop import train

        stop.imports_done()
        _quiet_libraries()
        progress.phase("preparing")  # checking the dataset, loading the base model, caching latents
        config = load_config(config_path)
        _confine(config, workspace)
        output_dir = str(config.output_dir)
        result = train(config, resume=resume or None, on_progress=progress)
    except KeyboardInterrupt:
        _write_exit(exit_path, "stopped", "stopped before training began (no checkpoint yet)", output_dir)
        return 130
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        _write_exit(exit_path, "failed", str(exc), None)
        return 2
    except Exception as exc:
        return _failed(exc, exit_path, output_dir)
    _write_exit(exit_path, "done", None, str(result.output_dir), str(result.lora_path), result.verified)
    return 0


def _failed(exc: Exception, exit_path: Path, output_dir: str | None) -> int:
    from ..errors import LoraScriptsError, TrainingInterrupted

    if isinstance(exc, TrainingInterrupted):
        _write_exit(exit_path, "stopped", str(exc), output_dir)
        return 130
    if isinstance(exc, LoraScriptsError):
        print(f"error: {exc}", file=sys.stderr)
        _write_exit(exit_path, "failed", str(exc), output_dir)
        return 2
    import traceback

    traceback.print_exc()
    _write_exit(exit_path, "failed", f"unexpected error: {exc!r} (the log has the traceback)", output_dir)
    return 1


def _write_exit(path: Path, status: str, error: str | None, output_dir: str | None, lora: str | None = None,
                verified: str | None = None) -> None:
    atomic_write_text(path, json.dumps({"status": status, "error": error, "output_dir": output_dir, "lora": lora,
                                        "self_test": verified}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("job_dir", type=Path)
    p.add_argument("config", type=Path)
    p.add_argument("--workspace", type=Path, required=True, help="every path the config names must stay in it")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    stop = StartupStop()
    signal.signal(signal.SIGINT, stop)
    try:
        return run(args.job_dir, args.config, args.resume, args.workspace.resolve(), stop)
    except KeyboardInterrupt:  # Stop while run() was not yet in its try (or while it wrote exit.json)
        _write_exit(args.job_dir / "exit.json", "stopped", "stopped before training began (no checkpoint yet)", None)
        return 130


if __name__ == "__main__":
    sys.exit(main())
