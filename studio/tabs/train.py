"""Train: advantage-weighted fine-tuning on the kept set, in a background job (a thread of the
studio, or ``accelerate launch`` on several processes), with a live loss curve, step / ETA,
fixed-seed previews, cancel (stops within one step and leaves a loadable checkpoint) and resume.
A finished run is published as RUN/final, as ``craft train`` does."""

from __future__ import annotations

import json

import gradio as gr
import pandas as pd

from craft.methods.registry import get_method
from craft.run.config import config_from_dict, field_choices, field_help
from studio.context import RunContext
from studio.plots import loss_curve
from studio.settings import Settings, UiState, lines_to_list, list_to_lines
from craft.run.layout import preview_dirs, train_dir
from craft.stages.engine import check_run_name, round_name, round_number
from craft.stages.calls import StageCall
from studio.launcher import stage_job
from studio.ui import (JobPanel, Tab, cancel_message, error_md, finished_message, job_buttons,
                       ok_md, processes_control, start_job, started_message)


RESUME_HINT = ("“Resume” (below) continues it from its last checkpoint; “Start training” "
               "starts a new run")
RUN_COLUMNS = ["id", "name", "round", "status", "started", "steps", "last loss", "kept",
               "selection", "processes", "checkpoint", "trackers", "error"]


def selection_summary(settings: dict) -> str:
    """What a training run's recorded selection was, in one line (its method says it)."""
    if not settings:
        return ""
    return get_method(settings.get("method", "craft")).describe(settings)


def runs_table(ctx: RunContext) -> pd.DataFrame:
    """One row per training run: status, progress, and the selection it trained on."""
    runs = ctx.store.train_runs_df()
    if runs.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    selections = ctx.store.selections_df().set_index("id")
    rows = []
    for r in runs.itertuples():
        m = ctx.store.metrics_df(int(r.id))
        sel = {}
        kept = None
        if getattr(r, "selection_id", None) is not None and not pd.isna(r.selection_id) \
                and int(r.selection_id) in selections.index:
            row = selections.loc[int(r.selection_id)]
            sel, kept = json.loads(row["settings_json"]), int(row["num_items"])
        rows.append({"id": r.id, "name": r.name, "round": round_number(r.name), "status": r.status,
                     "started": pd.Timestamp(r.started, unit="s").strftime("%H:%M:%S"),
                     "steps": int(m["step"].max()) if not m.empty else 0,
                     "last loss": round(float(m["loss"].iloc[-1]), 5) if not m.empty else None,
                     "kept": kept, "selection": selection_summary(sel),
                     "processes": sel.get("processes"),
                     "checkpoint": r.checkpoint_dir or "", "trackers": tracker_hint(ctx, r.name),
                     "error": (r.error or "")[:200]})
    return pd.DataFrame(rows, columns=RUN_COLUMNS).iloc[::-1]


def tracker_hint(ctx: RunContext, name: str) -> str:
    """Where a run's tracker files are and how to open them (train.report_to), or ""."""
    from craft.methods.trackers import FOLDER

    folder = train_dir(ctx.run_dir, name) / FOLDER
    parts = []
    if (folder / "tensorboard").is_dir():
        parts.append(f"tensorboard --logdir {folder / 'tensorboard'}")
    if (folder / "wandb").is_dir():
        parts.append(f"wandb sync {folder / 'wandb' / 'wandb'}/offline-run-*")
    return "; ".join(parts)


def will_train(ctx: RunContext, cfg=None) -> str:
    """What Start will train on, said by its method from the one selection
    (craft.stages.selection.select): the kept set of the run's current Curate settings, the
    pairs of the pool, or the groups it will sample. ``cfg``: the page's settings as they are
    being typed (default: the run's)."""
    from craft import CraftError
    from craft.stages.selection import select

    cfg = cfg or ctx.cfg
    method = get_method(cfg.train.method)
    try:
        selection = select(ctx.store, cfg)
    except (CraftError, ValueError) as e:
        from studio.wording import for_page

        return f"Start needs {method.data_label} first: {for_page(str(e))}"
    if selection.rows.empty:
        return (f"Start needs {method.data_label} first: the current settings select nothing; "
                f"loosen the filter in Curate")
    return method.will_train_on(selection, cfg)


