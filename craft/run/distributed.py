"""The processes of one ``accelerate launch`` (or one plain process), as the stages see them.

Why this wrapper: every stage needs the same few collective steps (wait for each other, hand the
main process's plan to everyone, send rows back to the main process, agree on "stop"), and they
must be right on one process, on several GPUs of one machine and on several machines. With one
process every operation is a no-op, so the studio's in-process jobs and a plain ``craft run``
pay nothing.

The process group is set up by accelerate's ``PartialState`` (the launcher's environment tells
it the ranks). ``cpu=True`` matters: without it a multi-process launch on a machine without GPUs
reports a single process, and every process would do every piece of work.

The rule the run store depends on: only the *global* main process (rank 0 of all machines) opens
``store.sqlite``. SQLite's WAL mode needs shared memory between its users, which a network
filesystem does not provide, so processes on other machines never touch the file; they receive
their share of the work with :meth:`Dist.broadcast` and return their rows with
:meth:`Dist.gather`. Images and checkpoints are plain files in the run directory, which every
machine must see at the same path (a shared filesystem).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a process waits at a collective step for the others. The main process alone writes
# prompts (an LLM expander can take long) and statistics while the others wait, so the default
# of the backends (10-30 min) is too short; a crashed process ends the launch anyway (the
# launcher stops the others), so a long wait never hangs a run that failed.
TIMEOUT_ENV = "CRAFT_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 360


def setup_process() -> None:
    """Process-level settings every stage wants, applied once per process: flush denormal floats
    to zero (denormals once made CPU inference several times slower)."""
    import torch

    torch.set_flush_denormal(True)


class Dist:
    """Rank, world size and the collective steps; see the module docstring."""

    def __init__(self, cpu: bool):
        from accelerate import PartialState

        minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
        self.state = PartialState(cpu=cpu, timeout=datetime.timedelta(minutes=minutes))
        self.rank = self.state.process_index
        self.world = self.state.num_processes
        self.local_rank = self.state.local_process_index
        self.is_main = self.state.is_main_process
        self.device = self.state.device

    @classmethod
    def for_config(cls, cfg) -> Dist:
        """The launch as a config sees it: CPU processes when the model runs on the CPU."""
        from craft.run.devices import resolve_device

        return cls(cpu=resolve_device(cfg.model.device).type == "cpu")

    @classmethod
    def local(cls) -> Dist:
        """This process alone (the studio's in-process jobs, direct library calls), without
        touching accelerate's process group."""
        import torch

        self = cls.__new__(cls)
        self.state = None
        self.rank, self.world, self.local_rank, self.is_main = 0, 1, 0, True
        self.device = torch.device("cpu")
        return self

    @staticmethod
    def launched() -> bool:
        """Whether this process was started by a multi-process launcher (torchrun sets
        WORLD_SIZE; accelerate's launcher too)."""
        return int(os.environ.get("WORLD_SIZE", "1")) > 1

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world={self.world}, device={self.device})"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def model_device(self, setting: str, key: str = "model.device"):
        """The device this process runs a model on: ``setting`` resolved, and under a
        multi-GPU launch each process's own GPU (``cuda`` and ``auto`` alike)."""
        import torch

        from craft.run.devices import resolve_device

        dev = resolve_device(setting, key=key)
        if dev.type == "cuda" and self.distributed and dev.index is None:
            return torch.device("cuda", self.local_rank)
        return dev

    # ----------------------------------------------------------------- collective steps

    def barrier(self) -> None:
        if self.distributed:
            self.state.wait_for_everyone()

    def broadcast(self, obj: T) -> T:
        """The main process's ``obj`` on every process (others pass anything, e.g. None)."""
        if not self.distributed:
            return obj
        import torch.distributed as td

        box = [obj if self.is_main else None]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """On the main process, every process's ``obj`` in rank order; None elsewhere."""
        if not self.distributed:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world if self.is_main else None
        td.gather_object(obj, out, dst=0)
        return out

    def on_main(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the main process, its result on every process. A failure
        on the main process fails every process with the same message (instead of leaving the
        others waiting until the launcher stops them)."""
        from craft import CraftError

        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn(*args, **kwargs))
            except CraftError as e:
                if not self.distributed:
                    raise
                outcome = ("error", str(e))
            except BaseException as e:
                if self.distributed:
                    self.broadcast(("error", f"the main process failed: {type(e).__name__}: {e}"))
                raise
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise CraftError(value)
        return value

    def any(self, flag: bool) -> bool:
        """True on every process when any process says True (a stop asked on one stops all)."""
        if not self.distributed:
            return bool(flag)
        import torch
        import torch.distributed as td

        t = torch.tensor([1 if flag else 0], device=self.device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t.item())

    def in_rounds(self, todo: list, batch: int, work, commit=None, should_stop=None) -> bool:
        """The one loop of every sharded stage (generation, scoring, evaluation images).

        Process ``r`` of ``n`` takes every n-th item of ``todo`` (the same list on every
        process); all move in rounds of one ``batch`` each: each runs ``work(its chunk) ->
        rows`` (an empty chunk when it has run out), the rows go to the main process, which
        runs ``commit(all rows of the round)``. Before every round the processes agree on
        stopping (a stop asked on one stops all), so a killed or cancelled launch loses at most
        the round in flight. Returns True when it stopped early."""
        mine = todo[self.rank::self.world]
        rounds = -(-len(todo[0::self.world]) // batch)  # process 0 has the most items
        for k in range(rounds):
            if self.any(should_stop is not None and should_stop()):
                return True
            rows = work(mine[k * batch:(k + 1) * batch])
            gathered = self.gather(rows)
            if self.is_main and commit is not None:
                commit([r for part in gathered for r in part])
        return False


__all__ = ["Dist", "setup_process"]
