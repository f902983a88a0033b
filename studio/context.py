"""The studio's shared state: the open run directory, its store, the current config, and the
cached candidate frame every analysis tab reads.

There is one studio per process (it is a local tool for one person), so this is a plain object
shared by all event handlers; each background job opens its *own* :class:`RunStore` on the run
directory it was started for, so switching runs while a job runs is safe.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pandas as pd

from craft import CraftError
from craft.config import (PROJECT_ROOT, CraftConfig, config_to_yaml, load_config,
                          resolve_path)
from craft.store import DB_NAME, RunStore

logger = logging.getLogger(__name__)

ASSETS_DIR = PROJECT_ROOT / "assets"
STUDIO_CONFIG_KEY = "studio"  # the store's config slot for the studio's last saved settings


class StudioContext:
    """The open run and the current settings."""

    def __init__(self, run_dir: str | Path, config_path: str | Path | None = None,
                 overrides: tuple[str, ...] = ()):
        self.config_path = Path(config_path) if config_path else None
        self.overrides = tuple(overrides)
        self.allowed_paths: list[str] = [str(ASSETS_DIR)]
        self._lock = threading.RLock()
        self._frame_cache: tuple[Any, pd.DataFrame] | None = None
        self.store: RunStore | None = None
        self.run_dir: Path = Path(run_dir).expanduser().resolve()
        self.cfg: CraftConfig = load_config(self.config_path, self.overrides)
        self.open_run(self.run_dir)

    # ------------------------------------------------------------------ runs

    def open_run(self, run_dir: str | Path) -> str:
        """Open (creating if needed) a run directory; returns a one-line description."""
        path = Path(str(run_dir).strip()).expanduser()
        if not str(run_dir).strip():
            raise CraftError("give a run directory, e.g. runs/toy")
        path = path.resolve()
        if path.exists() and not path.is_dir():
            raise CraftError(f"{path} is a file, not a run directory; choose a folder")
        if path.is_dir() and any(path.iterdir()) and not (path / DB_NAME).exists():
            raise CraftError(f"{path} is a non-empty folder without a {DB_NAME}; choose an "
                             f"empty or new folder, or an existing run directory")
        store = RunStore(path)
        with self._lock:
            old, self.store, self.run_dir = self.store, store, path
            self._frame_cache = None
            if str(path) not in self.allowed_paths:
                # Gradio reads this list on every file request: the studio serves the runs it
                # opened and the assets, nothing else.
                self.allowed_paths.append(str(path))
        if old is not None and old is not store:
            old.close()
        saved = store.get_config(STUDIO_CONFIG_KEY)
        if saved and self.config_path is None and not self.overrides:
            try:
                from craft.config import config_from_dict
                import yaml

                self.cfg = config_from_dict(yaml.safe_load(saved), f"{path} (studio settings)")
            except CraftError as e:
                logger.warning("ignoring the run's saved studio settings: %s", e)
        return self.describe()

    def describe(self) -> str:
        store = self.store
        counts = self.counts()
        return (f"Run **{store.run_dir}** · {counts['prompts']} prompts "
                f"({counts['eval_prompts']} held out) · {counts['variants']} variants · "
                f"{counts['candidates']} candidates · {counts['scored']} scored · "
                f"{counts['train_runs']} training runs · {counts['evaluations']} evaluations")

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def data_version(self) -> tuple:
        """Changes whenever candidates or scores change (cheap: a few aggregate queries)."""
        return (str(self.run_dir), self.cfg.model.pretrained, *self.store.data_version())

    # ------------------------------------------------------------------ config

    def set_config(self, cfg: CraftConfig) -> None:
        with self._lock:
            if cfg.model.pretrained != self.cfg.model.pretrained:
                self._frame_cache = None
            self.cfg = cfg

    def remember_config(self) -> None:
        """Save the current settings into the run (restored when the run is opened again)."""
        self.store.set_config(config_to_yaml(self.cfg), STUDIO_CONFIG_KEY)

    def reward_names(self) -> list[str]:
        return list(self.cfg.rewards.names)

    def model_path(self) -> str:
        """``model.pretrained`` resolved to an absolute folder when it is a local path."""
        found = resolve_path(self.cfg.model.pretrained)
        return str(found) if found is not None else self.cfg.model.pretrained

    # ------------------------------------------------------------------ data

    def frame(self) -> pd.DataFrame:
        """Training-split candidates of the base model joined with their scores (cached until
        the store's candidates or scores change)."""
        from craft.stages import candidate_frame

        version = self.data_version()
        with self._lock:
            if self._frame_cache is not None and self._frame_cache[0] == version:
                return self._frame_cache[1]
        df = candidate_frame(self.store, self.cfg)
        if df.empty:  # maybe generated under another spelling of the model path
            cands = self.store.candidates_df(split="train")
            if not cands.empty:
                model = cands["model"].value_counts().index[0]
                logger.info("no candidates of model %r; showing those of %r",
                            self.cfg.model.pretrained, model)
                from dataclasses import replace

                alt = replace(self.cfg, model=replace(self.cfg.model, pretrained=model))
                df = candidate_frame(self.store, alt)
        if not df.empty:
            # Seeds are large derived numbers; within a group they are shared by the original
            # and every variant, so their rank (0..S-1) is the readable name.
            df["seed_idx"] = (df.groupby("prompt_id")["seed"].rank(method="dense") - 1).astype(
                int)
        with self._lock:
            self._frame_cache = (version, df)
        return df

    def invalidate(self) -> None:
        with self._lock:
            self._frame_cache = None
