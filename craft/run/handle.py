"""A run directory as one process of a launch sees it: where it is, which process this is, and
(on the global main process only) its open store.

Why a handle instead of a bare :class:`~craft.run.store.RunStore`: under ``accelerate launch`` only
the global main process may open ``store.sqlite`` (see craft.run.distributed), yet every process
needs the run directory (images and checkpoints live there) and the collective steps. The stage
functions take a ``Run`` and do the right thing on every process; on a single process a ``Run``
is just the store plus no-op collectives.

The run's config: the first command that runs with ``--config`` / ``--set`` stores its resolved
config in the run (in the store, and as ``RUN/config.yaml`` so that every process of a launch can
read it without the database); later commands use it unless given a config again, so a stage
resumed after a crash runs with the settings it started with.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from craft import CraftError
from craft.run.distributed import Dist
from craft.run.store import RunStore

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.yaml"


@dataclasses.dataclass
class Run:
    run_dir: Path
    dist: Dist
    store: RunStore | None  # the global main process only

    @classmethod
    def open(cls, run_dir: str | Path, dist: Dist) -> Run:
        """Open (creating) the run on the main process; every process returns once the store
        exists and has recovered from any crash, so no process writes files before that."""
        path = Path(run_dir).expanduser().resolve()
        store = RunStore(path) if dist.is_main else None
        dist.barrier()
        return cls(path, dist, store)

    @classmethod
    def local(cls, store: RunStore) -> Run:
        """A single-process handle on an open store (the studio's jobs, tests, scripts)."""
        if Dist.launched():
            raise CraftError("this process is one of several (WORLD_SIZE > 1): open the run with "
                             "craft.run.handle.Run.open(run_dir, Dist.for_config(cfg)) so that only the "
                             "main process opens the store")
        return cls(store.run_dir, Dist.local(), store)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save_config(self, cfg) -> None:
        """Store ``cfg`` as the run's config (main process; see the module docstring)."""
        from craft.run.config import config_to_yaml
        from craft.run.fsutil import write_text_atomic

        if not self.is_main:
            return
        text = config_to_yaml(cfg)
        self.store.set_config(text)
        write_text_atomic(self.run_dir / RUN_CONFIG_FILE, text)


def as_run(obj: Run | RunStore) -> Run:
    """A :class:`Run` from either a Run or an open RunStore (single process)."""
    return obj if isinstance(obj, Run) else Run.local(obj)


def run_config(run_dir: str | Path, config: str | Path | None = None,
               overrides: tuple[str, ...] | list[str] = ()):
    """The config a command on ``run_dir`` runs with: ``config`` + ``overrides`` when a config
    file is given; else the run's stored config (+ ``overrides``); else configs/toy.yaml
    (+ ``overrides``). Every process calls this before
    the process group exists (the config says whether the processes run on CPUs or GPUs).
    Returns (cfg, given) where ``given`` says whether it must be stored in the run."""
    from craft.run.config import load_config

    stored = Path(run_dir).expanduser() / RUN_CONFIG_FILE
    if config is None and stored.is_file():
        # --set alone changes the run's own config (not the defaults): a real-model run stays
        # a real-model run when one filter value is changed from the command line.
        return load_config(stored, list(overrides)), bool(overrides)
    if config is None and not overrides:
        legacy = _config_in_store(Path(run_dir))
        if legacy is not None:
            return legacy, False
    return load_config(config, list(overrides)), True


def _config_in_store(run_dir: Path):
    """A run made before RUN/config.yaml existed keeps its config only in the store."""
    from craft.run.store import DB_NAME

    if not (run_dir / DB_NAME).exists() or Dist.launched():
        return None
    import yaml

    from craft.run.config import config_from_dict

    with RunStore(run_dir, cleanup=False) as store:
        text = store.get_config()
    if text is None:
        return None
    return config_from_dict(yaml.safe_load(text), source=f"{run_dir}/{DB_NAME}")


__all__ = ["RUN_CONFIG_FILE", "Run", "as_run", "run_config"]
