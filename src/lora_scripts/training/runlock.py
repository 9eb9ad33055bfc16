"""A lock on output_dir for the whole run: two runs started into the same folder must not mix their files.

The operating system's advisory lock (flock on POSIX, msvcrt on Windows) is tied to the open file, so a run that
crashes or is killed releases it with its process: there is never a stale lock to delete by hand. The file also
says who holds it (PID, start time, command), which is what the refusal shows.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import OutputDirError

log = logging.getLogger(__name__)
LOCK_FILE = ".lora-scripts.lock"


_HELD = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK}  # another process has it


def _try_lock(fd: int) -> bool:
    """True when we hold the lock, False when another process does. A file system that cannot lock at all
    (NFS without lockd, some FUSE mounts) must not read as "in use" forever: the run goes on unlocked."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _HELD:
            return False
        log.warning("cannot lock the output folder on this file system (%s); a second run started into it at "
                    "the same time would not be stopped", exc.strerror)
    return True


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started_at"]))
        return f"PID {info['pid']} on {info.get('host', '?')}, started {started} ({info.get('command', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


class OutputLock:
    """`with OutputLock(out):` or acquire()/release(). Folders it had to create are removed again on release
    when the run left nothing in them (a refused run writes nothing)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> "OutputLock":
        missing = []
        folder = self.output_dir
        while not folder.exists() and folder.parent != folder:
            missing.append(folder)
            folder = folder.parent
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._created = missing  # innermost first
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                holder = _holder(self.path)
                self._remove_created()
                raise OutputDirError(
                    f"output_dir {self.output_dir} is in use by another run: {holder}. Nothing was changed. Wait "
                    "for it to finish (or stop it), or choose another output_dir.")
            # The holder before us may have deleted the file between our open and our lock: then we hold a lock
            # on a file nobody else can see; take the new one instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                break
            os.close(fd)
        else:
            raise OutputDirError(f"output_dir {self.output_dir}: could not take its lock file {self.path}")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                "command": " ".join(sys.argv[:1] + sys.argv[1:])[:300]}
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps(info).encode())
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still locked: nobody takes a file that is going away
        except OSError:
            pass  # already gone, or Windows, which cannot delete an open file: it stays, unlocked
        finally:
            os.close(self._fd)
            self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
