"""The run plan: per-GPU peak memory of every stage of a config, a verdict, the cheapest change
that fits, and the time of the config's run, from simulations on fake tensors (no GPU, no
weights).

``make_plan(cfg, gpus=N, gpu=...)`` composes the stage simulations (craft.planning.simulate)
with how the run spreads over N GPUs: generation, scoring and evaluation are data parallel (each
GPU holds a whole model), training is data parallel too (DDP: a whole replica per GPU; its
gradient buckets are the gradients, ``gradient_as_bucket_view``), or sharded with
``train.sharding: fsdp`` (each GPU holds 1/N of the float32 master weights, gradients, AdamW
moments and EMA, plus the full weights of the blocks being computed; craft/models/sharding.py).
"""

from __future__ import annotations

import dataclasses
import logging

from craft import CraftError
from craft.methods.registry import get_method
from craft.models.sharding import effective_sharding
from craft.planning.hardware import (DEFAULT_UTILIZATION, MARGIN_TEXT, Gpu, hours, resolve_gpu,
                                     with_margin)
from craft.planning.simulate import (GIB, Sim, TrainSetup, simulate_generation, simulate_reward,
                                     simulate_training)
from craft.planning.specs import ModelSpec, model_spec, pixel_reward, reward_arch

log = logging.getLogger(__name__)

COLUMNS = ("weights", "trainable", "gradients", "optimizer", "ema", "data", "activations",
           "temporary", "sharding")

# The paper's Table 7 (supplementary), end-to-end H100 hours for CRAFT: (smaller, larger part).
# Its main text says "total training requires approximately 4 GPU hours (SDXL on H100)", so the
# smaller part is read as fine-tuning and the larger as candidate generation + filtering.
PAPER_TABLE7 = {"sd15": (1.9, 6.9), "sdxl": (4.0, 20.1)}


@dataclasses.dataclass
class StagePlan:
    stage: str
    parts: dict[str, float]  # GiB per category, per GPU, at the stage's peak
    fits: bool
    units: int | None = None  # images or training samples of the config's run
    unit: str = "image"
    flops_per_unit: float = 0.0
    hours: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    fix: list[str] | None = None  # --set overrides that make it fit
    fix_note: str = ""

    @property
    def simulated(self) -> float:
        return sum(self.parts.values())

    @property
    def needed(self) -> float:
        return with_margin(self.simulated) if self.simulated else 0.0


@dataclasses.dataclass
class RunPlan:
    model: str
    family: str
    source: str
    dtype: str
    size: tuple[int, int]
    gpu: Gpu
    gpus: int
    utilization: float
    sharding: str
    method: str  # "LoRA rank r" | "full"
    stages: list[StagePlan]
    notes: list[str] = dataclasses.field(default_factory=list)
    fix: list[str] | None = None  # --set overrides that make every stage fit

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.stage == name)

    def failing(self) -> list[StagePlan]:
        return [s for s in self.stages if not s.fits]

    def refusal(self) -> str:
        """One paragraph: what does not fit and how to change it (for `craft run`)."""
        parts = [f"{s.stage} needs {s.needed:.1f} GiB per GPU"
                 + (f" ({s.fix_note})" if s.fix_note else "") for s in self.failing()]
        how = (f"the cheapest change that fits every stage: --set {' --set '.join(self.fix)}"
               if self.fix else "no setting makes every stage fit")
        return (f"the plan for {self.gpus} x {self.gpu.memory_gib:g} GiB GPU(s) says this run "
                f"does not fit: {'; '.join(parts)}; {how}. `craft plan` shows the details; "
                f"--ignore-plan runs it anyway")

    def table(self, markdown: bool = False) -> str:
        return render(self, markdown)


# ------------------------------------------------------------------------ counting


