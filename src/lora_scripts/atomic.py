"""Crash-safe writes: write to a temp file beside the target, fsync, then rename over it.

A kill or a full disk mid-write leaves the previous file (if any) intact and never a truncated file
under the final name.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import DiskFullError, OutputDirError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    if path.is_dir():
        raise OutputDirError(f"{path} is a folder; give a file name to write (e.g. {path / 'NAME'}{path.suffix or ''})")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file the user asked for, not our temporary one
        if exc.errno in _NO_SPACE:
            raise DiskFullError(disk_full_message(path)) from None
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp makes 0600, and some writers (safetensors) create their file anew with 0600 as well: the final
        # file gets the permissions the user's umask gives any new file, as every other tool's files have.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise DiskFullError(disk_full_message(path)) from exc
        raise
    return path


def _proc_umask() -> int | None:
    """The umask as Linux shows it in /proc (no side effect); None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _set_and_restore_umask() -> int:
    # Elsewhere the only way to read it is to set it and put it straight back: done once, at import, before
    # any thread of ours could create a file in between (threads would otherwise race on a umask of 0).
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _proc_umask()
if _UMASK_AT_IMPORT is None:
    _UMASK_AT_IMPORT = _set_and_restore_umask()


def _umask() -> int:
    now = _proc_umask()
    return _UMASK_AT_IMPORT if now is None else now


def disk_full_message(path: Path) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return (f"disk full while writing {path} ({free}); nothing under that name was changed and earlier "
            "checkpoints are intact. Free some space (or set save_last_n to keep fewer checkpoints), then run the "
            "same command with --resume.")


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


# torch and safetensors are imported where they are used: the web UI's worker writes its status files through
# this module while torch may still be loading (or after a Stop interrupted that).
def save_file(state: dict, path: str, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file as write

    write(state, path, metadata=metadata)


def atomic_save_safetensors(state: dict, path: Path, metadata: dict[str, str] | None = None) -> Path:
    return atomic_write(path, lambda p: save_file(state, str(p), metadata=metadata))


def atomic_torch_save(obj: object, path: Path) -> Path:
    import torch

    return atomic_write(path, lambda p: torch.save(obj, str(p)))
