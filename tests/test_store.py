"""Run store: CRUD, schema versioning, WAL, crash recovery (including a SIGKILLed writer)."""

from __future__ import annotations

import json
import math
import time
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from craft.run.store import SCHEMA_VERSION, WRITERS_DIR, NewCandidate, RunStore, StoreError

REPO = Path(__file__).resolve().parents[1]


def image(value: int = 0, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), color=(value % 256, 40, 200))


@pytest.fixture
def store(tmp_path):
    with RunStore(tmp_path / "run") as s:
        yield s


def seeded(store: RunStore, n_prompts: int = 2, n_variants: int = 2, seeds: int = 2,
           model: str = "base") -> list[int]:
    pids = store.add_prompts([f"a red circle {i}" for i in range(n_prompts)])
    for pid in pids:
        store.add_variants(pid, [(j, f"a large red circle {pid}.{j}", "template")
                                 for j in range(1, n_variants + 1)])
    items = [NewCandidate(r.prompt_id, r.id, s, model, {"steps": 20}, image(r.id + s))
             for r in store.variants_df().itertuples() for s in range(seeds)]
    return store.add_candidates(items)


def test_creates_layout_wal_foreign_keys_and_version(tmp_path):
    with RunStore(tmp_path / "run") as s:
        assert (tmp_path / "run" / "store.sqlite").is_file()
        assert (tmp_path / "run" / "images").is_dir()
        conn = s._conn()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with RunStore(tmp_path / "run", create=False) as s:  # reopens
        assert s.prompts_df().empty


def test_open_refuses_missing_newer_and_foreign_databases(tmp_path):
    with pytest.raises(StoreError, match="no run store at"):
        RunStore(tmp_path / "nothing", create=False)
    RunStore(tmp_path / "new").close()
    conn = sqlite3.connect(tmp_path / "new" / "store.sqlite")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        RunStore(tmp_path / "new")
    (tmp_path / "other").mkdir()
    conn = sqlite3.connect(tmp_path / "other" / "store.sqlite")
    conn.execute("CREATE TABLE t(x)")
    conn.close()
    with pytest.raises(StoreError, match="not a CRAFT run store"):
        RunStore(tmp_path / "other")


def test_prompts_and_variants(store):
    ids = store.add_prompts(["a", "b", "a"], split="train", source="test")
    assert ids[0] == ids[2] and len(set(ids)) == 2
    assert store.add_prompts(["b"]) == [ids[1]]  # idempotent
    vids = store.add_variants(ids[0], [(1, "a big", "template"), (2, "a small", "template")])
    again = store.add_variants(ids[0], [(1, "changed text", "template")])
    assert again == vids[:1]
    v = store.variants_df()
    assert set(v[v.prompt_id == ids[0]].idx) == {0, 1, 2}  # 0 is the original itself
    assert v[(v.prompt_id == ids[0]) & (v.idx == 0)].text.item() == "a"
    assert v[(v.prompt_id == ids[0]) & (v.idx == 1)].text.item() == "a big"  # kept
    with pytest.raises(StoreError, match="already stored with split 'train'"):
        store.add_prompts(["a"], split="eval")
    with pytest.raises(StoreError, match="idx 0 is the original"):
        store.add_variants(ids[0], [(0, "x", "t")])
    with pytest.raises(StoreError, match="does not exist"):
        store.add_variants(999, [(1, "x", "t")])
    with pytest.raises(StoreError, match="split="):
        store.add_prompts(["c"], split="test")
    assert store.prompts_df(split="eval").empty and len(store.prompts_df()) == 2


