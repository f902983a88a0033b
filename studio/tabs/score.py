"""Score: compute the rewards of every candidate against its original prompt (background job),
then look at their distributions and how they correlate."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pandas as pd

from studio.context import RunContext
from studio.plots import correlation_heatmap, reward_histograms
from studio.settings import Settings, UiState
from craft.stages.calls import StageCall
from studio.launcher import stage_job
from studio.ui import (JobPanel, Tab, cancel_message, finished_message, job_buttons,
                       processes_control, start_job, started_message)


def reward_table(df: pd.DataFrame, rewards: list[str]) -> pd.DataFrame:
    rows = []
    for r in rewards:
        if r not in df:
            continue
        v = df[r].to_numpy(float)
        fin = v[np.isfinite(v)]
        orig = df["variant_idx"].to_numpy() == 0
        rows.append({"reward": r, "scored": int(np.isfinite(v).sum()),
                     "missing / NaN": int((~np.isfinite(v)).sum()),
                     "mean": round(float(fin.mean()), 4) if fin.size else None,
                     "std": round(float(fin.std()), 4) if fin.size else None,
                     "mean (original prompt)": round(float(np.nanmean(v[orig])), 4)
                     if np.isfinite(v[orig]).any() else None,
                     "mean (variants)": round(float(np.nanmean(v[~orig])), 4)
                     if np.isfinite(v[~orig]).any() else None})
    return pd.DataFrame(rows)


def score_views(ctx: RunContext) -> tuple:
    df = ctx.frame()
    rewards = list(dict.fromkeys([*ctx.cfg.rewards.names, *ctx.cfg.rewards.eval_names]))
    rewards = [r for r in rewards if r in df and df[r].notna().any()]
    return reward_table(df, rewards), reward_histograms(df, rewards), correlation_heatmap(
        df, rewards)


class ScoreTab(Tab):
    def __init__(self, ctx: RunContext, settings: Settings, ui: UiState):
        cfg = ctx.cfg
        choices = list(dict.fromkeys([*cfg.rewards.names, *cfg.rewards.eval_names]))
        gr.Markdown("Score every candidate with the reward models, **always against the original "
                    "prompt** (never the variant that generated it). Scores are cached in the run: "
                    "a rerun scores only what is missing. The held-out reward(s) in "
                    "`rewards.eval_names` are not used for selection; scoring them here shows how "
                    "they relate to the training rewards.")
        with gr.Row():
            self.rewards = gr.CheckboxGroup(choices, value=list(cfg.rewards.names),
                                            label="Rewards to compute", elem_id="score-rewards")
            self.force = gr.Checkbox(False, label="re-score everything (ignore cached scores)")
            self.device = settings.bind("rewards.device", gr.Textbox(
                cfg.rewards.device, label="rewards.device"))
            self.batch = settings.bind("rewards.batch_size", gr.Number(
                cfg.rewards.batch_size, precision=0, minimum=1, label="rewards.batch_size"))
        with gr.Row():
            self.processes = ui.bind("score.processes", processes_control("score"))
            self.start = gr.Button("Score", variant="primary", elem_id="score-start")
            self.cancel = gr.Button("Cancel", variant="secondary", interactive=False,
                                    elem_id="score-cancel")
        self.message = gr.Markdown(elem_id="score-message")
        self.panel = JobPanel("score", log_lines=5)
        self.table = gr.Dataframe(label="Rewards", interactive=False, elem_id="score-table")
        self.hists = gr.Plot(label="Per-reward histograms", elem_id="score-hists")
        self.corr = gr.Plot(label="Reward correlation", elem_id="score-corr")

    def wire(self, app) -> None:
        def on_start(names, force, processes):
            ctx = self.ctx
            cfg = ctx.settings_now()
            if not names:
                raise ValueError("tick at least one reward to compute")
            if ctx.counts()["candidates"] == 0:
                raise ValueError("this run has no candidates yet; press Generate on the "
                                 "Generate tab first")
            snap = start_job("score", f"Score candidates · {ctx.run_dir}", stage_job(
                StageCall("score", rewards=tuple(names), force=bool(force)), ctx.run_dir,
                cfg, processes))
            return started_message(snap, "scoring"), gr.Timer(active=True), *job_buttons(True)

        buttons = [self.start, self.cancel]
        app.on(self.start.click, on_start, [self.rewards, self.force, self.processes],
               [self.message, self.panel.timer, *buttons], message=self.message)
        app.on(self.cancel.click, lambda: cancel_message("score", "scoring"), None, self.message)

        def tick():
            snap = self.jobs.latest("score")
            out = self.panel.render(snap)
            if snap is not None and snap.running:
                return [*out, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                        *job_buttons(True)]
            return [*out, *score_views(self.ctx), finished_message(snap), gr.Timer(active=False),
                    *job_buttons(False)]

        self.panel.on_tick(app, tick, None, [*self.panel.outputs, self.table, self.hists,
                                             self.corr, self.message, self.panel.timer,
                                             *buttons])

    @property
    def refresh_outputs(self) -> list:
        return [self.table, self.hists, self.corr, *self.panel.outputs, self.panel.timer,
                self.start, self.cancel]

    def refresh(self) -> list:
        return [*score_views(self.ctx), *self.panel.render(), self.panel.keep_polling(),
                *job_buttons(self.panel.is_running())]


__all__ = ["ScoreTab", "reward_table", "score_views"]
