"""Curate: Composite Reward Filtering, live, and a review of every image it keeps or leaves.

Every control move re-runs the filter on the whole pool (a pure, vectorised function) and shows
at once the kept count, what the move changed (entered / left), the coverage of the prompts, then
the composite histogram, then one page of the chosen view in the grid. Clicking an image selects
it and says why it is or is not kept; keys or buttons keep / exclude it by hand (saved in the run,
honoured by training, export and ``craft filter``), undo, clear. The map of the pool projects
image embeddings to 2-D; a box drawn on it selects images into the grid."""

from __future__ import annotations


import gradio as gr

from craft import CraftError
import numpy as np
import pandas as pd

from craft.run.config import field_choices, field_help
from studio.context import RunContext
from studio.tabs.curate_views import (PAGE_SIZE, VIEWS, Curation, CurationCache, coverage_line,
                                     explain, grid_items, k_note, kept_line, levels_line,
                                     make_settings, moved, page_of,
                                     select_curation, showing_line, view_ids)
from studio.grid import ThumbGrid, event_delta, event_id, item_value
from studio.pool_map import KEPT, PoolMap, in_box, map_value
from studio.plots import composite_histogram, empty_figure
from studio.settings import Settings, UiState, none_as_zero, optional_int
from studio.tabs.curate_stopped import group_note, stopped_frame, stopped_line, stopped_table
from studio.ui import JobPanel, Tab, error_md, ok_md, short_name, start_job

LEVEL_LABELS = {"I_h (beat the reference on h)": "h", "I_ha (h and a)": "ha",
                "I_hpa (h, p and a; strictest)": "hpa", "custom (rewards below)": "custom",
                "none (keep every scorable)": "none"}
LEVEL_BY_VALUE = {v: k for k, v in LEVEL_LABELS.items()}
LEVEL_INFO = ("A level keeps the images that beat their group's reference (the mean of the "
              "original prompt's own images) on its roles: h = the HPS-like reward (how well "
              "the image shows the prompt), p = the PickScore-like one (which image people "
              "pick), a = the aesthetic one. I_hpa, the strictest, was the paper's best.")
GLOSSARY = ("**Terms.** A *group* is every image of one original prompt; its *reference* is "
            "the mean of the images made from the prompt itself (★). *R*, the composite, is "
            "the weighted sum of the normalised rewards (the sliders). *A*, the advantage, is "
            "how far an image's R is above its group's mean, in the group's standard "
            "deviations; it becomes the image's training weight. *Scorable*: every reward used "
            "has a finite score.")
ACTIONS = {"keep": "include", "exclude": "exclude", "auto": None}