def test_candidates_roundtrip(store):
    ids = seeded(store)
    df = store.candidates_df()
    assert list(df.id) == ids and len(df) == 2 * 3 * 2
    assert {"prompt", "variant", "variant_idx", "split", "params_json", "image_path"} <= set(
        df.columns)
    for path in df.image_path:
        assert Path(path).is_absolute()
        with Image.open(path) as im:
            im.load()
    assert json.loads(df.params_json[0]) == {"steps": 20}
    row = df.iloc[0]
    assert store.load_image(int(row.id)).getpixel((0, 0)) == image(row.variant_id + row.seed
                                                                   ).getpixel((0, 0))
    keys = store.existing_candidate_keys("base")
    assert len(keys) == len(ids) and store.existing_candidate_keys("tuned") == set()
    assert store.candidates_df(model="tuned").empty
    # the same key twice is refused, and the stored image is left alone
    before = Path(row.image_path).read_bytes()
    with pytest.raises(StoreError, match="already stored"):
        store.add_candidate(int(row.prompt_id), int(row.variant_id), int(row.seed), "base", {},
                            image(99))
    assert Path(row.image_path).read_bytes() == before
    # a variant of another prompt is refused
    other = df[df.prompt_id != row.prompt_id].iloc[0]
    with pytest.raises(StoreError, match="must belong to its prompt_id"):
        store.add_candidate(int(row.prompt_id), int(other.variant_id), 0, "x", {}, image())
    with pytest.raises(StoreError, match="PIL.Image"):
        store.add_candidate(int(row.prompt_id), int(row.variant_id), 50, "base", {}, "img")
    # a second model with path-like name gets its own files
    cid = store.add_candidate(int(row.prompt_id), int(row.variant_id), int(row.seed),
                              "runs/x/checkpoint-10", {}, image())
    assert store.candidates_df(model="runs/x/checkpoint-10").id.tolist() == [cid]
    assert not list(store.images_dir.rglob(".tmp-*"))


def test_scores(store):
    ids = seeded(store, n_prompts=1, n_variants=1, seeds=2)
    assert store.add_scores([(ids[0], "h", 1.5), (ids[1], "h", float("nan")),
                             (ids[0], "a", 2.0), (ids[2], "a", float("inf"))]) == 4
    assert store.scored_keys("h") == {ids[0], ids[1]}  # NaN counts as scored
    wide = store.scores_df()
    assert list(wide.columns) == ["a", "h"] and wide.index.name == "candidate_id"
    assert wide.loc[ids[0], "h"] == 1.5 and math.isnan(wide.loc[ids[1], "h"])
    assert math.isnan(wide.loc[ids[2], "a"]) and math.isnan(wide.loc[ids[2], "h"])
    assert list(store.scores_df(rewards=["h", "p"]).columns) == ["h", "p"]
    long = store.scores_df(wide=False)
    assert long.value.isna().sum() == 2 and len(long) == 4
    store.add_scores([(ids[0], "h", 3.0)])  # re-scoring replaces
    assert store.scores_df().loc[ids[0], "h"] == 3.0
    with pytest.raises(StoreError, match="candidate_id must exist"):
        store.add_scores([(12345, "h", 1.0)])
    assert store.scores_df(rewards=["zzz"]).empty


def test_overrides_selections_training_evaluations_config(store):
    ids = seeded(store, n_prompts=1, n_variants=1, seeds=2)
    store.set_override(ids[0], "include")
    store.set_override(ids[1], "exclude")
    store.set_override(ids[1], "include")
    assert store.overrides() == {ids[0]: "include", ids[1]: "include"}
    store.set_override(ids[0], None)
    assert store.overrides() == {ids[1]: "include"}
    with pytest.raises(StoreError, match="must be one of"):
        store.set_override(ids[0], "keep")
    with pytest.raises(StoreError, match="does not exist"):
        store.set_override(9999, "include")

    items = pd.DataFrame({"candidate_id": ids[:2], "composite": [1.0, 0.5],
                          "advantage": [0.7, float("nan")], "weight": [1.2, 0.8]})
    sid = store.save_selection("hpa-top100", {"level": "hpa", "top_k": (1, 2)}, items)
    sel = store.selections_df()
    assert sel.num_items.tolist() == [2] and json.loads(sel.settings_json[0])["top_k"] == [1, 2]
    got = store.selection_items_df(sid)
    assert got.candidate_id.tolist() == ids[:2] and got.advantage.isna().tolist() == [False, True]
    with pytest.raises(StoreError, match="lack column"):
        store.save_selection("bad", {}, pd.DataFrame({"candidate_id": ids}))

    rid = store.create_train_run("t1", {"lr": 1e-4})
    assert store.get_train_run(rid)["status"] == "running"
    store.add_metrics(rid, [{"step": 1, "loss": 0.5, "lr": 1e-4}, {"step": 2, "loss": 0.4}])
    store.add_metrics(rid, [{"step": 2, "loss": 0.3, "grad_norm": 1.0}])  # a resumed step
    m = store.metrics_df(rid)
    assert m.step.tolist() == [1, 2] and m.loss.tolist() == [0.5, 0.3] and math.isnan(m.lr[1])
    assert "dpo_accuracy" not in m  # a method's own numbers appear only where recorded
    store.add_metrics(rid, [{"step": 3, "loss": 0.2, "dpo_accuracy": 0.5}])
    m = store.metrics_df(rid)
    assert m["dpo_accuracy"].isna().tolist() == [True, True, False] and m.loss.tolist()[-1] == 0.2
    store.update_train_run(rid, status="done", checkpoint_dir="ckpt")
    run = store.get_train_run(rid)
    assert run["status"] == "done" and run["ended"] is not None and run["checkpoint_dir"] == "ckpt"
    with pytest.raises(StoreError, match="must be one of"):
        store.update_train_run(rid, status="finished")
    with pytest.raises(StoreError, match="does not exist"):
        store.update_train_run(999, status="done")
    with pytest.raises(StoreError, match="does not exist"):
        store.add_metrics(999, [{"step": 1}])

    eid = store.add_evaluation("e", "base", "tuned", {"seeds": 2}, {"win_rate": {"h": 0.6}})
    assert json.loads(store.evaluations_df().set_index("id").results_json[eid]) == {
        "win_rate": {"h": 0.6}}

    assert store.get_config() is None
    store.set_config("train:\n  lr: 1.0e-4\n")
    store.set_config("train:\n  lr: 2.0e-4\n")
    assert store.get_config() == "train:\n  lr: 2.0e-4\n"


