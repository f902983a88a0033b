"""Controls show only values that were saved, without a browser (the browser's side is
tests/test_studio_controls_browser.py): a value outside a box's bounds, no number, or a change
over another window's is refused with why, nothing saved and the saved value put back; Curate's
counts are those of the values the controls end up showing; settings that keep nothing say why
and Train refuses to start on them; the engine's command-line hints become the page's buttons
and know when the whole loop runs; "Quick try" sets the small sizes like any setting."""

from __future__ import annotations

import threading

import gradio as gr
import pytest


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from craft.run.store import RunStore
    from studio.app import build_app
    from studio_sample_data import populate

    run = tmp_path_factory.mktemp("controls")
    with RunStore(run) as store:
        populate(store, n_prompts=6, num_variants=2, seeds=2)
    return build_app(run, overrides=["filter.level=none", "filter.top_k=20"])


@pytest.fixture
def ctx(app):
    """The run's context, its settings put back after the test."""
    ctx = app.ctx
    cfg = ctx.cfg
    yield ctx
    ctx.set_config(cfg)
    ctx.clear_overrides()
    ctx.save_settings()


def _snapshot(app):
    from studio.settings_sync import snapshot

    return snapshot(app.settings, app.ctx.cfg)


def _config_bytes(ctx) -> bytes:
    ctx.flush()
    return (ctx.run_dir / "config.yaml").read_bytes()


def test_a_control_says_what_it_takes():
    from studio.settings import control_problem, unchecked

    with gr.Blocks():
        steps = unchecked(gr.Number(1, precision=0, minimum=1, label="steps"))
        margin = unchecked(gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="margin"))
        name = unchecked(gr.Textbox("x"))
    assert control_problem(steps, 3) is None and control_problem(margin, 1.5) is None
    assert control_problem(steps, 0) == "must be a whole number of at least 1"
    assert control_problem(steps, 2.5) == "must be a whole number of at least 1"
    assert control_problem(steps, None) == "must be a whole number of at least 1"
    assert control_problem(margin, 50) == "must be a number from 0 to 2"
    assert control_problem(margin, -1) == "must be a number from 0 to 2"
    assert control_problem(name, "anything") is None
    # the value reaches the handler as typed (Gradio's own check failed the whole event)
    assert steps.preprocess(0) == 0 and margin.preprocess(50) == 50
    assert steps.preprocess(3.0) == 3 and steps.preprocess(None) is None
    assert steps.get_block_name() == "number" and margin.get_block_name() == "slider"


@pytest.mark.parametrize("key,typed,why", [
    ("train.steps", 0, "must be a whole number of at least 1"),
    ("train.steps", None, "must be a whole number of at least 1"),
    ("filter.margin", 50, "must be a number from 0 to 2"),
    ("filter.top_k", 0, "must be a number from 1 to"),
    ("train.lr", float("nan"), "must be a number"),
])
def test_a_refused_value_saves_nothing_and_puts_the_saved_value_back(app, ctx, key, typed, why):
    from studio.app import _persist_setting
    from studio.session import bound
    from studio.settings_sync import value_of

    before, stored = _config_bytes(ctx), value_of(ctx.cfg, key)
    seen = _snapshot(app)
    with bound(ctx):
        # a keystroke's half-typed value waits (no message while typing)
        assert _persist_setting(app.settings, key, final=False)(typed, seen, "") == \
            [gr.skip()] * 5
        new_seen, notice, line, reload, box = _persist_setting(app.settings, key)(
            typed, seen, "")
    assert why in notice and key in notice and "was not saved" in notice
    assert notice in line and reload["visible"] is True
    shown = app.settings.bindings[app.settings.index(key)].to_ui(stored)
    assert box == shown and new_seen[key] == stored
    assert value_of(ctx.cfg, key) == stored and _config_bytes(ctx) == before


