"""Every path a request names is resolved inside one workspace folder, or refused.

Requests carry workspace-relative paths ("data/neon_lab/img.png"). Absolute paths, '..' and symlinks that lead
out of the workspace are refused; the check is done on the fully resolved path, so percent-encoding (decoded
by the web framework first) and chains of links do not get around it.

A config's paths (what a job reads and writes) obey the same rule; `config_escapes` is shared by the server
(when a config is saved or a job submitted) and the worker process (before it trains), so a file edited behind
the server's back is still refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LoraScriptsError

STATE_DIR = ".lora-scripts-ui"  # job database, job logs, generated images

# What a training job reads and what it writes, as TrainConfig names them.
INPUT_KEYS = ("train_data_dir", "metadata_path", "base_model", "validation_dir", "clip_l", "t5xxl", "ae", "tokenizer_dir")
OUTPUT_KEYS = ("output_dir", "logging_dir", "cache_dir")


class OutsideWorkspace(LoraScriptsError):
    """A request named a path outside the workspace (HTTP 403)."""


def inside(root: Path, path: Path | str) -> bool:
    """Does `path`, with every link followed, stay in `root` (an already resolved folder)?"""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte: nothing that can be trusted
        return False
    return resolved == root or root in resolved.parents


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = self.root / STATE_DIR
        self.state.mkdir(exist_ok=True)

    def path(self, rel: str | Path, must_exist: bool = False, write: bool = False) -> Path:
        """`rel` resolved inside the workspace. Raises OutsideWorkspace for anything that would leave it, and,
        with write=True, for the UI's own folder (job records, the validated copies of configs jobs run)."""
        text = str(rel)
        if "\x00" in text:
            raise OutsideWorkspace(f"{text!r}: not a valid path")
        candidate = Path(text)
        if candidate.is_absolute() or candidate.drive:
            raise OutsideWorkspace(f"{text}: give a path inside the workspace ({self.root}), not an absolute one")
        try:
            resolved = (self.root / candidate).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a link that leads back to itself
            raise OutsideWorkspace(f"{text}: cannot be followed ({exc}); fix or delete the link") from None
        if not inside(self.root, resolved):
            raise OutsideWorkspace(f"{text}: resolves outside the workspace ({self.root}); '..' and links that "
                                   "leave it are not allowed")
        if write and self.in_state(resolved):
            raise OutsideWorkspace(f"{text}: {STATE_DIR} is the UI's own folder (jobs, logs); save elsewhere in "
                                   "the workspace")
        if must_exist and not resolved.exists():
            raise FileNotFoundError(f"{text} does not exist in the workspace")
        return resolved

    def contains(self, path: Path) -> bool:
        return inside(self.root, path)

    def in_state(self, path: Path) -> bool:
        return inside(self.state, path)

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def configs(self) -> list[str]:
        """YAML files a user keeps here (not inside outputs or our state, nor links that lead out)."""
        found = []
        for p in sorted(self.root.rglob("*.y*ml")):
            parts = p.relative_to(self.root).parts
            if p.suffix in (".yaml", ".yml") and STATE_DIR not in parts and "output" not in parts[:1] \
                    and not any(part.startswith(".") for part in parts) and self.contains(p):
                found.append(p.relative_to(self.root).as_posix())
        return found

    def seed_with_demo(self) -> str | None:
        """A new, empty workspace gets the toy world (base model, neon-lab images, the demo YAML), so the first
        thing a person sees can be trained at once. Returns the config's path, or None if not empty (a folder
        of the user's own files is never added to)."""
        if any(p.name != STATE_DIR for p in self.root.iterdir()):
            return None
        from ..toy.demo import prepare_demo

        return self.rel(prepare_demo(self.root))


# --- a config's paths ------------------------------------------------------------------------------------------
def _plain_name_problem(name: Any) -> str | None:
    """output_name becomes OUTPUT_DIR/NAME.safetensors: a folder or '..' in it would put the LoRA elsewhere.
    The config's own rule, applied here again whatever validation a config file went through."""
    from ..config import check_file_stem

    if not isinstance(name, str) or not name:
        return None  # unset, or a wrong type that validation names
    try:
        check_file_stem(name)
    except ValueError as exc:
        return f"output_name = {name!r}: {exc}"
    return None


def path_escapes(paths: dict[str, Any], root: Path, output_name: Any = None,
                 typed: dict[str, Any] | None = None) -> dict[str, str]:
    """{key: message} for each path that would leave the workspace `root` (resolved) or enter its state folder.
    `paths`: absolute paths by config key (None = not set; a non-path value is left to validation). `typed`:
    the values as the user wrote them, for the message."""
    root = Path(root)
    typed = typed or {}
    problems: dict[str, str] = {}

    def check(key: str, path: Path) -> None:
        shown = typed.get(key, str(path))
        if not inside(root, path):
            problems[key] = (f"{key} = {str(shown)!r}: outside the workspace ({root}); the web UI only reads and "
                             "writes inside it (copy or move the file there)")
        elif inside(root / STATE_DIR, path):
            problems[key] = f"{key} = {str(shown)!r}: inside {STATE_DIR}, the UI's own folder; choose another folder"

    for key in INPUT_KEYS + OUTPUT_KEYS:
        value = paths.get(key)
        if isinstance(value, (str, Path)) and str(value):
            check(key, Path(value))
    name_problem = _plain_name_problem(output_name)
    if name_problem:
        problems["output_name"] = name_problem
    elif isinstance(output_name, str) and output_name and isinstance(paths.get("output_dir"), (str, Path)):
        lora = Path(paths["output_dir"]) / f"{output_name}.safetensors"
        if "output_dir" not in problems and not inside(root, lora):
            problems["output_name"] = (f"output_name = {output_name!r}: the LoRA file {lora} would be outside the "
                                       f"workspace ({root})")
    return problems


def config_escapes(config, root: Path) -> dict[str, str]:
    """path_escapes for a validated TrainConfig: every file it reads, and every file the run writes (the LoRA,
    the logs, the latent cache) with the defaults filled in."""
    root = Path(root).resolve()
    paths = {key: getattr(config, key) for key in INPUT_KEYS + OUTPUT_KEYS}
    problems = path_escapes(paths, root, config.name)
    # The defaults live under output_dir and train_data_dir, checked above; a link inside those folders could
    # still lead out, so the filled-in paths are checked too (once their folder itself passed).
    derived = {"logging_dir": (config.logging_dir is None and "output_dir" not in problems, config.log_dir),
               "cache_dir": (config.cache_dir is None and "train_data_dir" not in problems,
                             config.train_data_dir / ".lora-scripts-cache")}
    filled = {key: path for key, (needed, path) in derived.items() if needed}
    return {**problems, **path_escapes(filled, root)}
