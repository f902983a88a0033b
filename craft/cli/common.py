"""What every ``craft`` command shares: exit codes, the config options, progress and stop hooks.

Kept apart from craft.cli.main (the parser) and craft.cli.stages (the stage commands) so that each
imports this and neither imports the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# exit status: 0 done; 1 an unexpected error (a bug): its traceback is shown
EXIT_USER_ERROR = 2  # something the user can fix: one line says what and how
EXIT_STOPPED = 3  # stopped on request (--stop-file, the studio's Cancel); rerun to continue


def add_config_arguments(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    """The config options every pipeline command shares: a YAML file and ``--set`` overrides."""
    help_text = "YAML config (default: the run's stored config, else configs/toy.yaml)"
    if positional:
        parser.add_argument("config", nargs="?", default=None, help=help_text)
    else:
        parser.add_argument("--config", "-c", default=None, help=help_text)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax), e.g. --set train.lr=5e-5; "
                             "repeatable")


def config_from_args(args: argparse.Namespace):
    """The resolved :class:`craft.run.config.CraftConfig` for parsed ``add_config_arguments``."""
    from craft.run.config import load_config

    return load_config(args.config, args.overrides)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Hooks for a front end that runs the command as a subprocess (the studio)."""
    group = parser.add_argument_group("driven by another program (the studio)")
    group.add_argument("--progress-file", default=None, metavar="PATH",
                       help="write the current stage's progress to PATH as JSON")
    group.add_argument("--stop-file", default=None, metavar="PATH",
                       help="stop at the next batch or step (resumably) once PATH exists")
    group.add_argument("--result-file", default=None, metavar="PATH",
                       help="write the command's result to PATH as JSON when it ends")


class Reporter:
    """Progress for the main process: a tqdm bar per stage on stderr or, with
    ``--progress-file``, a JSON snapshot that the front end driving the command polls
    (rewritten at most 4 times a second and at every stage's end; no bars then)."""

    def __init__(self, path: str | None = None, enabled: bool = True):
        self.path = Path(path) if path else None
        self.enabled = enabled
        self._last = 0.0

    def stage(self, name: str):
        """The ``progress(done, total)`` callback of stage ``name``."""
        if not self.enabled:
            return None
        from tqdm import tqdm

        from craft.stages.calls import STAGE_UNITS

        unit = STAGE_UNITS.get(name, "it")
        state: dict = {}

        def progress(done: int, total: int) -> None:
            started = state.setdefault("started", time.time())
            if self.path is not None:
                self.write(name, done, total, unit, force=done >= total, started=started)
                return
            bar = state.get("bar")
            if bar is None:
                bar = state["bar"] = tqdm(total=total, desc=name, unit=unit, dynamic_ncols=True,
                                          file=sys.stderr)
            bar.total = total
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

        return progress

    def write(self, stage: str, done: int, total: int, unit: str = "", *, force: bool = False,
              **extra) -> None:
        if self.path is None or not self.enabled:
            return
        now = time.time()
        if not force and now - self._last < 0.25:
            return
        self._last = now
        from craft.run.fsutil import write_text_atomic

        write_text_atomic(self.path, json.dumps({"stage": stage, "done": done, "total": total,
                                                 "unit": unit, "time": now, **extra}))


def stop_check(path: str | None):
    """``should_stop`` for ``--stop-file``: True once the file exists."""
    if not path:
        return None
    p = Path(path)
    return p.exists


def write_result(path: str | None, result: dict) -> None:
    if path:
        from craft.run.fsutil import write_text_atomic

        write_text_atomic(path, json.dumps(result, default=str))


__all__ = ["EXIT_STOPPED", "EXIT_USER_ERROR", "Reporter",
           "add_config_arguments", "add_job_arguments", "config_from_args", "stop_check",
           "write_result"]
