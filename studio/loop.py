"""The first thing a new run offers: the whole loop in one click, and what each tab is for.

"Run the whole loop" runs ``craft run`` (craft.stages.calls.StageCall("run"): the engine's
``run_all``) as one job of the run: prompts, candidates, scores, the kept set, fine-tuning,
publishing and the base-vs-tuned evaluation, with per-stage progress, cancel (the stage in
progress stops at its next batch or step) and resume (running it again continues: stored
candidates and scores are kept, training continues from its checkpoint). Each tab shows its
stage's results as soon as they are stored; when the job ends, Compare opens on the evaluation.
"""

from __future__ import annotations

import gradio as gr

from craft.stages.calls import STAGES as LOOP_STAGES, StageCall
from studio.launcher import stage_job
from studio.ui import (JobPanel, Tab, cancel_message, error_md, job_buttons, ok_md, start_job,
                       started_message)

TABS_HELP = """\
**What each tab is for.** **Prompts**: the original prompts and their richer *variants* (used
only to generate). **Generate**: S images per prompt and variant from the base model: one
*group* per original prompt. **Score**: every image scored by each reward *against its original
prompt*. **Curate**: Composite Reward Filtering: the images that beat their group's reference
(the original prompt's own images) on the chosen rewards, ranked by the composite R, top K kept.
**Groups**: one prompt's group, each image's advantage A (how far its R is above the group's
mean) and the loss weight it gets. **Train**: fine-tuning on the kept set, each image's loss
weighted by its advantage. **Compare**: base vs tuned on held-out prompts with the same seeds.
"""

# the stages the loop's progress line names (filtering is instant: it shows as part of train)
STAGES = tuple(s for s in LOOP_STAGES if s != "filter")

# "Quick try": the sizes a first try needs small, set in one click (they sit on the Prompts,
# Generate, Train and Compare tabs), as control values, saved like any setting.
QUICK_TRY = {"prompts.max_prompts": 8, "prompts.max_eval_prompts": 8,
             "prompts.num_variants": 2, "generation.seeds_per_prompt": 2,
             "generation.num_inference_steps": 10, "train.steps": 20, "eval.num_prompts": 8,
             "eval.seeds_per_prompt": 2, "eval.num_inference_steps": 10}
QUICK_TRY_TEXT = ("8 prompts, 2 variants and 2 seeds each, 10 denoising steps, 20 training "
                  "steps, 8 × 2 held-out images")


