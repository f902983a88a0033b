"""Generate: sample S images per (prompt, variant) from the base model in a background job, with
progress, ETA and cancel; the latest candidates in a grid."""

from __future__ import annotations

import gradio as gr

from craft.run.config import field_choices, field_help
from studio.context import RunContext
from studio.settings import Settings, UiState, none_as_zero, optional_int
from craft.stages.calls import StageCall
from studio.launcher import stage_job
from studio.ui import (JobPanel, Tab, cancel_message, finished_message, job_buttons,
                       processes_control, start_job, started_message)

LATEST = 32


def latest_candidates(ctx: RunContext, n: int = LATEST) -> list[tuple[str, str]]:
    df = ctx.store.candidates_df(split="train")
    if df.empty:
        return []
    df = df.tail(n).iloc[::-1]
    # the first line fits under a thumbnail; the preview shows the whole caption
    return [(p, f"{'★ original' if v == 0 else f'variant {v}'}\n{text} · seed {s}")
            for p, v, s, text in zip(df["image_path"], df["variant_idx"], df["seed"],
                                     df["variant"])]


def plan_summary(ctx: RunContext) -> str:
    cfg = ctx.cfg
    counts = ctx.counts()
    per_prompt = 1 + cfg.prompts.num_variants
    planned = (counts["prompts"] + counts["variants"]) * cfg.generation.seeds_per_prompt
    text = (f"{counts['prompts']} prompts × (1 original + variants) × S = "
            f"{cfg.generation.seeds_per_prompt} seeds → **{planned}** candidates planned "
            f"(group size (1+V)·S = {per_prompt * cfg.generation.seeds_per_prompt}); "
            f"{counts['candidates']} stored.")
    return text + (f"\n\n{cost_summary(ctx)}" if counts["candidates"] + counts.get("stopped", 0)
                   else "")


def cost_summary(ctx: RunContext) -> str:
    """The pool's denoiser evaluations, in the sentence ``craft generate`` prints."""
    from craft.stages.early_reject import cost_sentence

    cost = ctx.store.generation_cost(ctx.cfg.model.pretrained, "train")
    return "Generation cost: " + cost_sentence(cost) + "."


