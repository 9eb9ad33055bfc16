"""Training jobs: a queue kept in SQLite (it survives a server restart) and run one at a time, each in its own
process, so a crash, an out-of-memory kill or a Ctrl-C of a job never takes the server down.

A job's folder (workspace/.lora-scripts-ui/jobs/ID) holds config.yaml, the copy of the config that was validated
when the job was submitted (or resumed) and the only one the worker runs, and what the worker process writes:
progress.json after every step, exit.json when it ends, log.txt (its stdout and stderr). The server only reads
those files and the process id, so it can also pick up a job that outlived a server restart.
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

from ..atomic import atomic_write_text
from .workspace import Workspace
from .worker import STOP_REQUESTED

SNAPSHOT = "config.yaml"  # in the job's folder: the validated config the worker runs
MAX_JOB_ID = 2**63 - 1  # SQLite's largest integer; a larger id in an address names no job

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
        if not 0 < job_id <= MAX_JOB_ID:
            return None
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
        self._stop_sent: set[int] = set()  # jobs sent SIGINT: an end without exit.json is then a stop, not a crash
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- requests ------------------------------------------------------------------------------------------
    def submit(self, config_rel: str, output_dir_rel: str | None = None, snapshot: str | None = None) -> Job:
        """Queue a job. `snapshot`: the YAML text that was validated; the worker runs it and nothing else (a job
        without one fails at launch rather than run an unchecked file)."""
        with self._lock:  # the queue thread must not launch it before its snapshot is written
            job = self.store.add(config_rel, output_dir_rel)
            if snapshot is not None:
                self._write_snapshot(job.id, snapshot)
        return job

    def _write_snapshot(self, job_id: int, snapshot: str) -> None:
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / SNAPSHOT, snapshot)

    def stop(self, job_id: int) -> Job:
        """Ask a running job to stop: SIGINT, which the trainer answers by saving a checkpoint. A queued job
        is just taken off the queue."""
        with self._lock:  # not while the queue thread is launching it (the stop would be lost)
            job = self.store.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.status == "queued":
                self.store.update(job_id, status="stopped", finished=time.time(), error="removed from the queue")
            elif job.status == "running" and job.pid:
                (self.job_dir(job_id) / STOP_REQUESTED).touch()  # before the signal, which start-up may miss
                try:
                    os.kill(job.pid, signal.SIGINT)
                    self._stop_sent.add(job_id)
                except ProcessLookupError:
                    pass
        return self.store.get(job_id)

    def resume(self, job_id: int, snapshot: str | None = None) -> Job:
        """Queue a stopped job again with --resume. `snapshot`: the config as validated now (the creator may have
        changed max_train_steps since); without one the job's previous snapshot runs."""
        with self._lock:
            job = self.store.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.status not in ("stopped", "interrupted", "failed"):
                raise ValueError(f"job {job_id} is {job.status}; only a stopped, interrupted or failed job can resume")
            if snapshot is not None:
                self._write_snapshot(job_id, snapshot)
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
        for name in ("exit.json", "progress.json", STOP_REQUESTED):  # a resumed job's last Stop is done
            (folder / name).unlink(missing_ok=True)
        config = folder / SNAPSHOT
        if not config.is_file():
            self.store.update(job.id, status="failed", finished=time.time(),
                              error=f"no validated copy of {job.config} for this job (it was queued by an older "
                                    "version); start it again from the Config page")
            return
        # The worker checks the workspace again itself: the snapshot is a file, and files can be edited.
        cmd = [sys.executable, "-m", "lora_scripts.ui.worker", str(folder), str(config),
               "--workspace", str(self.ws.root)]
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
        stop_sent = job.id in self._stop_sent
        self._stop_sent.discard(job.id)
        folder = self.job_dir(job.id)
        result = _read_json(folder / "exit.json")
        if result:
            status, error = result["status"], result.get("error")
        elif returncode is None:
            status, error = "interrupted", "the server stopped while this job ran; resume continues from its last checkpoint"
        elif returncode == -signal.SIGINT or (stop_sent and returncode >= 0):
            # Stop pressed while the worker was still starting (importing torch, before its own handler): Python
            # ends such a process by the signal, or with code 1 when the interrupt hit an import.
            status, error = "stopped", "stopped before training began (no checkpoint yet); Resume starts it again"
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
