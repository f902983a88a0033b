"""Online GRPO: the group-RL baseline the paper's Theorem 3.1 bounds CRAFT's loss by.

Every round samples a group of ``grpo.group_size`` images for each of ``grpo.prompts_per_step``
training prompts from the model *being trained*, with a stochastic sampler whose every step is
a Gaussian with a known density, so each step of each trajectory is a policy action with a
log-probability:

- UNet families (SD1.5, SDXL): DDIM with eta > 0 (ddpo-pytorch's ``ddim_step_with_logprob``):
  x_{t-1} ~ N(sqrt(a_prev) x0_hat + sqrt(1 - a_prev - s^2) eps_hat, s^2),
  s = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev));
- flow families (SD3, FLUX): the SDE form of the flow sampler (Flow-GRPO's
  ``sde_step_with_logprob``): with dt = sigma_next - sigma < 0 and
  s_t = a * sqrt(sigma / (1 - sigma)),
  x_next ~ N(x (1 + s_t^2 dt / (2 sigma)) + v (1 + s_t^2 (1 - sigma) / (2 sigma)) dt, s_t^2 |dt|).

The images are scored with the config's rewards against their prompt, the rewards become one
composite as Composite Reward Filtering makes it (normalised over the round, weighted by
filter.weights), and each image's advantage is its composite standardised within its prompt's
group (craft.stages.advantages.group_advantages), clipped to +-adv_clip. Each of ``grpo.updates``
optimizer steps then descends the clipped-ratio objective over the round's (trajectory, step)
pairs,

    L = mean max(-A r, -A clip(r, 1 - eps, 1 + eps)),   r = exp(log p_theta - log p_old),
        [+ kl_weight * ||mu_theta - mu_base||^2 / (2 s^2)   (Flow-GRPO's KL to the base)]

where log p is averaged over the latent's elements, as both peers do. The ratio is 1 on the
first update (the samples came from these very weights) and the clip acts from the second on.

Everything else (resume, checkpoints at round boundaries, previews, EMA, LoRA / full / FSDP,
final/) is craft.methods.training's loop; the rounds are a function of (seed, round), so a resumed
run samples exactly what the uninterrupted run sampled. Under several processes each process
samples whole groups of its share of the round's prompts (advantages need the whole group) and
DDP averages the gradients.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from craft import CraftError
from craft.methods.base import Method, PlanShape, Selection
from craft.methods.steps import accumulating, as_base, backward

log = logging.getLogger(__name__)

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sampling_guidance(family: str, cfg) -> float:
    """The guidance GRPO samples and trains with: the generation stage's, except FLUX's (a
    guidance embedding, no second pass). craft/planning sizes the step with it."""
    return 1.0 if family == "flux" else cfg.generation.guidance_scale


def steps_trained(g) -> int:
    """Sampler steps trained on per image in each update (of ``g.num_inference_steps``)."""
    return max(1, round(g.num_inference_steps * g.timestep_fraction))


# ------------------------------------------------------------------------ the step densities


@dataclasses.dataclass
class Step:
    """One stochastic sampler step: the next latent, its log-density (mean over the latent's
    elements), and the Gaussian's mean and std (the KL term compares means)."""

    prev: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    kl_std: torch.Tensor  # what the KL to the base divides by (see kl_to_base)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over all but the batch dimension."""
    lp = -((x.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.dim())))


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *[1] * (like.dim() - 1)).to(like.device, like.dtype)