def _leftovers(run):
    """A run with what a dead writer and a careless user can leave: a training run still marked
    running, an image deleted by hand, a temporary file and an image without a row."""
    with RunStore(run) as s:
        ids = seeded(s, n_prompts=1, n_variants=1, seeds=2)
        s.add_scores([(ids[0], "h", 1.0)])
        s.set_override(ids[0], "include")
        rid = s.create_train_run("killed", {})
        lost = Path(s.candidates_df().set_index("id").image_path[ids[0]])
        kept = Path(s.candidates_df().set_index("id").image_path[ids[1]])
    lost.unlink()  # deleted by hand
    stray = kept.parent / ".tmp-abc.png"
    stray.write_bytes(b"partial")
    orphan = kept.parent / "v9_s9_orphan.png"
    image().save(orphan)  # an image whose row was never committed
    return ids, rid, kept, stray, orphan


def _check_reconciled(s, ids, kept, stray, orphan):
    assert ids[0] not in set(s.candidates_df().id)
    assert ids[1] in set(s.candidates_df().id)
    assert s.scores_df().empty and s.overrides() == {}  # went with the row
    assert not stray.exists() and not orphan.exists() and kept.exists()


def test_open_after_a_dead_writer_reconciles_and_closes_interrupted_runs(tmp_path, caplog):
    run = tmp_path / "run"
    ids, rid, kept, stray, orphan = _leftovers(run)
    marker = run / WRITERS_DIR / "host-1234-5678"  # what a killed writer leaves
    marker.parent.mkdir(exist_ok=True)
    marker.write_text("0\n")
    with RunStore(run) as s:
        _check_reconciled(s, ids, kept, stray, orphan)
        assert s.get_train_run(rid)["status"] == "failed"
        assert "killed or crashed" in s.get_train_run(rid)["error"]
    assert not marker.exists()
    assert "whose image file is missing" in caplog.text


def test_open_without_a_dead_writer_does_not_scan_images(tmp_path):
    """The image folder is walked only after a crash (100k files take seconds); by hand, or
    when asked, reconcile() does the same check."""
    run = tmp_path / "run"
    ids, rid, kept, stray, orphan = _leftovers(run)
    with RunStore(run) as s:
        assert s.get_train_run(rid)["status"] == "failed"  # cheap: always repaired
        assert ids[0] in set(s.candidates_df().id) and stray.exists() and orphan.exists()
        assert s.reconcile() == {"temporary": 1, "rows_without_image": 1,
                                 "images_without_row": 1}
        _check_reconciled(s, ids, kept, stray, orphan)


