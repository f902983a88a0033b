"""What every stage shares: the run on this process, the preflight, progress and stop hooks,
and the rule for training-run names (craft/stages/engine.py and the stage modules beside it
import it; it imports none of them)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from craft import CraftError, StageStopped
from craft.run.distributed import Dist, setup_process
from craft.run.handle import Run

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]

DEFAULT_RUN_NAME = "craft"  # the training run `craft run` / `craft train` make
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def open_run(run_dir: str | Path, cfg, dist: Dist | None = None) -> Run:
    """The run for this process: the process group of a launch (or none), process-level
    settings, and the store on the main process."""
    setup_process()
    if dist is None:
        dist = Dist.for_config(cfg) if Dist.launched() else Dist.local()
    if not dist.is_main:  # one set of loading bars per launch, not one per process
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    return Run.open(run_dir, dist)


def require(cfg, *, model: bool = False, rewards=(), train: bool = False,
            processes: int = 1) -> None:
    """Fail before any work when something the stage reads is not on this machine: the base
    model's files, each reward's weights, training options (e.g. 8-bit Adam without
    bitsandbytes, an effective batch that ``processes`` cannot split). Reads no weights."""
    if model:
        from craft.models.loading import check_model

        check_model(cfg.model)
    if train:
        from craft.methods.training import check_train_options, gradient_accumulation

        check_train_options(cfg)
        gradient_accumulation(cfg.train, processes)
    if rewards:
        from craft.rewards.configured import check_reward

        for name in dict.fromkeys(rewards):
            check_reward(cfg, name)


def check_run_name(name: str) -> str:
    name = (name or "").strip()
    if not _NAME_RE.match(name):
        raise CraftError(f"training run name {name!r}: use letters, digits, '-', '_' or '.' "
                         f"(up to 64, starting with a letter or digit), e.g. craft-1")
    return name


def stopped(run: Run, should_stop: StopFn | None, what: str, kept: str) -> None:
    if run.dist.any(should_stop is not None and should_stop()):
        raise StageStopped(f"{what} stopped on request; {kept}, and running it again continues")


__all__ = ["DEFAULT_RUN_NAME", "ProgressFn", "StopFn", "check_run_name", "open_run", "require",
           "stopped"]