class LoopPanel(Tab):
    def __init__(self):
        with gr.Accordion("New here? Run the whole loop in one click", open=False,
                          elem_id="loop") as self.box:
            gr.Markdown(
                "One job runs every stage with the run's settings (the same as `craft run`): "
                "prompts → candidates → scores → the kept set → fine-tuning → base vs tuned. "
                "Cancel stops it at the next batch or step; pressing the button again "
                "continues where it stopped. Every tab shows its stage's results as they are "
                "stored; Compare shows the comparison at the end.")
            with gr.Row():
                self.quick = gr.Button("Quick try: small sizes", elem_id="loop-quick")
                self.start = gr.Button("Run the whole loop", variant="primary",
                                       elem_id="loop-start")
                self.cancel = gr.Button("Cancel", variant="secondary", interactive=False,
                                        elem_id="loop-cancel")
            gr.Markdown(f"*Quick try* sets a small first run: {QUICK_TRY_TEXT} (each can be "
                        "changed on its tab); then press *Run the whole loop*.")
            self.stages = gr.Markdown(elem_id="loop-stages")
            self.message = gr.Markdown(elem_id="loop-message")
            self.panel = JobPanel("loop", log_lines=4)
            gr.Markdown(TABS_HELP)
        self.shown_for = gr.State(None)  # the loop job whose result Compare already shows

    def wire(self, app) -> None:
        buttons = [self.start, self.cancel]
        self._wire_quick_try(app)

        def on_start():
            ctx = self.ctx
            snap = start_job("loop", f"The whole loop · {ctx.run_dir}", stage_job(
                StageCall("run"), ctx.run_dir, ctx.settings_now(), 1), info={"stage": "prompts"})
            return (started_message(snap, "the whole loop"), gr.Timer(active=True),
                    *job_buttons(True))

        app.on(self.start.click, on_start, None,
               [self.message, self.panel.timer, *buttons], message=self.message)
        app.on(self.cancel.click, lambda: cancel_message("loop", "loop"), None, self.message)

        def tick():
            snap = self.panel.latest()
            out = self.panel.render(snap)
            running = snap is not None and snap.running
            stages = stage_line(snap)
            if running:
                return [*out, stages, gr.skip(), gr.skip(), gr.skip(), *job_buttons(True)]
            done = snap is not None and snap.status == "done"
            message = finished(snap)
            # at the end, Compare opens on the evaluation the loop made
            tab = gr.Tabs(selected="compare") if done else gr.skip()
            return [*out, stages, message, gr.Timer(active=False), tab, *job_buttons(False)]

        dep = self.panel.on_tick(app, tick, None, [*self.panel.outputs, self.stages,
                                                   self.message, self.panel.timer, app.tabset,
                                                   *buttons])
        compare = app.tabs["Compare"]
        n = len(compare.refresh_outputs)

        def show_result(tuned, shown_for):
            """Once per finished loop: Compare shows the evaluation it made."""
            snap = self.panel.latest()
            if snap is None or snap.status != "done" or shown_for == snap.id:
                return [gr.skip()] * (n + 1)
            return [*compare.refresh(tuned), snap.id]

        app.then(dep, show_result, [compare.tuned, self.shown_for],
                 [*compare.refresh_outputs, self.shown_for], show_progress="hidden")

    def _wire_quick_try(self, app) -> None:
        """Quick try: the small sizes saved field by field (studio.settings_sync.apply: not
        over another window's change), their controls on every tab showing them."""
        keys = [k for k in QUICK_TRY if k in {b.key for b in app.settings.bindings}]
        controls = [app.settings.component(k) for k in keys]

        def on_quick(seen, notice):
            from studio.settings_sync import apply, notice_after, settings_text

            ctx = self.ctx
            out = apply(ctx, app.settings, {k: QUICK_TRY[k] for k in keys}, seen or {})
            notice = notice_after(out, app.settings, notice or "")
            text = settings_text(ctx, app.settings, out.seen, notice)
            shown = [out.reset.get(k, QUICK_TRY[k]) for k in keys]
            message = ok_md(f"quick try set: {QUICK_TRY_TEXT}; press “Run the whole loop”") \
                if not out.refused else error_md("some sizes were not set: see the settings "
                                                 "line at the top")
            return [message, out.seen, notice, text, gr.update(visible=bool(text)), *shown]

        app.on(self.quick.click, on_quick, [app.seen, app.notice],
               [self.message, app.seen, app.notice, app.stale, app.reload_settings, *controls],
               message=self.message)

    @property
    def refresh_outputs(self) -> list:
        return [self.box, self.stages, *self.panel.outputs, self.panel.timer, *[self.start,
                                                                                 self.cancel]]

    def refresh(self) -> list:
        """Open for a run with nothing in it yet (or while the loop runs)."""
        ctx = self.ctx
        snap = self.panel.latest()
        empty = ctx.counts()["candidates"] == 0
        running = snap is not None and snap.running
        return [gr.Accordion(open=empty or running), stage_line(snap), *self.panel.render(snap),
                self.panel.keep_polling(), *job_buttons(running)]


def stage_line(snap) -> str:
    """prompts ✓ · generate 120/960 · score · ... for the loop's job."""
    if snap is None:
        return " · ".join(STAGES)
    current = str(snap.info.get("stage", "")).split(":")[-1].strip() or "prompts"
    if snap.status == "done":
        current = None
    parts, reached = [], current is None
    for s in STAGES:
        if s == current:
            parts.append(f"**{s} {snap.done}/{snap.total}**" if snap.total else f"**{s}**")
            reached = True
        else:
            parts.append(f"{s} ✓" if not reached else s)
    return " · ".join(parts)


def finished(snap) -> str:
    if snap is None:
        return ""
    if snap.status == "done":
        r = snap.result or {}
        return ok_md(f"done: {r.get('kept')} images kept, {r.get('steps')} training steps; the "
                     f"Compare tab shows base vs tuned")
    if snap.status == "cancelled":
        return ("the loop was cancelled; what it made is kept, and pressing the button again "
                "continues it")
    return error_md(f"the loop failed: {snap.error or 'see its log'}")


__all__ = ["LoopPanel", "TABS_HELP"]
