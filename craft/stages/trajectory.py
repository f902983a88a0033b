"""A batch's trajectory cut short: the scheduler's own prediction of the final image after
``step`` denoising steps, and the images a check rejects dropped from the batch from then on.

Early rejection (craft.stages.generation) asks, part-way through sampling, what each image of a
batch is heading for: the scheduler's prediction of the clean sample at the current step
(``pred_original_sample``: DDIM and Euler return it; for the multistep solvers and the flow
schedulers it is the same formula their own ``step`` applies, computed from the model output the
pipeline handed them), decoded by the pipeline's VAE. A check decides which images go on; the
others stop there and cost no more denoiser evaluations.

Nothing of the sampler is re-implemented: the pipeline runs its own loop, guidance and
scheduler. :class:`StepCut` is a ``callback_on_step_end`` that, at the cut step, hands the
decoded predictions to the check and then returns the batch's tensors (latents, the text
conditioning the pipeline exposes to callbacks) with the rejected rows removed, and slices the
scheduler's per-image state (a multistep solver's history) the same way. Every sampler here is
deterministic (no noise is drawn inside the loop), and each image's arithmetic does not depend
on the others in its batch, so an image that goes on ends as it would have in the full batch
(up to float rounding), and a stopped one is reproduced exactly by its seed.

Supported: the pipelines whose callbacks expose all of the batch's conditioning (Stable
Diffusion 1.x/2.x and the toy base, SDXL, SD3 / SD3.5 and the flow toy base). FLUX's callback
does not expose its pooled embeddings, so a FLUX batch cannot shrink: refused with how to turn
early rejection off.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

# (global indices of the images, their predicted final images) -> which of them go on
CheckFn = Callable[[np.ndarray, list], np.ndarray]


def supports_cut(pipe) -> bool:
    from craft.models.families import family_of

    if family_of(pipe) == "flux":
        return False
    unet = getattr(pipe, "unet", None)
    return not (unet is not None and getattr(unet.config, "time_cond_proj_dim", None))


def require_cut(pipe) -> None:
    """Refuse, saying what to set, a pipeline whose batch cannot shrink mid-trajectory."""
    if not supports_cut(pipe):
        from craft import CraftError

        raise CraftError("generation.early_reject needs a pipeline whose step callback "
                         "exposes the whole batch (Stable Diffusion, SDXL, SD3); this one "
                         "(FLUX, or a guidance-embedded UNet) cannot drop images mid-batch: "
                         "set generation.early_reject: false")


def cut_step(num_inference_steps: int, at: float) -> int:
    """The step (1-based count of denoising steps done) where a fraction ``at`` of the
    trajectory has run; at least 1 and at most ``num_inference_steps - 1``."""
    return int(min(max(1, round(at * num_inference_steps)), max(1, num_inference_steps - 1)))


def x0_prediction(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                  out) -> torch.Tensor:
    """The scheduler's prediction of the clean latent at the step that just ran (``sample`` is
    the latent the step started from, ``out`` what ``step`` returned)."""
    if isinstance(out, tuple) and len(out) > 1 and torch.is_tensor(out[1]):
        return out[1]  # pred_original_sample (DDIM, Euler)
    config = scheduler.config
    flow = (type(scheduler).__name__.startswith("FlowMatch") or config.get("use_flow_sigmas")
            or config.get("prediction_type") == "flow_prediction")
    if flow:  # x_t = (1 - sigma) x0 + sigma eps, v = eps - x0
        index = max(int(scheduler.step_index) - 1, 0)
        sigma = scheduler.sigmas[index].to(sample.device, torch.float32)
        return (sample.float() - sigma * model_output.float()).to(sample.dtype)
    abar = scheduler.alphas_cumprod[int(timestep)].to(sample.device, torch.float32)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x, m = sample.float(), model_output.float()
    kind = config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        x0 = (x - s * m) / a
    elif kind == "v_prediction":
        x0 = a * x - s * m
    else:  # "sample"
        x0 = m
    return x0.to(sample.dtype)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list:
    """PIL images of (clean) latents through the pipeline's VAE and image processor, as the
    pipeline's own decode does (SDXL's upcast VAE and latent statistics, SD3's shift)."""
    vae = pipe.vae
    z = latents.to(vae.device, torch.float32)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        view = (1, -1, 1, 1)
        z = z * torch.tensor(std).view(view).to(z) / vae.config.scaling_factor \
            + torch.tensor(mean).view(view).to(z)
    else:
        z = z / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:  # SDXL's VAE overflows in float16: the pipeline decodes in float32 too
        vae.to(torch.float32)
    try:
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


