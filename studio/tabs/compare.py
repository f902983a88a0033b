"""Compare: the base model against a tuned checkpoint on the held-out prompts, same prompts and
same seeds, images side by side with per-reward deltas, a win-rate table and a mean-reward chart.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from craft.run.fsutil import save_image_atomic
from studio.context import RunContext
from studio.plots import empty_figure, mean_reward_bars
from studio.settings import Settings, UiState, none_as_zero, optional_int
from craft.stages.calls import StageCall
from studio.launcher import stage_job
from studio.ui import (JobPanel, Tab, cancel_message, finished_message, job_buttons,
                       processes_control, safe, short_name, start_job,
                       started_message)

MAX_PAIRS = 24
CELL = 128
HEADER, GAP = 22, 8  # pixels above the pair for its labels; between the two images


@functools.lru_cache(maxsize=1)
def _label_font():
    from PIL import ImageFont

    return ImageFont.load_default(size=14)


def checkpoint_choices(ctx: RunContext) -> list[tuple[str, str]]:
    """Tuned models of this run, newest first (what Compare offers first)."""
    from craft.stages.engine import tuned_models

    return [(label, str(path)) for label, path in tuned_models(ctx.run_dir)]


def eval_name(base: str, tuned, cfg) -> str:
    """Deterministic per (models, their files' age, evaluation settings): a rerun reuses the
    images, a retrained checkpoint of the same name gets new ones. ``tuned``: a path or a list
    of paths (a one-element list names the evaluation as the path does)."""
    tuned = [tuned] if isinstance(tuned, str) else list(tuned)
    stamp = [str(Path(p).stat().st_mtime_ns) if Path(p).exists() else ""
             for p in (base, *tuned)]
    key = json.dumps([base, tuned[0] if len(tuned) == 1 else tuned, stamp[:2] if len(tuned) == 1
                      else stamp, cfg.eval.num_prompts, cfg.eval.seeds_per_prompt,
                      cfg.eval.num_inference_steps, cfg.eval.guidance_scale,
                      cfg.generation.seed, list(cfg.rewards.eval_names)])
    label = "+".join(Path(t).parent.name + "-" + Path(t).name for t in tuned)[:80]
    return f"studio-{label}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def win_table(summary: pd.DataFrame, training_rewards=()) -> pd.DataFrame:
    """The per-reward table; held-out rewards (not used for training or filtering) and the
    diversity across seeds are marked, since they are what shows a price of alignment. An
    evaluation of several tuned models (``craft evaluate`` with more than one, a benchmark's)
    gets one block of rows per model, with a model column."""
    if summary is None or summary.empty:
        return pd.DataFrame()
    base = summary[summary["model"] == "base"].set_index("reward")
    models = [m for m in dict.fromkeys(summary["model"]) if m != "base"]
    rows = []
    for model in models:
        tuned = summary[summary["model"] == model].set_index("reward")
        for r in tuned.index:
            if r not in base.index:
                continue
            b, t = base.loc[r], tuned.loc[r]
            name = ("diversity across seeds" if r == "diversity" else
                    f"{r} (held out)" if training_rewards and r != "composite"
                    and r not in training_rewards else r)
            row = {"model": model} if len(models) > 1 else {}
            row.update({"reward": name, "base": f"{b['mean']:.4f} ± {b['se']:.4f}",
                        "tuned": f"{t['mean']:.4f} ± {t['se']:.4f}",
                        "Δ (tuned − base)": f"{t['diff']:+.4f} ± {t['diff_se']:.4f}",
                        "Δ / SE": round(float(t["diff"] / t["diff_se"]), 2)
                        if t["diff_se"] and np.isfinite(t["diff_se"]) and t["diff_se"] > 0
                        else None,
                        "win rate (tuned)": f"{100 * t['win_rate']:.1f}%"})
            rows.append(row)
    return pd.DataFrame(rows)


def tuned_labels_of(scores: pd.DataFrame) -> list[str]:
    """The compared models' labels in an evaluation (all but "base"), in evaluation order."""
    return [m for m in dict.fromkeys(scores["model"]) if m != "base"] or ["tuned"]


def pair_images(scores: pd.DataFrame, out_dir: Path, rewards: list[str],
                limit: int = MAX_PAIRS) -> tuple[list[tuple[str, str]], pd.DataFrame]:
    """One PNG per (prompt, seed): base | each tuned model, upscaled without smoothing, and a
    caption with the per-reward deltas (of each model against the base); plus the deltas table
    for every pair (one row per model when there are several)."""
    labels = tuned_labels_of(scores)
    base = scores[scores["model"] == "base"].set_index(["prompt", "seed"])
    tuned = {m: scores[scores["model"] == m].set_index(["prompt", "seed"]) for m in labels}
    keys = [k for k in base.index if all(k in t.index for t in tuned.values())]
    rows, items = [], []
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha1("|".join(labels).encode()).hexdigest()[:6]  # a sheet per model set
    for i, key in enumerate(keys):
        b = base.loc[key]
        deltas = {m: {r: float(t.loc[key][r]) - float(b[r]) for r in rewards if r in b}
                  for m, t in tuned.items()}
        for m, d in deltas.items():
            rows.append({**({"model": m} if len(labels) > 1 else {}), "prompt": key[0],
                         "seed": key[1], **{f"Δ {short_name(r)}": round(v, 3)
                                            for r, v in d.items()}})
        if i >= limit:
            continue
        path = out_dir / f"pair4-{tag}-{i:04d}.png"
        if not path.exists():
            cols = [("base", b["image_path"])] + [(m, tuned[m].loc[key]["image_path"])
                                                  for m in labels]
            sheet = Image.new("RGB", (len(cols) * CELL + (len(cols) - 1) * GAP, HEADER + CELL),
                              "white")
            d = ImageDraw.Draw(sheet)
            for k, (text, img_path) in enumerate(cols):
                x = k * (CELL + GAP)
                with Image.open(img_path) as im:
                    sheet.paste(im.convert("RGB").resize((CELL, CELL), Image.NEAREST),
                                (x, HEADER))
                d.text((x + CELL / 2, HEADER / 2), text[:18], fill="black",
                       font=_label_font(), anchor="mm")
            save_image_atomic(sheet, path, fsync=False)
        text = "\n".join((f"{m}: " if len(labels) > 1 else "")
                         + " ".join(f"Δ{short_name(r)} {v:+.2f}" for r, v in dd.items())
                         for m, dd in deltas.items())
        items.append((str(path), f"{key[0]} · seed {key[1]}\n{text}"))
    return items, pd.DataFrame(rows)


def evaluation_choices(ctx: RunContext) -> list[tuple[str, int]]:
    ev = ctx.store.evaluations_df()
    out = []
    for r in list(ev.itertuples())[::-1]:
        try:  # several models: their labels, all of them
            models = json.loads(r.tuned_model)
            names = ", ".join(models) if isinstance(models, dict) else str(models)
        except (ValueError, TypeError):
            names = f"{Path(r.tuned_model).parent.name}/{Path(r.tuned_model).name}"
        out.append((f"#{r.id} {names}", int(r.id)))
    return out


def load_evaluation(ctx: RunContext, evaluation_id: int):
    ev = ctx.store.evaluations_df()
    row = ev[ev["id"] == evaluation_id]
    if row.empty:
        raise ValueError(f"no evaluation #{evaluation_id}")
    row = row.iloc[0]
    results = json.loads(row["results_json"])
    summary = pd.DataFrame(results["summary"])
    scores_csv = Path(results["scores_csv"])
    scores = pd.read_csv(scores_csv) if scores_csv.exists() else None
    return row, summary, scores, scores_csv.parent


def evaluation_views(ctx: RunContext, evaluation_id):
    if evaluation_id is None:
        return ("No evaluation yet: choose a checkpoint and press Compare.", [], pd.DataFrame(),
                empty_figure("no evaluation yet"), pd.DataFrame())
    row, summary, scores, folder = load_evaluation(ctx, int(evaluation_id))
    rewards = [r for r in summary["reward"].unique() if r != "composite"]
    if scores is not None:
        items, deltas = pair_images(scores, folder / "pairs", rewards)
    else:
        items, deltas = [], pd.DataFrame()
    settings = json.loads(row["settings_json"])
    results = json.loads(row["results_json"])
    head = (f"**Evaluation #{row['id']}** · base `{row['base_model']}` vs tuned "
            f"`{', '.join(json.loads(row['tuned_model']).values())}` · "
            f"{settings.get('prompts')} held-out prompts × {settings.get('seeds_per_prompt')} "
            f"seeds (same seeds for both)")
    if results.get("diversity_metric"):
        head += (f"<br>Diversity across seeds = {_md(results['diversity_metric'])} between the "
                 "images of one prompt, mean over prompts (higher = more varied; its win rate "
                 "= share of prompts more varied than the base).")
    cov = results.get("coverage")
    if cov:
        head += (f"<br>Kept set of {_md(cov.get('training_run', 'the tuned model'))}: "
                 f"{cov['kept']} images from {cov['prompts']} prompts, at most "
                 f"{cov['largest']} ({100 * cov['largest_share']:.0f} %) from one.")
    for w in results.get("warnings") or []:
        head += f"<br><span class='drift-warning'>⚠ {_md(w)}</span>"
    raw = summary[~summary["reward"].isin(["composite", "diversity"])]  # own scales
    n_models = 1 + len(tuned_labels_of(scores)) if scores is not None else 2
    sheets = gr.Gallery(value=items, columns=3 if n_models <= 2 else 2 if n_models <= 4 else 1)
    return (head, sheets, win_table(summary, list(ctx.cfg.rewards.names)),
            mean_reward_bars(raw), deltas)


def _md(text: str) -> str:
    import html

    return html.escape(str(text), quote=False)


BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
REPORTS = (("toy_ablation.md", "The paper's ablations in the toy world (levels, K, weighting)"),
           ("toy_pareto.md", "The price of alignment: gain against diversity, per control"),
           ("toy_rounds.md", "Online CRAFT: two rounds against one"),
           ("toy_methods.md", "CRAFT against SFT, Diffusion-DPO and online GRPO, with costs"))


def reports_markdown() -> list[tuple[str, str]]:
    """The recorded benchmark reports that ship with the project (title, Markdown)."""
    out = []
    for fname, title in REPORTS:
        p = BENCHMARKS / fname
        if p.is_file():
            text = p.read_text()
            out.append((title, text.split("\n", 1)[1] if text.startswith("# ") else text))
    return out


class CompareTab(Tab):
    def __init__(self, ctx: RunContext, settings: Settings, ui: UiState):
        e = ctx.cfg.eval
        gr.Markdown("Compare the base model with a tuned checkpoint on the **held-out prompts**, "
                    "with the **same seeds** for both, so each image pair differs only by the "
                    "fine-tune. The held-out reward(s) were never used for selection.")
        with gr.Row():
            self.base = gr.Textbox(ctx.model_path(), label="base model", scale=2,
                                   elem_id="compare-base")
            # The choices arrive after the page loads, the remembered selection with the page
            # state: a custom value keeps the two from racing (Compare checks the path itself).
            self.tuned = ui.bind("compare.tuned", gr.Dropdown(
                [], label="tuned model(s): several methods side by side on the same seeds",
                scale=2, elem_id="compare-tuned", allow_custom_value=True, multiselect=True))
            self.refresh_btn = gr.Button("↻", scale=0, min_width=40, size="sm")
        with gr.Row():
            self.n_prompts = settings.bind("eval.num_prompts", gr.Number(
                none_as_zero(e.num_prompts), precision=0, minimum=0,
                label="held-out prompts (0 = all)", elem_id="compare-prompts"),
                to_ui=none_as_zero, from_ui=optional_int)
            self.n_seeds = settings.bind("eval.seeds_per_prompt", gr.Number(
                e.seeds_per_prompt, precision=0, minimum=1, label="seeds per prompt",
                elem_id="compare-seeds"))
            self.steps = settings.bind("eval.num_inference_steps", gr.Number(
                e.num_inference_steps, precision=0, minimum=1, label="denoising steps",
                elem_id="compare-steps"))
            self.guidance = settings.bind("eval.guidance_scale", gr.Number(
                e.guidance_scale, label="guidance scale"))
        with gr.Row():
            self.processes = ui.bind("compare.processes", processes_control("compare"))
            self.start = gr.Button("Compare", variant="primary", elem_id="compare-start")
            self.cancel = gr.Button("Cancel", variant="secondary", interactive=False,
                                    elem_id="compare-cancel")
            self.past = gr.Dropdown([], label="show evaluation", elem_id="compare-past", scale=2)
        self.message = gr.Markdown(elem_id="compare-message")
        self.panel = JobPanel("compare", log_lines=4)
        self.head = gr.Markdown(elem_id="compare-head")
        self.wins = gr.Dataframe(label="Per-reward means, paired differences and win rates "
                                       "(composite: z-scored over both models' images)",
                                 interactive=False, elem_id="compare-wins")
        with gr.Row():
            self.bars = gr.Plot(label="Mean reward", elem_id="compare-bars", scale=2)
            self.pairs = gr.Gallery(label="Same prompt, same seed: the base, then each tuned "
                                          "model (left to right)",
                                    columns=3, height=520, object_fit="contain",
                                    elem_classes=["pixelated"], elem_id="compare-pairs", scale=3)
        self.deltas = gr.Dataframe(label="Per-pair reward deltas (tuned − base)",
                                   interactive=False, max_height=300, elem_id="compare-deltas")
        reports = reports_markdown()
        if reports:
            with gr.Accordion("Recorded benchmarks: ablations, the price of alignment, online "
                              "rounds, the baselines (benchmarks/)", open=False,
                              elem_id="compare-reports"):
                for title, text in reports:
                    with gr.Accordion(title, open=False):
                        gr.Markdown(text, elem_classes=["report"])

    def wire(self, app) -> None:
        views = [self.head, self.pairs, self.wins, self.bars, self.deltas]
        buttons = [self.start, self.cancel]

        def on_start(base, tuned, processes):
            from craft.run.config import resolve_path

            ctx = self.ctx
            tuned = [tuned] if isinstance(tuned, str) else list(tuned or [])
            if not tuned:
                raise ValueError("choose a tuned model (train one in the Train tab)")
            for t in tuned:
                if not Path(t).exists():
                    raise ValueError(f"tuned model {t} is not there any more; pick one from "
                                     "the list (↻ refreshes it)")
            if not base:
                raise ValueError("give the base model")
            cfg = ctx.settings_now()
            base_path = str(resolve_path(base) or base)
            name = eval_name(base_path, tuned, cfg)
            snap = start_job("compare", f"Compare base vs {len(tuned)} tuned · {ctx.run_dir}",
                             stage_job(StageCall("evaluate", name=name, tuned=tuple(tuned) if
                                                 len(tuned) > 1 else tuned[0], base=base_path),
                                       ctx.run_dir, cfg, processes))
            return (started_message(snap, "evaluation"), gr.Timer(active=True),
                    *job_buttons(True))

        app.on(self.start.click, on_start, [self.base, self.tuned, self.processes],
               [self.message, self.panel.timer, *buttons], message=self.message)
        app.on(self.cancel.click, lambda: cancel_message("compare", "evaluation"), None,
               self.message)

        def tick():
            ctx = self.ctx
            snap = self.jobs.latest("compare")
            out = self.panel.render(snap)
            if snap is None or snap.running:
                return [*out, gr.skip(), *[gr.skip()] * len(views), gr.skip(), gr.skip(),
                        *job_buttons(snap is not None)]
            done = [finished_message(snap), gr.Timer(active=False), *job_buttons(False)]
            if snap.status == "done" and snap.result and \
                    snap.info.get("run_dir") in (None, str(ctx.run_dir)):
                eid = snap.result["evaluation_id"]
                return [*out, gr.update(choices=evaluation_choices(ctx), value=eid),
                        *evaluation_views(ctx, eid), *done]
            return [*out, gr.skip(), *[gr.skip()] * len(views), *done]

        self.panel.on_tick(app, tick, None, [*self.panel.outputs, self.past, *views,
                                             self.message, self.panel.timer, *buttons])

        app.on(self.past.input, lambda eid: evaluation_views(self.ctx, eid), self.past, views,
               message=self.head)
        app.on(self.refresh_btn.click, lambda: gr.update(choices=checkpoint_choices(self.ctx)),
               None, self.tuned)

    @property
    def refresh_inputs(self) -> list:
        return [self.tuned]

    @property
    def refresh_outputs(self) -> list:
        return [self.base, self.tuned, self.n_prompts, self.past, self.head, self.pairs,
                self.wins, self.bars, self.deltas, *self.panel.outputs, self.panel.timer,
                self.start, self.cancel]

    def refresh(self, tuned=None) -> list:
        ctx = self.ctx
        ckpts = checkpoint_choices(ctx)
        paths = [p for _, p in ckpts]
        evals = evaluation_choices(ctx)
        eid = evals[0][1] if evals else None
        views = safe(evaluation_views, 5)(ctx, eid)
        held = ctx.counts()["eval_prompts"]
        wanted = ctx.cfg.eval.num_prompts
        note = (f"this run has {held} held-out prompts" + (
            f"; {wanted} asked, so all {held} are used" if wanted and wanted > held else ""))
        return [ctx.model_path(),
                gr.update(choices=ckpts, value=_kept_choice(tuned, paths)),
                gr.update(info=note), gr.update(choices=evals, value=eid), *views,
                *self.panel.render(), self.panel.keep_polling(),
                *job_buttons(self.panel.is_running())]


def _kept_choice(tuned, paths: list[str]) -> list[str]:
    """The models a page had chosen that still exist, else the newest one."""
    chosen = [tuned] if isinstance(tuned, str) else list(tuned or [])
    chosen = [t for t in chosen if t in paths]
    return chosen or paths[:1]


__all__ = ["CompareTab", "checkpoint_choices", "pair_images", "win_table"]
