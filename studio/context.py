"""The studio's state: the runs it has open, and for each run its store, its settings, the UI
state saved with it and the cached candidate frame every analysis tab reads.

One :class:`RunContext` per run directory, shared by every browser looking at that run (which
run a browser looks at is its own: studio.session). Everything a user sets is saved in the run
as it changes, so a reload, a second browser or a restart finds it again:

- the settings (every control bound to a config key) are the run's config: the same file
  (RUN/config.yaml and the store) that ``craft filter``, ``craft train`` and ``craft run`` read
  when they are given no ``--config``, so the CLI selects what Curate shows;
- the rest (the Train form's run name, the views, the chosen checkpoint, ...) is the run's UI
  state, a small JSON record in the store (key :data:`UI_KEY`).

Each background job opens its *own* store on the run directory it was started for.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from craft import CraftError
from craft.run.config import (PROJECT_ROOT, CraftConfig, config_from_dict, load_config,
                          resolve_path)
from craft.run.store import DB_NAME, RunStore

logger = logging.getLogger(__name__)

ASSETS_DIR = PROJECT_ROOT / "assets"
LEGACY_SETTINGS_KEY = "studio"  # where earlier studios saved their settings in a run
UI_KEY = "studio-ui"
UNDO_DEPTH = 200
SAVE_DELAY_S = 0.3


class RunContext:
    """One open run: store, settings, UI state, cached frame, manual-override history."""

    def __init__(self, run_dir: Path, base_cfg: CraftConfig, prefer_base: bool = False):
        self.run_dir = run_dir
        self.store = RunStore(run_dir)
        self._lock = threading.RLock()
        self._frame_cache: tuple[Any, pd.DataFrame] | None = None
        self._undo: list[dict[int, str | None]] = []  # each entry: candidate -> previous action
        # bumped on every change of the settings / the hand overrides (:meth:`changes`)
        self._settings_changes = 0
        self._override_changes = 0
        self._save_timer: threading.Timer | None = None
        self.cfg = base_cfg if prefer_base else (self._saved_config() or base_cfg)
        if prefer_base:
            self.save_settings()

    def _saved_config(self) -> CraftConfig | None:
        import yaml

        for key in ("craft", LEGACY_SETTINGS_KEY):
            text = self.store.get_config(key)
            if not text:
                continue
            try:
                return config_from_dict(yaml.safe_load(text), f"{self.run_dir} (saved settings)")
            except CraftError as e:
                logger.warning("ignoring the run's saved settings (%s): %s", key, e)
        return None

    def close(self) -> None:
        self.flush()
        self.store.close()

    # ------------------------------------------------------------------ summaries

    def describe(self) -> str:
        counts = self.counts()
        return (f"Run **{self.run_dir}** · {counts['prompts']} training prompts + "
                f"{counts['eval_prompts']} held out for evaluation · {counts['variants']} "
                f"variants · "
                f"{counts['candidates']} candidates · {counts['scored']} scored · "
                + (f"{counts['sampled']} sampled by online training · " if counts.get("sampled")
                   else "") +
                f"{counts['train_runs']} training runs · {counts['evaluations']} evaluations")

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def data_version(self) -> tuple:
        """Changes whenever candidates or scores change (cheap: a few aggregate queries)."""
        return (str(self.run_dir), self.cfg.model.pretrained, *self.store.data_version())

    # ------------------------------------------------------------------ settings and UI state

    def set_config(self, cfg: CraftConfig) -> None:
        with self._lock:
            if cfg.model.pretrained != self.cfg.model.pretrained:
                self._frame_cache = None
            if cfg != self.cfg:
                self._settings_changes += 1
            self.cfg = cfg

    def changes(self) -> tuple[int, int]:
        """(settings, overrides) change counters: what a page polls (no query, no lock) to
        learn that another window saved a setting or kept / excluded an image by hand."""
        return self._settings_changes, self._override_changes

    def save_settings(self) -> None:
        """The current settings become the run's config (see the module docstring)."""
        from craft.run.handle import Run

        Run.local(self.store).save_config(self.cfg)

    remember_config = save_settings

    def schedule_save(self, delay_s: float = SAVE_DELAY_S) -> None:
        """Save the settings soon, off the caller's path: a burst of slider moves is one write."""
        with self._lock:
            if self._save_timer is not None:
                self._save_timer.cancel()
            self._save_timer = threading.Timer(delay_s, self._save_pending)
            self._save_timer.daemon = True
            self._save_timer.start()

    def _save_pending(self) -> None:
        with self._lock:
            self._save_timer = None
        try:
            self.save_settings()
        except Exception:  # noqa: BLE001 - a failed save must not kill the timer thread quietly
            logger.exception("could not save the studio settings into %s", self.run_dir)

    def flush(self) -> None:
        """Write a pending save now (before closing, or before a job reads the run's config)."""
        with self._lock:
            timer, self._save_timer = self._save_timer, None
        if timer is not None:
            timer.cancel()
            self.save_settings()

    def reload_config(self) -> CraftConfig:
        """Take the run's stored config again (a stage changed it, e.g. the prompts stage
        recording several sources in one file)."""
        self.flush()
        saved = self._saved_config()
        if saved is not None:
            self.set_config(saved)
        return self.cfg

    def settings_now(self) -> CraftConfig:
        """The run's settings as a job starts: every field is saved as it changes
        (studio.settings_sync), so they are the run's, not one page's form; a pending
        debounced save is written first, so a subprocess reading RUN/config.yaml sees them."""
        self.flush()
        return self.cfg

    def ui_state(self) -> dict[str, Any]:
        text = self.store.get_config(UI_KEY)
        try:
            return json.loads(text) if text else {}
        except ValueError:
            return {}

    def save_ui(self, **values: Any) -> None:
        with self._lock:
            state = self.ui_state()
            state.update(values)
            self.store.set_config(json.dumps(state, sort_keys=True), UI_KEY)

    def reward_names(self) -> list[str]:
        return list(self.cfg.rewards.names)

    def model_path(self) -> str:
        """``model.pretrained`` resolved to an absolute folder when it is a local path."""
        found = resolve_path(self.cfg.model.pretrained)
        return str(found) if found is not None else self.cfg.model.pretrained

    # ------------------------------------------------------------------ manual overrides

    def set_overrides(self, changes: dict[int, str | None]) -> None:
        """Apply manual include/exclude changes (None clears one) and remember how to undo
        them as one step."""
        with self._lock:
            before = self.store.overrides()
            previous = {cid: before.get(cid) for cid in changes}
            for cid, action in changes.items():
                self.store.set_override(int(cid), action)
            self._override_changes += 1
            self._undo.append(previous)
            del self._undo[:-UNDO_DEPTH]

    def undo_override(self) -> dict[int, str | None] | None:
        """Revert the last override step; returns what was restored, None if nothing to undo."""
        with self._lock:
            if not self._undo:
                return None
            previous = self._undo.pop()
            for cid, action in previous.items():
                self.store.set_override(int(cid), action)
            self._override_changes += 1
            return previous

    def can_undo(self) -> bool:
        return bool(self._undo)

    def clear_overrides(self) -> int:
        """Remove every manual override (one undoable step); returns how many."""
        current = self.store.overrides()
        if current:
            self.set_overrides({cid: None for cid in current})
        return len(current)

    # ------------------------------------------------------------------ data

    def frame(self, version: tuple | None = None) -> pd.DataFrame:
        """Training-split candidates of the run's model (``model.pretrained``; never another
        model's: what the engine selects from, craft.stages.selection.candidate_frame) joined
        with their scores (cached until the store's candidates or scores change; ``version``:
        a :meth:`data_version` the caller already has)."""
        from craft.stages.selection import candidate_frame

        version = version or self.data_version()
        with self._lock:
            if self._frame_cache is not None and self._frame_cache[0] == version:
                return self._frame_cache[1]
        df = candidate_frame(self.store, self.cfg)
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
            self._map_cache = None
            self._emb_cache = None

    # ------------------------------------------------------------------ the pool's embeddings

    _emb_cache: tuple | None = None

    def pool_embeddings(self, version: tuple | None = None) -> tuple:
        """(ids, vectors) of the pool in ``embed.encoder``'s space: what the engine's
        near-duplicate rule reads (craft.stages.selection.pool_embeddings), cached until the
        candidates change. Candidates not embedded yet are embedded here when the encoder is
        the cheap pixel one; CLIP's are left to the map job, and until it ran this says so."""
        from craft.stages.embeddings import embed_candidates, space_name

        version = version or self.data_version()
        key = (space_name(self.cfg), version)
        with self._lock:
            if self._emb_cache is not None and self._emb_cache[0] == key:
                return self._emb_cache[1]
        ids, vectors = self.store.embeddings(key[0])
        pool = self.frame(version)["candidate_id"].to_numpy()
        missing = int((~np.isin(pool, ids)).sum())
        if missing:
            if self.cfg.embed.encoder != "pixels":
                raise CraftError(
                    f"dropping near-duplicates needs the pool's embeddings ({key[0]}): "
                    f"{missing} of {len(pool)} candidates are not embedded yet; open “Map of "
                    "the pool” below and press “Compute the map” (it embeds them), or set the "
                    "near-duplicate box to 0")
            embed_candidates(self.store, self.cfg)
            ids, vectors = self.store.embeddings(key[0])
        with self._lock:
            self._emb_cache = (key, (ids, vectors))
        return ids, vectors

    # ------------------------------------------------------------------ the map of the pool

    _map_cache: tuple | None = None

    def pool_map(self):
        """(ids, 2-D map coordinates in [0, 1], embeddings) of the candidates embedded in the
        current space, or None before the map was computed. The projection is stored in the run
        beside the embeddings (space ``pca2:<space>``) by the map job."""
        from craft.stages.embeddings import space_name
        from studio.pool_map import unit_square

        space = space_name(self.cfg)
        key = (space, self.store.data_version(), len(self.store.embedded_ids(f"pca2:{space}")))
        with self._lock:
            if self._map_cache is not None and self._map_cache[0] == key:
                return self._map_cache[1]
        ids, xy = self.store.embeddings(f"pca2:{space}")
        value = None
        if len(ids):
            vec_ids, vectors = self.store.embeddings(space)
            order = np.searchsorted(vec_ids, ids)
            value = (ids, unit_square(xy), vectors[order])
        with self._lock:
            self._map_cache = (key, value)
        return value