def prompt_counts(cfg) -> tuple[int | None, int | None, list[str]]:
    """(training prompts, evaluation prompts, notes): counted from the prompt files when they
    are here, else the configured caps."""
    from craft.stages.prompts import load_prompts

    p, notes = cfg.prompts, []
    try:
        train = len(load_prompts(p.source, p.format, p.column, p.max_prompts,
                                 seed=p.seed).prompts)
    except CraftError:
        train = p.max_prompts
        notes.append(f"training prompts: {p.source} is not here; counted as prompts.max_prompts "
                     f"= {train}" if train else f"training prompts: {p.source} is not here and "
                     "prompts.max_prompts is null: generation time unknown")
    try:
        held = len(load_prompts(p.eval_source, "auto", None, p.max_eval_prompts,
                                seed=p.seed).prompts)
    except CraftError:
        held = p.max_eval_prompts
        if held is None:
            notes.append(f"evaluation prompts: {p.eval_source} is not here: evaluation time "
                         "unknown")
    if cfg.eval.num_prompts is not None and held is not None:
        held = min(held, cfg.eval.num_prompts)
    elif cfg.eval.num_prompts is not None:
        held = cfg.eval.num_prompts
    return train, held, notes


# ------------------------------------------------------------------------ composing


def _gib(parts: dict[str, int]) -> dict[str, float]:
    return {k: v / GIB for k, v in parts.items() if v}


def _sharded(parts: dict[str, float], n: int, step_extra: dict) -> dict[str, float]:
    """A full fine-tuning state split over n GPUs by FSDP: master weights, gradients, AdamW
    moments and EMA divide by n; the anchor's frozen base (when on) stays whole; the blocks
    being computed are whole: two units' weights in the compute dtype (the current and the
    prefetched) and their unsharded gradients in float32 before the reduce-scatter."""
    out = dict(parts)
    for k in ("trainable", "gradients", "optimizer", "ema"):
        if k in out:
            out[k] /= n
    if "weights" in out:
        out["weights"] = step_extra["base_bytes"] / GIB
    unit = step_extra["unit_numel"]
    out["sharding"] = unit * (2 * step_extra["compute_bytes"] + 2 * 4) / GIB
    return out