def check_trainable(ctx: RunContext, cfg) -> None:
    """Refuse Start before any job, with the reason, when the method has nothing to train on
    with the run's settings (the job would fail with craft.stages.train_stage's "nothing to
    train on" after loading the model): no scored pool, or a kept set / pairs / prompts that
    the current settings leave empty."""
    from craft import CraftError
    from craft.stages.selection import select

    method = get_method(cfg.train.method)
    try:
        selection = select(ctx.store, cfg)
    except (CraftError, ValueError) as e:
        raise ValueError(f"nothing to train on yet: {e}") from None
    if selection.rows.empty:
        kept = "" if selection.result is None else \
            f" (Curate keeps {selection.result.counts.kept} images)"
        raise ValueError(
            f"nothing to train on: {method.name} needs {method.data_label}, and the current "
            f"settings select none{kept}; loosen the filter on the Curate tab (a lower "
            "margin, a weaker level, a larger top-K) and press Start again")


# the settings a training run's time depends on (craft.stages.estimate)
ESTIMATE_KEYS = ("train.method", "train.steps", "train.effective_batch", "model.device",
                 "model.pretrained", "grpo.prompts_per_step", "grpo.group_size",
                 "grpo.num_inference_steps", "grpo.updates")


def train_estimate(ctx: RunContext, cfg=None) -> str:
    """The Train tab's line near Start: the run's estimated time on this device and its basis
    (craft.stages.estimate), or that there is none yet."""
    from craft.stages.estimate import estimate_train_time

    try:
        return estimate_train_time(ctx.store, cfg or ctx.cfg).text()
    except Exception as e:  # noqa: BLE001 - an estimate must never break the tab
        return f"no time estimate ({type(e).__name__}: {e})"


def method_boxes(method: str) -> list:
    """The Train tab's boxes of method settings, the method's own shown (dpo, then grpo)."""
    section = get_method(method).settings_section
    return [gr.update(visible=section == box) for box in METHOD_BOXES]


METHOD_BOXES = ("dpo", "grpo")  # config sections with a box of their own, in layout order


def run_names(ctx: RunContext) -> list[str]:
    runs = ctx.store.train_runs_df()
    return list(dict.fromkeys(runs["name"].tolist()[::-1])) if not runs.empty else []


def resumable(ctx: RunContext) -> list[str]:
    """Runs that did not finish (cancelled, failed, killed): each continues from its last
    checkpoint, or from step 0 when it has none."""
    runs = ctx.store.train_runs_df()
    if runs.empty:
        return []
    last = runs.groupby("name").tail(1)
    return [r.name for r in list(last.itertuples())[::-1] if r.status in ("cancelled", "failed")]


def next_name(ctx: RunContext, taken: tuple[str, ...] = (), method: str | None = None) -> str:
    """The first free METHOD-N, METHOD the run's training method unless given (``taken``:
    names just started, not yet recorded), so a list of runs says which method made each."""
    prefix = method or ctx.cfg.train.method
    names = set(run_names(ctx)) | set(taken)
    k = 1
    while f"{prefix}-{k}" in names or train_dir(ctx.run_dir, f"{prefix}-{k}").exists():
        k += 1
    return f"{prefix}-{k}"


def is_suggested_name(name: str) -> bool:
    """A name the page suggested (METHOD-N), which a method change may replace; a name the
    user typed is never replaced."""
    from craft.run.choices import TRAIN_METHODS

    head, _, k = (name or "").rpartition("-")
    return head in TRAIN_METHODS and k.isdigit()


def metrics_for(ctx: RunContext, name: str) -> pd.DataFrame:
    """Every logged step of every (resumed) run of ``name``; a re-logged step keeps the latest."""
    runs = ctx.store.train_runs_df()
    if runs.empty or not name:
        return pd.DataFrame()
    frames = [ctx.store.metrics_df(int(i)) for i in runs.loc[runs["name"] == name, "id"]]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames).drop_duplicates("step", keep="last").sort_values("step")