def ddim_step(alphas_cumprod: torch.Tensor, final_alpha: float, eps: torch.Tensor,
              t: torch.Tensor, prev_t: torch.Tensor, x: torch.Tensor, eta: float,
              prev: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Step:
    """DDIM's step x_t -> x_{t-1} with eta > 0 (DDIM paper eq. 12, ddpo-pytorch): ``prev``
    given = its log-density under this step; else drawn with ``noise``."""
    a_t = _expand(alphas_cumprod[t.cpu()], x)
    pt = prev_t.cpu()
    a_prev = _expand(torch.where(pt >= 0, alphas_cumprod[pt.clamp(min=0)],
                                 torch.full_like(pt, final_alpha, dtype=alphas_cumprod.dtype)), x)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * var.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps
    if prev is None:
        prev = mean + std * noise
    return Step(prev, gaussian_log_prob(prev, mean, std), mean, std, std)


def flow_sde_step(sigma: torch.Tensor, sigma_next: torch.Tensor, sigma_max: float,
                  v: torch.Tensor, x: torch.Tensor, noise_level: float,
                  prev: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Step:
    """The flow sampler's SDE step (Flow-GRPO): the Euler step x + dt v plus the drift that
    keeps the marginals and Gaussian noise of std s_t sqrt(|dt|)."""
    s, sn = _expand(sigma, x), _expand(sigma_next, x)
    dt = sn - s
    s_safe = torch.where(s >= 1, torch.full_like(s, sigma_max), s)
    std_t = (s / (1 - s_safe)).sqrt() * noise_level
    mean = x * (1 + std_t ** 2 / (2 * s) * dt) + v * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt
    std = std_t * (-dt).sqrt()
    if prev is None:
        prev = mean + std * noise
    return Step(prev, gaussian_log_prob(prev, mean, std), mean, std, std_t)


def kl_to_base(step: Step, ref: Step) -> torch.Tensor:
    """grpo.kl_weight's term, Flow-GRPO's beta term: per item, the mean over the latent of
    ||mu_theta - mu_base||^2 / (2 s^2). For the flow SDE, s is the noise scale s_t =
    a * sqrt(sigma / (1 - sigma)) without sqrt(|dt|), as flow_grpo writes it (|dt| times the
    Gaussian KL of the two steps); for DDIM, s is the step's std, so it is the exact Gaussian
    KL of the two steps per element."""
    n = step.mean.shape[0]
    return (((step.mean - ref.mean) ** 2).reshape(n, -1).mean(dim=1)
            / (2 * step.kl_std.reshape(n, -1)[:, 0] ** 2))


# ------------------------------------------------------------------------ the policy


@dataclasses.dataclass
class Policy:
    """How a denoiser becomes a stochastic sampler: its grid of timesteps, the CFG scale, the
    step density of its family."""

    call: object  # craft.methods.training.DenoiserCall
    flow: bool
    timesteps: torch.Tensor  # (T,) what the denoiser is fed
    sigmas: torch.Tensor | None  # flow: (T + 1,) with the final 0
    prev_timesteps: torch.Tensor | None  # DDIM: (T,), -1 = the end
    alphas_cumprod: torch.Tensor | None
    final_alpha: float
    guidance: float
    eta: float
    noise_level: float
    v_prediction: bool = False

    @classmethod
    def for_pipe(cls, pipe, cfg, size: tuple[int, int]) -> Policy:
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        from craft.models.families import family_of, is_flow, latent_shape
        from craft.methods.training import DenoiserCall

        g = cfg.grpo
        steps = g.num_inference_steps
        call = DenoiserCall.for_pipe(pipe, size, cfg.train.guidance_scale)
        guidance = sampling_guidance(family_of(pipe), cfg)
        if is_flow(pipe):
            sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            kw = {}
            if sched.config.get("use_dynamic_shifting"):
                from diffusers.pipelines.flux.pipeline_flux import calculate_shift

                c, h, w = latent_shape(pipe, *size)
                kw["mu"] = calculate_shift((h // 2) * (w // 2),
                                           sched.config.get("base_image_seq_len", 256),
                                           sched.config.get("max_image_seq_len", 4096),
                                           sched.config.get("base_shift", 0.5),
                                           sched.config.get("max_shift", 1.15))
            sched.set_timesteps(steps, device="cpu", **kw)
            return cls(call, True, sched.timesteps.float(), sched.sigmas.float(), None, None,
                       1.0, guidance, g.eta, g.noise_level)
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps, device="cpu")
        ts = sched.timesteps.long()
        prev = ts - sched.config.num_train_timesteps // steps
        # the last step's previous alpha is alphas_cumprod[0] whatever set_alpha_to_one says:
        # ddpo-pytorch clamps the previous timestep at 0; alpha 1 there would give the step std 0
        # and a NaN log-probability
        final = float(sched.alphas_cumprod[0])
        return cls(call, False, ts, None, prev, sched.alphas_cumprod.float(), final, guidance,
                   g.eta, g.noise_level,
                   sched.config.get("prediction_type", "epsilon") == "v_prediction")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def predict(self, model, x: torch.Tensor, k: torch.Tensor, cond: dict, empty: dict,
                dtype: torch.dtype) -> torch.Tensor:
        """The (classifier-free guided) prediction at step index ``k`` (one per sample)."""
        t = self.timesteps[k.cpu()].to(x.device)
        xin = x.to(dtype)
        c = {kk: v.to(dtype) for kk, v in cond.items()}
        if self.guidance <= 1.0:
            return self.call(model, xin, t, c).float()
        both = {kk: torch.cat([empty[kk].to(dtype).expand_as(v), v]) for kk, v in c.items()}
        u, cpred = self.call(model, torch.cat([xin, xin]), torch.cat([t, t]),
                             both).float().chunk(2)
        return u + self.guidance * (cpred - u)

    def step(self, pred: torch.Tensor, k: torch.Tensor, x: torch.Tensor,
             prev: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Step:
        kc = k.cpu()
        if self.flow:
            return flow_sde_step(self.sigmas[kc], self.sigmas[kc + 1], float(self.sigmas[1]),
                                 pred, x, self.noise_level, prev, noise)
        t = self.timesteps[kc]
        eps = pred
        if self.v_prediction:  # eps = sqrt(a) v + sqrt(1 - a) x
            a = _expand(self.alphas_cumprod[t], x)
            eps = a.sqrt() * pred + (1 - a).sqrt() * x
        return ddim_step(self.alphas_cumprod, self.final_alpha, eps, t, self.prev_timesteps[kc],
                         x, self.eta, prev, noise)


# ------------------------------------------------------------------------ a round


@dataclasses.dataclass
class Round:
    """One round's samples on this process: whole groups of its share of the prompts."""

    index: int
    prompt_rows: np.ndarray  # (n,) row of each sample's prompt in the encoded prompt table
    seeds: list[int]  # (n,) each sample's seed (its store key)
    latents: torch.Tensor  # (n, T + 1, *latent): x_T ... x_0
    log_probs: torch.Tensor  # (n, T) under the weights that sampled
    images: list
    rewards: dict  # name -> (n,) float64
    composite: np.ndarray
    advantages: torch.Tensor  # (n,)


def round_prompts(n_prompts: int, per_round: int, seed: int, r: int, process: int,
                  world: int) -> np.ndarray:
    """This process's prompts of round ``r``: a function of (seed, round), so a resumed run
    samples what the uninterrupted one did; processes take disjoint shares."""
    rng = np.random.default_rng([seed, r, 7919])
    chosen = rng.choice(n_prompts, size=per_round, replace=per_round > n_prompts)
    return chosen[process::world]


def sample_seed(r: int, slot: int, g: int, per_round: int, group: int) -> int:
    """A unique, reproducible seed per (round, prompt slot, group member)."""
    return (r * per_round + slot) * group + g


@torch.no_grad()
def sample_trajectories(policy: Policy, model, pipe, cond: dict, empty: dict, rows: np.ndarray,
                 seeds: list[int], shape: tuple, dtype: torch.dtype, device,
                 batch: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Trajectories (x_T .. x_0) and their log-probs from ``model``, ``batch`` at a time; the
    initial noise and every step's noise come from each sample's own CPU generator."""
    all_lat, all_lp, images = [], [], []
    for s in range(0, len(rows), batch):
        idx = rows[s:s + batch]
        gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds[s:s + batch]]
        x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        c = {k: v[torch.as_tensor(idx)].to(device) for k, v in cond.items()}
        e = {k: v.to(device) for k, v in empty.items()}
        lat, lps = [x], []
        for k in range(policy.num_steps):
            kk = torch.full((len(idx),), k, dtype=torch.long)
            pred = policy.predict(model, x, kk, c, e, dtype)
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
            st = policy.step(pred, kk, x, noise=noise)
            x = st.prev
            lat.append(x)
            lps.append(st.log_prob)
        all_lat.append(torch.stack(lat, dim=1).cpu())
        all_lp.append(torch.stack(lps, dim=1).cpu())
        images += decode(pipe, x)
    return torch.cat(all_lat), torch.cat(all_lp), images


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> list:
    """PIL images of final latents (the pipelines' own decode and post-processing)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents / vae.config.scaling_factor + shift
    out = vae.decode(z.to(vae.device, vae.dtype)).sample
    return pipe.image_processor.postprocess(out.float(), output_type="pil")


def composite_advantages(rewards: dict, group: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """The round's composite (each reward normalised over the round as filter.normalization,
    weighted by filter.weights, equal weights when none) and each sample's advantage within
    its prompt's group (craft.stages.advantages.group_advantages), NaN rewards as not applicable."""
    from craft.stages.advantages import group_advantages
    from craft.stages.filtering import normalize

    names = list(rewards)
    frame = pd.DataFrame(rewards).assign(prompt_id=group)
    norm = normalize(frame, names, cfg.filter.normalization)
    weights = {n: float(cfg.filter.weights.get(n, 0.0)) for n in names} \
        if cfg.filter.weights else {n: 1.0 for n in names}
    total = sum(weights.values()) or 1.0
    comp = sum(norm[n].to_numpy() * weights[n] / total for n in names)
    frame["composite"] = comp
    adv = group_advantages(frame, "composite", "prompt_id", cfg.advantage.eps).to_numpy()
    return np.asarray(comp, float), np.nan_to_num(adv, nan=0.0)


# ------------------------------------------------------------------------ the objective


def clipped_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor,
                 clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per item, and the ratio."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))
    return loss, ratio


# ------------------------------------------------------------------------ the run


@dataclasses.dataclass
class GRPOCallbacks:
    """``on_round(round, prompt_rows, seeds, images, rewards)``: every process, after scoring
    (craft.stages.engine stores the samples); it must be called on all processes together."""

    on_round: Callable | None = None


@dataclasses.dataclass
class GRPORun:
    """What every round of a GRPO run shares: the session, the trainable model and its
    sampler, the encoded prompts, the rewards, and this process's share of a round."""

    cfg: object
    ses: object  # craft.methods.training.Session
    tr: object  # craft.methods.training.Trainable
    policy: Policy
    texts: list[str]
    cond: dict
    empty: dict
    rewards: dict  # name -> reward callable (images, prompts) -> scores
    shape: tuple
    n_local: int  # samples per round on this process (whole groups)
    t_train: int  # sampler steps trained per sample
    accum: int  # micro-batches per update
    on_round: Callable | None = None

    @property
    def acc(self):
        return self.ses.accelerator


def sample_round(run: GRPORun, r: int) -> Round:
    """Round ``r`` on this process: its prompts' groups sampled from the live weights, scored,
    and each sample's advantage within its group (clipped to +-adv_clip)."""
    cfg, g, acc, tr = run.cfg, run.cfg.grpo, run.acc, run.tr
    world, rank = acc.num_processes, acc.process_index
    rows = round_prompts(len(run.texts), g.prompts_per_step, cfg.train.seed, r, rank, world)
    slots = np.arange(g.prompts_per_step)[rank::world]
    rows_g = np.repeat(rows, g.group_size)
    seeds = [sample_seed(r, int(sl), m, g.prompts_per_step, g.group_size)
             for sl in slots for m in range(g.group_size)]
    tr.raw.eval()
    lat, lps, images = sample_trajectories(run.policy, tr.raw, run.ses.pipe, run.cond, run.empty,
                                           rows_g, seeds, run.shape, tr.input_dtype, acc.device,
                                           max(1, cfg.generation.batch_size))
    tr.raw.train()
    prompt_text = [run.texts[i] for i in rows_g]
    scores = {n: np.asarray(rw(images, prompt_text), float) for n, rw in run.rewards.items()}
    comp, adv = composite_advantages(scores, rows_g, cfg)
    adv_t = torch.as_tensor(np.clip(adv, -g.adv_clip, g.adv_clip), dtype=torch.float32)
    if run.on_round is not None:
        run.on_round(r, rows_g, seeds, images, scores)
    return Round(r, rows_g, seeds, lat, lps, images, scores, comp, adv_t)


def update_items(run: GRPORun, step: int) -> torch.Tensor:
    """The (sample, sampler step) items of optimizer step ``step``, as the references choose
    them: with grpo.reuse = split the round's samples shuffled into grpo.updates disjoint
    minibatches (each used once), else all of them; of each sample the first ``t_train``
    sampler steps (grpo.step_selection = first) or a random ``t_train`` of them (random). A
    function of (seed, step, process), so a resumed run trains on what the uninterrupted one
    did."""
    g, seed, rank = run.cfg.grpo, run.cfg.train.seed, run.acc.process_index
    r, u = divmod(step, g.updates)
    samples = torch.arange(run.n_local)
    if g.reuse == "split":
        gen = torch.Generator().manual_seed(((seed * 1_000_003 + r) * 89) + rank)
        samples = torch.randperm(run.n_local, generator=gen).tensor_split(g.updates)[u].sort()[0]
    if g.step_selection == "first":
        ks = torch.arange(run.t_train).repeat(len(samples), 1)
    else:
        gen = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 97) + rank)
        ks = torch.stack([torch.randperm(run.policy.num_steps, generator=gen)[:run.t_train]
                          for _ in range(len(samples))])
    return torch.stack([samples.repeat_interleave(run.t_train), ks.reshape(-1)], 1)


def samples_per_update(g, n_samples: int) -> int:
    """Samples one update trains on (the largest minibatch when a round is split)."""
    return -(-n_samples // g.updates) if g.reuse == "split" else n_samples


def item_loss(run: GRPORun, rd: Round, part: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The clipped-ratio objective (+ the KL to the base) over one micro-batch of items."""
    g, acc, tr, policy = run.cfg.grpo, run.acc, run.tr, run.policy
    i, k = part[:, 0], part[:, 1]
    x = rd.latents[i, k].to(acc.device)
    x_next = rd.latents[i, k + 1].to(acc.device)
    c = {kk: v[torch.as_tensor(rd.prompt_rows[i.numpy()])].to(acc.device)
         for kk, v in run.cond.items()}
    e = {kk: v.to(acc.device) for kk, v in run.empty.items()}
    with acc.autocast():
        pred = policy.predict(tr.model, x, k, c, e, tr.input_dtype)
    st = policy.step(pred, k, x, prev=x_next)
    loss_i, ratio = clipped_loss(st.log_prob, rd.log_probs[i, k].to(acc.device),
                                 rd.advantages[i].to(acc.device), g.clip_range)
    loss = loss_i.mean()
    r = ratio.detach()
    facts = {"ratio": float(r.mean()),
             "clip_fraction": float(((r - 1).abs() > g.clip_range).float().mean())}
    if g.kl_weight > 0 and tr.base is not None:
        with torch.no_grad():
            ref = policy.step(_base_guided(policy, tr.base, x, k, c, e, acc), k, x, prev=x_next)
        kl = kl_to_base(st, ref).mean()
        loss = loss + g.kl_weight * kl
        facts["kl"] = float(kl.detach())
    return loss, facts


def update(run: GRPORun, rd: Round, step: int) -> dict:
    """One optimizer step's gradients on round ``rd`` (the loop steps the optimizer): its
    items in ``accum`` micro-batches; returns the step's metrics."""
    acc, tr = run.acc, run.tr
    parts = torch.tensor_split(update_items(run, step), run.accum)
    losses, facts = [], []
    for micro, part in enumerate(parts):
        with accumulating(tr, acc, micro, run.accum):
            loss, f = item_loss(run, rd, part)
            backward(tr, acc, loss, run.accum)
            losses.append(float(loss.detach()))
            facts.append(f)
    out = {"loss": float(np.mean(losses)), "round": float(rd.index),
           **{k: float(np.mean([f[k] for f in facts])) for k in facts[0]}}
    for n, v in rd.rewards.items():
        out[f"reward_{n}"] = _mean_over_processes(acc, float(np.nanmean(v)))
    out["composite_std"] = float(np.std(rd.composite))
    return out


def _check_schedule(cfg, world: int) -> None:
    tc, g = cfg.train, cfg.grpo
    if g.prompts_per_step % world:
        raise CraftError(f"grpo.prompts_per_step={g.prompts_per_step} must be a multiple of the "
                         f"{world} processes: each process samples whole groups")
    local = g.prompts_per_step // world * g.group_size
    if g.reuse == "split" and local < g.updates:
        raise CraftError(f"grpo.reuse=split: each process samples {local} images a round, fewer "
                         f"than grpo.updates={g.updates} minibatches; sample more "
                         f"(grpo.prompts_per_step, grpo.group_size) or lower grpo.updates")
    if tc.steps % g.updates or (tc.checkpoint_every and tc.checkpoint_every % g.updates):
        raise CraftError(f"train.steps ({tc.steps}) and train.checkpoint_every "
                         f"({tc.checkpoint_every}) must be multiples of grpo.updates "
                         f"({g.updates}): a checkpoint falls between rounds, so a resumed run "
                         f"samples its next round from the weights that sampled it before")


def open_grpo_run(cfg, texts: list[str], ses, on_round=None) -> GRPORun:
    """Everything a GRPO run samples and trains with, on this process."""
    from craft.models.families import latent_shape
    from craft.rewards.configured import build_reward
    from craft.methods.training import (build_trainable, empty_conditioning, encode_texts,
                                        offload_encoders, training_size)

    g, pipe, acc = cfg.grpo, ses.pipe, ses.accelerator
    _check_schedule(cfg, acc.num_processes)
    size = training_size(cfg, pipe)
    cond = {k: v.cpu() for k, v in encode_texts(pipe, texts, acc.device, size).items()}
    empty = {k: v.float().cpu() for k, v in empty_conditioning(pipe, acc.device, size).items()}
    rewards = {n: build_reward(cfg, n, device=str(acc.device) if cfg.rewards.device == "auto"
                               else cfg.rewards.device) for n in cfg.rewards.names}
    restore: list = []
    offload_encoders(pipe, restore, keep=("vae",))
    tr = build_trainable(cfg, pipe, acc)
    tr.restore[:0] = restore
    n_local = g.prompts_per_step // acc.num_processes * g.group_size
    t_train = steps_trained(g)
    accum = math.ceil(samples_per_update(g, n_local) * t_train / cfg.train.micro_batch)
    acc.gradient_accumulation_steps = accum
    return GRPORun(cfg, ses, tr, Policy.for_pipe(pipe, cfg, size), texts, cond, empty, rewards,
                   latent_shape(pipe, *size), n_local, t_train, accum, on_round)


def train_grpo(cfg, prompts: pd.DataFrame, out_dir: str | Path, *, callbacks=None,
               resume: bool = False, pipe=None, meta: dict | None = None,
               grpo_callbacks: GRPOCallbacks | None = None):
    """Online GRPO on ``prompts`` (columns prompt_id, prompt: the original training prompts):
    ``train.steps`` optimizer steps, ``grpo.updates`` per round, each round a sampling block
    (:func:`sample_round`) followed by its updates (:func:`update`). Returns the
    :class:`craft.methods.training.TrainResult` of craft.methods.training's loop."""
    from craft.methods.training import (TrainCallbacks, open_session, release, run_loop,
                                        run_meta)

    tc, g = cfg.train, cfg.grpo
    if prompts.empty:
        raise CraftError("GRPO needs training prompts; add prompts first (`craft prompts`, or "
                         "Prompts in the studio)")
    out_dir = Path(out_dir)
    ses = open_session(cfg, out_dir, pipe)
    run = open_grpo_run(cfg, list(prompts["prompt"]), ses,
                        (grpo_callbacks or GRPOCallbacks()).on_round)
    meta = run_meta(cfg, n_prompts=len(run.texts), **(meta or {}))
    state: dict = {"round": None}

    def step_fn(step: int) -> dict:
        from craft.run.watch import section

        r = step // g.updates
        if state["round"] is None or state["round"].index != r:
            with section("sample"):
                state["round"] = sample_round(run, r)
        return update(run, state["round"], step)

    try:
        log.info("GRPO: %d rounds of %d prompts x %d images, %d sampler steps, %d updates each "
                 "(%d micro-batches of up to %d (image, step) pairs per process)",
                 tc.steps // g.updates, g.prompts_per_step, g.group_size, run.policy.num_steps,
                 g.updates, run.accum, tc.micro_batch)
        return run_loop(cfg, ses.pipe, run.tr, step_fn, out_dir, callbacks or TrainCallbacks(),
                        resume, meta, ses.accelerator, boundary=g.updates)
    finally:
        release(run.tr, ses.pipe, ses.accelerator)


def _base_guided(policy: Policy, base, x, k, c, e, acc):
    """The frozen base's guided prediction (LoRA: the same module, adapters off)."""
    with acc.autocast(), as_base(base) as dtype:
        return policy.predict(base, x, k, c, e, dtype)


def _mean_over_processes(acc, value: float) -> float:
    if acc.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float32, device=acc.device)
    return float(acc.reduce(t, reduction="mean"))


def num_rounds(cfg) -> int:
    """Rounds in a GRPO run: ``train.steps`` optimizer steps, ``grpo.updates`` per round."""
    return cfg.train.steps // max(1, cfg.grpo.updates)


def sampled_images(cfg) -> int:
    """Images a GRPO run samples and scores (all processes together)."""
    return num_rounds(cfg) * cfg.grpo.prompts_per_step * cfg.grpo.group_size


class OnlineGRPO(Method):
    """Online GRPO: samples groups from the model being trained, scores them with the same
    rewards, and descends the clipped-ratio objective (module docstring)."""

    name = "grpo"
    title = "online GRPO (sampled groups, clipped ratio objective)"
    data = "prompts"
    filtered_pool = False
    settings_section = "grpo"
    data_stage = None

    def select(self, pool, settings, cfg) -> Selection:
        prompts = pool.prompts
        return Selection(self.name, prompts, {
            "method": self.name, "grpo": dataclasses.asdict(cfg.grpo),
            "rewards": list(cfg.rewards.names), "weights": dict(cfg.filter.weights),
            "prompt_ids": prompts["prompt_id"].astype(int).tolist()})

    def train(self, cfg, selection, out_dir, *, resume=False, pipe=None, meta=None,
              callbacks=None, hooks=None):
        return train_grpo(cfg, selection.rows, out_dir, resume=resume, pipe=pipe, meta=meta,
                          callbacks=callbacks,
                          grpo_callbacks=GRPOCallbacks(on_round=(hooks or {}).get("on_round")))

    def needs_base(self, cfg) -> bool:
        return cfg.grpo.kl_weight > 0

    def plan_shape(self, cfg, processes, pool, family) -> PlanShape:
        t, g = cfg.train, cfg.grpo
        cfg_on = sampling_guidance(family or cfg.model.family, cfg) > 1.0
        items = max(1, g.prompts_per_step // processes) * g.group_size
        per_update = samples_per_update(g, items) * steps_trained(g)
        return PlanShape(t.micro_batch * (2 if cfg_on else 1),
                         max(1, -(-per_update // t.micro_batch)),
                         g.kl_weight > 0, items * (g.num_inference_steps + 1))

    def plan_samples(self, cfg, family=None):
        g = cfg.grpo
        per_step = samples_per_update(g, g.prompts_per_step * g.group_size) * steps_trained(g)
        guided = sampling_guidance(family or cfg.model.family, cfg) > 1
        return cfg.train.steps * per_step * (2 if guided else 1), "(image, step) row", []

    def step_work(self, cfg) -> float:
        """A round's images through sampling and their trained steps, shared by its updates
        (a round is sampled once and trained on grpo.updates times)."""
        g = cfg.grpo
        return (g.prompts_per_step * g.group_size * (g.num_inference_steps + steps_trained(g))
                / max(1, g.updates))

    def describe(self, record: dict) -> str:
        g = record.get("grpo", {})
        return (f"GRPO online: {g.get('prompts_per_step')} prompts × {g.get('group_size')} per "
                f"round of {len(record.get('prompt_ids', []))} prompts")

    def will_train_on(self, selection, cfg) -> str:
        g = cfg.grpo
        rounds = num_rounds(cfg)
        return (f"**Start will sample {g.prompts_per_step} prompts × {g.group_size} images per "
                f"round**, {rounds} rounds of {g.num_inference_steps} sampler steps (= "
                f"{sampled_images(cfg)} images generated and scored with "
                f"{', '.join(cfg.rewards.names)}), {g.updates} updates each; no pool needed")

    def card_lines(self, config: dict, record: dict, extra: dict) -> list[str]:
        g = config.get("grpo", {})
        return [f"- **Trained on:** its own samples, {g.get('prompts_per_step')} prompts x "
                f"{g.get('group_size')} images a round, {g.get('num_inference_steps')} sampler "
                f"steps, clip range {g.get('clip_range')}, KL weight {g.get('kl_weight')}"]


GRPO = OnlineGRPO()


__all__ = ["GRPO", "GRPOCallbacks", "GRPORun", "OnlineGRPO", "Policy", "Round", "Step",
           "clipped_loss", "composite_advantages", "ddim_step", "flow_sde_step",
           "gaussian_log_prob", "item_loss", "kl_to_base", "num_rounds", "open_grpo_run", "round_prompts",
           "sample_round", "samples_per_update", "sample_trajectories", "sampled_images", "sampling_guidance",
           "steps_trained", "train_grpo", "update"]