class StepCut:
    """``callback_on_step_end`` that cuts a batch at ``step`` denoising steps.

    Per batch: :meth:`begin` (the batch's global indices; returns the pipeline keyword
    arguments), the pipeline call, :meth:`end` (the pipeline's images -> one entry per image of
    the batch, ``None`` for a stopped one). ``stopped`` then holds the batch's stopped global
    indices; ``check`` is called once per batch with the indices and the decoded predictions.
    """

    def __init__(self, step: int, check: CheckFn):
        if step < 1:
            raise ValueError(f"the cut step must be >= 1, got {step}")
        self.step = step
        self.check = check
        self.alive = np.zeros(0, dtype=np.int64)
        self.batch = np.zeros(0, dtype=np.int64)
        self._last = None
        self._dummy = False

    def begin(self, pipe, indices: Sequence[int]) -> dict:
        require_cut(pipe)
        self.batch = self.alive = np.asarray(indices, dtype=np.int64)
        self._dummy = False
        self._tap(pipe.scheduler)
        return {"callback_on_step_end": self,
                "callback_on_step_end_tensor_inputs": list(pipe._callback_tensor_inputs)}

    def _tap(self, scheduler) -> None:
        """Keep the arguments and result of the scheduler's last step (the instance's own
        ``step`` wrapped; removed in :meth:`end`)."""
        original = type(scheduler).step.__get__(scheduler)

        def step(model_output, timestep, sample, *args, **kwargs):
            out = original(model_output, timestep, sample, *args, **kwargs)
            self._last = (model_output, timestep, sample, out)
            return out

        scheduler.step = step

    def __call__(self, pipe, i: int, t, kwargs: dict) -> dict:
        if i + 1 != self.step or self._last is None:
            return {}
        x0 = x0_prediction(pipe.scheduler, *self._last)
        keep = np.asarray(self.check(self.alive, decode_latents(pipe, x0)), dtype=bool)
        self._last = None
        if keep.all():
            return {}
        rows = np.flatnonzero(keep)
        if rows.size == 0:  # nothing goes on: one row stays, unused, and the loop stops
            rows, self._dummy = np.zeros(1, dtype=np.int64), True
            pipe._interrupt = True
        self.alive = self.alive[keep]
        return shrink(pipe.scheduler, kwargs, rows)

    def end(self, pipe, images: list) -> list:
        vars(pipe.scheduler).pop("step", None)
        pipe._interrupt = False
        self._last = None
        position = {int(g): k for k, g in enumerate(self.batch)}
        out: list = [None] * len(self.batch)
        if not self._dummy:
            for g, im in zip(self.alive, images):
                out[position[int(g)]] = im
        return out

    @property
    def stopped(self) -> np.ndarray:
        return np.setdiff1d(self.batch, self.alive)


def shrink(scheduler, tensors: dict, rows: np.ndarray) -> dict:
    """The batch's tensors with only ``rows`` kept (a tensor of twice the batch holds the
    unconditional and the conditional halves of classifier-free guidance), and the scheduler's
    per-image state (any tensor shaped like the latents) sliced alike, in place."""
    latents = tensors["latents"]
    b = latents.shape[0]
    idx = torch.as_tensor(rows, device=latents.device)
    out = {}
    for name, value in tensors.items():
        out[name] = _rows(value, b, idx)
    for name, value in list(vars(scheduler).items()):
        if torch.is_tensor(value) and _per_image(value, latents):
            setattr(scheduler, name, value[idx.to(value.device)])
        elif isinstance(value, list) and any(torch.is_tensor(v) and _per_image(v, latents)
                                             for v in value):
            setattr(scheduler, name, [v[idx.to(v.device)] if torch.is_tensor(v)
                                      and _per_image(v, latents) else v for v in value])
    return out


def _per_image(value: torch.Tensor, latents: torch.Tensor) -> bool:
    return value.dim() == latents.dim() and value.shape[0] == latents.shape[0]


def _rows(value, b: int, idx: torch.Tensor):
    if not torch.is_tensor(value) or value.dim() == 0:
        return value
    i = idx.to(value.device)
    if value.shape[0] == 2 * b:
        return torch.cat([value[:b][i], value[b:][i]])
    if value.shape[0] == b:
        return value[i]
    return value


__all__ = ["CheckFn", "StepCut", "cut_step", "decode_latents", "require_cut", "shrink",
           "supports_cut", "x0_prediction"]
