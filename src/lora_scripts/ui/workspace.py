"""Every path a request names is resolved inside one workspace folder, or refused.

Requests carry workspace-relative paths ("data/neon_lab/img.png"). Absolute paths, '..' and symlinks that lead
out of the workspace are refused; the check is done on the fully resolved path, so percent-encoding (decoded
by the web framework first) and chains of links do not get around it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LoraScriptsError

STATE_DIR = ".lora-scripts-ui"  # job database, job logs, generated images


class OutsideWorkspace(LoraScriptsError):
    """A request named a path outside the workspace (HTTP 403)."""


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = self.root / STATE_DIR
        self.state.mkdir(exist_ok=True)

    def path(self, rel: str | Path, must_exist: bool = False) -> Path:
        """`rel` resolved inside the workspace. Raises OutsideWorkspace for anything that would leave it."""
        text = str(rel)
        if "\x00" in text:
            raise OutsideWorkspace(f"{text!r}: not a valid path")
        candidate = Path(text)
        if candidate.is_absolute() or candidate.drive:
            raise OutsideWorkspace(f"{text}: give a path inside the workspace ({self.root}), not an absolute one")
        resolved = (self.root / candidate).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise OutsideWorkspace(f"{text}: resolves outside the workspace ({self.root}); '..' and links that "
                                   "leave it are not allowed")
        if must_exist and not resolved.exists():
            raise FileNotFoundError(f"{text} does not exist in the workspace")
        return resolved

    def contains(self, path: Path) -> bool:
        resolved = Path(path).resolve()
        return resolved == self.root or self.root in resolved.parents

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def configs(self) -> list[str]:
        """YAML files a user keeps here (not inside outputs or our state)."""
        found = []
        for p in sorted(self.root.rglob("*.y*ml")):
            parts = p.relative_to(self.root).parts
            if p.suffix in (".yaml", ".yml") and STATE_DIR not in parts and "output" not in parts[:1] \
                    and not any(part.startswith(".") for part in parts):
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
