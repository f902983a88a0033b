"""Step helpers every training method shares, stateless, as diffusers' training_utils is:
the micro-batch's draws, noising and target, the denoiser's prediction, the weighted denoising
loss, the frozen base's prediction with adapters off, gradient accumulation and backward,
clipping, and the EMA. craft/methods/training.py's loop and each method (craft/methods/*.py)
are built from them; no method reaches into another's private names.

The weighted denoising loss, for the UNet families (SD1.5, SDXL; the model's own target: noise,
velocity or x0) and the flow-matching families (SD3 / SD3.5, FLUX.1; craft/models/flow.py):

    L = mean_i  weight_i * w(t_i) * || pred(x_t, t_i, c_i) - target ||^2
        [+ anchor_weight * mean_i || pred(x_t, t_i, c_i) - pred_base(x_t, t_i, c_i) ||^2]
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from craft import CraftError
from craft.models.flow import is_flow_scheduler, noisy, sample_sigmas, velocity_target
from craft.models.flow import loss_weight as flow_loss_weight

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_WEIGHTING_OF = {"uniform": "none", "sigma_sqrt": "sigma_sqrt", "cosmap": "cosmap"}


def prediction_type(scheduler) -> str:
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise CraftError(f"the model's scheduler has prediction_type={kind!r}; training supports "
                         f"{', '.join(PREDICTION_TYPES)}; fix scheduler/scheduler_config.json")
    return kind


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output: the noise (epsilon models: SD1.5, SDXL), the
    velocity alpha*eps - sigma*x0 (v-prediction: SD2.x-v, zero-terminal-SNR models) or x0."""
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


def timestep_weights(scheduler, mode: str, snr_gamma: float = 5.0) -> torch.Tensor:
    """w(t) for every training timestep, normalised to mean 1 so learning rates carry over.

    - uniform: the plain MSE on the model's own target (noise, velocity or x0).
    - elbo: the paper's eq. 9 weight on the epsilon error, (1 - abar_t) / (2 sigma_t^2 abar_t)
      with sigma_t^2 = beta_t.
    - min_snr: min(SNR_t, gamma) / SNR_t on the epsilon error (Hang et al. 2023).

    elbo and min_snr are defined on the epsilon error; for a v- or x0-prediction model they are
    carried over exactly, since ||eps_hat - eps||^2 = abar_t ||v_hat - v||^2 =
    SNR_t ||x0_hat - x0||^2. The products are written out so that a zero-terminal-SNR schedule
    (abar = 0 at the last step) stays finite.
    """
    from diffusers.training_utils import compute_snr

    kind = prediction_type(scheduler)
    abar = scheduler.alphas_cumprod.double()
    beta = scheduler.betas.double()
    snr = compute_snr(scheduler, torch.arange(len(abar))).double()
    if mode == "uniform":
        w = torch.ones_like(abar)
    elif mode == "elbo":
        w = {"epsilon": (1 - abar) / (2 * beta * abar.clamp_min(1e-12)),
             "v_prediction": (1 - abar) / (2 * beta),
             "sample": 1 / (2 * beta)}[kind]
    elif mode == "min_snr":
        clipped = torch.clamp(snr, max=snr_gamma)
        w = {"epsilon": clipped / snr.clamp_min(1e-12),
             "v_prediction": clipped / (snr + 1),
             "sample": clipped}[kind]
    else:
        raise CraftError(f"train.timestep_weighting={mode!r} is not one of uniform, elbo, min_snr")
    return (w / w.mean()).float()


def gather(cond: dict, idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in cond.items()}


