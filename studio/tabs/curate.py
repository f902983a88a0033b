"""Curate: Composite Reward Filtering, live. Every control move re-runs the filter on the whole
pool (a pure, vectorised function) and updates the kept count and the composite histogram at
once, then the grid of kept images. Clicking an image toggles a manual include / exclude that is
saved in the run and honoured by training and export."""

from __future__ import annotations

import gradio as gr

from craft.config import field_choices, field_help
from studio.context import StudioContext
from studio.curation import (VIEWS, Curation, CurationCache, curate, gallery_items,
                             kept_rows, gallery_rows, kept_line, levels_line, make_settings,
                             toggle_action)
from studio.plots import composite_histogram, empty_figure
from studio.settings import Settings
from studio.ui import error_md, ok_md, short_name, user_error

LEVEL_LABELS = {"I_h (beat the reference on h)": "h", "I_ha (h and a)": "ha",
                "I_hpa (h, p and a; strictest)": "hpa", "custom (rewards below)": "custom",
                "none (keep every scorable)": "none"}
LEVEL_BY_VALUE = {v: k for k, v in LEVEL_LABELS.items()}


class CurateTab:
    def __init__(self, ctx: StudioContext, settings: Settings):
        self.ctx = ctx
        self.cache = CurationCache()
        cfg = ctx.cfg
        f = cfg.filter
        self.rewards = list(cfg.rewards.names)
        self.short = {r: short_name(r) for r in self.rewards}
        roles = {v: k for k, v in cfg.rewards.roles.items()}
        gr.Markdown("**Composite Reward Filtering.** Each reward is normalised over the whole "
                    "pool; a candidate passes a level when it beats its group's reference (the "
                    "original prompt's images) on the level's rewards by more than the margin; "
                    "the composite R = Σ weight·normalised reward ranks the passing ones and the "
                    "top K are kept. Click an image to include or exclude it by hand.")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                self.weights = []
                for r in self.rewards:
                    role = roles.get(r)
                    label = f"weight: {r}" + (f" (role {role})" if role else "")
                    s = settings.bind(f"filter.weights.{r}", gr.Slider(
                        0.0, max(1.0, *f.weights.values()), value=float(f.weights.get(r, 0.0)),
                        step=0.05, label=label,
                        elem_id=f"curate-weight-{r}"))
                    self.weights.append(s)
                self.normalization = settings.bind("filter.normalization", gr.Dropdown(
                    list(field_choices("filter", "normalization")), value=f.normalization,
                    label="normalisation", info=field_help("filter", "normalization"),
                    elem_id="curate-normalization"))
                self.level = settings.bind("filter.level", gr.Radio(
                    list(LEVEL_LABELS), value=LEVEL_BY_VALUE[f.level], label="level",
                    elem_id="curate-level"),
                    to_ui=lambda v: LEVEL_BY_VALUE[v], from_ui=lambda v: LEVEL_LABELS[v])
                self.require = settings.bind("filter.require", gr.CheckboxGroup(
                    self.rewards, value=[r for r in f.require if r in self.rewards],
                    label="custom level: beat the reference on", elem_id="curate-require"),
                    to_ui=lambda v: [r for r in v if r in self.rewards], from_ui=list)
                self.margin = settings.bind("filter.margin", gr.Slider(
                    0.0, 2.0, value=f.margin, step=0.05, label="margin (normalised units)",
                    info=field_help("filter", "margin"), elem_id="curate-margin"))
                self.top_k = settings.bind("filter.top_k", gr.Slider(
                    1, max(2000, f.top_k), value=f.top_k, step=1, label="top-K",
                    info=field_help("filter", "top_k"), elem_id="curate-topk"))
                self.include_ref = settings.bind("filter.include_reference", gr.Checkbox(
                    f.include_reference, label="original-prompt images may be kept",
                    elem_id="curate-include-ref"))
            with gr.Column(scale=3):
                self.kept = gr.HTML("", elem_id="curate-kept", elem_classes=["kept-count"])
                self.levels = gr.Markdown("", elem_id="curate-levels")
                self.hist = gr.Plot(label="Composite histogram", elem_id="curate-hist")
                with gr.Row():
                    self.view = gr.Radio(list(VIEWS), value="kept", label="Show",
                                         elem_id="curate-view", scale=3)
                    self.export = gr.Button("Export kept set (imagefolder)",
                                            elem_id="curate-export", scale=1)
                self.message = gr.Markdown(elem_id="curate-message")
                self.gallery = gr.Gallery(label="Kept images (click to include / exclude by hand)",
                                          columns=8, height=520, object_fit="contain",
                                          allow_preview=False, elem_classes=["pixelated"],
                                          elem_id="curate-gallery")
                self.download = gr.File(label="Exported archive", visible=False,
                                        elem_id="curate-download")
        self.ids = gr.State([])
        self.controls = [*self.weights, self.normalization, self.level, self.require,
                         self.margin, self.top_k, self.include_ref]

    # ------------------------------------------------------------------ logic

    def settings_from(self, values):
        n = len(self.rewards)
        weights = dict(zip(self.rewards, values[:n]))
        norm, level_label, require, margin, top_k, include_ref = values[n:]
        return make_settings(self.ctx.cfg, weights, norm, LEVEL_LABELS[level_label], require,
                             margin, top_k, include_ref)

    def run(self, values) -> Curation:
        ctx = self.ctx
        settings = self.settings_from(values)
        df = ctx.frame()
        if df.empty:
            raise ValueError("no candidates yet: add prompts, generate and score first")
        missing = [r for r in settings.used_rewards if r not in df or df[r].isna().all()]
        if missing:
            raise ValueError(f"rewards {missing} have no scores yet; run the Score step")
        overrides = ctx.store.overrides()
        key = (ctx.data_version(), settings, tuple(sorted(overrides.items())))
        return self.cache.get(key, lambda: curate(df, settings, overrides,
                                                  ctx.cfg.advantage.eps))

    def counts(self, *values):
        """The fast step (what a slider move waits for): kept count and pass counts."""
        try:
            c = self.run(values)
        except Exception as e:  # noqa: BLE001
            return error_md(str(e)) if isinstance(e, ValueError) else user_error(e), ""
        a = self.ctx.cfg.advantage
        return kept_line(c, a.mode, a.tau), levels_line(c)

    def histogram(self, *values):
        try:
            c = self.run(values)
        except Exception:  # noqa: BLE001 - counts() already showed the message
            return empty_figure("nothing to show")
        f = c.frame
        return composite_histogram(f["composite"].to_numpy(float), f["passes"].to_numpy(),
                                   f["kept"].to_numpy(), c.result.cutoff)

    def summary(self, *values):
        return (*self.counts(*values), self.histogram(*values))

    def gallery_update(self, view, *values):
        try:
            c = self.run(values)
        except Exception:  # noqa: BLE001 - summary() already showed the message
            return [], []
        rows = gallery_rows(c, view)
        items, ids = gallery_items(rows, self.rewards, self.short)
        return items, ids

    # ------------------------------------------------------------------ wiring

    def wire(self, app) -> None:
        ctx = self.ctx
        count_out = [self.kept, self.levels]
        slow_in = [self.view, *self.controls]
        slow_out = [self.gallery, self.ids]
        quiet = dict(show_progress="hidden")

        def chain(dep):
            """After the counts: the histogram, then the grid (each its own round trip, so the
            count shows as soon as it is known)."""
            return (dep.then(self.histogram, self.controls, self.hist, **quiet)
                    .then(self.gallery_update, slow_in, slow_out, **quiet))

        for control in self.controls:
            # Sliders answer on release (a click or the end of a drag), other controls on input;
            # always_last drops moves superseded while one is computing. (Listening to a
            # slider's input as well would send two events per click: measured slower.) The
            # count step skips the queue: a plain request, ~50 ms faster than a queued event
            # on a busy machine (benchmarks/studio.md); histogram and grid stay queued.
            event = control.release if isinstance(control, gr.Slider) else control.input
            chain(event(self.counts, self.controls, count_out, trigger_mode="always_last",
                        queue=False, **quiet))
        self.view.input(self.gallery_update, slow_in, slow_out, **quiet)

        def on_select(evt: gr.SelectData, ids, *values):
            try:
                cid = int(ids[evt.index])
                c = self.run(values)
                current = ctx.store.overrides().get(cid)
                action = toggle_action(c, cid, current)
                ctx.store.set_override(cid, action)
                msg = {None: f"candidate {cid}: back to automatic selection",
                       "include": f"candidate {cid}: included by hand (click again to undo)",
                       "exclude": f"candidate {cid}: excluded by hand (click again to undo; "
                                  f"see 'manually excluded')"}[action]
                return ok_md(msg)
            except Exception as e:  # noqa: BLE001
                return user_error(e)

        chain(self.gallery.select(on_select, [self.ids, *self.controls], self.message)
              .then(self.counts, self.controls, count_out, **quiet))

        def on_export(*values):
            try:
                from craft.run import Run
                from craft.stages import stage_export

                c = self.run(values)
                a = ctx.cfg.advantage
                kept = kept_rows(c, a.mode, a.tau)
                folder, archive = stage_export(Run.local(ctx.store), ctx.cfg, c.settings,
                                               kept=kept)
                return (ok_md(f"exported {len(kept)} images to `{folder}` (load with "
                              f"`datasets.load_dataset('imagefolder', data_dir=...)`; the same "
                              f"as `craft export`)"),
                        gr.update(value=str(archive), visible=True))
            except Exception as e:  # noqa: BLE001
                return user_error(e), gr.skip()

        self.export.click(on_export, self.controls, [self.message, self.download])

    # ------------------------------------------------------------------ refresh

    @property
    def refresh_inputs(self) -> list:
        return [self.view, *self.controls]

    @property
    def refresh_outputs(self) -> list:
        return [self.kept, self.levels, self.hist, self.gallery, self.ids]

    def refresh(self, view, *values) -> list:
        kept, levels, fig = self.summary(*values)
        items, ids = self.gallery_update(view, *values) if "kept-number" in kept else ([], [])
        return [kept, levels, fig, items, ids]


__all__ = ["CurateTab", "LEVEL_LABELS"]
