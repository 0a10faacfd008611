"""The web app's jobs: each runs the `avatar` CLI in a child process, one at a time.

A child process per step gives the page exactly the CLI's behaviour and wording (its errors are
the CLI's one-line messages), keeps the server alive whatever a job does, and frees a job's
memory when it ends. Progress comes from the CLI's own progress bars (tqdm on stderr): each bar's
label, percentage and ETA.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# "fit:  42%|████▏     | 92/220 [00:09<00:13,  9.81step/s, loss=...]"
BAR = re.compile(r"(?P<label>[\w .\-]+):\s+(?P<percent>\d+)%\|[^|]*\|\s*\d+/\d+\s+"
                 r"\[[\d:]+<(?P<eta>[\d:?]+)")  # fmt: skip
ERROR = re.compile(r"avatar: (?:error: )?(?P<message>.+)")


@dataclass
class Step:
    """One CLI run of a job: its arguments and the label the page shows while it runs."""

    label: str
    argv: list[str]


@dataclass
class Job:
    id: str
    kind: str  # create | drive | converse
    title: str
    steps: list[Step]
    folder: Path
    outputs: dict[str, str] = field(default_factory=dict)  # name -> file name in `folder`
    status: str = "queued"  # queued | running | done | error | cancelled
    stage: str = ""
    percent: int = 0
    eta: str = ""
    error: str = ""
    started: float = 0.0
    finished: float = 0.0
    on_done: object = None  # callable(job), run in the worker when every step succeeded

    def public(self) -> dict:
        return {"id": self.id, "kind": self.kind, "title": self.title, "status": self.status,
                "stage": self.stage, "percent": self.percent, "eta": self.eta,
                "error": self.error, "seconds": round((self.finished or time.time()) -
                                                      self.started, 1) if self.started else 0,
                "outputs": {k: f"/files/{self.id}/{v}" for k, v in self.outputs.items()}}  # fmt: skip


class JobQueue:
    """Jobs run in order in one background thread; `jobs` keeps them all for the page."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._child: subprocess.Popen | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="avatar-jobs", daemon=True)
        self._thread.start()

    def new_id(self) -> str:
        """A job's id: unguessable, since it names the job's files in URLs."""
        return secrets.token_hex(6)

    def submit(self, job: Job) -> Job:
        with self.lock:
            self.jobs[job.id] = job
        self._queue.put(job)
        return job

    def listing(self) -> list[dict]:
        with self.lock:
            return [j.public() for j in reversed(self.jobs.values())]

    def cancel(self, jid: str) -> Job | None:
        """Cancel a job: a queued one never starts, a running one's process group is killed
        (what it was writing is a temporary file, never an output). None: no such job."""
        with self.lock:
            job = self.jobs.get(jid)
            if job is None or job.status not in ("queued", "running"):
                return job
            running = job.status == "running"
            job.status, job.stage, job.finished = "cancelled", "cancelled", time.time()
            child = self._child if running else None
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        return job

    def close(self) -> None:
        """Stop: queued jobs never start, the running one is killed (its whole process group)."""
        with self.lock:
            self._closing = True
            child = self._child
        self._queue.put(None)
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        self._thread.join(timeout=10)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None and not self._closing:
            with self.lock:
                if job.status != "queued":  # cancelled while it waited
                    continue
                job.status, job.started = "running", time.time()
            try:
                for step in job.steps:
                    job.stage, job.percent, job.eta = step.label, 0, ""
                    self._run(job, step)
                    if job.status != "running":
                        break
                else:
                    if job.on_done is not None:
                        job.on_done(job)
                    job.status, job.stage, job.percent = "done", "done", 100
            except Exception as exc:  # the server must outlive any job
                job.status, job.error = "error", f"the server could not run this job: {exc}"
            job.finished = time.time()

    def _run(self, job: Job, step: Step) -> None:
        # the job's folder is not put on sys.path (-P, PYTHONSAFEPATH): nothing in it is imported
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}
        safe = ["-P"] if sys.version_info >= (3, 11) else []
        with self.lock:
            if self._closing:
                job.status, job.error = "error", "the server stopped"
                return
            if job.status != "running":  # cancelled between two steps
                return
            child = self._child = subprocess.Popen(
                [self.python, *safe, "-m", "avatar", *step.argv], cwd=job.folder, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        tail = ""
        while chunk := child.stderr.read1(4096):
            tail = (tail + chunk.decode(errors="replace"))[-8192:]
            for line in re.split(r"[\r\n]", tail)[-3:]:
                if m := BAR.search(line):
                    job.stage = f"{step.label}: {m['label'].strip()}"
                    job.percent, job.eta = int(m["percent"]), m["eta"]
        code = child.wait()
        with self.lock:
            self._child = None
            if job.status != "running":  # cancelled: killed on purpose, not an error
                return
        if code != 0:
            job.status = "error"
            messages = [m["message"] for line in tail.splitlines() if (m := ERROR.match(line))]
            job.error = messages[-1] if messages else f"{step.label} stopped (exit status {code})"