def test_cleanup_waits_for_other_openers(tmp_path):
    """While another process (here: another RunStore) has the store open, an opener must not
    delete files that writer may be about to commit, even when a dead writer's marker says a
    check is due."""
    run = tmp_path / "run"
    with RunStore(run) as first:
        seeded(first, n_prompts=1, n_variants=0, seeds=1)
        pending = first.images_dir / ".tmp-inflight.png"
        pending.write_bytes(b"being written")
        (run / WRITERS_DIR).mkdir(exist_ok=True)
        (run / WRITERS_DIR / "dead-writer").write_text("0\n")
        with RunStore(run) as second:
            assert len(second.candidates_df()) == 1
        assert pending.exists()
    with RunStore(run):
        assert not pending.exists()


def test_threads_share_a_store(store):
    ids = seeded(store, n_prompts=2, n_variants=1, seeds=2)
    errors = []

    def work(reward: str) -> None:
        try:
            for cid in ids:
                store.add_scores([(cid, reward, float(cid))])
                store.scores_df()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.scores_df().shape == (len(ids), 4)


def test_closed_store_says_so(tmp_path):
    s = RunStore(tmp_path / "run")
    s.close()
    s.close()
    with pytest.raises(StoreError, match="is closed"):
        s.prompts_df()


WRITER = textwrap.dedent("""
    import sys, time
    from PIL import Image
    import craft.run.fsutil, craft.run.store
    from craft.run.store import RunStore

    run_dir, n_prompts, seeds, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    written = 0

    def pausing(real):
        # Stop inside the 13th write at the chosen crash window, so the parent's SIGKILL lands
        # exactly there: before the rename (a temporary file is left) or between the rename
        # and the commit (an image without a row is left).
        def wrapper(*args, **kwargs):
            if written == 12:
                print("paused", flush=True)
                time.sleep(60)
            return real(*args, **kwargs)
        return wrapper

    if pause == "before_rename":
        craft.run.fsutil.os.replace = pausing(craft.run.fsutil.os.replace)
    elif pause == "before_commit":
        craft.run.store.fsync_dir = pausing(craft.run.store.fsync_dir)

    with RunStore(run_dir) as store:
        pids = store.add_prompts([f"prompt {i}" for i in range(n_prompts)])
        for pid in pids:
            store.add_variants(pid, [(1, f"variant of {pid}", "test")])
        keys = [(r.prompt_id, r.id, s) for r in store.variants_df().itertuples()
                for s in range(seeds)]
        done = store.existing_candidate_keys("m")
        todo = [k for k in keys if k not in done]
        print("todo", len(todo), flush=True)
        for p, v, s in todo:
            img = Image.effect_noise((64, 64), 60 + s).convert("RGB")
            store.add_candidate(p, v, s, "m", {"seed": s}, img)
            written += 1
            print("wrote", flush=True)
    print("finished", flush=True)
""")


def run_writer(run_dir: Path, script: Path, n_prompts: int, seeds: int, pause: str = "none"):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, str(script), str(run_dir), str(n_prompts),
                             str(seeds), pause], stdout=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("pause", ["none", "before_rename", "before_commit"])
def test_sigkilled_writer_leaves_a_consistent_resumable_store(tmp_path, pause):
    run_dir, script = tmp_path / "run", tmp_path / "writer.py"
    script.write_text(WRITER)
    n_prompts, seeds = 6, 4
    total = n_prompts * 2 * seeds

    proc = run_writer(run_dir, script, n_prompts, seeds, pause)
    written = 0
    for line in proc.stdout:
        written += line.startswith("wrote")
        if line.startswith("paused") or (pause == "none" and written >= 12):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    leftovers = list((run_dir / "images").rglob("*.png"))
    if pause == "before_rename":
        assert any(p.name.startswith(".tmp-") for p in leftovers)  # the crash window was hit
    if pause == "before_commit":
        assert len(leftovers) == 13  # 12 recorded + 1 renamed but never recorded

    with RunStore(run_dir) as store:
        df = store.candidates_df()
        stored = len(df)
        # at a pause the 13th write was cut; a kill after the 12th commit may land a bit later
        assert stored == 12 if pause != "none" else 12 <= stored < total
        for path in df.image_path:
            with Image.open(path) as im:
                im.load()  # exists and decodes
        assert not list(store.images_dir.rglob(".tmp-*"))
        on_disk = {str(p) for p in store.images_dir.rglob("*.png")}
        assert on_disk == set(df.image_path)  # no orphans either

    proc = run_writer(run_dir, script, n_prompts, seeds)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert out.splitlines()[0] == f"todo {total - stored}"  # only the missing keys
    with RunStore(run_dir) as store:
        df = store.candidates_df()
        assert len(df) == total
        assert not df.duplicated(["prompt_id", "variant_id", "seed", "model"]).any()
        assert all(Path(p).is_file() for p in df.image_path)


