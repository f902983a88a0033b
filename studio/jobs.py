"""Background jobs for the studio: one thread per job, polled by the UI, cancelled by an Event.

Long stages (prompt expansion, generation, scoring, training, evaluation) must not run inside a
Gradio event: the request would block, a page reload would lose it, and nothing could cancel it.
Instead an event *starts* a job here and returns at once; a ``gr.Timer`` in each tab polls
:meth:`JobManager.snapshot` and renders progress, ETA, status and the last log lines.

Rules that keep the UI honest:

- A job ends in exactly one of ``done``, ``failed`` or ``cancelled``. An exception (including
  ``MemoryError`` / CUDA out-of-memory, which are ordinary exceptions in the worker thread)
  becomes ``failed`` with the error and the last log lines.
- A job whose thread is gone while it still says ``running`` (killed from outside, interpreter
  shutting down) is reported as ``failed`` by the next snapshot: never "running forever".
- Cancel sets a ``threading.Event`` that the stage functions poll between batches / steps
  (their ``should_stop`` argument); the job then ends as ``cancelled`` with whatever the stage
  committed, which the stages keep consistent (resumable).
- Log records emitted by the job's thread (``logging`` anywhere in ``craft``) are captured into
  the job's own ring buffer, so the studio shows the last lines of *that* job.

The manager is a module-level singleton (:data:`JOBS`) so every browser session sees the same
jobs, and a page reload finds a running job again. **Jobs belong to their run**: each run
directory has its own slot per kind (two runs can generate at once), a page shows and controls
only its own run's jobs (:meth:`JobManager.for_run`), sees the others' listed read-only with
their full run path (:meth:`JobManager.others`), and a job can be cancelled only for its own run.
With ``craft studio --auth`` each job records who started it. A job's function may run the
stage in this process or drive a ``craft`` subprocess on several processes (studio.launcher);
the job looks the same either way.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable

from craft import CraftError, StageStopped

logger = logging.getLogger(__name__)

FINISHED = ("done", "failed", "cancelled")
LOG_LINES = 200


class JobBusyError(CraftError):
    """A job of the same kind is still running."""


@dataclasses.dataclass(frozen=True)
class JobSnapshot:
    """An immutable view of a job, safe to render from any thread."""

    id: int
    kind: str
    title: str
    status: str  # queued, running, done, failed or cancelled
    done: int
    total: int
    started: float
    ended: float | None
    eta_s: float | None
    message: str
    error: str | None
    log: tuple[str, ...]
    result: Any = None
    info: dict = dataclasses.field(default_factory=dict)
    run_dir: str = ""  # the run the job belongs to (its full path)
    owner: str | None = None  # who started it (with --auth)

    @property
    def running(self) -> bool:
        return self.status in ("queued", "running")

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    @property
    def elapsed_s(self) -> float:
        return (self.ended or time.time()) - self.started

    def summary(self) -> str:
        """One line: status, progress, elapsed, ETA, message."""
        parts = [f"**{self.title}**: {self.status}"]
        if self.owner:
            parts.append(f"started by {self.owner}")
        if self.total:
            parts.append(f"{self.done}/{self.total} ({100 * self.fraction:.0f}%)")
        parts.append(f"elapsed {format_seconds(self.elapsed_s)}")
        if self.running and self.eta_s is not None:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        if self.message:
            parts.append(self.message)
        if self.error:
            parts.append(f"error: {self.error}")
        return " · ".join(parts)


def format_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class JobContext:
    """What a job function receives: progress reporting, logging, cancellation."""

    def __init__(self, job: "Job"):
        self._job = job

    @property
    def cancel_event(self) -> threading.Event:
        return self._job.cancel_event

    def should_stop(self) -> bool:
        return self._job.cancel_event.is_set()

    def progress(self, done: int, total: int, message: str | None = None) -> None:
        self._job.set_progress(done, total, message)

    def log(self, line: str) -> None:
        self._job.append_log(line)

    def set_info(self, **info: Any) -> None:
        """Job-specific values for the UI (e.g. the training run id, preview paths)."""
        self._job.update_info(info)


class Job:
    def __init__(self, job_id: int, kind: str, title: str, fn: Callable[[JobContext], Any],
                 registry: dict[int, "Job"] | None = None, run_dir: str = "",
                 owner: str | None = None):
        self.id = job_id
        self.run_dir = str(run_dir)
        self.owner = owner
        self._registry = registry if registry is not None else {}
        self.kind = kind
        self.title = title
        self.fn = fn
        self.cancel_event = threading.Event()
        self._lock = threading.Lock()
        self.status = "queued"
        self.done = 0
        self.total = 0
        self.message = ""
        self.error: str | None = None
        self.result: Any = None
        self.info: dict = {}
        self.started = time.time()
        self.ended: float | None = None
        self._rate_origin: tuple[float, int] | None = None  # (time, done) of the first report
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self.thread = threading.Thread(target=self._run, name=f"studio-job-{job_id}-{kind}",
                                       daemon=True)

    # -------------------------------------------------------------- called from the job thread

    def set_progress(self, done: int, total: int, message: str | None = None) -> None:
        now = time.time()
        with self._lock:
            self.done, self.total = int(done), int(total)
            if message is not None:
                self.message = message
            if self._rate_origin is None or done < self._rate_origin[1]:
                self._rate_origin = (now, int(done))

    def append_log(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with self._lock:
            for part in str(line).splitlines() or [""]:
                self.log.append(f"{stamp} {part}")

    def update_info(self, info: dict) -> None:
        with self._lock:
            self.info = {**self.info, **info}

    def _run(self) -> None:
        self._registry[threading.get_ident()] = self
        try:
            self._run_inner()
        finally:
            self._registry.pop(threading.get_ident(), None)

    def _run_inner(self) -> None:
        with self._lock:
            self.status = "running"
            self.started = time.time()
        ctx = JobContext(self)
        status, error = "done", None
        try:
            result = self.fn(ctx)
            with self._lock:
                self.result = result
            if self.cancel_event.is_set():
                status = "cancelled"
        except BaseException as e:  # noqa: BLE001 - every way out must end the job
            if self.cancel_event.is_set() and isinstance(e, (KeyboardInterrupt, StageStopped)):
                status = "cancelled"
                self.append_log(str(e))
            else:
                status = "failed"
                error = _error_text(e)
                tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
                if not isinstance(e, CraftError):
                    for line in tb.rstrip().splitlines()[-12:]:
                        self.append_log(line)
                logger.warning("studio job %s (%s) failed: %s", self.id, self.title, error)
        with self._lock:
            self.status = status
            self.error = error
            self.ended = time.time()

    # -------------------------------------------------------------- called from the UI

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            status, error = self.status, self.error
            if status == "running" and not self.thread.is_alive():
                # The thread is gone without reporting: the process is going down, or it was
                # killed. Say so rather than show "running" forever.
                status = self.status = "failed"
                error = self.error = "the job's thread ended without reporting a result"
                self.ended = self.ended or time.time()
            eta = None
            if status == "running" and self._rate_origin and self.total:
                t0, d0 = self._rate_origin
                if self.done > d0:
                    rate = (self.done - d0) / max(1e-9, time.time() - t0)
                    eta = (self.total - self.done) / rate
            return JobSnapshot(self.id, self.kind, self.title, status, self.done, self.total,
                               self.started, self.ended, eta, self.message, error,
                               tuple(self.log), self.result, dict(self.info), self.run_dir,
                               self.owner)


def _error_text(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, CraftError):
        text = f"{type(e).__name__}: {text}"
    return text[:2000]


class _ThreadLogHandler(logging.Handler):
    """Routes log records to the job whose thread emitted them."""

    def __init__(self, manager: "JobManager"):
        super().__init__(level=logging.INFO)
        self.manager = manager
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        job = self.manager._by_thread.get(record.thread)
        if job is None:
            return
        try:
            job.append_log(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break a job
            pass


class JobManager:
    """Starts, tracks and cancels jobs; at most one running job per (run, kind)."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._by_thread: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._handler: _ThreadLogHandler | None = None

    def _capture_logs(self) -> None:
        """On the first job: route the ``craft`` / ``studio`` loggers' INFO records to the jobs
        (importing this module changes no logging configuration)."""
        if self._handler is not None:
            return
        self._handler = _ThreadLogHandler(self)
        for name in ("craft", "studio"):
            log = logging.getLogger(name)
            log.addHandler(self._handler)
            if log.level == logging.NOTSET or log.level > logging.INFO:
                log.setLevel(logging.INFO)

    def start(self, kind: str, title: str, fn: Callable[[JobContext], Any],
              info: dict | None = None, run_dir: str = "", owner: str | None = None
              ) -> JobSnapshot:
        """Run ``fn(ctx)`` in a new thread for ``run_dir``; raises JobBusyError if that run's
        ``kind`` is busy. ``info`` starts the job's info (what the UI shows about it, e.g. the
        training run's name)."""
        with self._lock:
            self._capture_logs()
            busy = self.running(kind, run_dir)
            if busy is not None:
                raise JobBusyError(f"a {kind} job of this run is already running "
                                   f"({busy.title}); cancel it or wait for it to finish")
            job = Job(next(self._ids), kind, title, fn, self._by_thread, str(run_dir), owner)
            job.info = dict(info or {})
            self._jobs[job.id] = job
            job.thread.start()
        return job.snapshot()

    def _of(self, kind: str | None, run_dir: str | None):
        for job in reversed(list(self._jobs.values())):
            if (kind is None or job.kind == kind) and (run_dir is None
                                                       or job.run_dir == str(run_dir)):
                yield job

    def running(self, kind: str | None = None, run_dir: str | None = None
                ) -> JobSnapshot | None:
        """The running job of ``kind`` (any if None) of ``run_dir`` (any if None), or None."""
        for job in self._of(kind, run_dir):
            snap = job.snapshot()
            if snap.running:
                return snap
        return None

    def latest(self, kind: str, run_dir: str | None = None) -> JobSnapshot | None:
        """The most recently started job of ``kind`` (of ``run_dir``), finished or not."""
        job = next(self._of(kind, run_dir), None)
        return None if job is None else job.snapshot()

    def others(self, run_dir: str) -> list[JobSnapshot]:
        """Running jobs of every other run (shown read-only, with their run's full path)."""
        return [j.snapshot() for j in self._of(None, None)
                if j.run_dir != str(run_dir) and j.snapshot().running]

    def get(self, job_id: int) -> JobSnapshot | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.snapshot()

    def cancel(self, job_id: int | None = None, kind: str | None = None,
               run_dir: str | None = None) -> bool:
        """Ask a job to stop: by id, or the running one of ``kind`` of ``run_dir``; True if
        one was asked. A job of another run than ``run_dir`` (when given) is not touched."""
        job = self._jobs.get(job_id) if job_id is not None else None
        if job is None and kind is not None:
            snap = self.running(kind, run_dir)
            job = self._jobs.get(snap.id) if snap else None
        if job is None or job.snapshot().status in FINISHED:
            return False
        if run_dir is not None and job.run_dir != str(run_dir):
            return False
        job.cancel_event.set()
        job.append_log("cancel requested; stopping after the current step")
        return True

    def for_run(self, run_dir: str) -> "RunJobs":
        return RunJobs(self, str(run_dir))

    def wait(self, job_id: int, timeout: float | None = None) -> JobSnapshot:
        job = self._jobs[job_id]
        job.thread.join(timeout)
        return job.snapshot()

    def list(self) -> list[JobSnapshot]:
        return [j.snapshot() for j in self._jobs.values()]


@dataclasses.dataclass(frozen=True)
class RunJobs:
    """The jobs of one run: what a page on that run may start, see and cancel."""

    manager: JobManager
    run_dir: str

    def start(self, kind: str, title: str, fn: Callable[[JobContext], Any],
              info: dict | None = None, owner: str | None = None) -> JobSnapshot:
        return self.manager.start(kind, title, fn, info, self.run_dir, owner)

    def latest(self, kind: str) -> JobSnapshot | None:
        return self.manager.latest(kind, self.run_dir)

    def running(self, kind: str | None = None) -> JobSnapshot | None:
        return self.manager.running(kind, self.run_dir)

    def cancel(self, kind: str) -> bool:
        return self.manager.cancel(kind=kind, run_dir=self.run_dir)

    def others(self) -> list[JobSnapshot]:
        return self.manager.others(self.run_dir)


JOBS = JobManager()

__all__ = ["FINISHED", "JOBS", "Job", "JobBusyError", "JobContext", "JobManager", "JobSnapshot",
           "RunJobs", "format_seconds"]