def test_the_configs_own_check_is_said_the_same_way(app, ctx):
    """A value inside the box's bounds that the config refuses (a custom level without a
    reward to beat): refused with the config's words, the radio back at the saved level."""
    from studio.session import bound
    from studio.tabs.curate import LEVEL_BY_VALUE
    from studio.settings_sync import apply

    before = _config_bytes(ctx)
    level = ctx.cfg.filter.level
    with bound(ctx):
        out = apply(ctx, app.settings, {"filter.level": "custom (rewards below)",
                                        "filter.require": []}, _snapshot(app))
    assert [k for k, *_ in out.invalid] == ["filter.level"]
    assert "must name at least one reward" in out.text(app.settings)
    assert out.reset == {"filter.level": LEVEL_BY_VALUE[level]}
    assert ctx.cfg.filter.level == level and _config_bytes(ctx) == before


def test_a_stale_pages_change_is_refused_and_its_control_shows_the_saved_value(app, ctx):
    from studio.session import bound
    from studio.settings_sync import apply

    stale = _snapshot(app)  # what page A loaded: K = 20
    with bound(ctx):
        b = apply(ctx, app.settings, {"filter.top_k": 50}, _snapshot(app))  # page B: K = 50
        assert b.saved == ["filter.top_k"] and ctx.cfg.filter.top_k == 50
        # page A's keystroke: refused, her box as typed until she is done with it
        typing = apply(ctx, app.settings, {"filter.top_k": 80}, stale, final=False)
        assert typing.seen["filter.top_k"] == 20 and typing.conflicts
        a = apply(ctx, app.settings, {"filter.top_k": 80}, stale)
    assert ctx.cfg.filter.top_k == 50
    assert a.reset == {"filter.top_k": 50} and a.seen["filter.top_k"] == 50
    assert "<b>top-K (filter.top_k)</b> is <b>50</b>, set in another window; your 80 was not saved" \
        in a.text(app.settings)
    # her next change, from the saved state, is saved
    with bound(ctx):
        again = apply(ctx, app.settings, {"filter.top_k": 80}, a.seen)
    assert again.saved == ["filter.top_k"] and ctx.cfg.filter.top_k == 80


def _curate_values(app, cfg, **changes):
    curate = app.tabs["Curate"]
    everything = app.settings.values_from(cfg)
    values = [everything[app.settings.index(k)] for k in curate.control_keys]
    for key, value in changes.items():
        values[curate.control_keys.index(key)] = value
    return values


def test_curates_counts_are_those_of_the_values_the_controls_end_up_showing(app, ctx):
    """A refused move: the header says the saved settings' kept count (never "Kept 80" when the
    run keeps 50), the refused control gets the saved value, and the page says why."""
    from studio.session import bound
    from studio.settings_sync import apply

    curate = app.tabs["Curate"]
    stale = _snapshot(app)
    with bound(ctx):
        apply(ctx, app.settings, {"filter.top_k": 10}, _snapshot(app))  # another window
        out = curate.move(None, stale, "", *_curate_values(app, ctx.cfg, **{
            "filter.top_k": 15}))
    kept, *_, seen, notice, line, _reload, local, changes = out[:11]
    boxes, moved = out[11:-1], out[-1]
    assert "<b id='kept-number'>10</b>" in kept and moved is True
    assert "<b>top-K (filter.top_k)</b> is <b>10</b>, set in another window; your 15 was not saved" \
        in local and "was not saved" in notice and notice in line
    assert boxes[curate.control_keys.index("filter.top_k")] == 10
    assert all(b == gr.skip() for i, b in enumerate(boxes)
               if i != curate.control_keys.index("filter.top_k"))
    assert seen["filter.top_k"] == 10 and changes == list(ctx.changes())


