"""One selection serves every face: for a grid of filter settings, manual overrides and training
methods, what the studio shows (Curate's kept set and counts, Groups' training weights, Curate's
Export) is what a training run records (craft.stages.selection.select with ``save_as``, and the
train stage's plan, which records the same select()).

The studio side goes through the page's own code path without a browser: the Curate tab's
``run`` with the control values the page shows for the run's config (studio.tabs.curate), and the
functions Groups and Export build on. The run is filled with rendered, scored toy candidates.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pandas as pd
import pytest

LEVELS = ("none", "h", "hpa")
TOP_K = (3, 12, 60)
CAPS = (None, 2)
DEDUP = (None, 0.95)
METHODS = ("craft", "sft", "dpo")


def _populate():
    try:
        from studio_sample_data import populate  # tests/studio_sample_data.py
    except ImportError:  # an older checkout kept it in the studio package
        from studio.sample_data import populate
    return populate


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from craft.run.store import RunStore
    from studio.app import build_app

    run = tmp_path_factory.mktemp("selection") / "run"
    with RunStore(run) as store:
        _populate()(store, n_prompts=6, num_variants=2, seeds=3, seed=3)
    app = build_app(run)
    yield app
    app.studio.close()


def _config(base, level, top_k, cap, dedup, method, replace_excluded=False):
    f = dataclasses.replace(base.filter, level=level, top_k=top_k, per_prompt_cap=cap,
                            dedup_threshold=dedup, replace_excluded=replace_excluded)
    return dataclasses.replace(base, filter=f, train=dataclasses.replace(base.train,
                                                                         method=method))


def _shown(app, cfg):
    """What the Curate tab computes for ``cfg`` (the run's settings as its controls show them)."""
    from studio.session import bound

    curate = app.tabs["Curate"]
    app.ctx.set_config(cfg)
    everything = app.settings.values_from(cfg)
    values = [everything[app.settings.index(k)] for k in curate.control_keys]
    with bound(app.ctx):
        return curate.run(values)


def _recorded(store, cfg, name):
    """(items, record) a training run's selection records: select(..., save_as=name)."""
    from craft.stages.selection import select

    select(store, cfg, save_as=name)
    sels = store.selections_df()
    sid = int(sels.loc[sels["name"] == name, "id"].iloc[-1])
    items = store.selection_items_df(sid).set_index("candidate_id")
    return items, store.selection_settings(sid)


def _planned(store, cfg):
    """The rows and pairs the train stage would train on and record (its plan, not a run)."""
    from craft.run.handle import Run
    from craft.stages.selection import localize
    from craft.stages.train_stage import plan_training

    plan = plan_training(Run.local(store), cfg, "never-trained", None, None)
    return localize(plan.kept, store.run_dir), plan.pairs


def _overrides(app):
    """A best image excluded by hand and a failing one included (chosen once, at level hpa)."""
    from craft.stages.selection import filter_settings
    from studio.tabs.curate_views import curate

    c = curate(app.ctx.frame(), filter_settings(app.ctx.cfg), {})
    f = c.frame.sort_values(["composite", "candidate_id"], ascending=[False, True])
    best = int(f.loc[f["kept"], "candidate_id"].iloc[0])
    failing = int(f.loc[~f["passes"] & f["scorable"], "candidate_id"].iloc[0])
    return {best: "exclude", failing: "include"}


def test_the_studio_shows_what_training_records(app):
    from craft import CraftError
    from studio.tabs.curate_views import kept_line, training_weights_by_id

    store, base = app.ctx.store, app.ctx.cfg
    hand = _overrides(app)
    grid = list(itertools.product(LEVELS, TOP_K, CAPS, DEDUP, (False, True), METHODS))
    checked = {"kept": 0, "pairs": 0, "refused": 0, "duplicates": 0, "capped": 0}
    try:
        for i, (level, k, cap, dedup, by_hand, method) in enumerate(grid):
            cfg = _config(base, level, k, cap, dedup, method, replace_excluded=by_hand and k == 3)
            for cid in hand:
                store.set_override(cid, hand[cid] if by_hand else None)
            where = f"level {level}, K {k}, cap {cap}, dedup {dedup}, by hand {by_hand}, {method}"
            c = _shown(app, cfg)
            checked["duplicates"] += c.result.counts.duplicates > 0
            checked["capped"] += c.result.counts.capped > 0
            try:
                items, record = _recorded(store, cfg, f"grid-{i}")
            except CraftError as e:  # training would refuse: the page says why
                assert c.note is not None and str(e) in c.note, where
                assert c.selection.method == "craft", where
                checked["refused"] += 1
                continue
            shown_w = training_weights_by_id(c)
            assert record["method"] == c.selection.method == method, where
            assert sorted(shown_w.index) == sorted(items.index), where
            np.testing.assert_allclose(shown_w.reindex(items.index).to_numpy(float),
                                       items["weight"].to_numpy(float), rtol=1e-12,
                                       err_msg=where)
            if method == "dpo":
                assert c.selection.pair_ids == record["pairs"], where
                assert f"<b id='pairs-number'>{len(record['pairs'])}</b>" in kept_line(c)
                checked["pairs"] += 1
            else:
                assert sorted(c.kept_ids.tolist()) == sorted(items.index), where
                assert c.result.counts.kept == len(items), where
                assert f"<b id='kept-number'>{len(items)}</b>" in kept_line(c), where
                if method == "sft":
                    assert (items["weight"] == 1.0).all(), where
                checked["kept"] += 1
    finally:
        for cid in hand:
            store.set_override(cid, None)
        app.ctx.set_config(base)
    # every case of the grid happened (a refusal may: none is expected since DPO's pairs ignore
    # the kept set's near-duplicate rule)
    assert all(v for k, v in checked.items() if k != "refused"), checked


@pytest.mark.parametrize("method", METHODS)
def test_groups_and_the_train_stage_agree(app, method):
    """Groups' "training weight" column (0: not trained on) is the train stage's plan, for every
    prompt; the pairs too (DPO)."""
    from studio.tabs.groups import group_view

    store, base = app.ctx.store, app.ctx.cfg
    cfg = _config(base, "h", 12, 2, None, method)
    try:
        c = _shown(app, cfg)
        rows, pairs = _planned(store, cfg)
    finally:
        app.ctx.set_config(base)
    planned = rows.set_index("candidate_id")["weight"]
    assert pairs == c.selection.pair_ids
    seen = pd.Series(dtype=float)
    for pid in sorted(c.frame["prompt_id"].unique()):
        _, _, _, table = group_view(c, int(pid), list(cfg.rewards.names), cfg.advantage.mode)
        seen = pd.concat([seen, table.set_index("candidate id")["training weight"]])
    assert sorted(seen.index) == sorted(c.frame["candidate_id"])  # every image, once
    want = planned.reindex(seen.index).fillna(0.0).round(3)  # the table's rounding
    np.testing.assert_allclose(seen.to_numpy(float), want.to_numpy(float))


@pytest.mark.parametrize("method", ["craft", "sft"])
def test_export_from_curate_is_craft_export(app, method, tmp_path):
    """Curate's Export (the selection it shows) and `craft export` (stage_export, selecting
    itself) write the same images with the same weights as a training run records: weight 1
    each for sft, whatever advantage.mode says."""
    from craft.run.handle import Run
    from craft.stages.engine import stage_export

    store, base = app.ctx.store, app.ctx.cfg
    cfg = _config(base, "h", 12, None, None, method)
    try:
        c = _shown(app, cfg)
        run = Run.local(store)
        page, _ = stage_export(run, cfg, c.settings, name=f"page-{method}",
                               selection=c.selection if c.selection.pairs is None else None)
        cli, _ = stage_export(run, cfg, name=f"cli-{method}")
        items, _ = _recorded(store, cfg, f"export-check-{method}")
    finally:
        app.ctx.set_config(base)

    def weights(folder):
        rows = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
        return pd.Series({r["candidate_id"]: r["weight"] for r in rows}).sort_index()

    want = items["weight"].sort_index()
    for folder in (page, cli):
        got = weights(folder)
        assert got.index.tolist() == want.index.tolist()
        np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(float), rtol=1e-12)
    if method == "sft":
        assert (weights(page) == 1.0).all()


