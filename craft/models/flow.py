"""Flow matching (SD3 / SD3.5, FLUX.1): where a training sample sits between data and noise.

The flow families are trained on the straight path between a clean latent and noise,

    x_t = (1 - sigma) * x_0 + sigma * eps,      target v = eps - x_0,

with the denoiser conditioned on ``timestep = sigma * 1000``. Which sigmas are drawn follows
diffusers' own SD3 and FLUX training scripts (examples/dreambooth/train_dreambooth_sd3.py,
train_dreambooth_flux.py): a density ``u`` (logit-normal, "mode" or uniform; diffusers'
``compute_density_for_timestep_sampling``) picks an index into the model scheduler's training
timesteps, so the scheduler's ``shift`` (SD3.5: 3.0) skews training toward noisy steps exactly
as the model was trained, and FLUX (``use_dynamic_shifting``: the shift depends on the image
size at sampling time) trains on the unshifted grid. The loss weight ``w(sigma)`` is diffusers'
``compute_loss_weighting_for_sd3`` (``none`` = 1, ``sigma_sqrt``, ``cosmap``).

Kept in one module so that the CRAFT fine-tuning (craft.methods.training) and the flow toy base
(craft.toyworld.train_base) draw timesteps by the same rule.
"""

from __future__ import annotations

import torch

from craft.run.choices import TIMESTEP_SAMPLING as _SAMPLING

TIMESTEP_SAMPLING = _SAMPLING  # train.timestep_sampling (craft.run.choices)
FLOW_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


def is_flow_scheduler(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


def sample_sigmas(scheduler, n: int, scheme: str = "logit_normal", *, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas, timesteps)`` for ``n`` training samples, on the CPU (float32).

    ``scheduler`` is the model's FlowMatchEulerDiscreteScheduler as loaded (its ``timesteps`` /
    ``sigmas`` are the training grid until ``set_timesteps`` is called, so pass a fresh copy).
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if scheme not in TIMESTEP_SAMPLING:
        raise ValueError(f"train.timestep_sampling={scheme!r} is not one of "
                         f"{list(TIMESTEP_SAMPLING)}")
    u = compute_density_for_timestep_sampling(scheme, n, logit_mean=logit_mean,
                                              logit_std=logit_std, mode_scale=mode_scale,
                                              generator=generator)
    num = scheduler.config.num_train_timesteps
    idx = (u * num).long().clamp(0, num - 1)
    timesteps = scheduler.timesteps[idx].float()
    sigmas = scheduler.sigmas[idx].float()
    return sigmas, timesteps


def loss_weight(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """``w(sigma)`` per sample, diffusers' ``compute_loss_weighting_for_sd3``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if scheme not in FLOW_WEIGHTING:
        raise ValueError(f"flow weighting {scheme!r} is not one of {list(FLOW_WEIGHTING)}")
    return compute_loss_weighting_for_sd3(scheme, sigmas).float()


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) x_0 + sigma eps`` (sigma per sample)."""
    s = sigmas.view(-1, *[1] * (x0.dim() - 1)).to(x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What a flow model is trained to output: ``eps - x_0``."""
    return noise - x0