def test_before_the_page_has_the_runs_settings_curate_counts_the_saved_ones(app, ctx):
    """A tab opened while a reload is still loading: its controls hold the values the studio
    started with; the counts are the run's saved settings', which the load puts in the
    controls (the header agrees with them)."""
    import dataclasses

    curate = app.tabs["Curate"]
    started = _curate_values(app, ctx.cfg)
    ctx.set_config(dataclasses.replace(ctx.cfg, filter=dataclasses.replace(ctx.cfg.filter,
                                                                           top_k=7)))
    saved = _curate_values(app, ctx.cfg)
    from studio.session import bound

    with bound(ctx):
        assert curate.page_values({}, started) == saved
        assert curate.page_values(_snapshot(app), started) == started
        kept = curate.refresh("kept", 1, None, {}, [], [], "kept / not kept", {}, *started)[0]
    assert "<b id='kept-number'>7</b>" in kept


def test_settings_that_keep_nothing_say_why_and_train_refuses_to_start(app, ctx):
    import dataclasses

    from craft.stages.selection import filter_settings
    from studio.session import bound
    from studio.tabs.curate_views import kept_line, select_curation
    from studio.tabs.train import check_trainable

    cfg = dataclasses.replace(ctx.cfg, filter=dataclasses.replace(ctx.cfg.filter, level="hpa",
                                                                  margin=50.0))
    c = select_curation(ctx.store, cfg, filter_settings(cfg), ctx.frame())
    line = kept_line(c)
    assert "<b id='kept-number'>0</b>" in line and "id='nothing-kept'" in line
    assert "lower the margin" in line and "Start on the Train tab refuses" in line
    ctx.set_config(cfg)
    with bound(ctx), pytest.raises(ValueError, match="nothing to train on.*keeps 0 images.*"
                                                     "Curate tab"):
        check_trainable(ctx, cfg)
    # every candidate that passes excluded by hand
    cfg = dataclasses.replace(cfg, filter=dataclasses.replace(cfg.filter, level="none",
                                                              margin=0.0))
    ctx.set_config(cfg)
    ctx.set_overrides({int(i): "exclude" for i in ctx.frame()["candidate_id"]})
    with bound(ctx):
        c = app.tabs["Curate"].run(_curate_values(app, cfg))
    assert "excluded by hand" in kept_line(c)


def test_the_engines_hints_name_the_pages_buttons():
    from studio.ui import error_md
    from studio.wording import for_page

    cases = {
        "rewards ['a'] have no scores in this run; score them first (`craft score`, or Score "
        "in the studio)": "score them first (press Score on the Score tab)",
        "no candidates of model 'x' in this run yet; generate them first (`craft generate`, or "
        "Generate in the studio)": "(press Generate on the Generate tab)",
        "run /r has no prompts yet; run the prompts stage first (`craft prompts --run-dir /r`)":
            "press “Add prompts to the run” on the Prompts tab first",
        "no tuned model at /r/final; train and publish first (`craft train --run-dir /r`), or "
        "pass --tuned PATH": "train first (press “Start training” on the Train tab)",
        "nothing to train on: craft selected no rows with these settings; loosen the filter "
        "(Curate in the studio, or filter.level / filter.top_k)":
            "loosen the filter on the Curate tab",
        "run `craft score` first": "press Score on the Score tab first",
    }
    for engine, page in cases.items():
        said = for_page(engine)
        assert page in said and "`craft" not in said, said
    assert "press Score on the Score tab" in error_md("run `craft score` first")


def test_a_missing_step_knows_the_whole_loop_is_making_it(app, ctx):
    from studio.jobs import JOBS
    from studio.session import bound
    from studio.wording import for_page, loop_line

    release = threading.Event()

    def loop(jc):
        jc.progress(3, 12, "generating")
        release.wait(30)
        return {}

    jobs = JOBS.for_run(str(ctx.run_dir))
    with bound(ctx):
        assert loop_line("generate") is None
        jobs.start("loop", "The whole loop", loop, info={"stage": "generate"})
        try:
            said = for_page("this run has no candidates yet; press Generate on the Generate "
                            "tab first")
            assert "the whole loop of this run is running (now: generate" in said
            assert "whole loop is running" in loop_line("generate")
            assert for_page("top-K must be a number") == "top-K must be a number"
        finally:
            release.set()
            JOBS.wait(jobs.latest("loop").id, 30)
        assert "the whole loop's last job" in loop_line("score")
        assert loop_line("map") is None