def test_the_pairs_export_is_what_dpo_trains_on(app):
    from craft.run.handle import Run
    from craft.stages.engine import stage_export_pairs
    from craft.stages.export import PAIRS_FILE

    store, base = app.ctx.store, app.ctx.cfg
    cfg = _config(base, "hpa", 12, None, None, "dpo")
    try:
        c = _shown(app, cfg)
        folder = stage_export_pairs(Run.local(store), cfg, name="pairs-check")
        _, pairs = _planned(store, cfg)
    finally:
        app.ctx.set_config(base)
    df = pd.read_parquet(folder / PAIRS_FILE)
    won = np.where(df["label_0"] == 1.0, df["candidate_id_0"], df["candidate_id_1"])
    lost = np.where(df["label_0"] == 1.0, df["candidate_id_1"], df["candidate_id_0"])
    assert [[int(w), int(lo)] for w, lo in zip(won, lost)] == pairs == c.selection.pair_ids


def test_page_settings_are_the_engines_settings(app):
    """The controls as the page shows them give exactly the config's filter settings (one
    validation: craft.stages.selection.filter_settings), and a refused value is said in the
    config's terms and the page's."""
    from craft import CraftError
    from craft.stages.selection import filter_settings
    from studio.session import bound
    from studio.tabs.curate_views import make_settings

    cfg = app.ctx.cfg
    curate = app.tabs["Curate"]
    everything = app.settings.values_from(cfg)
    values = [everything[app.settings.index(k)] for k in curate.control_keys]
    with bound(app.ctx):
        assert curate.settings_from(values) == filter_settings(cfg)
    zero = {r: 0.0 for r in cfg.rewards.names}
    with pytest.raises(CraftError, match=r"filter\.weights.*all be zero.*on this page"):
        make_settings(cfg, zero, "zscore", "h", [], 0.0, 10, True)
    with pytest.raises(CraftError, match=r"filter\.top_k = -1.*None"):
        filter_settings(cfg, top_k=-1)


def test_another_models_candidates_are_never_shown(app):
    """The studio used to fall back to another model's candidates; now it says why it shows
    nothing, as the engine refuses to select."""
    from craft import CraftError
    from craft.stages.selection import select

    base = app.ctx.cfg
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model,
                                                              pretrained="some/other-model"))
    try:
        with pytest.raises(CraftError, match="no candidates of model 'some/other-model'"):
            _shown(app, cfg)
        with pytest.raises(CraftError, match="no candidates of model 'some/other-model'"):
            select(app.ctx.store, cfg)
    finally:
        app.ctx.set_config(base)