def make_plan(cfg, *, gpus: int = 1, gpu: Gpu | None = None,
              utilization: float = DEFAULT_UTILIZATION, suggest: bool = True,
              spec: ModelSpec | None = None) -> RunPlan:
    """Plan ``cfg`` on ``gpus`` GPUs of ``gpu`` (default: an 80 GB H100)."""
    if gpus < 1:
        raise CraftError(f"--gpus {gpus}: must be at least 1")
    if not 0 < utilization <= 1:
        raise CraftError(f"--utilization {utilization}: must lie in (0, 1], e.g. 0.35")
    gpu = gpu or resolve_gpu(None, None)
    spec = spec or model_spec(cfg)
    sharding = effective_sharding(cfg)
    n_train, n_eval, notes = prompt_counts(cfg)
    g, t = cfg.generation, cfg.train
    per_prompt = (1 + cfg.prompts.num_variants) * g.seeds_per_prompt
    n_images = n_train * per_prompt * t.rounds if n_train else None

    def timed(flops: float, units: int | None) -> float | None:
        return None if units is None else hours(units * flops, gpus, gpu, utilization)

    stages = []
    method = get_method(t.method)
    online = method.online
    if online:  # an online method samples its own images in training: no candidate pool
        notes.append(f"train.method={method.name}: no candidate pool; the images are sampled "
                     "in training (the 'GRPO: sample a round' stage)")
    else:
        gen = simulate_generation(spec, g.batch_size, g.num_inference_steps, g.guidance_scale,
                                  cfg.model.vae_slicing)
        flops, extra, finished, gen_notes = early_rejection(cfg, gen)
        stages.append(_stage("generation", _gib({**gen.parts, **extra}), gpu, n_images, "image",
                             flops, timed(flops, n_images), [*gen.notes, *gen_notes]))
        stages.append(_scoring(cfg, gpu, None if n_images is None else round(
            n_images * finished), timed, scored_in_generation(cfg)))
    setup = TrainSetup.from_config(cfg, gpus, pool=n_images, family=spec.family)
    train = simulate_training(spec, setup)
    if method.data_stage:
        stages.append(_stage(method.data_stage, _gib(train["data"].parts), gpu))
    step = train["step"]
    parts = _gib(step.parts)
    ddp = gpus > 1 and sharding == "none"
    if ddp and "gradients" not in parts:  # DDP's buckets hold the gradients all along
        parts["gradients"] = step.extra["trainable_numel"] * 4 / GIB
    if sharding == "fsdp" and gpus > 1 and not t.lora:
        parts = _sharded(parts, gpus, step.extra)
    samples, unit, method_notes = method.plan_samples(cfg, spec.family)
    step_notes = list(step.notes) + method_notes
    if online:
        resident = _grpo_resident(cfg, spec)
        parts["weights"] = parts.get("weights", 0) + resident
        step_notes.append(f"GRPO: the rewards and the VAE stay on the device all run "
                          f"({resident:.1f} GiB, in weights)")
    if sharding == "fsdp" and gpus == 1:
        step_notes.append("train.sharding=fsdp on one GPU shards nothing")
    if sharding == "fsdp" and t.lora:
        step_notes.append("LoRA is not sharded (its frozen weights stay whole): data parallel")
    stages.append(_stage("training: one step", parts, gpu, samples, unit, step.flops,
                         timed(step.flops, samples), step_notes))
    if online:
        stages.append(_grpo_sampling(cfg, spec, step, gpu, gpus, sharding, timed, resident))
    stages.append(_checkpoint(cfg, spec, step, gpu, gpus, sharding,
                              resident if online else 0.0))
    stages.append(_evaluation(cfg, spec, gpu, n_eval, timed))
    method = f"LoRA rank {t.lora_rank}" if t.lora else "full fine-tuning"
    plan = RunPlan(cfg.model.pretrained, spec.family, spec.source,
                   str(spec.dtype).replace("torch.", ""), (spec.height, spec.width), gpu, gpus,
                   utilization, sharding, method, stages, notes)
    if suggest and not plan.fits:
        suggest_fixes(cfg, plan, spec)
    return plan


def _stage(name, parts, gpu, units=None, unit="image", flops=0.0, hours_=None, notes=None):
    s = StagePlan(name, parts, True, units, unit, flops, hours_, notes or [])
    s.fits = s.needed <= gpu.memory_gib
    return s


# What share of the variants' candidates early rejection lets run to the end, for the plan:
# measured in the toy world (benchmarks/toy_candidates_cost.md, the default check: after 40 %
# of the steps, margin 1 error SD; K = 50 of a 640-image pool: 48-52 % of the variants stopped
# on both toy bases). With the paper's K = 100 of a pool of 100k the running top-K cut-off is
# far stricter, so at real size this is an upper bound.
EXPECTED_SURVIVAL = 0.5