def test_quick_try_sets_the_small_sizes_like_any_setting(app, ctx):
    from studio.loop import QUICK_TRY
    from studio.session import bound
    from studio.settings_sync import value_of

    fn = next(f for f in app.demo.fns.values() if f.name == "on_quick").fn
    with bound(ctx):
        message, seen, notice, line, _, *controls = fn(None, str(ctx.run_dir), _snapshot(app),
                                                       "")
    assert "quick try set" in message and notice == "" and line == ""
    for key, value in QUICK_TRY.items():
        ui = app.settings.bindings[app.settings.index(key)].to_ui(value_of(ctx.cfg, key))
        assert ui == value and seen[key] == value_of(ctx.cfg, key), key
    assert controls == list(QUICK_TRY.values())
    assert ctx.cfg.generation.seeds_per_prompt == 2 and ctx.cfg.train.steps == 20


def test_a_ui_state_number_outside_its_bounds_is_refused_too(app, ctx):
    """The processes box (saved with the run's UI state, not its config): 0 is refused with
    the bounds, the box shows the saved value, nothing is saved."""
    from studio.app import _persist_ui
    from studio.session import bound

    box = app.tabs["Train"].processes
    persist = _persist_ui("train.processes", box, True, app.settings)
    with bound(ctx):
        saved = ctx.ui_state().get("train.processes", box.value)
        notice, line, reload, value = persist(0, _snapshot(app), "")
        assert "must be a whole number from 1 to 256" in notice and "your <b>0</b>" in notice
        assert value == saved and notice in line and reload["visible"] is True
        assert ctx.ui_state().get("train.processes", box.value) == saved
        assert persist(2, _snapshot(app), "") == [gr.skip()] * 4
        assert ctx.ui_state()["train.processes"] == 2


def test_a_recipe_sets_the_training_settings_of_its_config_and_nothing_else(app, ctx):
    """Train's "Apply recipe": the shipped config's train / grpo / dpo fields that differ are
    saved (the controls show them, the method's own box opens), the prompts, pool and filter
    stay; CRAFT's own config takes them back."""
    from craft.run.config import load_config
    from craft.run.recipes import recipes_for
    from studio.session import bound

    train = app.tabs["Train"]
    labels = list(recipes_for(ctx.cfg))
    assert {"grpo: configs/toy-grpo.yaml", "dpo: configs/toy-dpo.yaml",
            "craft: configs/toy.yaml"} <= set(labels)
    before = ctx.cfg
    with bound(ctx):
        out = train.apply_recipe("grpo: configs/toy-grpo.yaml", _snapshot(app), "")
    want = load_config("configs/toy-grpo.yaml")
    assert "applied: train.method grpo" in out[0]
    assert ctx.cfg.train == want.train and ctx.cfg.grpo == want.grpo
    assert ctx.cfg.filter == before.filter and ctx.cfg.prompts == before.prompts
    assert ctx.cfg.generation == before.generation
    shown = dict(zip(train._recipe_keys, out[5:5 + len(train._recipe_keys)]))
    assert shown["train.method"] == "grpo" and shown["grpo.prompts_per_step"] == 8
    assert b"method: grpo" in _config_bytes(ctx)  # saved in the run
    with bound(ctx):
        train.apply_recipe("craft: configs/toy.yaml", _snapshot(app), "")
        assert ctx.cfg.train.method == "craft" and ctx.cfg.train.steps == before.train.steps
        with pytest.raises(ValueError, match="choose a recipe first"):
            train.apply_recipe(None, _snapshot(app), "")
