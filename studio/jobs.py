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

**Heavy jobs wait their turn for a device** (:class:`DeviceQueue`): generation, scoring,
training, evaluation, the pool map and the whole loop (:data:`HEAVY_KINDS`, or a job function's
``device_request``) go through one queue per device: the CPU, and each GPU
(``torch.cuda.device_count()``). By default one heavy job runs per device at a time
(``craft studio --jobs-per-device N`` or the ``CRAFT_STUDIO_JOBS_PER_DEVICE`` environment
variable change it; 0 = no limit): two people's trainings on one GPU would run out of memory,
and on a small CPU machine two jobs at once made each step ~200x slower. A waiting job is
``queued``: its snapshot says its place in line and, where the running job's ETA is known, when
it should start; Cancel takes it out of the line (nothing ran). With several GPUs a job gets
the least-loaded device it may use, given to its function as :attr:`JobContext.devices`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable

from craft import CraftError, StageStopped

logger = logging.getLogger(__name__)

FINISHED = ("done", "failed", "cancelled")
LOG_LINES = 200
# Kinds of jobs that load a model or run one over many images: they queue for a device.
HEAVY_KINDS = frozenset({"generate", "score", "train", "compare", "map", "loop"})
PER_DEVICE_ENV = "CRAFT_STUDIO_JOBS_PER_DEVICE"


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
    devices: tuple[str, ...] = ()  # the device(s) a heavy job was given (none while queued)
    queue_position: int | None = None  # 1 = next in line (queued jobs only)
    queue_line: str = ""  # "queued: 2nd in line for the CPU, starts in about 40s (after …)"
    start_in_s: float | None = None  # estimated wait before a queued job starts, if known
    waiting: int = 0  # heavy jobs queued for this running job's device(s)

    @property
    def running(self) -> bool:
        return self.status in ("queued", "running")

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    @property
    def elapsed_s(self) -> float:
        return (self.ended or time.time()) - self.started

    @property
    def short_title(self) -> str:
        """The title without its run path ("Train craft-1")."""
        return self.title.split(" · ")[0]

    def summary(self) -> str:
        """One line: status, progress, elapsed, ETA, message (a queued job: its place in line
        and when it should start)."""
        if self.status == "queued":
            parts = [f"**{self.title}**: {self.queue_line or 'queued'}"]
            if self.owner:
                parts.append(f"started by {self.owner}")
            parts.append(f"waiting {format_seconds(self.elapsed_s)}")
            return " · ".join(parts)
        parts = [f"**{self.title}**: {self.status}"]
        if self.owner:
            parts.append(f"started by {self.owner}")
        if self.running and any(d != "cpu" for d in self.devices):
            parts.append(f"on {', '.join(self.devices)}")
        if self.total:
            parts.append(f"{self.done}/{self.total} ({100 * self.fraction:.0f}%)")
        parts.append(f"elapsed {format_seconds(self.elapsed_s)}")
        if self.running and self.waiting:
            parts.append(f"{self.waiting} job{'s' if self.waiting > 1 else ''} waiting for "
                         f"its device")
        if self.running and self.eta_s is not None:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        if self.message:
            parts.append(self.message)
        if self.error:
            parts.append(f"error: {self.error}")
        return " · ".join(parts)


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


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

    @property
    def devices(self) -> tuple[str, ...]:
        """The device(s) the queue gave this job ("cpu", "cuda:1", …); () for a light job."""
        return self._job.devices