class CurateTab(Tab):
    def __init__(self, ctx: RunContext, settings: Settings, ui: UiState):
        self.cache = CurationCache()
        self._stopped_cache = None  # (key, stopped_frame): see stopped()
        cfg = ctx.cfg
        f = cfg.filter
        self.rewards = list(cfg.rewards.names)
        self.short = {r: short_name(r) for r in self.rewards}
        roles = {v: k for k, v in cfg.rewards.roles.items()}
        gr.Markdown("**Composite Reward Filtering.** Each reward is normalised over the whole "
                    "pool; a candidate passes a level when it beats its group's reference (the "
                    "original prompt's images) on the level's rewards by more than the margin; "
                    "the composite R = Σ weight·normalised reward ranks the passing ones and the "
                    "top K are kept. Click an image to see why it is (not) kept; keep or exclude "
                    "it by hand with the buttons or the keys k / x (arrows move, z enlarges, "
                    "u undoes).")
        gr.Markdown(GLOSSARY, elem_id="curate-glossary")
        curated = dict(persisted_by="Curate")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                self.weights = []
                for r in self.rewards:
                    role = roles.get(r)
                    label = f"{r}" + (f" ({role})" if role else "")
                    s = settings.bind(f"filter.weights.{r}", gr.Slider(
                        0.0, max(1.0, *f.weights.values()), value=float(f.weights.get(r, 0.0)),
                        step=0.05, label=label, elem_id=f"curate-weight-{r}"), **curated)
                    self.weights.append(s)
                self.normalization = settings.bind("filter.normalization", gr.Dropdown(
                    list(field_choices("filter", "normalization")), value=f.normalization,
                    label="normalisation", info=field_help("filter", "normalization"),
                    elem_id="curate-normalization"), **curated)
                self.level = settings.bind("filter.level", gr.Radio(
                    list(LEVEL_LABELS), value=LEVEL_BY_VALUE[f.level], label="level",
                    info=LEVEL_INFO, elem_id="curate-level"),
                    to_ui=lambda v: LEVEL_BY_VALUE[v], from_ui=lambda v: LEVEL_LABELS[v],
                    **curated)
                self.require = settings.bind("filter.require", gr.CheckboxGroup(
                    self.rewards, value=[r for r in f.require if r in self.rewards],
                    label="custom level: beat the reference on", elem_id="curate-require"),
                    to_ui=lambda v: [r for r in v if r in self.rewards], from_ui=list,
                    **curated)
                self.margin = settings.bind("filter.margin", gr.Slider(
                    0.0, 2.0, value=f.margin, step=0.05, label="margin (normalised units)",
                    info=field_help("filter", "margin"), elem_id="curate-margin"), **curated)
                self.top_k = settings.bind("filter.top_k", gr.Slider(
                    1, max(2000, f.top_k), value=f.top_k, step=1, label="top-K",
                    info=field_help("filter", "top_k"), elem_id="curate-topk"), **curated)
                self.cap = settings.bind("filter.per_prompt_cap", gr.Number(
                    none_as_zero(f.per_prompt_cap), precision=0, minimum=0,
                    label="at most this many per prompt (0 = no cap)",
                    info=field_help("filter", "per_prompt_cap"), elem_id="curate-cap"),
                    to_ui=none_as_zero, from_ui=optional_int, **curated)
                self.dedup = settings.bind("filter.dedup_threshold", gr.Number(
                    f.dedup_threshold or 0, minimum=0, maximum=1, step=0.01,
                    label="drop near-duplicates at cosine ≥ (0 = keep them; embeds the pool)",
                    info=field_help("filter", "dedup_threshold"), elem_id="curate-dedup"),
                    to_ui=lambda v: v or 0, from_ui=lambda v: float(v) if v else None,
                    **curated)
                self.include_ref = settings.bind("filter.include_reference", gr.Checkbox(
                    f.include_reference, label="original-prompt images may be kept",
                    elem_id="curate-include-ref"), **curated)
                self.replace_excluded = settings.bind("filter.replace_excluded", gr.Checkbox(
                    f.replace_excluded, label="the next candidate replaces an excluded image",
                    info=field_help("filter", "replace_excluded"),
                    elem_id="curate-replace-excluded"), **curated)
            with gr.Column(scale=3):
                # this page's refused move: why, and that the control shows the saved value
                self.notice = gr.HTML("", elem_id="curate-notice")
                self.kept = gr.HTML("", elem_id="curate-kept", elem_classes=["kept-count"])
                self.coverage = gr.HTML("", elem_id="curate-coverage")
                self.levels = gr.Markdown("", elem_id="curate-levels")
                self.hist = gr.Plot(label="Composite histogram", elem_id="curate-hist")
                gr.Markdown("Weights (sliders above) are relative: R uses them normalised to sum 1.",
                            elem_id="curate-weights-note")
                self.view = ui.bind("curate.view", gr.Radio(
                    list(VIEWS), value="kept", label="Show", elem_id="curate-view"))
                with gr.Row(equal_height=True):
                    self.prev_btn = gr.Button("◀ previous page", elem_id="curate-prev",
                                              scale=0, min_width=130)
                    self.showing = gr.Markdown("", elem_id="curate-showing")
                    self.next_btn = gr.Button("next page ▶", elem_id="curate-next", scale=0,
                                              min_width=130)
                with gr.Row():  # the why sits beside the grid, where the image was clicked
                    with gr.Column(scale=3, min_width=420):
                        self.grid = ThumbGrid(elem_id="curate-grid")
                    with gr.Column(scale=2, min_width=300):
                        self.why = gr.Markdown("Click an image to see why it is or is not "
                                               "kept.", elem_id="curate-why")
                with gr.Row(equal_height=True):
                    self.keep_btn = gr.Button("Keep (k)", elem_id="curate-keep", min_width=90)
                    self.exclude_btn = gr.Button("Exclude (x)", elem_id="curate-exclude",
                                                 min_width=90)
                    self.auto_btn = gr.Button("Back to automatic (a)", elem_id="curate-auto",
                                              min_width=150)
                    self.undo_btn = gr.Button("Undo (u)", elem_id="curate-undo", min_width=90)
                    self.clear_btn = gr.Button("Clear all overrides", elem_id="curate-clear",
                                               min_width=150)
                    self.similar_btn = gr.Button("More like this", elem_id="curate-similar",
                                                 min_width=120)
                    self.export = gr.Button("Export kept set (imagefolder)",
                                            elem_id="curate-export", min_width=160)
                self.message = gr.Markdown(elem_id="curate-message")
                self.download = gr.File(label="Exported archive", visible=False,
                                        elem_id="curate-download")
                with gr.Accordion("Stopped early: candidates early rejection did not finish",
                                  open=False, elem_id="curate-stopped-section"):
                    gr.Markdown("Early rejection (`generation.early_reject`) stops a variant's "
                                "candidate whose predicted final image could not enter the "
                                "kept set. It has no image; its seed reproduces it exactly. "
                                "When looser settings could keep some, finish them: they are "
                                "generated to the last step and stored as ordinary candidates "
                                "(score them next).")
                    self.finish_btn = gr.Button(
                        "Finish the stopped candidates these settings could keep",
                        elem_id="curate-finish-stopped")
                    self.finish_message = gr.Markdown(elem_id="curate-finish-message")
                    self.stopped_table = gr.Dataframe(interactive=False,
                                                      elem_id="curate-stopped-table")
                with gr.Accordion("Map of the pool: image embeddings in 2-D", open=False,
                                  elem_id="curate-map-section"):
                    gr.Markdown("Each point is a candidate (embedding: `embed.encoder`, "
                                f"{cfg.embed.encoder}), placed by the first two principal "
                                "components. Drag a box to show those images in the grid; "
                                "“More like this” shows the selected image's nearest "
                                "neighbours.")
                    with gr.Row(equal_height=True):
                        self.color_by = ui.bind("curate.color_by", gr.Dropdown(
                            [KEPT, "composite", *self.rewards], value=KEPT,
                            label="colour by", elem_id="curate-color-by", scale=2))
                        self.map_btn = gr.Button("Compute the map", elem_id="curate-map-start",
                                                 scale=1, min_width=150)
                    self.map_panel = JobPanel("map", log_lines=3)
                    self.pool_map = PoolMap(elem_id="curate-map")
                    self.dups = gr.Markdown(elem_id="curate-dups")
        # Per browser: the page shown (its ids stay put while overrides change badges), the
        # selected image, the kept set before the last move and what the move changed, the
        # map's selection and the neighbours of the selected image.
        self.ids = gr.State([])
        self.page = gr.State(1)
        self.selected = gr.State(None)
        self.last_kept = gr.State(None)
        self.changed = gr.State({})
        self.map_ids = gr.State([])
        self.similar_ids = gr.State([])
        self.dup_ids = gr.State([])
        self.controls = [*self.weights, self.normalization, self.level, self.require,
                         self.margin, self.top_k, self.cap, self.dedup, self.include_ref,
                         self.replace_excluded]
        self.settings = settings
        self.moved_flag = gr.State(False)  # whether the last control event changed a value
        # the run's change counters (RunContext.changes) this page's counts last reflected
        self.shown_changes = gr.State(None)
        by_component = {id(b.component): b.key for b in settings.bindings}
        self.control_keys = [by_component[id(c)] for c in self.controls]

    # ------------------------------------------------------------------ logic

    def settings_from(self, values):
        n = len(self.rewards)
        weights = dict(zip(self.rewards, values[:n]))
        norm, level_label, require, margin, top_k, cap, dedup, include_ref, replace = values[n:]
        return make_settings(self.ctx.cfg, weights, norm, LEVEL_LABELS[level_label], require,
                             margin, top_k, include_ref, cap, dedup, replace)

    def run(self, values) -> Curation:
        """The engine's selection for the page's settings (select_curation: the one
        craft.stages.selection.select that ``craft train`` records), cached by everything it
        depends on, so a repeated or concurrent ask for the same settings is computed once."""
        ctx = self.ctx
        cfg = ctx.cfg
        settings = self.settings_from(values)
        version = ctx.data_version()
        df = ctx.frame(version)
        if df.empty:
            self._no_candidates()
        embeddings = ctx.pool_embeddings(version) if settings.dedup_threshold is not None \
            else None
        overrides = ctx.store.overrides()
        key = (version, settings, tuple(sorted(overrides.items())), cfg.train.method,
               repr(cfg.advantage), repr(cfg.dpo), None if embeddings is None else
               len(embeddings[0]))
        return self.cache.get(key, lambda: select_curation(ctx.store, cfg, settings, df,
                                                           embeddings))

    def _no_candidates(self) -> None:
        """Say why nothing can be curated: no candidates of the run's model (another model's
        are never shown in its place: `craft train` would not select them)."""
        model = self.ctx.cfg.model.pretrained
        others = self.ctx.store.candidates_df(split="train")["model"].value_counts()
        if others.empty:
            raise CraftError(f"no candidates of model {model!r} in this run yet: add prompts "
                             "(Prompts tab), press Generate on the Generate tab and Score on "
                             "the Score tab first, or press “Run the whole loop”")
        names = ", ".join(f"{m!r} ({n})" for m, n in others.head(3).items())
        raise CraftError(f"no candidates of model {model!r} (model.pretrained) in this run; "
                         f"its candidates are of {names}. Generate with this model, or set "
                         "model.pretrained to the model whose candidates you want to curate")

    def changes(self, seen: dict, values) -> dict:
        """The controls this page has moved since it last loaded or saved them (``seen``):
        key -> control value. Leaving a box with the value it had is no change."""
        from studio.settings_sync import value_of

        ctx = self.ctx
        out = {}
        for key, value in zip(self.control_keys, values):
            try:
                new = value_of(self.settings.config_with(ctx.cfg, key, value), key)
            except (CraftError, ValueError, TypeError):  # refused: apply() says why
                out[key] = value
                continue
            if new != seen.get(key, value_of(ctx.cfg, key)):
                out[key] = value
        return out

    def move(self, last_kept, seen, notice, *values):
        """A user's move of a Curate control: saved into the run's filter settings (which
        ``craft filter`` / ``craft train`` read) field by field, not over a change made in
        another window nor a value the control or the config refuses (studio.settings_sync);
        a refused control shows the saved value again and the page says why. Then the counts,
        of the settings the controls now show. No change: nothing happens."""
        from studio.settings_sync import apply, notice_after, settings_text

        seen = seen or {}
        moved_keys = self.changes(seen, values)
        if not moved_keys:  # e.g. leaving a number box with the value it had
            return [*[gr.skip()] * (11 + len(self.controls)), False]
        out = apply(self.ctx, self.settings, moved_keys, seen)
        values = [out.reset.get(k, v) for k, v in zip(self.control_keys, values)]
        notice = notice_after(out, self.settings, notice or "")
        text = settings_text(self.ctx, self.settings, out.seen, notice)
        mine = "; ".join(out.parts(self.settings))
        local = f"<span class='studio-error'>⚠ {mine}.</span>" if mine else ""
        return [*self.counts(last_kept, *values), out.seen, notice, text,
                gr.update(visible=bool(text)), local, list(self.ctx.changes()),
                *(out.reset.get(k, gr.skip()) for k in self.control_keys), True]

    def counts(self, last_kept, *values):
        """The fast step (what a control move waits for): kept count, what the move changed,
        coverage, pass counts. Saves nothing (a tab refresh calls it too)."""
        try:
            c = self.run(values)
        except (CraftError, ValueError) as e:  # settings the filter refuses: said here
            return error_md(e), "", "", gr.skip(), gr.skip()
        a = self.ctx.cfg.advantage
        now = sorted(int(i) for i in c.kept_ids)
        changed = moved(last_kept, now)
        return (kept_line(c, a.mode, a.tau, changed if last_kept is not None else None),
                coverage_line(c), self.levels_text(c), now, changed)

    def stopped(self, c: Curation):
        """The stopped candidates with ``could_keep`` under ``c``'s settings (cached: every
        move asks)."""
        ctx = self.ctx
        key = (ctx.data_version(), len(ctx.store.stopped_keys(ctx.cfg.model.pretrained)),
               c.settings, ctx.cfg.generation.early_reject_margin)
        hit = self._stopped_cache
        if hit is None or hit[0] != key:
            hit = self._stopped_cache = (key, stopped_frame(ctx.store, ctx.cfg, c.settings))
        return hit[1]

    def levels_text(self, c: Curation) -> str:
        line = stopped_line(self.stopped(c), self.ctx.cfg)
        return levels_line(c) + (f"\n\n{line}" if line else "")

    def explain(self, c: Curation, candidate_id: int) -> str:
        """Why an image is or is not kept, and the stopped candidates of its prompt."""
        return explain(c, candidate_id, self.rewards) + group_note(
            c, self.stopped(c), candidate_id, self.ctx.cfg)

    def histogram(self, *values):
        try:
            c = self.run(values)
        except (CraftError, ValueError):  # counts() already showed the message
            return empty_figure("nothing to show")
        f = c.frame
        return composite_histogram(f["composite"].to_numpy(float), f["passes"].to_numpy(),
                                   f["kept"].to_numpy(), c.result.cutoff)

    def page_view(self, view, page, selected, changed, map_ids, similar_ids, *values,
                  keep_ids=None):
        """One page of ``view``: (grid value, showing line, page ids, page, why text)."""
        try:
            c = self.run(values)
        except (CraftError, ValueError) as e:  # counts() already showed the message
            empty = item_value([], empty=str(e))
            return empty, "", [], 1, gr.skip(), None
        extra = ()
        if view == "changed by the last move":
            extra = list(changed or {})
        elif view == "map selection":
            extra = map_ids or []
        elif view == "similar to the selected image":
            extra = similar_ids or []
        elif view == "near-duplicates in the kept set":
            extra = self.duplicates(c)[1]
        if keep_ids is not None:  # the same images, fresh badges (after an override)
            ids, total, pages = list(keep_ids), None, None
        else:
            all_ids = view_ids(c, view, extra)
            page_ids, page, pages = page_of(all_ids, page)
            ids, total = [int(i) for i in page_ids], len(all_ids)
        items = grid_items(c, ids, self.rewards, changed)
        if selected not in ids:
            selected = ids[0] if ids else None
        value = item_value(items, selected, empty=f"Nothing in “{view}” with these settings.")
        showing = gr.skip() if total is None else showing_line(len(ids), page, pages, total,
                                                               view)
        why = self.explain(c, selected) if selected is not None else \
            "Nothing selected."
        return value, showing, ids, page, why, selected

    def duplicates(self, c: Curation) -> tuple[str, list[int]]:
        """Near-duplicate groups among the kept images: a line, and their ids group by group."""
        from craft.stages.embeddings import near_duplicates

        pm = self.ctx.pool_map()
        if pm is None:
            return "Near-duplicates: compute the map first.", []
        ids, _, vectors = pm
        kept = np.isin(ids, c.kept_ids)
        t = self.ctx.cfg.embed.duplicate_threshold
        groups = near_duplicates(ids[kept], vectors[kept], t)
        flat = [i for g in groups for i in g]
        if not groups:
            return f"No near-duplicates in the kept set (cosine similarity ≥ {t:g}).", []
        return (f"Near-duplicates in the kept set (cosine ≥ {t:g}): "
                f"<b id='dup-groups'>{len(groups)}</b> groups, {len(flat)} images; the largest "
                f"has {len(groups[0])} (view “near-duplicates in the kept set”).", flat)

    def map_view(self, color_by, map_ids, *values):
        """The map and the near-duplicate line for the current settings."""
        pm = self.ctx.pool_map()
        if pm is None:
            return gr.skip(), "Near-duplicates: compute the map first."
        try:
            c = self.run(values)
        except (CraftError, ValueError):  # counts() shows the message
            return gr.skip(), ""
        ids, xy, _ = pm
        return map_value(c.frame, ids, xy, color_by, map_ids), self.duplicates(c)[0]

    # ------------------------------------------------------------------ wiring

    def wire(self, app) -> None:
        self.view_in = [self.view, self.page, self.selected, self.changed, self.map_ids,
                        self.similar_ids, *self.controls]
        self.view_out = [self.grid, self.showing, self.ids, self.page, self.why, self.selected]
        self.seen = app.seen
        self._wire_moves(app)
        self._wire_changes(app)
        self._wire_views(app)
        self._wire_overrides(app)
        self._wire_export(app)
        self._wire_finish(app)
        self._wire_map(app, self.view_in, self.view_out)

    def _wire_moves(self, app) -> None:
        """A control moved: the count first (its own round trip), then the first page of the
        grid, then the histogram; nothing at all when the move changed no value."""
        quiet = dict(show_progress="hidden")
        count_in = [self.last_kept, app.seen, app.notice, *self.controls]
        count_out = [self.kept, self.coverage, self.levels, self.last_kept, self.changed,
                     app.seen, app.notice, app.stale, app.reload_settings, self.notice,
                     self.shown_changes, *self.controls, self.moved_flag]

        def first_page_if_moved(moved_, view, page, *rest):
            return self.page_view(view, 1, *rest) if moved_ else [gr.skip()] * 6

        def histogram_if_moved(moved_, *values):
            return self.histogram(*values) if moved_ else gr.skip()

        for control in self.controls:
            # Sliders answer on release (a click, the end of a drag, Enter in the number box),
            # other controls on input; always_last drops moves superseded while one is
            # computing. The count step skips the queue: a plain request, ~50 ms faster than a
            # queued event on a busy machine (benchmarks/studio.md).
            events = [control.release] if isinstance(control, gr.Slider) else (
                [control.submit, control.blur] if isinstance(control, gr.Number) else
                [control.input])
            for event in events:
                dep = app.on(event, self.move, count_in, count_out,
                             trigger_mode="always_last", queue=False, **quiet)
                dep = app.then(dep, first_page_if_moved, [self.moved_flag, *self.view_in],
                               self.view_out, **quiet)
                app.then(dep, histogram_if_moved, [self.moved_flag, *self.controls], self.hist,
                         **quiet)

    def _wire_views(self, app) -> None:
        quiet = dict(show_progress="hidden")
        view_in, view_out = self.view_in, self.view_out

        def first_page(view, page, *rest):
            return self.page_view(view, 1, *rest)

        app.on(self.view.input, first_page, view_in, view_out, **quiet)

        def turn(delta):
            def fn(view, page, *rest):
                return self.page_view(view, (page or 1) + delta, *rest)
            return fn

        app.on(self.prev_btn.click, turn(-1), view_in, view_out, **quiet)
        app.on(self.next_btn.click, turn(1), view_in, view_out, **quiet)

        def on_page_key(evt: gr.EventData, view, page, *rest):
            return self.page_view(view, (page or 1) + event_delta(evt), *rest)

        app.on(self.grid.grid_page, on_page_key, view_in, view_out, **quiet)

        def on_pick(evt: gr.EventData, *values):
            cid = event_id(evt)
            return self.explain(self.run(values), cid), cid

        app.on(self.grid.grid_pick, on_pick, self.controls, [self.why, self.selected],
               message=self.why, **quiet)

    def _overridden(self, message, view, page, selected, changed, map_ids, similar_ids, ids,
                    last_kept, values):
        """After an override: the page keeps its images; their badges, the counts and the
        why change."""
        kept, coverage, levels, now, changed = self.counts(last_kept, *values)
        value, _, ids, _, why, selected = self.page_view(
            view, page, selected, changed, map_ids, similar_ids, *values, keep_ids=ids)
        return [kept, coverage, levels, now, changed, value, ids, why, selected, message,
                list(self.ctx.changes())]

    def _wire_overrides(self, app) -> None:
        quiet = dict(show_progress="hidden")
        after = [self.kept, self.coverage, self.levels, self.last_kept, self.changed,
                 self.grid, self.ids, self.why, self.selected, self.message, self.shown_changes]
        state_in = [self.view, self.page, self.selected, self.changed, self.map_ids,
                    self.similar_ids, self.ids, self.last_kept, *self.controls]

        def set_action(action_name):
            def fn(cid, view, page, selected, changed, map_ids, similar_ids, ids, last_kept,
                   *values):
                cid = selected if cid is None else cid
                if cid is None:
                    return [*[gr.skip()] * 9, "Select an image first (click it).", gr.skip()]
                self.ctx.set_overrides({int(cid): ACTIONS[action_name]})
                text = {"keep": f"#{cid}: kept by hand", "exclude": f"#{cid}: excluded by hand",
                        "auto": f"#{cid}: back to the automatic choice"}[action_name]
                replace = bool(values[-1])  # the "replaces an excluded image" box
                return self._overridden(ok_md(text + " (undo: u)" + k_note(action_name, replace)),
                                        view,
                                        page, int(cid), changed, map_ids, similar_ids, ids,
                                        last_kept, values)
            return fn

        for name, button in (("keep", self.keep_btn), ("exclude", self.exclude_btn),
                             ("auto", self.auto_btn)):
            action = set_action(name)
            app.on(button.click, lambda *a, fn=action: fn(None, *a), state_in, after,
                   message=self.message, **quiet)

            def by_key(evt: gr.EventData, *a, fn=action):
                return fn(event_id(evt), *a)

            app.on(getattr(self.grid, f"grid_{name}"), by_key, state_in, after,
                   message=self.message, **quiet)

        def on_undo(*a):
            restored = self.ctx.undo_override()
            message = "Nothing to undo." if restored is None else ok_md(
                "undone: " + ", ".join(f"#{c} back to {x or 'automatic'}"
                                       for c, x in list(restored.items())[:5])
                + (" …" if len(restored) > 5 else ""))
            return self._overridden(message, *a[:8], a[8:])

        app.on(self.undo_btn.click, on_undo, state_in, after, message=self.message, **quiet)

        def on_undo_key(evt: gr.EventData, *a):
            return on_undo(*a)

        app.on(self.grid.grid_undo, on_undo_key, state_in, after, message=self.message,
               **quiet)

        def on_clear(*a):
            n = self.ctx.clear_overrides()
            message = ok_md(f"cleared {n} manual override(s) (undo brings them back)") if n \
                else "There are no manual overrides."
            return self._overridden(message, *a[:8], a[8:])

        app.on(self.clear_btn.click, on_clear, state_in, after, message=self.message, **quiet)

    def _wire_export(self, app) -> None:
        def on_export(*values):
            from craft.run.handle import Run
            from craft.stages.engine import stage_export

            ctx = self.ctx
            c = self.run(values)
            # the kept set shown, as `craft export` selects it (DPO's pairs are no kept set:
            # then the export selects craft's, the kept set this page shows)
            sel = c.selection if c.selection.pairs is None else None
            folder, archive = stage_export(Run.local(ctx.store), ctx.cfg, c.settings,
                                           selection=sel)
            n = c.result.counts.kept
            return (ok_md(f"exported {n} images to {folder} (load with "
                          f"datasets.load_dataset('imagefolder', data_dir=...); the same as "
                          f"`craft export`)"), gr.update(value=str(archive), visible=True))

        app.on(self.export.click, on_export, self.controls, [self.message, self.download],
               message=self.message)

    def finish_stopped(self, *values):
        """Finish the stopped candidates the saved settings could keep: a generate job (the
        device queue's), the very call of `craft generate --finish-stopped`. The page's
        settings are the saved ones (every move is saved before its counts show)."""
        from craft.stages.calls import StageCall
        from studio.launcher import stage_job
        from studio.ui import started_message

        ctx = self.ctx
        df = self.stopped(self.run(values))
        could = int(df["could_keep"].sum()) if len(df) else 0
        table = stopped_table(df, ctx.cfg)
        if not could:
            why = ("no candidate was stopped early in this run" if df.empty else
                   f"none of the {len(df)} stopped candidates could be kept under these "
                   "settings (loosen the level, the margin or K first)")
            return error_md(f"Nothing to finish: {why}."), table
        snap = start_job("generate", f"Finish {could} stopped candidates · {ctx.run_dir}",
                         stage_job(StageCall("generate", finish_stopped="keepable"),
                                   ctx.run_dir, ctx.settings_now(), 1))
        return (started_message(snap, f"finishing {could} stopped candidate"
                                f"{'s' if could != 1 else ''} (see the Generate tab; then "
                                "press Score on the Score tab)"), table)

    def _wire_finish(self, app) -> None:
        app.on(self.finish_btn.click, self.finish_stopped, self.controls,
               [self.finish_message, self.stopped_table], message=self.finish_message)

    def _wire_map(self, app, view_in, view_out) -> None:
        self._wire_map_job(app)
        self._wire_map_selection(app, view_in, view_out)

    def _wire_map_job(self, app) -> None:
        """Compute the map (embed the pool, project it) as a job of the run; redraw on end."""
        quiet = dict(show_progress="hidden")
        map_out = [self.pool_map, self.dups]

        def on_map_start(*values):
            from craft.stages.embeddings import check_encoder

            ctx = self.ctx
            cfg = ctx.cfg
            check_encoder(cfg)

            def job(jc):
                from craft.stages.embeddings import embed_candidates, project_pool
                from craft.run.store import RunStore

                with RunStore(ctx.run_dir) as store:
                    n = embed_candidates(store, cfg, jc.progress, jc.should_stop)
                    jc.log(f"embedded {n} new candidates ({cfg.embed.encoder})")
                    m = project_pool(store, cfg)
                    jc.log(f"map of {m} candidates")
                ctx.invalidate()
                return {"embedded": n, "mapped": m}

            start_job("map", f"Map the pool · {ctx.run_dir}", job)
            return ok_md("computing the map…"), gr.Timer(active=True)

        app.on(self.map_btn.click, on_map_start, self.controls,
               [self.dups, self.map_panel.timer], message=self.dups)

        def map_tick(color_by, map_ids, *values):
            snap = self.jobs.latest("map")
            out = self.map_panel.render(snap)
            if snap is not None and snap.running:
                return [*out, gr.skip(), gr.skip(), gr.skip()]
            view, dups = self.map_view(color_by, map_ids, *values)
            return [*out, view, dups, gr.Timer(active=False)]

        self.map_panel.on_tick(app, map_tick, [self.color_by, self.map_ids, *self.controls],
                               [*self.map_panel.outputs, *map_out, self.map_panel.timer])
        app.on(self.color_by.input, self.map_view, [self.color_by, self.map_ids,
                                                    *self.controls], map_out, **quiet)

    def _wire_map_selection(self, app, view_in, view_out) -> None:
        """A box drawn on the map, or "more like this": the grid shows those images."""
        quiet = dict(show_progress="hidden")
        map_out = [self.pool_map, self.dups]

        def on_box(evt: gr.EventData, color_by, *values):
            pm = self.ctx.pool_map()
            if pm is None:
                return [gr.skip()] * 4
            box = getattr(evt, "_data", None) or {}
            ids, xy, _ = pm
            chosen = in_box(ids, xy, box)
            view, dups = self.map_view(color_by, chosen, *values)
            return [chosen, "map selection", view, dups]

        def show_selection(view, page, selected, changed, map_ids, similar_ids, *values):
            return self.page_view(view, 1, selected, changed, map_ids, similar_ids, *values)

        dep = app.on(self.pool_map.map_box, on_box, [self.color_by, *self.controls],
                     [self.map_ids, self.view, *map_out], **quiet)
        app.then(dep, show_selection, view_in, view_out, **quiet)

        def on_similar(selected, *values):
            from craft.stages.embeddings import neighbours

            pm = self.ctx.pool_map()
            if selected is None:
                return gr.skip(), gr.skip(), "Select an image first (click it)."
            if pm is None:
                return gr.skip(), gr.skip(), ("“More like this” needs the map: open “Map of "
                                              "the pool” and press “Compute the map”.")
            ids, _, vectors = pm
            near, sims = neighbours(ids, vectors, int(selected), PAGE_SIZE)
            span = f" (cosine {sims[-1]:.3f} to {sims[1]:.3f})" if len(sims) > 1 else ""
            return (near, "similar to the selected image",
                    ok_md(f"#{selected} and the {len(near) - 1} images most like it{span}, most "
                          f"alike first"))

        dep = app.on(self.similar_btn.click, on_similar, [self.selected, *self.controls],
                     [self.similar_ids, self.view, self.message], message=self.message, **quiet)
        app.then(dep, show_selection, view_in, view_out, **quiet)

    # ------------------------------------------------------------------ refresh

    @property
    def refresh_inputs(self) -> list:
        return [self.view, self.page, self.selected, self.changed, self.map_ids,
                self.similar_ids, self.color_by, self.seen, *self.controls]

    @property
    def refresh_outputs(self) -> list:
        return [self.kept, self.coverage, self.levels, self.hist, self.grid, self.showing,
                self.ids, self.page, self.why, self.selected, self.last_kept, self.pool_map,
                self.dups, *self.map_panel.outputs, self.shown_changes, self.stopped_table]

    def refresh(self, view, page, selected, changed, map_ids, similar_ids, color_by, seen,
                *values) -> list:
        values = self.page_values(seen, values)
        changes = list(self.ctx.changes())
        kept, coverage, levels, now, _ = self.counts(None, *values)
        fig = self.histogram(*values)
        panel = self.map_panel.render()
        if "kept-number" not in str(kept):
            return [kept, "", "", fig, item_value([], empty="No candidates to show yet."), "",
                    [], 1, gr.skip(), None, None, gr.skip(), gr.skip(), *panel, changes,
                    stopped_table(pd.DataFrame(), self.ctx.cfg)]
        grid = self.page_view(view, page, selected, changed, map_ids, similar_ids, *values)
        table = stopped_table(self.stopped(self.run(values)), self.ctx.cfg)
        return [kept, coverage, levels, fig, *grid, now,
                *self.map_view(color_by, map_ids, *values), *panel, changes, table]

    def page_values(self, seen, values) -> list:
        """The control values to show the counts of: the controls', or, before this page has
        its run's settings (a tab opened while a reload is still loading them: the controls
        still hold the values the studio started with), the run's saved ones, which the load
        puts in the controls: the header always agrees with what the controls end up
        showing."""
        if seen:
            return list(values)
        saved = self.settings.values_from(self.ctx.cfg)
        return [saved[self.settings.index(k)] for k in self.control_keys]

    def _wire_changes(self, app) -> None:
        """Another window's hand override or saved setting reaches this page within the poll
        (app.changes_timer, of RunContext.changes: no query), without a tab switch: after an
        override, the counts, the badges of the page's images and the why follow the run's
        overrides; after a setting, the settings line says which changed elsewhere (this
        page's controls keep what it set, and its counts are theirs: studio.settings_sync).
        A poll asked before this page's own event answered must not undo what that event
        showed: the settings line is left alone when the poll would say what it says, and
        the counts keep the last move's line."""
        inputs = [self.shown_changes, app.stale, self.view, self.page, self.selected,
                  self.changed, self.map_ids, self.similar_ids, self.ids, app.seen, app.notice,
                  *self.controls]
        outputs = [self.shown_changes, self.kept, self.coverage, self.levels, self.last_kept,
                   self.grid, self.why, self.selected, app.stale, app.reload_settings]

        def on_poll(shown, line_now, view, page, selected, changed, map_ids, similar_ids, ids,
                    seen, notice, *values):
            from studio.settings_sync import settings_text

            now = list(self.ctx.changes())
            if shown is None or list(shown) == now:  # Curate not shown yet, or nothing new
                return [now if shown is None else gr.skip(), *[gr.skip()] * 9]
            text = settings_text(self.ctx, self.settings, seen, notice)
            line = [gr.skip()] * 2 if text == (line_now or "") else [
                text, gr.update(visible=bool(text))]
            if list(shown)[1] == now[1]:  # no override changed: the counts are as shown
                return [now, *[gr.skip()] * 7, *line]
            try:
                c = self.run(values)
                grid, _, _, _, why, selected = self.page_view(
                    view, page, selected, changed, map_ids, similar_ids, *values, keep_ids=ids)
            except Exception:  # noqa: BLE001 - the tab's own events say what is wrong
                return [now, *[gr.skip()] * 7, *line]
            a = self.ctx.cfg.advantage
            return [now, kept_line(c, a.mode, a.tau, changed or None), coverage_line(c),
                    self.levels_text(c), sorted(int(i) for i in c.kept_ids), grid, why, selected,
                    *line]

        app.on(app.changes_timer.tick, on_poll, inputs, outputs, queue=False,
               show_progress="hidden")


__all__ = ["CurateTab", "LEVEL_LABELS", "PAGE_SIZE"]