def test_counts_and_data_version(store):
    empty = store.counts()
    assert set(empty.values()) == {0} and len(empty) == 9  # stopped: early rejection
    v0 = store.data_version()
    ids = seeded(store, n_prompts=2, n_variants=2, seeds=2)  # originals + 2 variants each
    store.add_prompts(["held out"], split="eval")
    c = store.counts()
    assert (c["prompts"], c["eval_prompts"], c["variants"], c["candidates"], c["scored"]) == \
        (2, 1, 4, 12, 0)
    v1 = store.data_version()
    assert v1 != v0
    store.add_scores([(ids[0], "h", 1.0)])
    v2 = store.data_version()
    assert v2 != v1 and store.counts()["scored"] == 1
    time.sleep(0.01)
    store.add_scores([(ids[0], "h", 2.0)])  # a rescore changes the version, not the count
    assert store.data_version() != v2 and store.counts()["scored"] == 1
    # images an online method sampled are counted apart from the pool
    from craft.run.store import SAMPLED_PREFIX, NewCandidate
    from PIL import Image

    cid = store.add_candidates([NewCandidate(1, 1, 7, f"{SAMPLED_PREFIX}g", {},
                                             Image.new("RGB", (4, 4)))])[0]
    store.add_scores([(cid, "h", 0.5)])
    c = store.counts()
    assert (c["candidates"], c["sampled"], c["scored"]) == (12, 1, 1)


def test_a_version_1_store_is_upgraded_in_place(tmp_path):
    """A run made by the previous release (schema 1) opens, keeps its rows and gains the
    training runs' selection link."""
    run = tmp_path / "run"
    with RunStore(run) as s:
        ids = seeded(s, n_prompts=1, n_variants=1, seeds=1)
        s.add_scores([(ids[0], "h", 0.5)])
        rid = s.create_train_run("old", {"train": {}})
    conn = sqlite3.connect(run / "store.sqlite")  # take it back to what version 1 had
    conn.executescript("DROP INDEX train_runs_name; DROP INDEX scores_by_reward; "
                       "DROP TABLE embeddings; "
                       "CREATE INDEX scores_reward ON scores(reward); "
                       "ALTER TABLE train_runs DROP COLUMN selection_id; "
                       "ALTER TABLE train_metrics DROP COLUMN extra_json; "
                       "DROP TABLE stopped_candidates; "
                       "ALTER TABLE candidates DROP COLUMN evaluations; "
                       "ALTER TABLE candidates DROP COLUMN plain_evaluations; "
                       "PRAGMA user_version=1;")
    conn.close()
    with RunStore(run) as s:
        assert s._conn().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert s.generation_cost() == {"candidates": 2, "stopped": 0, "evaluations": 0,
                                       "plain_evaluations": 0, "uncounted": 2}
        s.add_metrics(rid, [{"step": 1, "loss": 0.5, "dpo_accuracy": 0.75}])
        assert s.metrics_df(rid)["dpo_accuracy"].tolist() == [0.75]
        assert s.get_train_run(rid)["selection_id"] is None
        assert s.scores_df(["h"])["h"].tolist() == [0.5]
        s.add_embeddings("pixels16", [ids[0]], [[0.5, -0.25]])
        got_ids, vectors = s.embeddings("pixels16")
        assert got_ids.tolist() == [ids[0]] and vectors.tolist() == [[0.5, -0.25]]
        sid = s.save_selection("x", {}, [(ids[0], 0.1, 0.2, 1.0)])
        assert s.get_train_run(s.create_train_run("new", {}, selection_id=sid))[
            "selection_id"] == sid