class Job:
    def __init__(self, job_id: int, kind: str, title: str, fn: Callable[[JobContext], Any],
                 registry: dict[int, "Job"] | None = None, run_dir: str = "",
                 owner: str | None = None, request: "DeviceRequest | None" = None,
                 queue: "DeviceQueue | None" = None):
        self.id = job_id
        self.request = request  # None: a light job, started at once
        self.queue = queue
        self.devices: tuple[str, ...] = ()
        self.finished = threading.Event()  # set once the job has ended, however it ended
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

    def launch(self, devices: tuple[str, ...] = ()) -> None:
        """Start the job's thread on ``devices`` (the queue's choice; () for a light job). The
        status says ``running`` from here on, and the thread is alive before anyone can look."""
        with self._lock:
            self.devices = tuple(devices)
            self.status = "running"
            self.started = time.time()
            self.thread.start()

    def cancel_unstarted(self) -> None:
        """Cancelled while waiting in the queue: ends at once, nothing ran."""
        with self._lock:
            self.status = "cancelled"
            self.ended = time.time()
            self.info = {**self.info, "never_started": True}
        self.append_log("cancelled while waiting for a device; nothing ran")
        self.finished.set()

    def _run(self) -> None:
        self._registry[threading.get_ident()] = self
        try:
            self._run_inner()
        finally:
            self._registry.pop(threading.get_ident(), None)
            if self.queue is not None and self.request is not None:
                try:  # the device is free: the next job in line starts
                    self.queue.release(self)
                except Exception:  # noqa: BLE001 - never leave the job unfinished
                    logger.exception("studio job queue: releasing job %s failed", self.id)
            self.finished.set()

    def _run_inner(self) -> None:
        ctx = JobContext(self)
        status, error = "done", None
        if self.cancel_event.is_set():  # cancelled as it left the queue: nothing runs
            with self._lock:
                self.status, self.ended = "cancelled", time.time()
            return
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
        """The job as it is now; a queued job's place in line and expected start, a running
        heavy job's count of jobs waiting for its device (from the queue, outside the job's
        lock: the queue's lock is always taken before a job's)."""
        snap = self._base_snapshot()
        if self.queue is None or self.request is None:
            return snap
        if snap.status == "queued":
            wait = self.queue.wait_info(self)
            if wait is not None:
                return dataclasses.replace(snap, queue_position=wait[0], queue_line=wait[1],
                                           start_in_s=wait[2])
        elif snap.status == "running":
            return dataclasses.replace(snap, waiting=self.queue.waiting_for(snap.devices))
        return snap

    def _base_snapshot(self) -> JobSnapshot:
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
                               self.owner, self.devices)


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


@dataclasses.dataclass(frozen=True)
class DeviceRequest:
    """What a heavy job needs: ``count`` devices among ``choices`` (None: any accelerator, i.e.
    any GPU, or the CPU on a machine without one). A job pinned by its config (``cpu``,
    ``cuda:1``) names its device; one on several processes asks for several GPUs."""

    choices: tuple[str, ...] | None = None
    count: int = 1