def micro_batch_generator(tc, step: int, micro: int, process: int) -> torch.Generator:
    """The draws of one micro-batch: a function of (seed, step, micro-batch, process), so a
    resumed run draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed(
        ((tc.seed * 1_000_003 + step) * 1009 + micro) * 97 + process)


@dataclasses.dataclass
class Noised:
    """One micro-batch on its way into the denoiser: the noisy latents, their timesteps, the
    target the model should predict, the per-sample w(t) and the (dropped-out) conditioning."""

    xt: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    w: torch.Tensor
    cond: dict


def noised_batch(noise_sched, w_t, data, tc, idx: torch.Tensor, gen, device,
                 share: int = 1) -> Noised:
    """Draw x0 from each image's latent posterior, noise it at a random timestep, and drop the
    prompt with probability ``train.cond_dropout``. ``share`` = 2: ``idx`` is two halves (DPO's
    winners then losers) that get the same noise, timestep and dropout, so their errors compare
    the images and nothing else. The order of the draws is fixed (resume depends on it)."""
    x0 = data.lat_mean[idx] + data.lat_std[idx] * torch.randn(
        data.lat_mean[idx].shape, generator=gen).to(device)
    x0 = (x0 - data.shift) * data.scaling
    n = len(idx) // share
    noise = torch.randn((n, *x0.shape[1:]), generator=gen).to(device).repeat(
        share, *[1] * (x0.dim() - 1))
    if is_flow_scheduler(noise_sched):
        sigmas, t = sample_sigmas(noise_sched, n, tc.timestep_sampling,
                                  logit_mean=tc.logit_mean, logit_std=tc.logit_std,
                                  mode_scale=tc.mode_scale, generator=gen)
        sigmas, t = sigmas.to(device).repeat(share), t.to(device).repeat(share)
        xt = noisy(x0, noise, sigmas)
        target = velocity_target(x0, noise)
        w = flow_loss_weight(sigmas, FLOW_WEIGHTING_OF[tc.timestep_weighting])
    else:
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (n,),
                          generator=gen).to(device).repeat(share)
        xt = noise_sched.add_noise(x0, noise, t)
        target = training_target(noise_sched, x0, noise, t)
        w = w_t[t]
    c = gather(data.cond, idx)
    drop = (torch.rand(n, generator=gen) < tc.cond_dropout).to(device).repeat(share)
    if drop.any():
        for k in c:
            c[k] = torch.where(drop.view(-1, *[1] * (c[k].dim() - 1)),
                               data.empty[k].expand_as(c[k]), c[k])
    return Noised(xt, t, target, w, c)


def predict(model, data, nb: Noised, accelerator) -> torch.Tensor:
    with accelerator.autocast():
        return data.call(model, nb.xt.to(data.input_dtype), nb.t,
                         {k: v.to(data.input_dtype) for k, v in nb.cond.items()})


def sq_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, in float32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(
        dim=tuple(range(1, pred.dim())))


def weighted_loss(unet, noise_sched, w_t: torch.Tensor, data, tc, step: int,
                     micro: int, process: int, accelerator, base_unet=None) -> torch.Tensor:
    """One micro-batch of L = mean_i weight_i * w(t_i) * ||pred - target||^2
    (+ anchor_weight * mean_i ||pred - pred_base||^2 when ``train.anchor_weight`` > 0).

    The anchor term compares the tuned prediction with the frozen base model's (``base_unet``;
    for LoRA the same module with its adapters disabled) on the same noisy input, timestep and
    conditioning. For two samplers whose reverse steps are Gaussians of equal variance, the KL
    divergence of one from the other is a weighted sum of exactly these squared differences, so
    this is the KL-style regulariser of DiffusionNFT / AWM: it lets the advantage-weighted term
    pull toward the kept images while charging for every move away from what the base model
    would predict. It is not weighted by the sample's advantage (the base is where every sample
    should stay near). At weight 0 it is not computed: the loss is the plain CRAFT loss, bit for
    bit.
    """
    device = accelerator.device
    gen = micro_batch_generator(tc, step, micro, process)
    idx = torch.randint(0, len(data), (tc.micro_batch,), generator=gen).to(device)
    nb = noised_batch(noise_sched, w_t, data, tc, idx, gen, device)
    pred = predict(unet, data, nb, accelerator)
    loss = (data.weights[idx] * nb.w * sq_error(pred, nb.target)).mean()
    if tc.anchor_weight > 0 and base_unet is not None:
        ref = base_prediction(base_unet, data, nb.xt, nb.t, nb.cond, accelerator)
        loss = loss + tc.anchor_weight * sq_error(pred, ref).mean()
    return loss


@contextlib.contextmanager
def as_base(base):
    """``base`` as the frozen base model: a LoRA run's denoiser with its adapters off for the
    duration (a full run's base has none). Yields the dtype to feed it."""
    adapters = bool(getattr(base, "_hf_peft_config_loaded", False))
    if adapters:
        base.disable_adapters()
    try:
        yield next(base.parameters()).dtype
    finally:
        if adapters:
            base.enable_adapters()


def base_prediction(base, data, xt, t, c, accelerator):
    with torch.no_grad(), accelerator.autocast(), as_base(base) as dtype:
        return data.call(base, xt.to(dtype), t, {k: v.to(dtype) for k, v in c.items()})


@contextlib.contextmanager
def accumulating(tr, accelerator, micro: int, accum: int):
    """Gradient accumulation: accelerate's for one process or DDP; for FSDP, gradients are
    reduce-scattered only after the last micro-batch."""
    if not tr.sharded:
        with accelerator.accumulate(tr.model):
            yield
        return
    tr.raw.set_requires_gradient_sync(micro == accum - 1)
    yield


def backward(tr, accelerator, loss, accum: int) -> None:
    if tr.sharded:
        (loss / accum).backward()
    else:
        accelerator.backward(loss)  # divides by the accumulation steps


def clip_gradients(tr, accelerator, max_norm: float) -> float:
    if tr.sharded:
        norm = torch.nn.utils.clip_grad_norm_(tr.params, max_norm if max_norm > 0 else
                                              float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(tr.params, max_norm))
    return float(torch.norm(torch.stack([p.grad.norm() for p in tr.params
                                         if p.grad is not None])))


def make_ema(params, decay: float, sharded: bool):
    """diffusers' EMAModel of the trainable weights (None at decay 0). foreach kernels have no
    DTensor sharding rules (copy_, lerp_): per tensor when sharded."""
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, foreach=not sharded)


def optimizer_step(tr) -> None:
    """The optimizer step after accumulation: AdamW, zeroed gradients, the EMA's update."""
    tr.opt.step()
    tr.opt.zero_grad(set_to_none=True)
    if tr.ema is not None:
        tr.ema.step(tr.params)


__all__ = ["FLOW_WEIGHTING_OF", "Noised", "PREDICTION_TYPES", "accumulating", "as_base",
           "backward", "base_prediction", "clip_gradients", "gather", "make_ema",
           "micro_batch_generator", "noised_batch", "optimizer_step", "predict",
           "prediction_type", "sq_error", "timestep_weights", "training_target",
           "weighted_loss"]
