"""Training jobs: a queue kept in SQLite (it survives a server restart) and run one at a time, each in its own
process, so a crash, an out-of-memory kill or a Ctrl-C of a job never takes the server down.

A job's folder (workspace/.lora-scripts-ui/jobs/ID) holds what the worker process writes: progress.json after
every step, exit.json when it ends, log.txt (its stdout and stderr). The server only reads those files and the
process id, so it can also pick up a job that outlived a server restart.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .workspace import Workspace

# Statuses: queued -> running -> done | failed | stopped (checkpoint saved, resumable) | interrupted (the server
# went away while it ran; resumable from its last checkpoint).

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    resume INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    pid INTEGER,
    output_dir TEXT,
    lora TEXT,
    error TEXT
)"""


@dataclass
class Job:
    id: int
    config: str
    status: str
    resume: int
    created: float
    started: float | None
    finished: float | None
    pid: int | None
    output_dir: str | None
    lora: str | None
    error: str | None

    def to_dict(self) -> dict:
        return asdict(self)


class JobStore:
    """The job table. One connection per call: the queue thread and request threads share it safely."""

    def __init__(self, db: Path):
        self.db = db
        with self._connect() as con:
            con.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.db, timeout=10)
        con.row_factory = sqlite3.Row
        return con

    def add(self, config: str, output_dir: str | None = None) -> Job:
        with self._connect() as con:
            cur = con.execute("INSERT INTO jobs (config, status, created, output_dir) VALUES (?, 'queued', ?, ?)",
                              (config, time.time(), output_dir))
            job_id = cur.lastrowid
        return self.get(job_id)

    def get(self, job_id: int) -> Job | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(**dict(row)) if row else None

    def all(self) -> list[Job]:
        with self._connect() as con:
            return [Job(**dict(r)) for r in con.execute("SELECT * FROM jobs ORDER BY id DESC")]

    def next_queued(self) -> Job | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
        return Job(**dict(row)) if row else None

    def running(self) -> list[Job]:
        with self._connect() as con:
            return [Job(**dict(r)) for r in con.execute("SELECT * FROM jobs WHERE status = 'running'")]

    def update(self, job_id: int, **fields) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._connect() as con:
            con.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))


def _alive(pid: int, job_dir: Path) -> bool:
    """Is `pid` still this job's worker? (A reused pid belongs to some other program.)"""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        return "lora_scripts.ui.worker" in text and str(job_dir) in text
    return True


def _log_tail(path: Path, lines: int = 12) -> str:
    """The last non-empty lines of a job's log (progress-bar redraws count as lines)."""
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


class JobQueue:
    """Runs queued jobs one after another in worker processes; a daemon thread polls twice a second."""

    def __init__(self, workspace: Workspace, poll: float = 0.5):
        self.ws = workspace
        self.store = JobStore(workspace.state / "jobs.sqlite")
        self.jobs_dir = workspace.state / "jobs"
        self.jobs_dir.mkdir(exist_ok=True)
        self.poll = poll
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- requests ------------------------------------------------------------------------------------------
    def submit(self, config_rel: str, output_dir_rel: str | None = None) -> Job:
        return self.store.add(config_rel, output_dir_rel)

    def stop(self, job_id: int) -> Job:
        """Ask a running job to stop: SIGINT, which the trainer answers by saving a checkpoint. A queued job
        is just taken off the queue."""
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.status == "queued":
            self.store.update(job_id, status="stopped", finished=time.time(), error="removed from the queue")
        elif job.status == "running" and job.pid:
            try:
                os.kill(job.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        return self.store.get(job_id)

    def resume(self, job_id: int) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.status not in ("stopped", "interrupted", "failed"):
            raise ValueError(f"job {job_id} is {job.status}; only a stopped, interrupted or failed job can resume")
        self.store.update(job_id, status="queued", resume=1, error=None, finished=None)
        return self.store.get(job_id)

    def job_dir(self, job_id: int) -> Path:
        return self.jobs_dir / str(job_id)

    def progress(self, job_id: int) -> dict | None:
        return _read_json(self.job_dir(job_id) / "progress.json")

    def log(self, job_id: int) -> str:
        return _log_tail(self.job_dir(job_id) / "log.txt", lines=40)

    # --- the queue thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._run, name="lora-scripts-jobs", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def recover(self) -> None:
        """Record every 'running' job whose worker has ended: one this server started (its exit code is known)
        or one adopted after a restart, which ended while nobody watched."""
        for job in self.store.running():
            proc = self._procs.get(job.id)
            if proc is not None:
                if proc.poll() is not None:
                    self._finish(job, proc.returncode)
            elif not (job.pid and _alive(job.pid, self.job_dir(job.id))):
                self._finish(job, returncode=None)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the queue must outlive any single job's surprise
                print(f"lora-scripts ui: job queue error: {exc!r}", file=sys.stderr)
            self._stop.wait(self.poll)

    def tick(self) -> None:
        with self._lock:
            self.recover()
            if not self.store.running():
                job = self.store.next_queued()
                if job is not None:
                    self._launch(job)

    def _launch(self, job: Job) -> None:
        folder = self.job_dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("exit.json", "progress.json"):
            (folder / name).unlink(missing_ok=True)
        config = self.ws.path(job.config)
        cmd = [sys.executable, "-m", "lora_scripts.ui.worker", str(folder), str(config)]
        if job.resume:
            cmd.append("--resume")
        log = open(folder / "log.txt", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # argv list, never a shell: nothing from a request is ever interpreted by one.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.ws.root, env=env)
        log.close()
        self._procs[job.id] = proc
        self.store.update(job.id, status="running", pid=proc.pid, started=time.time(), finished=None, error=None)

    def _finish(self, job: Job, returncode: int | None) -> None:
        self._procs.pop(job.id, None)
        folder = self.job_dir(job.id)
        result = _read_json(folder / "exit.json")
        if result:
            status, error = result["status"], result.get("error")
        elif returncode is None:
            status, error = "interrupted", "the server stopped while this job ran; resume continues from its last checkpoint"
        elif returncode < 0:
            status = "failed"
            error = f"the training process was killed by signal {-returncode} " + (
                "(out of memory?)" if -returncode == signal.SIGKILL else "") + "\n" + _log_tail(folder / "log.txt")
        else:
            status, error = "failed", f"the training process exited with code {returncode}\n" + _log_tail(folder / "log.txt")
        self.store.update(job.id, status=status, error=error, finished=time.time(),
                          output_dir=self._rel((result or {}).get("output_dir")) or job.output_dir,
                          lora=self._rel((result or {}).get("lora")) or job.lora)

    def _rel(self, path: str | None) -> str | None:
        return self.ws.rel(Path(path)) if path and self.ws.contains(Path(path)) else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