def previews_for(ctx: RunContext, name: str, prompts: list[str]) -> list[tuple[str, str]]:
    """The first and the latest preview sets of a run (same prompts and seeds)."""
    steps = [(s, d) for s, d in preview_dirs(train_dir(ctx.run_dir, name)) if any(d.glob("*.png"))]
    if not steps:
        return []
    chosen = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    items = []
    for step, d in chosen:
        files = sorted(d.glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)
        for i, f in enumerate(files):
            text = prompts[i] if i < len(prompts) else f"preview {i}"
            items.append((str(f), f"step {step} · seed {i} · {text}"))
    return items


TRAINED_ON_SHOWN = 24  # images in the "what it trains on" gallery


def trained_on(ctx: RunContext, name: str) -> list[tuple[str, str]]:
    """(image, caption) of what run ``name`` trains on: DPO's recorded pairs side by side, or
    the images GRPO sampled (newest round first) with their composite rewards."""
    from craft.stages.train_stage import sampled_model_key

    runs = ctx.store.train_runs_df()
    rows = runs[runs["name"] == name] if not runs.empty else runs
    if rows.empty or pd.isna(rows.iloc[-1].get("selection_id")):
        return []
    sel = ctx.store.selection_settings(int(rows.iloc[-1]["selection_id"]))
    data = get_method(sel.get("method", "craft")).data
    if data == "pairs":
        paths = ctx.store.candidates_df().set_index("id")["image_path"]
        out = []
        for k, (w, lo) in enumerate(sel.get("pairs", [])[:TRAINED_ON_SHOWN // 2]):
            out += [(paths.get(w), f"pair {k + 1}: winner #{w}"),
                    (paths.get(lo), f"pair {k + 1}: loser #{lo}")]
        return [(p, c) for p, c in out if p is not None]
    if data == "prompts":
        c = ctx.store.candidates_df(model=sampled_model_key(name))
        if c.empty:
            return []
        c = c.assign(round=[json.loads(p).get("round", 0) for p in c["params_json"]])
        c = c.sort_values(["round", "id"], ascending=[False, True]).head(TRAINED_ON_SHOWN)
        return [(r.image_path, f"round {r.round}: {r.prompt}") for r in c.itertuples()]
    return []


def stored_config(ctx: RunContext, name: str):
    runs = ctx.store.train_runs_df()
    rows = runs[runs["name"] == name]
    if rows.empty:
        raise ValueError(f"no training run named {name!r}")
    return config_from_dict(json.loads(rows.iloc[-1]["config_json"]), f"training run {name}")


class TrainTab(Tab):
    def __init__(self, ctx: RunContext, settings: Settings, ui: UiState):
        t = ctx.cfg.train
        a = ctx.cfg.advantage
        from craft.models.families import FLOW_FAMILIES

        flow = ctx.cfg.model.family in FLOW_FAMILIES
        what = ("the flow transformer (flow-matching loss on the velocity ε − x₀)" if flow
                else "the denoiser (UNet, or a flow transformer)"
                if ctx.cfg.model.family == "auto" else "the UNet")
        gr.Markdown(f"Fine-tune {what} on the **kept set** (Curate tab) with each image's loss "
                    "weighted by its group advantage (CRAFT); conditioning is the original "
                    "prompt. The other methods are the paper's baselines on the same pool: SFT "
                    "(the kept set, weight 1), Diffusion-DPO (winner / loser pairs of each "
                    "prompt's group) and online GRPO (samples and scores its own groups while "
                    "it trains). Training runs in the background: every other tab stays usable.")
        self.method = settings.bind("train.method", gr.Radio(
            list(field_choices("train", "method")), value=t.method, label="method",
            info=field_help("train", "method"), elem_id="train-method"))
        with gr.Row(equal_height=True):
            from craft.run.recipes import recipes_for

            self.recipe = gr.Dropdown(
                list(recipes_for(ctx.cfg)), value=None, elem_id="train-recipe", scale=3,
                label="recipe: a method as its authors run it (a shipped config)",
                info="Apply sets the training settings below (train, grpo, dpo) to the "
                     "config's, saved like any setting; the prompts, pool and filter stay.")
            self.recipe_btn = gr.Button("Apply recipe", elem_id="train-recipe-apply", scale=1)
        self.recipe_message = gr.Markdown(elem_id="train-recipe-message")
        self._method_settings(ctx, settings)
        with gr.Row():
            self.steps = settings.bind("train.steps", gr.Number(
                t.steps, precision=0, minimum=1, label="steps", info=field_help("train", "steps"),
                elem_id="train-steps"))
            self.lr = settings.bind("train.lr", gr.Number(t.lr, label="learning rate",
                                                          elem_id="train-lr"))
            self.eff = settings.bind("train.effective_batch", gr.Number(
                t.effective_batch, precision=0, minimum=1, label="effective batch",
                info=field_help("train", "effective_batch"), elem_id="train-effective-batch"))
            self.micro = settings.bind("train.micro_batch", gr.Number(
                t.micro_batch, precision=0, minimum=1, label="micro batch (per device)",
                elem_id="train-micro-batch"))
        with gr.Row():
            self.adv_mode = settings.bind("advantage.mode", gr.Dropdown(
                list(field_choices("advantage", "mode")), value=a.mode, label="advantage → weight",
                info=field_help("advantage", "mode")))
            self.tau = settings.bind("advantage.tau", gr.Number(a.tau, label="softmax τ"))
            self.anchor = settings.bind("train.anchor_weight", gr.Number(
                t.anchor_weight, minimum=0, label="anchor to the base (β, 0 = off)",
                info=field_help("train", "anchor_weight"), elem_id="train-anchor"))
            self.rounds = settings.bind("train.rounds", gr.Number(
                t.rounds, precision=0, minimum=1, label="rounds (online CRAFT)",
                info=field_help("train", "rounds"), elem_id="train-rounds"))
        with gr.Row():
            self.tw = settings.bind("train.timestep_weighting", gr.Dropdown(
                list(field_choices("train", "timestep_weighting")), value=t.timestep_weighting,
                label="w(t)", info=field_help("train", "timestep_weighting")))
            self.cond = settings.bind("train.conditioning", gr.Dropdown(
                list(field_choices("train", "conditioning")), value=t.conditioning,
                label="conditioning", info=field_help("train", "conditioning")))
        with gr.Accordion("More hyper-parameters", open=False):
            with gr.Row():
                self.dropout = settings.bind("train.cond_dropout", gr.Slider(
                    0.0, 0.5, value=t.cond_dropout, step=0.01, label="prompt dropout"))
                self.ema = settings.bind("train.ema_decay", gr.Slider(
                    0.0, 0.999, value=t.ema_decay, step=0.001, label="EMA decay"))
                self.wd = settings.bind("train.weight_decay", gr.Number(
                    t.weight_decay, label="weight decay"))
                self.clip = settings.bind("train.max_grad_norm", gr.Number(
                    t.max_grad_norm, label="max grad norm"))
            with gr.Row():
                self.lora = settings.bind("train.lora", gr.Checkbox(t.lora, label="LoRA"))
                self.rank = settings.bind("train.lora_rank", gr.Number(
                    t.lora_rank, precision=0, minimum=1, label="LoRA rank"))
                self.ckpt = settings.bind("train.checkpoint_every", gr.Number(
                    t.checkpoint_every, precision=0, minimum=0, label="checkpoint every N steps",
                    elem_id="train-checkpoint-every"))
                self.prev = settings.bind("train.preview_every", gr.Number(
                    t.preview_every, precision=0, minimum=0, label="preview every N steps",
                    elem_id="train-preview-every"))
                self.seed = settings.bind("train.seed", gr.Number(t.seed, precision=0,
                                                                  label="seed"))
                self.mp = settings.bind("train.mixed_precision", gr.Dropdown(
                    list(field_choices("train", "mixed_precision")), value=t.mixed_precision,
                    label="mixed precision"))
            self.preview_prompts = settings.bind("train.preview_prompts", gr.Textbox(
                list_to_lines(t.preview_prompts), lines=4,
                label="preview prompts (one per line; fixed seeds 0, 1, 2, …)"),
                to_ui=list_to_lines, from_ui=lines_to_list)
        self.will_train = gr.Markdown(elem_id="train-will")
        with gr.Row():
            self.name = ui.bind("train.name", gr.Textbox(
                "craft-1", label="run name", elem_id="train-name", scale=2))
            self.processes = ui.bind("train.processes", processes_control("train"))
            self.start = gr.Button("Start training", variant="primary", elem_id="train-start")
            self.cancel = gr.Button("Cancel", variant="secondary", interactive=False,
                                    elem_id="train-cancel")
        # how long Start would take on this device, from this run's earlier measured steps
        self.estimate = gr.Markdown(train_estimate(ctx), elem_id="train-estimate")
        with gr.Row():
            self.resume_name = gr.Dropdown([], label="resume a cancelled / failed run",
                                           elem_id="train-resume-name", scale=2)
            self.resume = gr.Button("Resume", elem_id="train-resume")
        self.message = gr.Markdown(elem_id="train-message")
        self.panel = JobPanel("train", log_lines=6)
        with gr.Row():
            self.view = gr.Dropdown([], label="show run", elem_id="train-view", scale=1)
        with gr.Row():
            self.loss = gr.Plot(label="Loss", elem_id="train-loss")
            self.previews = gr.Gallery(label="Fixed-seed previews: first and latest", columns=4,
                                       height=360, object_fit="contain",
                                       elem_classes=["pixelated"], elem_id="train-previews")
        self.trained_on = gr.Gallery(
            label="What the run trains on: DPO's pairs (winner, then loser) or the groups GRPO "
                  "sampled so far (newest round first); CRAFT / SFT: the kept set (Curate)",
            columns=6, height=300, object_fit="contain", elem_classes=["pixelated"],
            elem_id="train-trained-on")
        self.runs = gr.Dataframe(label="Training runs", interactive=False, max_height=260,
                                 elem_id="train-runs")
        self._preview_key = None

    def _method_settings(self, ctx: RunContext, settings: Settings) -> None:
        """DPO's and GRPO's own settings, shown for their method only."""
        d, g = ctx.cfg.dpo, ctx.cfg.grpo
        dpo_shown, grpo_shown = (u["visible"] for u in method_boxes(ctx.cfg.train.method))
        self.settings = settings
        self._method_keys = ["dpo.pairs", "dpo.beta", "dpo.margin", "dpo.max_pairs",
                             *(f"grpo.{k}" for k in ("prompts_per_step", "group_size",
                                                      "num_inference_steps", "updates",
                                                      "clip_range", "kl_weight", "eta",
                                                      "noise_level"))]
        with gr.Group(visible=dpo_shown, elem_id="train-dpo") as self.dpo_box:
            with gr.Row():
                self.dpo_pairs = settings.bind("dpo.pairs", gr.Dropdown(
                    list(field_choices("dpo", "pairs")), value=d.pairs, label="DPO pairs",
                    info=field_help("dpo", "pairs"), elem_id="train-dpo-pairs"))
                self.dpo_beta = settings.bind("dpo.beta", gr.Number(
                    d.beta, minimum=0, label="β", info=field_help("dpo", "beta"),
                    elem_id="train-dpo-beta"))
                self.dpo_margin = settings.bind("dpo.margin", gr.Number(
                    d.margin, minimum=0, label="composite margin",
                    info=field_help("dpo", "margin")))
                self.dpo_max = settings.bind("dpo.max_pairs", gr.Number(
                    d.max_pairs or 0, precision=0, minimum=0, label="at most N pairs (0 = all)"),
                    to_ui=lambda v: v or 0, from_ui=lambda v: int(v or 0) or None)
        with gr.Group(visible=grpo_shown, elem_id="train-grpo") as self.grpo_box:
            with gr.Row():
                binds = [("prompts_per_step", "prompts per round", 0),
                         ("group_size", "group size (images per prompt)", 0),
                         ("num_inference_steps", "sampler steps", 0),
                         ("updates", "updates per round", 0),
                         ("clip_range", "clip range ε", None), ("kl_weight", "KL to the base", None),
                         ("eta", "DDIM η (UNets)", None), ("noise_level", "SDE noise (flow)", None)]
                for key, label, precision in binds:
                    settings.bind(f"grpo.{key}", gr.Number(
                        getattr(g, key), precision=precision, minimum=0, label=label,
                        info=field_help("grpo", key), elem_id=f"train-grpo-{key.replace('_', '-')}"))

    # ------------------------------------------------------------------ jobs

    def _start(self, cfg, name: str, resume: bool, processes: int) -> str:
        """Train (and publish) as ``craft train`` does: the same call (craft.stages.calls), in
        this studio or on several processes."""
        ctx = self.ctx
        rounds = cfg.train.rounds
        shown = round_name(name, rounds, rounds)  # the run the loss curve follows at the end
        call = StageCall("train", name=name, resume=None if rounds > 1 else resume)
        fn = stage_job(call, ctx.run_dir, cfg, processes)
        start_job("train", f"{'Resume' if resume else 'Train'} {name}"
                  + (f" ({rounds} rounds)" if rounds > 1 else "")
                  + (f" ({int(processes)} processes)" if int(processes or 1) > 1 else "")
                  + f" · {ctx.run_dir}", fn,
                  info={"name": shown if int(processes or 1) > 1 else round_name(
                      name, 1, rounds)})
        return name

    def wire(self, app) -> None:
        buttons = [self.start, self.cancel]
        self._wire_settings(app)
        self._wire_recipe(app)
        self._wire_jobs(app, buttons)
        self._wire_progress(app, buttons)
        self._wire_estimate(app)

    def _wire_estimate(self, app) -> None:
        """The run's estimated time near Start, for the settings on the page: when a setting it
        depends on changes, when a tab is opened, and as a training job goes (its measured
        steps are the next estimate's basis)."""
        keys = [k for k in ESTIMATE_KEYS if k in {b.key for b in self.settings.bindings}]
        fields = [self.settings.component(k) for k in keys]

        def on_estimate(*values):
            from craft.run.config import ConfigError

            cfg = self.ctx.cfg
            try:
                for key, value in zip(keys, values):
                    cfg = self.settings.config_with(cfg, key, value)
            except (ConfigError, ValueError, TypeError):
                return gr.skip()  # a half-typed value: its box says what is wrong
            return train_estimate(self.ctx, cfg)

        quiet = dict(show_progress="hidden")
        for field in fields:
            app.on(field.input, on_estimate, fields, self.estimate, **quiet)
        app.on(app.tabset.select, on_estimate, fields, self.estimate, **quiet)
        app.on(self.panel.timer.tick, on_estimate, fields, self.estimate, **quiet)

    def apply_recipe(self, label, seen, notice):
        """Set the chosen recipe's training settings (craft.run.recipes): the fields with a
        control on this page as if typed there (studio.settings_sync.apply: not over another
        window's change), the others directly; the page's controls then show the run's."""
        from craft.run.config import config_from_dict, config_to_dict
        from craft.run.recipes import recipe_changes, recipes_for
        from studio.settings_sync import apply, notice_after, settings_text, value_of

        ctx, settings = self.ctx, self.settings
        recipes = recipes_for(ctx.cfg)
        if label not in recipes:
            raise ValueError(f"choose a recipe first (this run's model {ctx.cfg.model.pretrained!r}"
                             f" has: {', '.join(recipes) or 'none shipped'})")
        changes = recipe_changes(recipes[label], ctx.cfg)
        bound = {b.key: b for b in settings.bindings}
        out = apply(ctx, settings, {k: bound[k].to_ui(v) for k, v in changes.items()
                                    if k in bound}, seen or {})
        rest = {k: v for k, v in changes.items() if k not in bound}
        if rest and not out.refused:
            with ctx._lock:
                data = config_to_dict(ctx.cfg)
                for key, value in rest.items():
                    section, name = key.split(".")
                    data[section][name] = value
                ctx.set_config(config_from_dict(data, f"recipe {recipes[label]}"))
                ctx.schedule_save()
        notice = notice_after(out, settings, notice or "")
        text = settings_text(ctx, settings, out.seen, notice)
        shown = [bound[k].to_ui(value_of(ctx.cfg, k)) for k in self._recipe_keys]
        what = ", ".join(f"{k} {v}" for k, v in changes.items()) or "nothing (already set)"
        message = (error_md("the recipe was not applied in full: see the settings line at the "
                            "top") if out.refused else ok_md(f"{label} applied: {what}"))
        return [message, out.seen, notice, text, gr.update(visible=bool(text)), *shown,
                *method_boxes(ctx.cfg.train.method), will_train(ctx)]

    def _wire_recipe(self, app) -> None:
        from craft.run.recipes import RECIPE_SECTIONS

        self._recipe_keys = [b.key for b in self.settings.bindings
                             if b.key.split(".")[0] in RECIPE_SECTIONS]
        controls = [self.settings.component(k) for k in self._recipe_keys]
        app.on(self.recipe_btn.click, self.apply_recipe, [self.recipe, app.seen, app.notice],
               [self.recipe_message, app.seen, app.notice, app.stale, app.reload_settings,
                *controls, self.dpo_box, self.grpo_box, self.will_train],
               message=self.recipe_message)

    def _wire_settings(self, app) -> None:
        """The method's own settings, what Start would train on, and the suggested name."""
        keys = ["train.method", "train.steps", *self._method_keys]
        fields = [self.settings.component(k) for k in keys]

        def on_method_settings(method, *values):
            """The method's own settings shown, and what Start would train on with the values
            on the page (saved or not yet)."""
            from craft.run.config import ConfigError

            cfg = self.ctx.cfg
            try:
                for key, value in zip(keys, (method, *values)):
                    cfg = self.settings.config_with(cfg, key, value)
                text = will_train(self.ctx, cfg)
            except (ConfigError, ValueError, TypeError):
                text = gr.skip()  # a half-typed value: its box says what is wrong
            return (*method_boxes(method), text)

        for field in fields:  # what the user changes (a refresh sets the same itself)
            app.on(field.input, on_method_settings, fields,
                   [self.dpo_box, self.grpo_box, self.will_train], show_progress="hidden")

        def on_method_name(method, name):
            """The suggested run name follows the method (dpo-1 after craft-1)."""
            return next_name(self.ctx, method=method) if is_suggested_name(name) else gr.skip()

        app.on(self.method.input, on_method_name, [self.method, self.name], [self.name],
               show_progress="hidden")

    def _wire_jobs(self, app, buttons: list) -> None:
        """Start (a new run), Resume (a cancelled or failed one) and Cancel."""

        def on_start(name, processes):
            ctx = self.ctx
            name = check_run_name(name)
            cfg = ctx.settings_now()
            rounds = cfg.train.rounds
            for n in {name, *(round_name(name, r, rounds) for r in range(1, rounds + 1))}:
                if n in run_names(ctx) or train_dir(ctx.run_dir, n).exists():
                    raise ValueError(f"a training run named {n!r} exists; pick another "
                                     f"name or resume it (the Resume list below)")
            check_trainable(ctx, cfg)
            self._start(cfg, name, resume=False, processes=processes)
            first = round_name(name, 1, cfg.train.rounds)
            what = f"training {name}" + (f" ({cfg.train.rounds} rounds: {first} first)"
                                         if cfg.train.rounds > 1 else "")
            return (started_message(self.jobs.running("train"), what), gr.Timer(active=True),
                    gr.update(choices=[first, *run_names(ctx)], value=first),
                    next_name(ctx, (name,)),
                    *job_buttons(True))

        app.on(self.start.click, on_start, [self.name, self.processes],
               [self.message, self.panel.timer, self.view, self.name, *buttons],
               message=self.message)

        def on_resume(name, processes):
            ctx = self.ctx
            if not name:
                raise ValueError("pick a cancelled or failed run to resume")
            self._start(stored_config(ctx, name), name, resume=True, processes=processes)
            return (ok_md(f"resuming {name} from its last checkpoint"), gr.Timer(active=True),
                    gr.update(choices=run_names(ctx), value=name), *job_buttons(True))

        app.on(self.resume.click, on_resume, [self.resume_name, self.processes],
               [self.message, self.panel.timer, self.view, *buttons], message=self.message)
        app.on(self.cancel.click, lambda: cancel_message("train", "training"), None,
               self.message)

    def _wire_progress(self, app, buttons: list) -> None:
        """The job's progress, loss curve and previews as it runs, and the run shown."""

        def tick(view):
            ctx = self.ctx
            snap = self.jobs.latest("train")
            out = self.panel.render(snap)
            running = snap is not None and snap.running
            if running and snap.info.get("name"):
                view = snap.info["name"]  # this run's job: the loss curve follows it
            loss, previews, seen = self._run_view(view)
            # the runs table shows a run in progress as it goes
            extra = [runs_table(ctx), gr.skip(), gr.skip(), gr.skip()]
            if not running:
                extra = [runs_table(ctx), gr.update(choices=resumable(ctx)),
                         finished_message(snap, again=RESUME_HINT), gr.Timer(active=False)]
            return [*out, loss, previews, seen, *extra, *job_buttons(running)]

        self.panel.on_tick(app, tick, self.view, [*self.panel.outputs, self.loss, self.previews,
                                                  self.trained_on,
                                                  self.runs, self.resume_name, self.message,
                                                  self.panel.timer, *buttons])

        def on_view(view):
            self._preview_key = None
            return self._run_view(view)

        app.on(self.view.input, on_view, self.view, [self.loss, self.previews, self.trained_on])

    def _run_view(self, name):
        """(loss figure, previews, what it trains on) of run ``name``; unchanged galleries are
        skipped so a poll does not reload their images."""
        if not name:
            return loss_curve(None), [], []
        ctx = self.ctx
        metrics = metrics_for(ctx, name)
        fig = loss_curve(metrics, title=f"Loss · {name}")
        runs = ctx.store.train_runs_df()
        prompts = list((stored_config(ctx, name) if name in set(runs.get("name", []))
                        else ctx.cfg).train.preview_prompts)
        items = previews_for(ctx, name, prompts)
        seen = trained_on(ctx, name)
        key = (name, tuple(p for p, _ in items), tuple(p for p, _ in seen))
        if key == self._preview_key:
            return fig, gr.skip(), gr.skip()
        self._preview_key = key
        return fig, items, seen

    # ------------------------------------------------------------------ refresh

    @property
    def refresh_inputs(self) -> list:
        return [self.name]

    @property
    def refresh_outputs(self) -> list:
        return [self.name, self.view, self.resume_name, self.runs, self.loss, self.previews,
                self.trained_on,
                *self.panel.outputs, self.panel.timer, self.start, self.cancel,
                self.will_train, self.dpo_box, self.grpo_box]

    def refresh(self, current_name: str = "") -> list:
        ctx = self.ctx
        names = run_names(ctx)
        taken = (not current_name or current_name in names
                 or train_dir(ctx.run_dir, current_name).exists())
        snap = self.jobs.running("train")
        mine = snap is not None and snap.info.get("run_dir") == str(ctx.run_dir)
        view = snap.info.get("name") if mine else (names[0] if names else None)
        self._preview_key = None
        loss, previews, seen = self._run_view(view)
        return [next_name(ctx) if taken else gr.skip(), gr.update(choices=names, value=view),
                gr.update(choices=resumable(ctx), value=None), runs_table(ctx), loss, previews,
                seen,
                *self.panel.render(), self.panel.keep_polling(),
                *job_buttons(self.panel.is_running()), will_train(ctx),
                *method_boxes(ctx.cfg.train.method)]


__all__ = ["TrainTab", "metrics_for", "previews_for", "runs_table", "trained_on"]