class Studio:
    """The runs this studio serves: which folders it may open (``runs_root``), the launch
    settings new runs start from, the open run contexts and the files it may serve."""

    def __init__(self, run_dir: str | Path, config_path: str | Path | None = None,
                 overrides: tuple[str, ...] = (), runs_root: str | Path | None = None):
        self.config_path = Path(config_path) if config_path else None
        self.overrides = tuple(overrides)
        self.explicit = self.config_path is not None or bool(self.overrides)
        self.base_cfg: CraftConfig = load_config(self.config_path, self.overrides)
        self.runs_root = Path(runs_root).expanduser().resolve() if runs_root else None
        # Gradio reads this list on every file request: the studio serves the runs it opened
        # and the assets, nothing else.
        self.allowed_paths: list[str] = [str(ASSETS_DIR)]
        self._contexts: dict[Path, RunContext] = {}
        self._lock = threading.RLock()
        self.default_run = self.check_path(run_dir)
        self.context(self.default_run)

    def check_path(self, run_dir: str | Path) -> Path:
        """A run directory the studio may open: inside ``runs_root`` (when set), a folder that
        is new, empty or holds a run store."""
        text = str(run_dir or "").strip()
        if not text:
            raise CraftError("give a run directory, e.g. runs/toy")
        path = Path(text).expanduser()
        if self.runs_root is not None and not path.is_absolute():
            path = self.runs_root / path
        path = path.resolve()
        if self.runs_root is not None and not path.is_relative_to(self.runs_root):
            raise CraftError(f"{path} is outside the folder this studio serves "
                             f"(--runs-root {self.runs_root}); choose a run under it")
        if path.exists() and not path.is_dir():
            raise CraftError(f"{path} is a file, not a run directory; choose a folder")
        if path.is_dir() and any(path.iterdir()) and not (path / DB_NAME).exists():
            raise CraftError(f"{path} is a non-empty folder without a {DB_NAME}; choose an "
                             f"empty or new folder, or an existing run directory")
        return path

    def context(self, run_dir: str | Path) -> RunContext:
        """The context of ``run_dir``, opening (creating) the run on first use."""
        path = self.check_path(run_dir)
        with self._lock:
            ctx = self._contexts.get(path)
            if ctx is None:
                # Settings given on the command line are for the run named there; any other run
                # opens with its own saved settings.
                ctx = RunContext(path, self.base_cfg,
                                 prefer_base=self.explicit and path == self.default_run)
                self._contexts[path] = ctx
                if str(path) not in self.allowed_paths:
                    self.allowed_paths.append(str(path))
            return ctx

    def runs(self) -> list[str]:
        """Run directories to offer: those open, beside the default one, and under
        ``runs_root``."""
        found = {str(p) for p in self._contexts}
        roots = [self.runs_root] if self.runs_root else [self.default_run.parent]
        for root in roots:
            try:
                found |= {str(p) for p in root.iterdir() if (p / DB_NAME).exists()}
            except OSError:
                pass
        return sorted(found)

    def close(self) -> None:
        with self._lock:
            for ctx in self._contexts.values():
                ctx.close()
            self._contexts.clear()


__all__ = ["ASSETS_DIR", "RunContext", "Studio", "UI_KEY"]