def detect_devices() -> list[str]:
    """The devices heavy jobs queue for: the CPU and each GPU torch sees."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA: the CPU only
        n = 0
    return ["cpu", *(f"cuda:{i}" for i in range(n))]


def per_device_setting(value: int | str | None = None) -> int:
    """Heavy jobs at once per device: ``value``, else $CRAFT_STUDIO_JOBS_PER_DEVICE, else 1;
    0 = no limit."""
    raw = value if value is not None else os.environ.get(PER_DEVICE_ENV, "").strip() or 1
    try:
        n = int(raw)
    except (TypeError, ValueError):
        raise CraftError(f"jobs per device = {raw!r}: give a whole number (1 = one heavy job "
                         f"per device at a time, 0 = no limit)") from None
    if n < 0:
        raise CraftError(f"jobs per device = {n}: give 1 or more (0 = no limit)")
    return n


def device_label(devices: list[str] | tuple[str, ...], count: int = 1) -> str:
    if list(devices) == ["cpu"]:
        return "the CPU"
    if len(devices) == 1:
        return f"GPU {devices[0].partition(':')[2] or 0} ({devices[0]})"
    return "a GPU" if count == 1 else f"{count} GPUs"


class DeviceQueue:
    """One line per device: heavy jobs wait here until their device has a free slot.

    A job starts when ``count`` of the devices it may use each run fewer than ``per_device``
    heavy jobs, and no job queued before it waits for any of those devices (first come, first
    served per device; a CPU job never waits behind a GPU job). It gets the least-loaded of
    them. ``devices`` (default: :func:`detect_devices`) can be given, e.g. a fake GPU list in
    tests."""

    def __init__(self, devices: list[str] | None = None, per_device: int | None = None):
        self._devices = list(devices) if devices is not None else None
        self._per_device = per_device
        self._lock = threading.RLock()
        self._waiting: list[Job] = []
        self._holding: dict[int, Job] = {}  # running heavy jobs, by id

    # -------------------------------------------------------------- settings

    @property
    def devices(self) -> list[str]:
        if self._devices is None:
            self._devices = detect_devices()
        return self._devices

    @property
    def per_device(self) -> int:
        if self._per_device is None:
            self._per_device = per_device_setting()
        return self._per_device

    def configure(self, devices: list[str] | None = None, per_device: int | None = None) -> None:
        """Change the device list and / or the jobs per device (the studio's flags); waiting
        jobs that now fit start."""
        with self._lock:
            if devices is not None:
                self._devices = list(devices)
            if per_device is not None:
                self._per_device = per_device_setting(per_device)
            self._schedule()

    # -------------------------------------------------------------- the line

    def candidates(self, request: DeviceRequest) -> list[str]:
        """The devices ``request`` may use, in the device list's order."""
        if request.choices:
            return list(request.choices)
        gpus = [d for d in self.devices if d != "cpu"]
        return gpus or ["cpu"]

    def _count(self, request: DeviceRequest, cands: list[str]) -> int:
        return max(1, min(int(request.count or 1), len(cands)))

    def _load(self, device: str) -> int:
        return sum(device in job.devices for job in self._holding.values())

    def _free(self, device: str) -> int:
        if self.per_device == 0:
            return 1 << 30
        return max(0, self.per_device - self._load(device))

    def submit(self, job: Job) -> None:
        """Queue ``job``; it starts now if its device is free."""
        with self._lock:
            self._waiting.append(job)
            self._schedule()

    def release(self, job: Job) -> None:
        """``job`` has ended: its devices are free for the next in line."""
        with self._lock:
            self._holding.pop(job.id, None)
            self._schedule()

    def withdraw(self, job: Job) -> bool:
        """Take a waiting job out of the line (cancelled before it started); False if it is not
        waiting (it has started meanwhile)."""
        with self._lock:
            if job not in self._waiting:
                return False
            self._waiting.remove(job)
            job.cancel_unstarted()
            self._schedule()
            return True

    def _schedule(self) -> None:
        for jid, job in list(self._holding.items()):  # a thread gone without releasing
            if not job.thread.is_alive() and job.thread.ident is not None:
                self._holding.pop(jid)
        blocked: set[str] = set()
        order = {d: i for i, d in enumerate(self.devices)}
        for job in list(self._waiting):
            cands = self.candidates(job.request)
            k = self._count(job.request, cands)
            free = [d for d in cands if d not in blocked and self._free(d) > 0]
            if len(free) < k:
                blocked.update(cands)  # first come, first served on these devices
                continue
            chosen = sorted(free, key=lambda d: (self._load(d), order.get(d, len(order))))[:k]
            self._waiting.remove(job)
            self._holding[job.id] = job
            job.launch(tuple(chosen))
            logger.info("studio job %s (%s) starts on %s", job.id, job.title, ", ".join(chosen))

    # -------------------------------------------------------------- what the pages say

    def waiting_for(self, devices: tuple[str, ...]) -> int:
        """Jobs in line for any of ``devices``."""
        with self._lock:
            return sum(bool(set(self.candidates(j.request)) & set(devices))
                       for j in self._waiting)

    def wait_info(self, job: Job) -> tuple[int, str, float | None] | None:
        """(place in line, the line a page shows, estimated seconds to its start or None) of a
        waiting job; None if it is not waiting. The estimate comes from the ETAs of the jobs
        running on its devices: it needs the slot the Nth of them frees, N = the jobs ahead
        of it + 1; unknown when those ETAs are not known (yet)."""
        with self._lock:
            if job not in self._waiting:
                return None
            cands = self.candidates(job.request)
            k = self._count(job.request, cands)
            idx = self._waiting.index(job)
            position = 1 + sum(bool(set(self.candidates(j.request)) & set(cands))
                               for j in self._waiting[:idx])
            free_now = sum(min(self._free(d), k) for d in cands)
            holders = [(j, d) for j in self._holding.values() for d in j.devices if d in cands]
            snaps = {j.id: j._base_snapshot() for j, _ in holders}
        label = device_label(cands, k)
        head = f"queued: {ordinal(position)} in line for {label}"
        need = position - 1 + k - free_now  # slots that must be freed before it starts
        if need <= 0:
            return position, f"{head}, starting", 0.0

        def who(snap: JobSnapshot) -> str:
            run = os.path.basename(snap.run_dir.rstrip("/")) if snap.run_dir else ""
            return snap.short_title + (f" in {run}" if run else "") + \
                (f" ({snap.owner})" if snap.owner else "")

        etas = [(snaps[j.id].eta_s, snaps[j.id]) for j, _ in holders]
        if etas and len(etas) >= need and all(e is not None for e, _ in etas):
            eta, snap = sorted(etas, key=lambda t: t[0])[need - 1]
            after = who(snap) if position == 1 else f"{who(snap)} and the job(s) ahead"
            return position, f"{head}, starts in about {format_seconds(eta)} (after {after})", eta
        running = {s.id: s for _, s in etas}
        if len(running) == 1 and position == 1:
            [snap] = running.values()
            why = f"after {who(snap)}, whose time left is not known yet"
        elif position > 1:
            why = f"{position - 1} job(s) ahead of it"
        else:
            why = f"when one of the {len(running)} jobs on {label} ends"
        return position, f"{head}, start time unknown ({why})", None


class JobManager:
    """Starts, tracks and cancels jobs; at most one running job per (run, kind); heavy jobs
    (:data:`HEAVY_KINDS`) wait their turn in the device queue (:class:`DeviceQueue`)."""

    def __init__(self, devices: list[str] | None = None, per_device: int | None = None) -> None:
        self._jobs: dict[int, Job] = {}
        self._by_thread: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._handler: _ThreadLogHandler | None = None
        self.queue = DeviceQueue(devices, per_device)

    def configure(self, devices: list[str] | None = None, per_device: int | None = None) -> None:
        """Set the devices heavy jobs queue for and how many run at once on each."""
        self.queue.configure(devices, per_device)

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
              info: dict | None = None, run_dir: str = "", owner: str | None = None,
              request: DeviceRequest | None = None) -> JobSnapshot:
        """Run ``fn(ctx)`` in a new thread for ``run_dir``; raises JobBusyError if that run's
        ``kind`` is busy. ``info`` starts the job's info (what the UI shows about it, e.g. the
        training run's name). A heavy job (``request``, else ``fn.device_request``, else a kind
        in :data:`HEAVY_KINDS`: any device) waits in the device queue: its snapshot says
        ``queued`` until its device is free."""
        if request is None:
            request = getattr(fn, "device_request", None)
        if request is None and kind in HEAVY_KINDS:
            request = DeviceRequest()
        with self._lock:
            self._capture_logs()
            busy = self.running(kind, run_dir)
            if busy is not None:
                raise JobBusyError(f"a {kind} job of this run is already "
                                   f"{'queued' if busy.status == 'queued' else 'running'} "
                                   f"({busy.title}); cancel it or wait for it to finish")
            job = Job(next(self._ids), kind, title, fn, self._by_thread, str(run_dir), owner,
                      request, self.queue)
            job.info = dict(info or {})
            self._jobs[job.id] = job
            if request is None:
                job.launch()
            else:
                self.queue.submit(job)
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
        if self.queue.withdraw(job):  # still waiting for its device: out of the line
            return True
        job.cancel_event.set()
        job.append_log("cancel requested; stopping after the current step")
        return True

    def for_run(self, run_dir: str) -> "RunJobs":
        return RunJobs(self, str(run_dir))

    def wait(self, job_id: int, timeout: float | None = None) -> JobSnapshot:
        """Wait until the job has ended (queued jobs included), at most ``timeout`` s."""
        job = self._jobs[job_id]
        if job.finished.wait(timeout) and job.thread.ident is not None:
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
              info: dict | None = None, owner: str | None = None,
              request: DeviceRequest | None = None) -> JobSnapshot:
        return self.manager.start(kind, title, fn, info, self.run_dir, owner, request)

    def latest(self, kind: str) -> JobSnapshot | None:
        return self.manager.latest(kind, self.run_dir)

    def running(self, kind: str | None = None) -> JobSnapshot | None:
        return self.manager.running(kind, self.run_dir)

    def cancel(self, kind: str) -> bool:
        return self.manager.cancel(kind=kind, run_dir=self.run_dir)

    def others(self) -> list[JobSnapshot]:
        return self.manager.others(self.run_dir)


JOBS = JobManager()

__all__ = ["DeviceQueue", "DeviceRequest", "FINISHED", "HEAVY_KINDS", "JOBS", "Job",
           "JobBusyError", "JobContext", "JobManager", "JobSnapshot", "PER_DEVICE_ENV", "RunJobs",
           "detect_devices", "device_label", "format_seconds", "ordinal", "per_device_setting"]