def early_rejection(cfg, gen: Sim) -> tuple[float, dict, float, list[str]]:
    """Generation's FLOPs per candidate (the pool's mean) with ``generation.early_reject``,
    the bytes the filter's rewards add on the device, the share of candidates that finish
    (scored with those rewards right there), and a note; without it, the plain sampler's."""
    g = cfg.generation
    if not g.early_reject or "step_flops" not in gen.extra:
        return gen.flops, {}, 1.0, []
    from craft.stages.trajectory import cut_step

    e, n = gen.extra, g.num_inference_steps
    s = cut_step(n, g.early_reject_at)
    ref = 1.0 / (1 + cfg.prompts.num_variants)
    q = EXPECTED_SURVIVAL
    notes: list[str] = []
    names = scored_in_generation(cfg)
    sims = [r for r in (_reward(x, cfg.rewards.batch_size, notes, cfg) for x in names) if r]
    score = sum(r.flops for r in sims)
    weights = sum(r.extra["weights"] for r in sims)
    acts = max((r.peak - r.extra["weights"] for r in sims), default=0)
    base = e["text_flops"] + e["decode_flops"]
    # every finished candidate is scored with the filter's rewards right away (generation
    # stores its scores; the score stage skips them): ``score`` once more for each
    flops = (ref * (base + n * e["step_flops"] + score)
             + (1 - ref) * (base + s * e["step_flops"] + score
                            + q * ((n - s) * e["step_flops"] + e["decode_flops"] + score)))
    finished = ref + (1 - ref) * q
    evals = ref * n + (1 - ref) * (s + q * (n - s))
    notes = [f"early rejection: the original prompts' images (1 in {1 + cfg.prompts.num_variants}"
             f") run all {n} steps; every variant's candidate runs {s}, its predicted image is "
             f"decoded and scored ({', '.join(names)}: their weights stay on the device) and it "
             f"goes on only if it could still be kept, assumed for {q:.0%} of them (measured "
             "in the toy world, benchmarks/toy_candidates_cost.md; the paper's K of a larger "
             f"pool stops more): {evals / n:.0%} of the plain sampler's denoiser evaluations, "
             f"{flops / gen.flops:.0%} of its compute"]
    return flops, {"weights": gen.parts.get("weights", 0) + weights,
                   "activations": max(gen.parts.get("activations", 0), acts)}, finished, notes


def scored_in_generation(cfg) -> tuple[str, ...]:
    """The rewards generation itself scores every finished candidate with: the filter's, under
    early rejection (craft/stages/generation.py); the score stage then skips them (found by
    `craft rehearse configs/sd15.yaml --method dpo --set train.lora=true`: its scoring stage
    held nothing where the plan had 8.5 GiB)."""
    if not cfg.generation.early_reject:
        return ()
    from craft.stages.filtering import FilterSettings

    return tuple(FilterSettings.from_config(cfg).used_rewards)


def _scoring(cfg, gpu, n_images, timed, skip: tuple[str, ...] = ()) -> StagePlan:
    weights, acts, flops, notes = 0.0, 0.0, 0.0, []
    rest = [n for n in cfg.rewards.names if n not in skip]
    if skip:
        notes.append(f"{', '.join(skip)}: scored in generation (early rejection), not here")
    for name in rest:
        sim = _reward(name, cfg.rewards.batch_size, notes, cfg)
        if sim is None:
            continue
        w = sim.extra["weights"] / GIB
        weights += w
        acts = max(acts, sim.peak / GIB - w)
        flops += sim.flops
    parts = {"weights": weights, "activations": acts} if weights else {}
    if rest:
        notes.insert(0, f"all of {', '.join(rest)} loaded at once, float32, "
                        f"{cfg.rewards.batch_size} images a batch")
    else:  # every reward was scored in generation: nothing left for this stage
        n_images = None
    return _stage("scoring", parts, gpu, n_images, "image", flops,
                  timed(flops, n_images) if flops else None, _grouped(notes))


def _reward(name: str, batch: int, notes: list[str], cfg=None) -> Sim | None:
    from craft.rewards.configured import is_remote

    if cfg is not None and is_remote(cfg, name):
        notes.append(f"{name}|served by another process (rewards.remote / rewards.vlm): no "
                     "memory on this GPU")
        return None
    if pixel_reward(name):
        notes.append(f"{name}|computed from pixels on the CPU, no GPU memory")
        return None
    if reward_arch(name) is None:
        notes.append(f"{name}|not simulated (a plugin's reward: add its model's memory)")
        return None
    return simulate_reward(name, batch)


def _grouped(notes: list[str]) -> list[str]:
    """"name|what" notes merged by what: "a, b: what"."""
    plain = [n for n in notes if "|" not in n]
    by_what: dict[str, list[str]] = {}
    for n in notes:
        if "|" in n:
            name, what = n.split("|", 1)
            by_what.setdefault(what, []).append(name)
    return plain + [f"{', '.join(names)}: {what}" for what, names in by_what.items()]