class GenerateTab(Tab):
    def __init__(self, ctx: RunContext, settings: Settings, ui: UiState):
        cfg = ctx.cfg
        g = cfg.generation
        gr.Markdown("Generate the **candidates**: for every original prompt and each of its "
                    "variants, S images from the base model, all sharing the group's seeds. "
                    "Finished batches are stored as they come, so a cancelled or crashed run "
                    "resumes where it stopped.")
        with gr.Row():
            self.model = settings.bind("model.pretrained", gr.Textbox(
                cfg.model.pretrained, label="model.pretrained (base model)",
                info=field_help("model", "pretrained"), scale=3, elem_id="gen-model"))
            self.device = settings.bind("model.device", gr.Textbox(
                cfg.model.device, label="model.device", info=field_help("model", "device")))
            self.dtype = settings.bind("model.dtype", gr.Dropdown(
                list(field_choices("model", "dtype")), value=cfg.model.dtype, label="model.dtype"))
        with gr.Row():
            self.seeds = settings.bind("generation.seeds_per_prompt", gr.Slider(
                1, 16, value=g.seeds_per_prompt, step=1, label="S: seeds per prompt / variant",
                info=field_help("generation", "seeds_per_prompt"), elem_id="gen-seeds"))
            self.steps = settings.bind("generation.num_inference_steps", gr.Slider(
                1, 100, value=g.num_inference_steps, step=1, label="denoising steps",
                elem_id="gen-steps"))
            self.guidance = settings.bind("generation.guidance_scale", gr.Slider(
                1.0, 15.0, value=g.guidance_scale, step=0.5, label="guidance scale"))
        with gr.Row():
            self.batch = settings.bind("generation.batch_size", gr.Number(
                g.batch_size, precision=0, minimum=1, label="batch size (per device)"))
            self.seed = settings.bind("generation.seed", gr.Number(
                g.seed, precision=0, minimum=0, label="base seed"))
            self.height = settings.bind("generation.height", gr.Number(
                none_as_zero(g.height), precision=0, minimum=0, label="height (0 = native)"),
                to_ui=none_as_zero, from_ui=optional_int)
            self.width = settings.bind("generation.width", gr.Number(
                none_as_zero(g.width), precision=0, minimum=0, label="width (0 = native)"),
                to_ui=none_as_zero, from_ui=optional_int)
        with gr.Row():
            self.scheduler = settings.bind("generation.scheduler", gr.Dropdown(
                list(field_choices("generation", "scheduler")), value=g.scheduler,
                label="sampler", info=field_help("generation", "scheduler"),
                elem_id="gen-scheduler"))
            self.early = settings.bind("generation.early_reject", gr.Checkbox(
                value=g.early_reject, label="early rejection",
                info=field_help("generation", "early_reject"), elem_id="gen-early"))
            self.early_at = settings.bind("generation.early_reject_at", gr.Slider(
                0.05, 0.95, value=g.early_reject_at, step=0.05, label="check at (fraction of "
                "steps)", info=field_help("generation", "early_reject_at")))
            self.early_margin = settings.bind("generation.early_reject_margin", gr.Number(
                g.early_reject_margin, minimum=0, label="safety margin (SD)",
                info=field_help("generation", "early_reject_margin")))
        self.plan = gr.Markdown(elem_id="gen-plan")
        with gr.Row():
            self.processes = ui.bind("generate.processes", processes_control("gen"))
            self.start = gr.Button("Generate", variant="primary", elem_id="gen-start")
            self.cancel = gr.Button("Cancel", variant="secondary", interactive=False,
                                    elem_id="gen-cancel")
        self.message = gr.Markdown(elem_id="gen-message")
        self.panel = JobPanel("generate")
        self.gallery = gr.Gallery(label="Latest candidates", columns=8, height=420,
                                  object_fit="contain", elem_classes=["pixelated"],
                                  elem_id="gen-gallery", allow_preview=True)
        self._shown = None

    def wire(self, app) -> None:
        def on_start(processes):
            ctx = self.ctx
            cfg = ctx.settings_now()
            if ctx.counts()["prompts"] == 0:
                raise ValueError("this run has no prompts yet; add some in the Prompts tab")
            snap = start_job("generate", f"Generate candidates · {ctx.run_dir}", stage_job(
                StageCall("generate"), ctx.run_dir, cfg, processes))
            return (started_message(snap, "generation"), gr.Timer(active=True),
                    plan_summary(ctx),
                    *job_buttons(True))

        buttons = [self.start, self.cancel]
        app.on(self.start.click, on_start, [self.processes],
               [self.message, self.panel.timer, self.plan, *buttons], message=self.message)
        app.on(self.cancel.click, lambda: cancel_message("generate", "generation"), None,
               self.message)

        def tick():
            ctx = self.ctx
            snap = self.jobs.latest("generate")
            out = self.panel.render(snap)
            n = ctx.counts()["candidates"]
            gallery = latest_candidates(ctx) if n != self._shown else gr.skip()
            self._shown = n
            running = snap is not None and snap.running
            timer = gr.skip() if running else gr.Timer(active=False)
            return [*out, gallery, plan_summary(ctx), finished_message(snap), timer,
                    *job_buttons(running)]

        self.panel.on_tick(app, tick, None, [*self.panel.outputs, self.gallery, self.plan,
                                             self.message, self.panel.timer, *buttons])

    @property
    def refresh_outputs(self) -> list:
        return [self.plan, self.gallery, *self.panel.outputs, self.panel.timer, self.start,
                self.cancel]

    def refresh(self) -> list:
        self._shown = self.ctx.counts()["candidates"]
        return [plan_summary(self.ctx), latest_candidates(self.ctx), *self.panel.render(),
                self.panel.keep_polling(), *job_buttons(self.panel.is_running())]


__all__ = ["GenerateTab", "cost_summary", "latest_candidates", "plan_summary"]
