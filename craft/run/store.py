"""The run store: one folder per run, a SQLite database plus the candidate images.

Every stage reads and writes here, so any stage can be re-run, resumed, or driven from the CLI
and the studio alike. Layout::

    RUN_DIR/store.sqlite     prompts, variants, candidates, scores, selections, training, evals
    RUN_DIR/images/p000012/  one PNG per candidate, named by its key

Crash safety rests on one ordering rule: an image is fully on disk (temporary file, fsync,
atomic rename) *before* the row that points at it is committed. A killed writer therefore leaves
at most a temporary file or an image without a row, never a row without its image, and a resumed
writer skips the keys that have rows (an image path is a function of its key, so a regenerated
image replaces an orphan).

Recovery without a scan on every open: walking the image folder costs seconds at the paper's
scale (~100k candidates), and every command and every studio job opens the store. So each image
writer holds a marker file in ``RUN/.writing/`` while it writes and removes it when its rows are
committed. Only a writer that died leaves its marker; the next opener that has the store to
itself then reconciles rows and files once (temporary files, images without a row, rows whose
image has gone) and clears the markers. :meth:`RunStore.reconcile` runs the same check on demand.

Concurrency: SQLite in WAL mode with a busy timeout, one connection per thread, so a Gradio app,
its job threads and several processes *of one machine* can share a store. WAL needs shared
memory, which a network filesystem does not give processes on different machines, so under a
multi-machine launch only the global main process opens the store (craft.run.distributed). The
clean-up runs only when no other process has the store open (an exclusive ``flock`` on
``store.lock``), so it never deletes a file another writer is about to commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, is_dataclass
from dataclasses import field as dataclasses_field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from craft import CraftError
from craft.run.fsutil import TMP_PREFIX, fsync_dir, save_image_atomic
from craft.run.choices import OVERRIDE_ACTIONS

try:  # POSIX only; without it the store skips the "am I alone?" test and always cleans up.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 4
DB_NAME = "store.sqlite"
LOCK_NAME = "store.lock"
IMAGES_DIR = "images"
WRITERS_DIR = ".writing"
TRAIN_STATUSES = ("running", "done", "failed", "cancelled")
SPLITS = ("train", "eval")

# Candidates that early rejection stopped part-way (craft.stages.generation): no image, the
# step they stopped at, the denoiser evaluations they cost, the scores of the decoded prediction
# and its predicted composite. A key is either here or in candidates, never both: finishing a
# stopped candidate records it in candidates and removes it here, in one transaction.
_STOPPED_TABLE = """CREATE TABLE stopped_candidates (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL,
    variant_id INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    model TEXT NOT NULL,
    params_json TEXT NOT NULL,
    step INTEGER NOT NULL,
    evaluations INTEGER NOT NULL,
    plain_evaluations INTEGER NOT NULL,
    scores_json TEXT NOT NULL,
    composite REAL,
    created REAL NOT NULL,
    UNIQUE (prompt_id, variant_id, seed, model),
    FOREIGN KEY (variant_id, prompt_id) REFERENCES variants(id, prompt_id) ON DELETE CASCADE
);"""

_SCHEMA = """
CREATE TABLE config (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE prompts (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL UNIQUE,
    split TEXT NOT NULL CHECK (split IN ('train', 'eval')),
    source TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE TABLE variants (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL CHECK (idx >= 0),
    text TEXT NOT NULL,
    expander TEXT NOT NULL,
    UNIQUE (prompt_id, idx),
    UNIQUE (id, prompt_id)
);
CREATE TABLE candidates (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL,
    variant_id INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    model TEXT NOT NULL,
    params_json TEXT NOT NULL,
    image_path TEXT NOT NULL,
    created REAL NOT NULL,
    evaluations INTEGER,
    plain_evaluations INTEGER,
    UNIQUE (prompt_id, variant_id, seed, model),
    FOREIGN KEY (variant_id, prompt_id) REFERENCES variants(id, prompt_id) ON DELETE CASCADE
);
CREATE INDEX candidates_model ON candidates(model);
{stopped}
CREATE TABLE scores (
    candidate_id INTEGER NOT NULL REFERENCES candidates(id) ON DELETE CASCADE,
    reward TEXT NOT NULL,
    value REAL,
    created REAL NOT NULL,
    PRIMARY KEY (candidate_id, reward)
);
CREATE INDEX scores_by_reward ON scores(reward, candidate_id, value);
CREATE TABLE selections (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    settings_json TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE selection_items (
    selection_id INTEGER NOT NULL REFERENCES selections(id) ON DELETE CASCADE,
    candidate_id INTEGER NOT NULL REFERENCES candidates(id) ON DELETE CASCADE,
    composite REAL,
    advantage REAL,
    weight REAL,
    PRIMARY KEY (selection_id, candidate_id)
);
CREATE TABLE overrides (
    candidate_id INTEGER PRIMARY KEY REFERENCES candidates(id) ON DELETE CASCADE,
    action TEXT NOT NULL CHECK (action IN ({actions})),
    created REAL NOT NULL
);
CREATE TABLE train_runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    config_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'cancelled')),
    started REAL NOT NULL,
    ended REAL,
    checkpoint_dir TEXT,
    error TEXT,
    selection_id INTEGER REFERENCES selections(id) ON DELETE SET NULL
);
CREATE TABLE train_metrics (
    run_id INTEGER NOT NULL REFERENCES train_runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    loss REAL,
    grad_norm REAL,
    lr REAL,
    step_time REAL,
    created REAL NOT NULL,
    extra_json TEXT,
    PRIMARY KEY (run_id, step)
);
CREATE INDEX train_runs_name ON train_runs(name);
CREATE TABLE embeddings (
    candidate_id INTEGER NOT NULL REFERENCES candidates(id) ON DELETE CASCADE,
    space TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (space, candidate_id)
);
CREATE TABLE evaluations (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    base_model TEXT NOT NULL,
    tuned_model TEXT NOT NULL,
    settings_json TEXT NOT NULL,
    results_json TEXT NOT NULL,
    created REAL NOT NULL
);
""".replace("{actions}", ", ".join(f"'{a}'" for a in OVERRIDE_ACTIONS)).replace(
    "{stopped}", _STOPPED_TABLE)

# Forward migrations: MIGRATIONS[v] lists the statements that upgrade version v to v + 1. They run
# inside the opening transaction (so not via executescript, which would commit half-way).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # v2: a training run records the selection it trained on; runs are looked up by name; a
    # covering index serves the per-reward score columns; image embeddings (the studio's map).
    1: ("ALTER TABLE train_runs ADD COLUMN selection_id INTEGER REFERENCES selections(id) "
        "ON DELETE SET NULL",
        "CREATE INDEX train_runs_name ON train_runs(name)",
        "DROP INDEX scores_reward",
        "CREATE INDEX scores_by_reward ON scores(reward, candidate_id, value)",
        "CREATE TABLE embeddings (candidate_id INTEGER NOT NULL REFERENCES candidates(id) ON "
        "DELETE CASCADE, space TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (space, "
        "candidate_id))"),
    # v3: a training step records its method's own numbers (DPO's implicit accuracy, GRPO's
    # group rewards) beside the loss
    2: ("ALTER TABLE train_metrics ADD COLUMN extra_json TEXT",),
    # v4: the denoiser evaluations each candidate cost (and what the plain sampler spends on
    # one), and the candidates early rejection stopped part-way
    3: ("ALTER TABLE candidates ADD COLUMN evaluations INTEGER",
        "ALTER TABLE candidates ADD COLUMN plain_evaluations INTEGER",
        _STOPPED_TABLE.rstrip(";")),
}


# the model key's prefix of images an online training method (GRPO) sampled: candidates of
# that training run, not of the pool the filter selects from (craft.stages.engine.grpo_model_key)
SAMPLED_PREFIX = "grpo:"
# the per-step numbers every training method records in their own columns
METRIC_COLUMNS = ("step", "loss", "grad_norm", "lr", "step_time")


class StoreError(CraftError):
    """A run store that cannot be used as asked (wrong version, bad input, conflicting rows)."""


@dataclass(frozen=True)
class NewCandidate:
    """One generated image and its key, as handed to :meth:`RunStore.add_candidates`."""

    prompt_id: int
    variant_id: int
    seed: int
    model: str
    params: Mapping[str, Any]
    image: Image.Image
    evaluations: int | None = None  # denoiser evaluations this image cost (None: not counted)
    plain_evaluations: int | None = None  # what the plain sampler spends on one image


@dataclass(frozen=True)
class StoppedCandidate:
    """A candidate early rejection stopped after ``step`` denoising steps (no image)."""

    prompt_id: int
    variant_id: int
    seed: int
    model: str
    params: Mapping[str, Any]
    step: int
    evaluations: int
    plain_evaluations: int
    scores: Mapping[str, float | None]  # the filter's rewards on the decoded prediction
    composite: float | None  # its predicted composite (the reference images' z-scale)
    # the final scores predicted from ``scores`` (calibrated on the reference images) and
    # that prediction's error (standard deviation) per reward
    predicted: Mapping[str, float | None] = dataclasses_field(default_factory=dict)
    error_sd: Mapping[str, float | None] = dataclasses_field(default_factory=dict)


def _now() -> float:
    return time.time()


def _json(value: Any) -> str:
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _slug(model: str) -> str:
    """A short, filesystem-safe, collision-free name for a model string (paths, hub ids)."""
    readable = re.sub(r"[^A-Za-z0-9]+", "-", model.rsplit("/", 1)[-1]).strip("-")[:24] or "m"
    return f"{readable}-{hashlib.sha1(model.encode()).hexdigest()[:8]}"


class RunStore:
    """A run directory's database and images; creates the run on first use.

    Use as a context manager, or call :meth:`close`. Methods may be called from any thread.
    ``cleanup=False`` skips recovery on open (closing stale training runs, and reconciling
    images after a writer died: see the module docstring).
    """

    def __init__(self, run_dir: str | Path, *, create: bool = True, cleanup: bool = True):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.db_path = self.run_dir / DB_NAME
        self.images_dir = self.run_dir / IMAGES_DIR
        if not self.db_path.exists() and not create:
            raise StoreError(f"no run store at {self.run_dir} ({DB_NAME} is missing); pass an "
                             f"existing run directory or create it with create=True")
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()
        self._closed = False
        self._lock_file = None
        exclusive = self._acquire_lock()
        try:
            self._init_schema()
            if cleanup and exclusive:
                self._recover()
            elif cleanup:
                logger.debug("%s is open in another process; leftover clean-up skipped",
                             self.run_dir)
        except BaseException:
            self.close()
            raise
        if fcntl is not None and exclusive:
            fcntl.flock(self._lock_file, fcntl.LOCK_SH)  # let other processes open it too

    # ---------------------------------------------------------------- connections and locking

    def _acquire_lock(self) -> bool:
        """Hold a shared lock while open; return True if we were, briefly, the only opener."""
        if fcntl is None:
            return True
        self._lock_file = open(self.run_dir / LOCK_NAME, "a+b")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            fcntl.flock(self._lock_file, fcntl.LOCK_SH)  # waits while another opener cleans up
            return False

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"the run store at {self.run_dir} is closed; open a new RunStore")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=60.0, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._conn_lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; BEGIN IMMEDIATE takes the write lock up front, avoiding the
        deadlock-prone upgrade from a read lock when several processes write."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    def _df(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        cur = self._conn().cursor()
        cur.row_factory = None  # plain tuples: sqlite3.Row objects cost ~1.8x at 100k rows
        cur.execute(sql, params)
        return pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description])

    # ---------------------------------------------------------------- summaries

    def counts(self) -> dict[str, int]:
        """Rows per kind: train/eval prompts, train variants (the original excluded),
        candidates of the pool, images sampled online (GRPO), scored pool candidates, training
        runs, evaluations. A few aggregate queries:
        cheap enough for a UI to poll while a job writes (WAL: readers never wait)."""
        q = {
            "prompts": "SELECT count(*) FROM prompts WHERE split='train'",
            "eval_prompts": "SELECT count(*) FROM prompts WHERE split='eval'",
            "variants": "SELECT count(*) FROM variants v JOIN prompts p ON p.id=v.prompt_id "
                        "WHERE p.split='train' AND v.idx>0",
            # the pool; images an online method sampled while it trained are counted apart
            "candidates": f"SELECT count(*) FROM candidates WHERE model NOT LIKE "
                          f"'{SAMPLED_PREFIX}%'",
            "sampled": f"SELECT count(*) FROM candidates WHERE model LIKE '{SAMPLED_PREFIX}%'",
            "scored": f"SELECT count(DISTINCT candidate_id) FROM scores WHERE candidate_id NOT "
                      f"IN (SELECT id FROM candidates WHERE model LIKE '{SAMPLED_PREFIX}%')",
            "train_runs": "SELECT count(*) FROM train_runs",
            "evaluations": "SELECT count(*) FROM evaluations",
            # candidates early rejection stopped part-way (no image; not in the pool)
            "stopped": "SELECT count(*) FROM stopped_candidates",
        }
        return {k: int(self._query(sql)[0][0]) for k, sql in q.items()}

    def data_version(self) -> tuple:
        """A value that changes whenever candidates or scores are added or rescored, so a
        cache of the joined candidate table knows when to rebuild."""
        # Index look-ups only (~5 ms at 100k candidates; max(created) scanned every score row):
        # a score written or rewritten (INSERT OR REPLACE) always takes a new, larger rowid;
        # removed candidates (and their scores) change the count.
        row = self._query(
            "SELECT (SELECT count(*) FROM candidates), (SELECT max(id) FROM candidates), "
            "(SELECT max(rowid) FROM scores)")[0]
        return tuple(row)

    def close(self) -> None:
        """Close every thread's connection and release the lock; safe to call twice."""
        self._closed = True
        with self._conn_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.run_dir)!r})"

    # ---------------------------------------------------------------- schema and recovery

    def _init_schema(self) -> None:
        with self._tx() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'"
                                  ).fetchone()[0]
            if version == 0 and tables == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                logger.info("created run store %s", self.run_dir)
                return
            if version == 0:
                raise StoreError(f"{self.db_path} is an SQLite file but not a CRAFT run store "
                                 f"(no schema version); choose another run directory")
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.db_path} has schema version {version}, newer than this "
                                 f"craft-studio understands ({SCHEMA_VERSION}); upgrade "
                                 f"craft-studio, or use another run directory")
            while version < SCHEMA_VERSION:
                if version not in MIGRATIONS:
                    raise StoreError(f"{self.db_path} has schema version {version}, which this "
                                     f"craft-studio cannot upgrade; use another run directory")
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
                conn.execute(f"PRAGMA user_version={version}")
                logger.info("upgraded run store %s to schema version %d", self.run_dir, version)

    def _recover(self) -> None:
        """What an opener that has the store to itself repairs: training runs still marked
        running (their process is gone), and, only if an image writer died (its marker is
        left), the rows and files it may have left inconsistent."""
        with self._tx() as conn:
            n = conn.execute("UPDATE train_runs SET status='failed', ended=?, error=? "
                             "WHERE status='running'",
                             (_now(), "the training process ended without closing the run "
                                      "(killed or crashed); resume from its last checkpoint"),
                             ).rowcount
        if n:
            logger.warning("marked %d interrupted training run(s) as failed", n)
        writers = self.run_dir / WRITERS_DIR
        left = sorted(writers.iterdir()) if writers.is_dir() else []
        if left:
            logger.warning("%d image writer(s) of %s stopped without finishing (%s); checking "
                           "images against rows", len(left), self.run_dir,
                           ", ".join(p.name for p in left[:3]))
            self.reconcile()
            for marker in left:
                marker.unlink(missing_ok=True)

    def reconcile(self) -> dict[str, int]:
        """Walk the image folder once and make rows and files agree: remove temporary files,
        images without a candidate row, and rows whose image has gone (deleted by hand; their
        scores and selection entries go with them and generation makes them again). Returns
        the counts. Call it only while no other writer is active."""
        on_disk: set[str] = set()
        tmp: list[Path] = []
        for root, _dirs, files in os.walk(self.images_dir):
            for name in files:
                path = Path(root) / name
                if name.startswith(TMP_PREFIX):
                    tmp.append(path)
                else:
                    on_disk.add(path.relative_to(self.run_dir).as_posix())
        for path in tmp:
            path.unlink(missing_ok=True)
        if tmp:
            logger.warning("removed %d unfinished image file(s) left by an interrupted writer "
                           "in %s", len(tmp), self.images_dir)
        rows = {r["image_path"]: r["id"] for r in self._query("SELECT id, image_path FROM candidates")}
        missing = [cid for path, cid in rows.items() if path not in on_disk]
        if missing:
            with self._tx() as conn:
                conn.executemany("DELETE FROM candidates WHERE id=?", [(c,) for c in missing])
            logger.warning("removed %d candidate row(s) whose image file is missing (e.g. %s); "
                           "their scores and selection entries went with them, and generation "
                           "will make them again", len(missing),
                           ", ".join(p for p in rows if p not in on_disk)[:200])
        orphans = on_disk - set(rows)
        for rel in orphans:
            (self.run_dir / rel).unlink(missing_ok=True)
        if orphans:
            logger.info("removed %d image(s) without a candidate row (a writer stopped between "
                        "saving an image and recording it)", len(orphans))
        return {"temporary": len(tmp), "rows_without_image": len(missing),
                "images_without_row": len(orphans)}

    # ---------------------------------------------------------------- config

    def set_config(self, text: str, key: str = "craft") -> None:
        """Store a text blob (by default the run's config YAML) under ``key``."""
        with self._tx() as conn:
            conn.execute("INSERT INTO config(key, value, updated) VALUES (?, ?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value, "
                         "updated=excluded.updated", (key, text, _now()))

    def get_config(self, key: str = "craft") -> str | None:
        rows = self._query("SELECT value FROM config WHERE key=?", (key,))
        return rows[0]["value"] if rows else None

    # ---------------------------------------------------------------- prompts and variants

    def add_prompts(self, texts: Iterable[str], split: str = "train", source: str = ""
                    ) -> list[int]:
        """Insert prompts (each also becomes its own variant 0) and return their ids, in order.

        Prompts already in the store keep their row and id. A prompt already stored under the
        other split is an error: the same text in training and evaluation would leak.
        """
        if split not in SPLITS:
            raise StoreError(f"split={split!r} must be one of {SPLITS}")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise StoreError(f"prompt {t!r} is empty or not text; drop it from the input")
        now = _now()
        with self._tx() as conn:
            conn.executemany("INSERT INTO prompts(text, split, source, created) VALUES (?,?,?,?) "
                             "ON CONFLICT(text) DO NOTHING",
                             [(t, split, source, now) for t in texts])
            found = {}
            for i in range(0, len(texts), 500):
                chunk = texts[i:i + 500]
                q = ",".join("?" * len(chunk))
                for r in conn.execute(f"SELECT id, text, split FROM prompts WHERE text IN ({q})",
                                      chunk):
                    found[r["text"]] = (r["id"], r["split"])
            clash = [t for t in texts if found[t][1] != split]
            if clash:
                raise StoreError(f"{len(clash)} prompt(s) are already stored with split "
                                 f"{found[clash[0]][1]!r}, e.g. {clash[0]!r}; remove them from "
                                 f"the {split!r} set so training and evaluation stay disjoint")
            conn.executemany("INSERT INTO variants(prompt_id, idx, text, expander) "
                             "VALUES (?, 0, ?, 'original') ON CONFLICT DO NOTHING",
                             [(found[t][0], t) for t in texts])
        return [found[t][0] for t in texts]

    def add_variants(self, prompt_id: int, variants: Iterable[tuple[int, str, str]]
                     ) -> list[int]:
        """Insert ``(idx, text, expander)`` variants (idx >= 1) and return their ids, in order.

        An existing ``(prompt_id, idx)`` keeps its text: candidates may already have been
        generated from it. Use a new run directory to re-expand.
        """
        variants = list(variants)
        for idx, text, _exp in variants:
            if not isinstance(idx, int) or idx < 1:
                raise StoreError(f"variant idx {idx!r} of prompt {prompt_id}: must be an int >= 1 "
                                 f"(idx 0 is the original prompt, added by add_prompts)")
            if not text.strip():
                raise StoreError(f"variant {idx} of prompt {prompt_id} is empty")
        with self._tx() as conn:
            if not conn.execute("SELECT 1 FROM prompts WHERE id=?", (prompt_id,)).fetchone():
                raise StoreError(f"prompt id {prompt_id} does not exist; add it with add_prompts")
            conn.executemany("INSERT INTO variants(prompt_id, idx, text, expander) "
                             "VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                             [(prompt_id, i, t, e) for i, t, e in variants])
            ids = {r["idx"]: r["id"] for r in conn.execute(
                "SELECT id, idx FROM variants WHERE prompt_id=?", (prompt_id,))}
        return [ids[i] for i, _t, _e in variants]

    def prompts_df(self, split: str | None = None) -> pd.DataFrame:
        """Columns id, text, split, source, created."""
        if split is None:
            return self._df("SELECT * FROM prompts ORDER BY id")
        return self._df("SELECT * FROM prompts WHERE split=? ORDER BY id", (split,))

    def variants_df(self, split: str | None = None) -> pd.DataFrame:
        """Columns id, prompt_id, idx, text, expander, prompt (the original text), split."""
        where, params = ("WHERE p.split=?", (split,)) if split else ("", ())
        return self._df("SELECT v.*, p.text AS prompt, p.split FROM variants v "
                        f"JOIN prompts p ON p.id=v.prompt_id {where} ORDER BY v.prompt_id, v.idx",
                        params)

    # ---------------------------------------------------------------- candidates

    def existing_candidate_keys(self, model: str) -> set[tuple[int, int, int]]:
        """``(prompt_id, variant_id, seed)`` of every stored candidate of ``model``: the work a
        resumed generator skips."""
        rows = self._query("SELECT prompt_id, variant_id, seed FROM candidates WHERE model=?",
                           (model,))
        return {(r[0], r[1], r[2]) for r in rows}

    def image_relpath(self, prompt_id: int, variant_id: int, seed: int, model: str) -> str:
        return image_relpath(prompt_id, variant_id, seed, model)

    def add_candidate(self, prompt_id: int, variant_id: int, seed: int, model: str,
                      params: Mapping[str, Any], image: Image.Image) -> int:
        """Save one image and record it; returns the candidate id. See :meth:`add_candidates`."""
        return self.add_candidates([NewCandidate(prompt_id, variant_id, seed, model, params,
                                                 image)])[0]

    def add_candidates(self, items: Iterable[NewCandidate]) -> list[int]:
        """Save images atomically, then record them in one transaction; returns their ids.

        A key that is already stored is an error (its image may have been scored); skip the
        keys in :meth:`existing_candidate_keys` when resuming. (Under a multi-process launch
        the other processes call :func:`write_candidate_images` and the main process
        :meth:`record_candidates`; this is both in one process.)
        """
        items = list(items)
        if not items:
            return []
        _check_new_candidates(items)
        done = self._stored_keys([(c.prompt_id, c.variant_id, c.seed, c.model) for c in items])
        if done:
            raise StoreError(f"{len(done)} candidate(s) already stored, e.g. (prompt_id, "
                             f"variant_id, seed, model) = {sorted(done)[0]}; skip the keys in "
                             f"existing_candidate_keys(model) when resuming")
        with writing_images(self.run_dir):
            rows = write_candidate_images(self.run_dir, items)
            return self.record_candidates(rows)

    def record_candidates(self, rows: Sequence[CandidateRow]) -> list[int]:
        """Record candidates whose images :func:`write_candidate_images` already wrote (by this
        or another process); one transaction; returns their ids in order."""
        if not rows:
            return []
        now = _now()
        try:
            with self._tx() as conn:
                ids = [conn.execute("INSERT INTO candidates(prompt_id, variant_id, seed, model, "
                                    "params_json, image_path, created, evaluations, "
                                    "plain_evaluations) VALUES (?,?,?,?,?,?,?,?,?)",
                                    (*row[:6], now, *(tuple(row[6:8]) + (None, None))[:2])
                                    ).lastrowid for row in rows]
                # a finished key is no longer a stopped one (craft.stages.generation)
                conn.executemany("DELETE FROM stopped_candidates WHERE prompt_id=? AND "
                                 "variant_id=? AND seed=? AND model=?",
                                 [tuple(row[:4]) for row in rows])
                return ids
        except sqlite3.IntegrityError as e:
            raise StoreError(f"could not record candidates ({e}): each variant_id must belong to "
                             f"its prompt_id, and a key may be written only once") from None

    def record_stopped(self, items: Sequence[StoppedCandidate]) -> int:
        """Record candidates early rejection stopped (one transaction); returns how many. A key
        already stored, stopped or finished, is an error."""
        if not items:
            return 0
        now = _now()
        done = self._stored_keys([(c.prompt_id, c.variant_id, c.seed, c.model) for c in items])
        if done:
            raise StoreError(f"{len(done)} stopped candidate(s) are already stored as finished, "
                             f"e.g. {sorted(done)[0]}; skip the stored keys when resuming")
        rows = [(int(c.prompt_id), int(c.variant_id), int(c.seed), str(c.model),
                 _json(dict(c.params)), int(c.step), int(c.evaluations),
                 int(c.plain_evaluations),
                 _json({part: {k: _finite_or_none(v) for k, v in values.items()}
                        for part, values in (("early", c.scores), ("predicted", c.predicted),
                                             ("error_sd", c.error_sd))}),
                 _finite_or_none(c.composite), now) for c in items]
        try:
            with self._tx() as conn:
                conn.executemany("INSERT INTO stopped_candidates(prompt_id, variant_id, seed, "
                                 "model, params_json, step, evaluations, plain_evaluations, "
                                 "scores_json, composite, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                                 rows)
        except sqlite3.IntegrityError as e:
            raise StoreError(f"could not record stopped candidates ({e}): each variant_id must "
                             f"belong to its prompt_id, and a key may be written only once"
                             ) from None
        return len(rows)

    def stopped_keys(self, model: str) -> set[tuple[int, int, int]]:
        """``(prompt_id, variant_id, seed)`` of every stopped candidate of ``model``: work a
        resumed generator skips too (finish them with craft.stages.stopped)."""
        rows = self._query("SELECT prompt_id, variant_id, seed FROM stopped_candidates WHERE "
                           "model=?", (model,))
        return {(r[0], r[1], r[2]) for r in rows}

    def stopped_df(self, model: str | None = None, split: str | None = None) -> pd.DataFrame:
        """One row per stopped candidate: id, prompt_id, variant_id, variant_idx, seed, model,
        params_json, status ('stopped'), step, evaluations, plain_evaluations, composite (the
        predicted one), created, prompt, variant, split, and per filter reward
        ``early_<reward>`` (its score of the decoded prediction at ``step``),
        ``predicted_<reward>`` (the final score predicted from it) and ``error_sd_<reward>``
        (that prediction's error, measured on the reference images)."""
        where, params = ("WHERE model=?", [model]) if model is not None else ("", [])
        df = self._df("SELECT id, prompt_id, variant_id, seed, model, params_json, step, "
                      "evaluations, plain_evaluations, scores_json, composite, created FROM "
                      f"stopped_candidates {where} ORDER BY id", params)
        prompts = self._df("SELECT id, text, split FROM prompts").set_index("id")
        variants = self._df("SELECT id, idx, text FROM variants").set_index("id")
        if split is not None:
            df = df[df["prompt_id"].map(prompts["split"]).to_numpy() == split]
            df = df.reset_index(drop=True)
        df.insert(3, "variant_idx", df["variant_id"].map(variants["idx"]).astype("int64"))
        df.insert(6, "status", "stopped")
        df["composite"] = df["composite"].astype(float)
        df["prompt"] = df["prompt_id"].map(prompts["text"])
        df["variant"] = df["variant_id"].map(variants["text"])
        df["split"] = df["prompt_id"].map(prompts["split"])
        parts = [json.loads(x) for x in df.pop("scores_json")]
        for part in ("early", "predicted", "error_sd"):
            scores = pd.DataFrame([p.get(part, {}) for p in parts], index=df.index)
            for name in scores.columns:
                df[f"{part}_{name}"] = scores[name].astype(float)
        return df

    def add_evaluations(self, extra: Iterable[tuple[int, int]]) -> None:
        """Add ``(candidate_id, evaluations)`` to candidates' recorded cost (work done for them
        later: the early check's calibration re-runs a reference image's first steps)."""
        with self._tx() as conn:
            conn.executemany("UPDATE candidates SET evaluations=coalesce(evaluations, 0) + ? "
                             "WHERE id=?", [(int(n), int(c)) for c, n in extra])

    def generation_cost(self, model: str | None = None, split: str | None = "train") -> dict:
        """What generating the pool cost in denoiser evaluations: ``candidates`` (finished),
        ``stopped`` (stopped early), ``evaluations`` spent on both, ``plain_evaluations`` the
        plain sampler (every candidate to the last step) would have spent, and ``uncounted``:
        finished candidates recorded before costs were (not in either sum). Sampled images of
        an online method (GRPO) are not the pool and are left out."""
        where = [f"c.model NOT LIKE '{SAMPLED_PREFIX}%'"]
        params: list = []
        if model is not None:
            where.append("c.model=?")
            params.append(model)
        if split is not None:
            where.append("p.split=?")
            params.append(split)
        sql = ("SELECT count(*), sum(c.evaluations IS NULL), sum(c.evaluations), "
               "sum(c.plain_evaluations) FROM {t} c JOIN prompts p ON p.id=c.prompt_id WHERE "
               + " AND ".join(where))
        n, unknown, spent, plain = self._query(sql.format(t="candidates"), params)[0]
        s_n, _, s_spent, s_plain = self._query(sql.format(t="stopped_candidates"), params)[0]
        return {"candidates": int(n or 0), "stopped": int(s_n or 0),
                "evaluations": int(spent or 0) + int(s_spent or 0),
                "plain_evaluations": int(plain or 0) + int(s_plain or 0),
                "uncounted": int(unknown or 0)}

    def _stored_keys(self, keys: Iterable[tuple[int, int, int, str]]
                     ) -> set[tuple[int, int, int, str]]:
        """The subset of ``(prompt_id, variant_id, seed, model)`` keys already stored."""
        conn = self._conn()
        found = set()
        for key in keys:
            if conn.execute("SELECT 1 FROM candidates WHERE prompt_id=? AND variant_id=? AND "
                            "seed=? AND model=?", key).fetchone():
                found.add(tuple(key))
        return found

    def candidates_df(self, model: str | None = None, split: str | None = None) -> pd.DataFrame:
        """One row per candidate with its prompt and variant text.

        Columns: id, prompt_id, variant_id, variant_idx (0 = the original prompt), seed, model,
        params_json, image_path (absolute), created, prompt, variant, split.
        """
        # Texts are joined in pandas, not in SQL: 100k rows would otherwise each carry a copy
        # of their prompt's and variant's text out of SQLite (most of the time of this query
        # at the paper's scale; benchmarks/scaleout.md).
        where, params = ("WHERE model=?", [model]) if model is not None else ("", [])
        df = self._df("SELECT id, prompt_id, variant_id, seed, model, params_json, image_path, "
                      f"created FROM candidates {where} ORDER BY id", params)
        prompts = self._df("SELECT id, text, split FROM prompts").set_index("id")
        variants = self._df("SELECT id, idx, text FROM variants").set_index("id")
        if split is not None:
            df = df[df["prompt_id"].map(prompts["split"]).to_numpy() == split]
            df = df.reset_index(drop=True)
        df.insert(3, "variant_idx", df["variant_id"].map(variants["idx"]).astype("int64"))
        df["prompt"] = df["prompt_id"].map(prompts["text"])
        df["variant"] = df["variant_id"].map(variants["text"])
        df["split"] = df["prompt_id"].map(prompts["split"])
        df["image_path"] = (str(self.run_dir) + os.sep) + df["image_path"].astype(object)
        return df

    def load_image(self, candidate_id: int) -> Image.Image:
        rows = self._query("SELECT image_path FROM candidates WHERE id=?", (candidate_id,))
        if not rows:
            raise StoreError(f"candidate id {candidate_id} does not exist")
        with Image.open(self.run_dir / rows[0]["image_path"]) as im:
            return im.convert("RGB")

    # ---------------------------------------------------------------- scores

    def add_scores(self, rows: Iterable[tuple[int, str, float | None]]) -> int:
        """Insert or replace ``(candidate_id, reward, value)`` rows; returns how many.

        NaN and inf are stored as NULL: the candidate was scored but is unscorable for that
        reward, which later stages report and exclude instead of silently keeping.
        """
        now = _now()
        data = [(int(cid), str(reward), _finite_or_none(value), now) for cid, reward, value in rows]
        try:
            with self._tx() as conn:
                conn.executemany("INSERT OR REPLACE INTO scores(candidate_id, reward, value, "
                                 "created) VALUES (?,?,?,?)", data)
        except sqlite3.IntegrityError as e:
            raise StoreError(f"could not record scores ({e}): every candidate_id must exist"
                             ) from None
        unscorable = sum(v is None for _c, _r, v, _t in data)
        if unscorable:
            logger.warning("%d of %d scores were NaN/inf and are stored as missing",
                           unscorable, len(data))
        return len(data)

    def scored_keys(self, reward: str) -> set[int]:
        """Candidate ids that already have a row for ``reward`` (NaN results included)."""
        return {r[0] for r in self._query("SELECT candidate_id FROM scores WHERE reward=?",
                                          (reward,))}

    def scores_df(self, rewards: Sequence[str] | None = None, wide: bool = True) -> pd.DataFrame:
        """Scores, wide by default: index candidate_id, one float column per reward, NaN where
        a score is missing or was NaN. ``wide=False`` gives the raw rows (candidate_id, reward,
        value, created), where a NULL value and an absent row can be told apart."""
        if not wide:
            sql, params = "SELECT candidate_id, reward, value, created FROM scores", []
            if rewards is not None:
                sql += f" WHERE reward IN ({','.join('?' * len(rewards))})"
                params = list(rewards)
            return self._df(sql + " ORDER BY candidate_id, reward", params)
        # One indexed query per reward, columns aligned on candidate_id: ~4x faster than
        # pivoting the long table at 100k candidates x 4 rewards.
        names = list(rewards) if rewards is not None else [
            r[0] for r in self._query("SELECT DISTINCT reward FROM scores ORDER BY reward")]
        cols = {}
        for name in names:
            part = self._df("SELECT candidate_id, value FROM scores WHERE reward=?", (name,))
            cols[name] = pd.Series(part["value"].to_numpy(dtype=float, na_value=np.nan),
                                   index=part["candidate_id"].to_numpy(), dtype=float)
        wide_df = pd.DataFrame(cols, columns=names, dtype=float)
        wide_df.index.name = "candidate_id"
        return wide_df.sort_index()

    # ---------------------------------------------------------------- embeddings

    def add_embeddings(self, space: str, candidate_ids: Sequence[int], vectors) -> int:
        """Store one embedding per candidate in ``space`` (float16; replaces earlier ones)."""
        vectors = np.asarray(vectors, dtype=np.float16)
        if len(candidate_ids) != len(vectors):
            raise StoreError(f"{len(candidate_ids)} candidate ids but {len(vectors)} vectors")
        rows = [(int(c), space, v.tobytes()) for c, v in zip(candidate_ids, vectors)]
        try:
            with self._tx() as conn:
                conn.executemany("INSERT OR REPLACE INTO embeddings(candidate_id, space, vector) "
                                 "VALUES (?,?,?)", rows)
        except sqlite3.IntegrityError as e:
            raise StoreError(f"could not record embeddings ({e}): every candidate_id must "
                             f"exist") from None
        return len(rows)

    def embedded_ids(self, space: str) -> set[int]:
        return {r[0] for r in self._query("SELECT candidate_id FROM embeddings WHERE space=?",
                                          (space,))}

    def embeddings(self, space: str) -> tuple[np.ndarray, np.ndarray]:
        """(candidate ids, float32 matrix with one row each) of ``space``, by id."""
        rows = self._query("SELECT candidate_id, vector FROM embeddings WHERE space=? "
                           "ORDER BY candidate_id", (space,))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float16).reshape(len(rows), -1)
        return ids, mat.astype(np.float32)

    # ---------------------------------------------------------------- curation

    def set_override(self, candidate_id: int, action: str | None) -> None:
        """Force a candidate in ('include') or out ('exclude') of selections; None clears it."""
        if action is not None and action not in OVERRIDE_ACTIONS:
            raise StoreError(f"override action {action!r} must be one of {OVERRIDE_ACTIONS} or "
                             f"None (to clear)")
        with self._tx() as conn:
            if action is None:
                conn.execute("DELETE FROM overrides WHERE candidate_id=?", (candidate_id,))
                return
            try:
                conn.execute("INSERT OR REPLACE INTO overrides(candidate_id, action, created) "
                             "VALUES (?,?,?)", (candidate_id, action, _now()))
            except sqlite3.IntegrityError:
                raise StoreError(f"candidate id {candidate_id} does not exist") from None

    def overrides(self) -> dict[int, str]:
        return {r[0]: r[1] for r in self._query("SELECT candidate_id, action FROM overrides")}

    def save_selection(self, name: str, settings: Any, items: pd.DataFrame | Iterable[tuple]
                       ) -> int:
        """Record a selection: settings (JSON-able or a dataclass) and its items, either a
        DataFrame with columns candidate_id, composite, advantage, weight or such tuples."""
        if isinstance(items, pd.DataFrame):
            cols = ["candidate_id", "composite", "advantage", "weight"]
            missing = [c for c in cols if c not in items.columns]
            if missing:
                raise StoreError(f"selection items lack column(s) {missing}; expected {cols}")
            items = items[cols].itertuples(index=False, name=None)
        rows = [(int(cid), _finite_or_none(comp), _finite_or_none(adv), _finite_or_none(w))
                for cid, comp, adv, w in items]
        try:
            with self._tx() as conn:
                sid = conn.execute("INSERT INTO selections(name, settings_json, created) "
                                   "VALUES (?,?,?)", (name, _json(settings), _now())).lastrowid
                conn.executemany("INSERT INTO selection_items VALUES (?,?,?,?,?)",
                                 [(sid, *r) for r in rows])
        except sqlite3.IntegrityError as e:
            raise StoreError(f"could not save selection {name!r} ({e}): candidate ids must "
                             f"exist and appear once") from None
        return sid

    def selections_df(self) -> pd.DataFrame:
        """Columns id, name, settings_json, created, num_items."""
        return self._df("SELECT s.*, (SELECT count(*) FROM selection_items i "
                        "WHERE i.selection_id=s.id) AS num_items FROM selections s ORDER BY s.id")

    def selection_settings(self, selection_id: int) -> dict:
        """The settings a selection was saved with (how it was made)."""
        rows = self._query("SELECT settings_json FROM selections WHERE id=?", (selection_id,))
        if not rows:
            raise StoreError(f"no selection with id {selection_id} in {self.run_dir}")
        return json.loads(rows[0][0])

    def selection_items_df(self, selection_id: int) -> pd.DataFrame:
        """Columns candidate_id, composite, advantage, weight."""
        return self._df("SELECT candidate_id, composite, advantage, weight FROM selection_items "
                        "WHERE selection_id=? ORDER BY candidate_id", (selection_id,))

    # ---------------------------------------------------------------- training

    def create_train_run(self, name: str, config: Any, checkpoint_dir: str | Path | None = None,
                         selection_id: int | None = None) -> int:
        """Start a training-run record with status 'running'; returns its id. ``selection_id``
        names the saved selection (:meth:`save_selection`) it trains on."""
        with self._tx() as conn:
            return conn.execute("INSERT INTO train_runs(name, config_json, status, started, "
                                "checkpoint_dir, selection_id) VALUES (?,?,?,?,?,?)",
                                (name, _json(config), "running", _now(),
                                 None if checkpoint_dir is None else str(checkpoint_dir),
                                 selection_id)).lastrowid

    def train_run_by_name(self, name: str) -> dict[str, Any] | None:
        """The latest training run called ``name`` (a resumed run keeps its one row), or None."""
        rows = self._query("SELECT * FROM train_runs WHERE name=? ORDER BY id DESC LIMIT 1",
                           (name,))
        return dict(rows[0]) if rows else None

    def update_train_run(self, run_id: int, *, status: str | None = None,
                         checkpoint_dir: str | Path | None = None, error: str | None = None
                         ) -> None:
        """Change a run's status / checkpoint / error; leaving 'running' stamps ``ended``, going
        back to 'running' (a resume) clears ``ended`` and the old error."""
        if status is not None and status not in TRAIN_STATUSES:
            raise StoreError(f"train run status {status!r} must be one of {TRAIN_STATUSES}")
        sets, params = [], []
        if status is not None:
            sets += ["status=?", "ended=?"]
            params += [status, None if status == "running" else _now()]
            if status == "running" and error is None:
                sets.append("error=NULL")
        if checkpoint_dir is not None:
            sets.append("checkpoint_dir=?")
            params.append(str(checkpoint_dir))
        if error is not None:
            sets.append("error=?")
            params.append(error)
        if not sets:
            return
        with self._tx() as conn:
            n = conn.execute(f"UPDATE train_runs SET {', '.join(sets)} WHERE id=?",
                             (*params, run_id)).rowcount
        if n == 0:
            raise StoreError(f"train run id {run_id} does not exist")

    def get_train_run(self, run_id: int) -> dict[str, Any]:
        rows = self._query("SELECT * FROM train_runs WHERE id=?", (run_id,))
        if not rows:
            raise StoreError(f"train run id {run_id} does not exist")
        return dict(rows[0])

    def train_runs_df(self) -> pd.DataFrame:
        return self._df("SELECT * FROM train_runs ORDER BY id")

    def add_metrics(self, run_id: int, rows: Iterable[Mapping[str, Any]]) -> None:
        """Record per-step metrics (keys step, loss, grad_norm, lr, step_time; missing = NULL;
        any other numeric keys, a method's own, are kept as JSON and come back as columns).
        A step logged again (after a resume) replaces the earlier row."""
        now = _now()
        data = []
        for r in rows:
            if "step" not in r:
                raise StoreError(f"metrics row {dict(r)!r} has no 'step'")
            extra = {k: _finite_or_none(v) for k, v in r.items() if k not in METRIC_COLUMNS}
            data.append((run_id, int(r["step"]), *(_finite_or_none(r.get(k)) for k in
                         METRIC_COLUMNS[1:]), now, _json(extra) if extra else None))
        try:
            with self._tx() as conn:
                conn.executemany("INSERT OR REPLACE INTO train_metrics(run_id, step, loss, "
                                 "grad_norm, lr, step_time, created, extra_json) VALUES "
                                 "(?,?,?,?,?,?,?,?)", data)
        except sqlite3.IntegrityError:
            raise StoreError(f"train run id {run_id} does not exist") from None

    def metrics_df(self, run_id: int) -> pd.DataFrame:
        """Columns step, loss, grad_norm, lr, step_time, created, then a method's own numbers
        (e.g. dpo_accuracy, reward_mean) where recorded; sorted by step."""
        df = self._df("SELECT step, loss, grad_norm, lr, step_time, created, extra_json FROM "
                      "train_metrics WHERE run_id=? ORDER BY step", (run_id,))
        cols = list(METRIC_COLUMNS[1:])
        df[cols] = df[cols].astype(float)
        extra = pd.DataFrame([json.loads(x) if isinstance(x, str) else {}
                              for x in df.pop("extra_json")], index=df.index)
        return pd.concat([df, extra.astype(float)], axis=1) if len(extra.columns) else df

    # ---------------------------------------------------------------- evaluation

    def add_evaluation(self, name: str, base_model: str, tuned_model: str, settings: Any,
                       results: Any) -> int:
        with self._tx() as conn:
            return conn.execute("INSERT INTO evaluations(name, base_model, tuned_model, "
                                "settings_json, results_json, created) VALUES (?,?,?,?,?,?)",
                                (name, base_model, tuned_model, _json(settings), _json(results),
                                 _now())).lastrowid

    def evaluations_df(self) -> pd.DataFrame:
        """Columns id, name, base_model, tuned_model, settings_json, results_json, created."""
        return self._df("SELECT * FROM evaluations ORDER BY id")


# ------------------------------------------------------------------------ image writers
# Used by any process of a launch: they touch files only, never the database.

# (prompt_id, variant_id, seed, model, params_json, image_path[, evaluations, plain_evaluations])
CandidateRow = tuple


def image_relpath(prompt_id: int, variant_id: int, seed: int, model: str) -> str:
    """Where a candidate's PNG lives, relative to the run directory (a function of its key, so
    a regenerated image replaces an orphan of an interrupted run)."""
    return f"{IMAGES_DIR}/p{prompt_id:06d}/v{variant_id}_s{seed}_{_slug(model)}.png"


def _check_new_candidates(items: Sequence[NewCandidate]) -> None:
    keys = [(c.prompt_id, c.variant_id, c.seed, c.model) for c in items]
    if len(set(keys)) != len(keys):
        raise StoreError("the batch holds the same (prompt_id, variant_id, seed, model) twice;"
                         " give each image its own seed")
    for c in items:
        if not isinstance(c.image, Image.Image):
            raise StoreError(f"candidate {c.prompt_id}/{c.variant_id}/{c.seed}: image must be "
                             f"a PIL.Image, got {type(c.image).__name__}")


def write_candidate_images(run_dir: str | Path, items: Sequence[NewCandidate]
                           ) -> list[CandidateRow]:
    """Write each image atomically (and make the renames durable) under ``run_dir``; return the
    rows :meth:`RunStore.record_candidates` commits. Call it inside :func:`writing_images`."""
    run_dir = Path(run_dir)
    _check_new_candidates(items)
    rows, dirs = [], set()
    for c in items:
        rel = image_relpath(c.prompt_id, c.variant_id, c.seed, c.model)
        target = run_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        save_image_atomic(c.image, target, format="PNG", compress_level=3)
        dirs.add(target.parent)
        rows.append((int(c.prompt_id), int(c.variant_id), int(c.seed), str(c.model),
                     _json(dict(c.params)), rel, c.evaluations, c.plain_evaluations))
    for d in dirs:  # the renames are durable before the rows that point at them
        fsync_dir(d)
    return rows


@contextlib.contextmanager
def writing_images(run_dir: str | Path) -> Iterator[Path]:
    """Hold a marker in ``RUN/.writing/`` while this writer's images may lack their rows. It is
    removed on a normal exit only: after a crash or an exception the next exclusive opener of
    the store reconciles images and rows (see the module docstring)."""
    folder = Path(run_dir) / WRITERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
    marker.write_text(f"{time.time()}\n")
    yield marker
    marker.unlink(missing_ok=True)


__all__ = ["CandidateRow", "NewCandidate", "RunStore", "SAMPLED_PREFIX", "SCHEMA_VERSION",
           "StoppedCandidate", "StoreError", "image_relpath", "write_candidate_images", "writing_images"]