def _checkpoint(cfg, spec: ModelSpec, step: Sim, gpu, gpus: int, sharding: str,
                resident: float = 0.0) -> StagePlan:
    """After a step: the resident training state, one weight cast for saving, and the encoders
    back on the device for the fixed-seed previews; for GRPO also what it keeps on the device
    all run (``resident`` GiB: the rewards and the VAE; found by `craft rehearse`, which
    measured SD1.5 LoRA GRPO's checkpoint at 10.9 GiB where the plan had said 2.7)."""
    t = cfg.train
    after = _gib(step.extra["after_step"])
    after.pop("activations", None)
    after.pop("temporary", None)
    if gpus > 1 and sharding == "fsdp" and not t.lora:
        after = _sharded(after, gpus, step.extra)
        save = after.pop("sharding")  # the full state dict is gathered a unit at a time
    else:
        if gpus > 1:
            after["gradients"] = step.extra["trainable_numel"] * 4 / GIB
        save = step.extra["largest_param"] * spec.dtype.itemsize / GIB
    notes = []
    parts = dict(after)
    act = save
    if t.preview_every and t.preview_prompts:
        prev = simulate_generation(spec, len(t.preview_prompts), cfg.eval.num_inference_steps,
                                   cfg.eval.guidance_scale, cfg.model.vae_slicing)
        encoders = (prev.extra["weights"] - _denoiser_bytes(prev, spec)) / GIB
        parts["weights"] = parts.get("weights", 0) + encoders
        act = max(save, prev.parts.get("activations", 0) / GIB)
        notes.append(f"previews of {len(t.preview_prompts)} prompts: text encoders and VAE "
                     "back on the device")
        resident = max(resident - _vae_bytes(spec) / GIB, 0.0) if resident else 0.0
    if resident:
        parts["weights"] = parts.get("weights", 0) + resident
        notes.append(f"GRPO: the rewards and the VAE stay on the device ({resident:.1f} GiB "
                     "beyond the previews' own, in weights)")
    parts["activations"] = act
    return _stage("checkpoint + previews", parts, gpu, notes=notes)


def _grpo_resident(cfg, spec: ModelSpec) -> float:
    """GiB GRPO keeps on the device beside the trained model: the VAE (to decode each round)
    and every training reward (to score it)."""
    notes: list[str] = []
    rewards = sum(sim.extra["weights"] for n in cfg.rewards.names
                  if (sim := _reward(n, cfg.rewards.batch_size, notes, cfg)) is not None)
    return (rewards + _vae_bytes(spec)) / GIB


def _grpo_sampling(cfg, spec: ModelSpec, step: Sim, gpu, gpus: int, sharding: str,
                   timed, resident: float) -> StagePlan:
    """A GRPO round: the resident training state, the VAE and the rewards, and the sampler's
    activations (the denoiser under no_grad, guidance doubling the batch), then scoring."""
    from craft.methods.grpo import sampled_images, sampling_guidance

    g, t = cfg.grpo, cfg.train
    after = _gib(step.extra["after_step"])
    after.pop("activations", None)
    after.pop("temporary", None)
    if gpus > 1 and sharding == "fsdp" and not t.lora:
        after = _sharded(after, gpus, step.extra)
    guidance = sampling_guidance(spec.family, cfg)
    batch = max(1, min(cfg.generation.batch_size,
                       g.prompts_per_step // gpus * g.group_size))
    sim = simulate_generation(spec, batch, g.num_inference_steps, guidance,
                              cfg.model.vae_slicing)
    parts = dict(after)
    parts["weights"] = parts.get("weights", 0) + resident  # the VAE and the rewards
    parts["activations"] = sum(v for k, v in sim.parts.items() if k != "weights") / GIB
    images = sampled_images(cfg)
    notes = [f"{g.prompts_per_step} prompts x {g.group_size} images a round, "
             f"{g.num_inference_steps} sampler steps, {batch} images a batch per GPU; the "
             "log-probabilities and latents of every step kept (in data)"]
    return _stage("GRPO: sample a round", parts, gpu, images, "image", sim.flops,
                  timed(sim.flops, images), notes)


def _denoiser_bytes(sim: Sim, spec: ModelSpec) -> int:
    return sim.extra["weights"] - sim.extra["encoders"] - _vae_bytes(spec)


def _vae_bytes(spec: ModelSpec) -> int:
    from craft.planning.simulate import _meta, _vae_upcast

    import torch

    dtype = torch.float32 if _vae_upcast(spec) else spec.dtype
    return sum(p.numel() * dtype.itemsize for p in _meta(spec, "vae", dtype).parameters())


def _evaluation(cfg, spec, gpu, n_eval, timed) -> StagePlan:
    e = cfg.eval
    gen = simulate_generation(spec, e.batch_size, e.num_inference_steps, e.guidance_scale,
                              cfg.model.vae_slicing)
    best, notes, flops = _gib(gen.parts), list(gen.notes), gen.flops
    for name in cfg.rewards.eval_names:
        sim = _reward(name, cfg.rewards.batch_size, notes, cfg)
        if sim is None:
            continue
        flops += sim.flops / 2  # every image is scored once; both models' images: x2 below
        if sim.peak > sum(v * GIB for v in best.values()):
            best = _gib(sim.parts)
    units = None if n_eval is None else n_eval * e.seeds_per_prompt * 2
    notes.append("one pipeline on the device at a time, then each evaluation reward alone")
    return _stage("evaluation", best, gpu, units, "image", flops, timed(flops, units),
                  _grouped(notes))


# ------------------------------------------------------------------------ fixes


def with_overrides(cfg, overrides: list[str]):
    """``cfg`` with ``section.key=value`` overrides applied (values parsed as YAML)."""
    import yaml

    from craft.run.config import config_from_dict, config_to_dict

    data = config_to_dict(cfg)
    for o in overrides:
        key, _, raw = o.partition("=")
        section, name = key.split(".")
        data[section][name] = yaml.safe_load(raw)
    return config_from_dict(data, "the plan's suggestion")


def _halvings(key: str, value: int) -> list[list[str]]:
    out, v = [], value
    while v > 1:
        v //= 2
        out.append([f"{key}={v}"])
    return out


def _candidates(cfg, stage: str, gpus: int) -> list[list[str]]:
    """Changes that lower a stage's memory, cheapest (least change to the run) first."""
    t, m = cfg.train, cfg.model
    if stage == "generation" or stage.startswith("evaluation"):
        key = "generation.batch_size" if stage == "generation" else "eval.batch_size"
        value = cfg.generation.batch_size if stage == "generation" else cfg.eval.batch_size
        out = [] if m.vae_slicing else [["model.vae_slicing=true"]]
        return out + _halvings(key, value) + ([] if not stage.startswith("evaluation") else
                                              _halvings("rewards.batch_size",
                                                        cfg.rewards.batch_size))
    if stage.startswith("scoring"):
        return _halvings("rewards.batch_size", cfg.rewards.batch_size)
    if stage.startswith("training: encode"):
        return [] if m.vae_slicing else [["model.vae_slicing=true"]]
    if stage.startswith("GRPO"):  # sampling beside the training state
        out = [] if m.vae_slicing else [["model.vae_slicing=true"]]
        out += _halvings("generation.batch_size", cfg.generation.batch_size)
    else:
        out = [] if m.gradient_checkpointing else [["model.gradient_checkpointing=true"]]
        out += _halvings("train.micro_batch", t.micro_batch)
    if not t.use_8bit_adam:
        out.append(["train.use_8bit_adam=true"])
    if t.ema_decay > 0:
        out.append(["train.ema_decay=0"])
    if stage.startswith("checkpoint") and t.preview_every:
        out.append(["train.preview_every=0"])
    if gpus > 1 and effective_sharding(cfg) == "none" and not t.lora:
        out.append(["train.sharding=fsdp"])
    return out  # LoRA changes the method: suggest_fixes offers it apart


def suggest_fixes(cfg, plan: RunPlan, spec: ModelSpec) -> None:
    """For each failing stage, the cheapest change that makes it fit (``StagePlan.fix``); for
    the run, the cheapest change that makes every stage fit (``RunPlan.fix``). Cheapest: the
    first single change in :func:`_candidates`' order, else the shortest run of them taken in
    order. Full fine-tuning that no setting fits on one GPU is answered with both ways out:
    sharding over the number of GPUs the plan finds, or LoRA (a different method)."""
    memo: dict = {}

    def plan_with(overrides: list[str], gpus: int | None = None) -> RunPlan | None:
        key = (tuple(overrides), gpus)
        if key not in memo:
            try:
                changed = with_overrides(cfg, overrides)
            except CraftError:
                memo[key] = None
            else:
                memo[key] = make_plan(changed, gpus=gpus or plan.gpus, gpu=plan.gpu,
                                      utilization=plan.utilization, suggest=False, spec=spec)
        return memo[key]

    def stage_ok(stage: str, gpus: int | None = None):
        return lambda o: (p := plan_with(o, gpus)) is not None and p.stage(stage).fits

    lora = [] if cfg.train.lora else [
        ["train.lora=true"] + (["train.sharding=none"] if cfg.train.sharding == "fsdp" else [])]
    everything: list[list[str]] = []
    for s in plan.failing():
        cands = _candidates(cfg, s.stage, plan.gpus)
        everything += [c for c in cands if c not in everything]
        s.fix = _search(cands, stage_ok(s.stage))
        if s.fix is not None:
            continue
        training = s.stage.startswith(("training", "checkpoint", "GRPO"))
        n = _gpus_for_sharding(cfg, plan, stage_ok, s.stage) if training else None
        by_lora = bool(lora) and training and stage_ok(s.stage)(lora[0])
        ways = []
        if n is not None:
            ways.append(f"shard it over at least {n} GPUs of {plan.gpu.memory_gib:g} GiB "
                        f"(--gpus {n} --set train.sharding=fsdp)")
        if by_lora:
            ways.append(f"train LoRA adapters instead (--set {' --set '.join(lora[0])})")
            s.fix = lora[0]
        if ways:
            s.fix_note = (f"{'full fine-tuning' if not cfg.train.lora else 'this stage'} does "
                          f"not fit {plan.gpus} GPU(s) of {plan.gpu.memory_gib:g} GiB with any "
                          f"setting: " + ", or ".join(ways))
        else:
            weights = s.parts.get("weights", 0)
            s.fix_note = (f"no setting fits: the model's weights alone need "
                          f"{with_margin(weights):.1f} GiB with the margin; use GPUs with at "
                          f"least {s.needed:.0f} GiB")
    plan.fix = _search(everything + lora, lambda o: (p := plan_with(o)) is not None and p.fits)


def _search(cands: list[list[str]], ok) -> list[str] | None:
    for c in cands:
        if ok(c):
            return c
    acc: list[str] = []
    for c in cands:
        acc = _merge(acc, c)
        if ok(acc):
            return acc
    return None


def _merge(acc: list[str], change: list[str]) -> list[str]:
    keys = {c.split("=")[0] for c in change}
    return [a for a in acc if a.split("=")[0] not in keys] + change


def _gpus_for_sharding(cfg, plan: RunPlan, stage_ok, stage: str) -> int | None:
    if cfg.train.lora:
        return None
    for n in (2, 4, 8, 16, 32, 64):
        if n > plan.gpus and cfg.train.effective_batch % (cfg.train.micro_batch * n) == 0 \
                and stage_ok(stage, n)(["train.sharding=fsdp"]):
            return n
    return None


# ------------------------------------------------------------------------ rendering


def _duration(h: float | None) -> str:
    if h is None:
        return ""
    return f"{h:.1f} h" if h >= 1 else f"{h * 60:.0f} min" if h * 60 >= 1 else "<1 min"


def _fmt(v: float | None) -> str:
    return "-" if not v else f"{v:.1f}" if v >= 0.05 else "<0.1"


def render(plan: RunPlan, markdown: bool = False) -> str:
    cols = [c for c in COLUMNS if any(c in s.parts for s in plan.stages)]
    head = ["stage", *cols, "simulated", "+margin", "verdict", "run", "time"]
    rows = []
    for s in plan.stages:
        run = (f"{s.units:,} {s.unit}s" if s.units else "")
        verdict = "fits" if s.fits else "DOES NOT FIT"
        rows.append([s.stage, *(_fmt(s.parts.get(c)) for c in cols), _fmt(s.simulated),
                     _fmt(s.needed), verdict, run, _duration(s.hours)])
    total = sum(s.hours for s in plan.stages if s.hours)
    h, w = plan.size
    title = (f"{plan.model} ({plan.family}, {plan.dtype}, {h}x{w}, {plan.method}"
             f"{', FSDP over %d GPUs' % plan.gpus if plan.sharding == 'fsdp' and plan.gpus > 1 else ''})"
             f" on {plan.gpus} x {plan.gpu.name}"
             f"{'' if 'GiB' in plan.gpu.name else f' ({plan.gpu.memory_gib:g} GiB)'}")
    lines = [title, f"architecture: {plan.source}", "GiB per GPU at each stage's peak:", ""]
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        fmt = lambda r: "  ".join(str(x).ljust(wd) if i == 0 else str(x).rjust(wd)  # noqa: E731
                                  for i, (x, wd) in enumerate(zip(r, widths)))
        lines += [fmt(head), *(fmt(r) for r in rows)]
    lines.append("")
    for s in plan.stages:
        for n in s.notes:
            lines.append(f"- {s.stage}: {n}")
    for n in plan.notes:
        lines.append(f"- {n}")
    lines.append(f"- margin: {MARGIN_TEXT}")
    lines.append(f"- time: FLOPs counted on the architecture (torch.utils.flop_counter) / "
                 f"({plan.gpus} x {plan.gpu.tflops:g} TFLOP/s: {plan.gpu.source}) at "
                 f"{plan.utilization:.0%} utilization (an assumption; benchmarks/gpu.py measures "
                 f"it): the run takes {_duration(total) or 'an unknown time'} on {plan.gpus} "
                 f"GPU(s), {total * plan.gpus:.1f} GPU-hours")
    from craft.planning.specs import KNOWN_REPOS

    paper = PAPER_TABLE7.get(KNOWN_REPOS.get(plan.model.lower(), ""))
    if paper:
        lines.append(f"- the paper's Table 7 ({plan.family}, H100 hours): {paper[0]} + {paper[1]}; "
                     f"read as fine-tuning {paper[0]} h and candidates + filtering {paper[1]} h "
                     f"(its summary: ~4 GPU hours of training for SDXL)")
    lines.append("")
    if plan.fits:
        lines.append(f"verdict: fits on {plan.gpus} x {plan.gpu.memory_gib:g} GiB")
    else:
        lines.append(f"verdict: DOES NOT FIT on {plan.gpus} x {plan.gpu.memory_gib:g} GiB")
        for s in plan.failing():
            lines.append(f"  {s.stage}: needs {s.needed:.1f} GiB per GPU"
                         + (f"; {s.fix_note}" if s.fix_note else ""))
        lines.append("the cheapest change that fits every stage: " +
                     (f"--set {' --set '.join(plan.fix)}" if plan.fix else "none on these GPUs"))
    return "\n".join(lines)


__all__ = ["PAPER_TABLE7", "RunPlan", "StagePlan", "effective_sharding", "make_plan",
           "prompt_counts", "render", "with_overrides"]
