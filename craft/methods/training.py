"""Group-advantage-weighted fine-tuning (CRAFT stage 3), one readable loop.

    L = mean_i  weight_i * w(t_i) * || eps_theta(x_t, t_i, c_i) - eps ||^2
        [+ anchor_weight * mean_i || eps_theta(x_t, t_i, c_i) - eps_base(x_t, t_i, c_i) ||^2]

for the UNet families (SD1.5, SDXL; the model's own target: noise, velocity or x0), and for the
flow-matching families (SD3 / SD3.5, FLUX.1; craft.models.flow)

    L = mean_i  weight_i * w(sigma_i) * || v_theta(x_t, sigma_i, c_i) - (eps - x_0) ||^2,
    x_t = (1 - sigma_i) x_0 + sigma_i eps,   sigma_i drawn as diffusers' SD3/FLUX scripts do,

over the kept candidates, where ``weight_i`` comes from the sample's group advantage
(craft.stages.advantages) and ``c_i`` is the *original* prompt by default, which is what carries the
variants' quality over to plain prompts. The rest is ordinary diffusion fine-tuning: AdamW,
gradient accumulation to an effective batch, the base model's empty-prompt dropout (so
classifier-free guidance stays calibrated), an EMA of the tuned weights (what gets saved),
full UNet or LoRA, checkpoints in diffusers format, resume, and a cancel that stops within one
optimizer step and leaves a loadable checkpoint. It runs unchanged under ``accelerate launch``
(data parallel: every process draws its own micro-batches, gradients are averaged).

:func:`train` is the loop, top to bottom; each phase is a named helper above it (build the
trainable model and optimiser, encode the data set once, resume, one micro-batch loss, save).
It talks to the outside only through :class:`TrainCallbacks` (metrics, previews, checkpoints,
cancel), never through prints or the run store, so the CLI, the studio and the benchmarks drive
it alike; craft.stages.engine records runs and metrics in the store.

Which library pieces are used, and where they differ from a hand-written loop:

- ``accelerator.accumulate`` for gradient accumulation (no gradient all-reduce on the
  micro-batches before the last; ``accelerator.backward`` divides by the accumulation steps).
- diffusers' ``EMAModel`` for the EMA of the trainable weights. Its decay is
  min(ema_decay, k / (k + 9)) at optimizer step k, as before, except that its first update is a
  plain copy (decay 0, where the earlier loop used 0.1): after step 1 the EMA equals the live
  weights.
- diffusers' ``compute_snr`` for the SNR in the min-SNR and ELBO weights (float32; the earlier
  table was float64, the weights agree to ~1e-6).
- Not ``get_scheduler("constant_with_warmup")``: it gives lr 0 on the first step (a wasted
  step); the warm-up here is lr * (step + 1) / warmup, equal from the second step on.
- Not ``accelerator.save_state``: it pickles the RNG states and loads them with
  ``weights_only=False``. Here the data order is a function of (seed, step, micro-batch,
  process), so no RNG state is needed, and ``state.pt`` holds tensors and numbers only, read
  back with ``weights_only=True``. A checkpoint also holds a complete diffusers UNet, so it can
  be evaluated without the training code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from craft import CraftError
# checkpoint_* / latest_checkpoint and LORA_TARGETS live in craft.models.checkpoints and craft.models.lora;
# imported here for the callers that know them as craft.methods.training's
from craft.models.checkpoints import (checkpoint_denoiser, checkpoint_folder,  # noqa: F401
                               checkpoint_meta, latest_checkpoint)
from craft.models.lora import LORA_TARGETS  # noqa: F401
from craft.models.families import native_size
from craft.run.layout import final_dir, preview_dir
from craft.run.choices import UNET_WEIGHTINGS as _UNET_W
# the step helpers, known to older callers as craft.methods.training's
from craft.methods.steps import (FLOW_WEIGHTING_OF, PREDICTION_TYPES, accumulating,  # noqa: F401
                                 backward, clip_gradients, make_ema, micro_batch_generator,
                                 noised_batch, optimizer_step, timestep_weights,
                                 training_target, weighted_loss)
from craft.methods.steps import weighted_loss as micro_batch_loss  # noqa: F401

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainCallbacks:
    """How a caller watches and steers training; every member is optional."""

    on_step: Callable[[int, int, dict], None] | None = None  # (step, total, metrics)
    on_preview: Callable[[int, list, list], None] | None = None  # (step, images, prompts)
    on_checkpoint: Callable[[int, Path], None] | None = None
    should_stop: Callable[[], bool] | None = None  # checked before every optimizer step


@dataclasses.dataclass
class TrainResult:
    run_id: int | None  # the run store's row (set by craft.stages.engine; None when called directly)
    status: str  # done | cancelled
    steps_done: int
    out_dir: Path
    final_dir: Path | None  # the complete tuned pipeline (status done)
    last_checkpoint: Path | None


# ------------------------------------------------------------------------ timestep weighting


# ------------------------------------------------------------------------ conditioning


def encode_text(pipe, prompts: list[str], device, size: tuple[int, int] | None = None) -> dict:
    """Denoiser conditioning for ``prompts``: hidden states, plus SDXL's pooled embeds and time
    ids, or the flow families' pooled embeds.

    SDXL's time ids are (original size, crop top-left, target size) = ``(h, w, 0, 0, h, w)`` for
    uncropped training images of ``size`` = (h, w) pixels (default: the native size), as the
    pipeline builds them when it generates at that size.
    """
    from craft.models.families import FLOW_FAMILIES, encode_prompts, family_of

    fam = family_of(pipe)
    with torch.no_grad():
        out = encode_prompts(pipe, prompts, cfg=False, device=device)
    if fam == "sdxl":
        h, w = size or native_size(pipe)
        embeds = out["prompt_embeds"]
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=device,
                                dtype=embeds.dtype).repeat(len(prompts), 1)
        return {"hidden": embeds, "text_embeds": out["pooled_prompt_embeds"],
                "time_ids": time_ids}
    if fam in FLOW_FAMILIES:
        return {"hidden": out["prompt_embeds"], "pooled": out["pooled_prompt_embeds"]}
    return {"hidden": out["prompt_embeds"]}


def empty_conditioning(pipe, device, size: tuple[int, int] | None = None) -> dict:
    """The conditioning that replaces a caption under prompt dropout: whatever the pipeline
    uses as the unconditional branch of classifier-free guidance, so that dropout keeps
    guidance calibrated. That is the encoding of "" for SD1.5, SD3 and FLUX (which has no
    unconditional branch; "" is what its recipes drop to), and zeros for SDXL models saved
    with ``force_zeros_for_empty_prompt`` (the SDXL default)."""
    from craft.models.families import family_of

    empty = encode_text(pipe, [""], device, size)
    if family_of(pipe) == "sdxl" and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        empty["hidden"] = torch.zeros_like(empty["hidden"])
        empty["text_embeds"] = torch.zeros_like(empty["text_embeds"])
    return empty


@dataclasses.dataclass(frozen=True)
class DenoiserCall:
    """How the denoiser of a family is called on a batch of (unpacked) latents.

    UNets take (x_t, t, hidden states[, SDXL's added conditions]); SD3's transformer takes the
    pooled embeds and ``timestep = sigma * 1000``; FLUX's takes 2x2-packed latents, position ids
    for image and text tokens, ``timestep = sigma`` and, for FLUX.1-dev, the guidance scale as
    an input (its training scripts pass a constant, 3.5 by default).
    """

    family: str
    height: int = 0  # pixels (FLUX: to unpack the prediction)
    width: int = 0
    vae_scale_factor: int = 8
    guidance: float | None = None

    @classmethod
    def for_pipe(cls, pipe, size: tuple[int, int], guidance: float):
        from craft.models.families import family_of, flux_guidance

        fam = family_of(pipe)
        return cls(fam, size[0], size[1], pipe.vae_scale_factor,
                   guidance if fam == "flux" and flux_guidance(pipe) else None)

    def __call__(self, model, xt, t, cond: dict):
        if self.family == "sd3":
            return model(hidden_states=xt, timestep=t, encoder_hidden_states=cond["hidden"],
                         pooled_projections=cond["pooled"]).sample
        if self.family == "flux":
            from diffusers import FluxPipeline

            b, c, h, w = xt.shape
            packed = FluxPipeline._pack_latents(xt, b, c, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, xt.device,
                                                             xt.dtype)
            txt_ids = torch.zeros(cond["hidden"].shape[1], 3, device=xt.device, dtype=xt.dtype)
            guidance = (None if self.guidance is None else
                        torch.full((b,), self.guidance, device=xt.device, dtype=torch.float32))
            out = model(hidden_states=packed, timestep=t / 1000, guidance=guidance,
                        pooled_projections=cond["pooled"], encoder_hidden_states=cond["hidden"],
                        txt_ids=txt_ids, img_ids=img_ids).sample
            return FluxPipeline._unpack_latents(out, self.height, self.width,
                                                self.vae_scale_factor)
        extra = {}
        if "text_embeds" in cond:
            extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"],
                                          "time_ids": cond["time_ids"]}
        return model(xt, t, cond["hidden"], **extra).sample


# ------------------------------------------------------------------------ data


def encode_latents(vae, pixels: torch.Tensor, device, batch: int = 16):
    """Posterior (mean, std) of ``pixels`` in [-1, 1], as float32 tensors on ``device``.

    A float16 VAE whose config sets ``force_upcast`` (SDXL's: it overflows to NaN in float16)
    encodes in float32, as the pipelines do when they decode; it is cast back afterwards.
    """
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        with torch.no_grad():
            dists = [vae.encode(pixels[i:i + batch].to(device, vae.dtype)).latent_dist
                     for i in range(0, len(pixels), batch)]
    finally:
        if upcast:
            vae.to(dtype)
    return (torch.cat([d.mean for d in dists]).float(),
            torch.cat([d.std for d in dists]).float())


def load_training_images(paths: list[str], size: tuple[int, int]) -> torch.Tensor:
    """Images as a float tensor in [-1, 1], resized to the model's resolution if needed."""
    out = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out).float().div(127.5).sub(1.0)


def _check_training_frame(df: pd.DataFrame) -> None:
    need = {"image_path", "prompt", "weight"}
    missing = need - set(df.columns)
    if missing:
        raise CraftError(f"training set is missing columns {sorted(missing)}; it needs "
                         f"{sorted(need)} (craft.stages.selection.select gives it: Selection.rows)")
    if len(df) == 0:
        raise CraftError("the training set is empty: no candidate passed the filter. Loosen "
                         "filter.level (e.g. ha or h), lower filter.margin, or generate more "
                         "candidates")
    w = df["weight"].to_numpy(float)
    if not np.isfinite(w).all():
        raise CraftError("training weights contain NaN/inf; this is a bug in the selection step")


# ------------------------------------------------------------------------ options


def resolve_mixed_precision(mode: str, device: torch.device) -> str:
    """``train.mixed_precision`` as accelerate takes it: ``auto`` is bf16 on GPUs that support
    it, fp16 on older ones, and no autocast on the CPU."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_train_options(cfg) -> None:
    """Fail before any work on training options this machine cannot honour (``craft run``
    calls this before generating, so a missing package does not surface hours later)."""
    import importlib.util

    from craft.run.devices import resolve_device

    tc = cfg.train
    device = resolve_device(cfg.model.device)
    if tc.use_8bit_adam:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise CraftError("train.use_8bit_adam=true needs the bitsandbytes package, which is "
                             "not installed: pip install bitsandbytes (CUDA machines), or --set "
                             "train.use_8bit_adam=false")
        if device.type != "cuda":
            raise CraftError(f"train.use_8bit_adam=true needs a CUDA device, but the model runs "
                             f"on {device}; --set train.use_8bit_adam=false")
    if tc.mixed_precision == "fp16" and device.type != "cuda":
        raise CraftError(f"train.mixed_precision='fp16' needs a CUDA device, but the model runs "
                         f"on {device}; use 'no', 'bf16' or 'auto'")
    if (tc.mixed_precision == "bf16" and device.type == "cuda"
            and not torch.cuda.is_bf16_supported()):
        raise CraftError("train.mixed_precision='bf16' but this GPU does not support bfloat16; "
                         "use 'fp16' or 'auto'")


# train.timestep_weighting on a flow model -> diffusers' weighting scheme (craft.models.flow)
UNET_WEIGHTINGS = _UNET_W  # (craft.run.choices)


def check_flow_options(cfg, pipe) -> None:
    """The timestep weighting must exist for the model's objective: elbo / min_snr are defined
    on the epsilon error of a noise schedule, sigma_sqrt / cosmap on the flow-matching path."""
    from craft.models.families import family_of, is_flow

    mode = cfg.train.timestep_weighting
    if is_flow(pipe) and mode not in FLOW_WEIGHTING_OF:
        raise CraftError(f"train.timestep_weighting={mode!r} is defined for noise-prediction "
                         f"models; this {family_of(pipe)} model is trained by flow matching: "
                         f"use one of {list(FLOW_WEIGHTING_OF)} (uniform is the SD3/FLUX "
                         "recipe's default)")
    if not is_flow(pipe) and mode not in UNET_WEIGHTINGS:
        raise CraftError(f"train.timestep_weighting={mode!r} is a flow-matching weighting; "
                         f"this {family_of(pipe)} model predicts noise: use one of "
                         f"{list(UNET_WEIGHTINGS)}")


def gradient_accumulation(tc, n_processes: int) -> int:
    """Micro-batches per optimizer step on each process, so that micro_batch x processes x
    accumulation = effective_batch."""
    if tc.effective_batch % (tc.micro_batch * n_processes):
        raise CraftError(
            f"train.effective_batch={tc.effective_batch} is not a multiple of micro_batch "
            f"({tc.micro_batch}) x processes ({n_processes}); choose effective_batch as a "
            f"multiple of {tc.micro_batch * n_processes}")
    return tc.effective_batch // (tc.micro_batch * n_processes)


# ------------------------------------------------------------------------ the phases


@dataclasses.dataclass
class TrainData:
    """The kept set, encoded once: latent posteriors, text conditioning, loss weights."""

    lat_mean: torch.Tensor
    lat_std: torch.Tensor
    cond: dict
    empty: dict  # the conditioning prompt dropout substitutes
    weights: torch.Tensor
    scaling: float
    shift: float
    call: DenoiserCall
    input_dtype: torch.dtype = torch.float32  # what the denoiser is fed (LoRA: its own dtype)
    pairs: torch.Tensor | None = None  # DPO: (n_pairs, 2) rows of winner and loser

    def __len__(self) -> int:
        return len(self.weights)


@dataclasses.dataclass
class Trainable:
    """What trains, and how it is held.

    LoRA: adapters (float32) on the pipeline's *own* denoiser, whose weights stay frozen in the
    model dtype; the anchor's base prediction is that module with the adapters disabled. Full:
    a float32 master copy of the denoiser (built tensor by tensor from the base, never a
    model-dtype copy first); the pipeline's own denoiser is the frozen base, kept on the device
    only when the anchor needs it. ``model`` is what the loss calls (DDP-wrapped, sharded or
    plain), ``raw`` the module itself."""

    model: torch.nn.Module
    raw: torch.nn.Module
    params: list
    opt: object
    ema: object
    lora: bool
    sharded: bool
    base: torch.nn.Module | None  # the anchor's reference (LoRA: raw itself, adapters off)
    input_dtype: torch.dtype
    model_dtype: torch.dtype  # the pipeline's denoiser's dtype: what is saved and generated in
    restore: list = dataclasses.field(default_factory=list)  # (module, device) moved off


def use_sharding(cfg, accelerator) -> bool:
    """FSDP when the config (or the user's accelerate config) asks, training is full
    fine-tuning and there are processes to shard over. LoRA's frozen weights stay whole on
    every process (its point is that they fit); it runs data parallel."""
    from craft.models.sharding import effective_sharding

    if effective_sharding(cfg) != "fsdp" or accelerator.num_processes == 1:
        return False
    if cfg.train.lora:
        log.warning("FSDP was asked for (accelerate's --use_fsdp) but train.lora trains "
                    "adapters on a frozen model: training data parallel instead")
        return False
    return True


def float32_copy(module) -> torch.nn.Module:
    """A float32 copy of ``module`` on its device, built from its config on the meta device
    and filled tensor by tensor (``copy.deepcopy(m).float()`` first copies in the model dtype:
    half a model more at the peak)."""
    from accelerate import init_empty_weights

    from craft.models.loading import LOAD_LOCK

    with LOAD_LOCK, init_empty_weights(include_buffers=False):
        copy_ = type(module).from_config(module.config)
    state = {k: v.detach().to(torch.float32, copy=True) for k, v in module.state_dict().items()}
    copy_.load_state_dict(state, assign=True, strict=True)
    for name, buf in module.named_buffers():  # non-persistent buffers are not in state_dict
        owner, _, leaf = name.rpartition(".")
        target = copy_.get_submodule(owner) if owner else copy_
        if getattr(target, leaf).is_meta:
            setattr(target, leaf, buf.clone())
    return copy_


def _offload(module, restore: list) -> None:
    """Move a frozen module to the CPU while the steps run (CUDA only; on the CPU there is
    nowhere to move it: it stays, and a memory meter watching the run is told it left)."""
    from craft.run.watch import left_device

    dev = next(module.parameters()).device
    if dev.type == "cuda":
        module.to("cpu")
    left_device(module)
    restore.append((module, dev))


def build_trainable(cfg, pipe, accelerator) -> Trainable:
    """The trainable denoiser (LoRA adapters or a float32 master copy), its AdamW and EMA,
    placed for the process set-up: one process, DDP, or FSDP (craft/models/sharding.py)."""
    from craft.models.lora import add_lora
    from craft.models.families import denoiser, denoiser_name
    from craft.models.sharding import fully_shard_model

    tc = cfg.train
    base = denoiser(pipe)
    base.requires_grad_(False)
    model_dtype = base.dtype
    sharded = use_sharding(cfg, accelerator)
    restore: list = []
    if tc.lora:
        add_lora(base, denoiser_name(pipe), tc.lora_rank, tc.lora_alpha)
        raw, anchor, input_dtype = base, base, base.dtype
    else:
        raw = float32_copy(base)
        raw.requires_grad_(True)
        # the frozen base stays on the device when a loss compares with it (anchor, DPO, KL)
        from craft.methods.registry import get_method

        needs_base = get_method(tc.method).needs_base(cfg)
        anchor, input_dtype = (base if needs_base else None), torch.float32
        if anchor is None:
            _offload(base, restore)
    if cfg.model.gradient_checkpointing:
        raw.enable_gradient_checkpointing()
    raw.train()
    if sharded:
        mp = accelerator.mixed_precision
        fully_shard_model(raw, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp))
    params = [p for p in raw.parameters() if p.requires_grad]
    betas = (tc.adam_beta1, tc.adam_beta2)
    if tc.use_8bit_adam:
        import bitsandbytes as bnb  # present: check_train_options said so

        opt = bnb.optim.AdamW8bit(params, lr=tc.lr, betas=betas, weight_decay=tc.weight_decay)
    else:
        # fused: one kernel for all tensors (the per-tensor default loop dominated CPU steps)
        opt = torch.optim.AdamW(params, lr=tc.lr, betas=betas, weight_decay=tc.weight_decay,
                                fused=not sharded)
    model = raw
    if not sharded:
        model, opt = accelerator.prepare(raw, opt)
    ema = make_ema(params, tc.ema_decay, sharded)
    return Trainable(model, raw, params, opt, ema, tc.lora, sharded, anchor, input_dtype,
                     model_dtype, restore)


def release(tr: Trainable, pipe, accelerator) -> None:
    """Give the pipeline back as it came: accelerate's autocast wrapper off the module, the
    adapters out, offloaded modules back on their device."""
    from craft.models.lora import remove_lora

    if not tr.sharded:
        accelerator.unwrap_model(tr.model, keep_fp32_wrapper=False)
    if tr.lora:
        remove_lora(tr.raw)
    from craft.run.watch import back_on_device

    for module, dev in tr.restore:
        module.to(dev)
        back_on_device(module)
    tr.restore.clear()
    # The training state sits in reference cycles (accelerate's forward wrapper refers back to
    # the module): left to the cyclic collector, a full run's float32 copy stayed on the device
    # into evaluation, beside both pipelines (craft rehearse measured it). Dropped now.
    from craft.run.devices import free_memory

    accelerator.free_memory()
    tr.model = tr.raw = tr.opt = tr.ema = tr.base = None
    tr.params = []
    free_memory()


def training_size(cfg, pipe) -> tuple[int, int]:
    """Train at the resolution the candidates were generated at (the native one by default)."""
    native_h, native_w = native_size(pipe)
    return cfg.generation.height or native_h, cfg.generation.width or native_w


TEXT_CHUNK = 16  # prompts encoded at a time (craft.planning simulates the same)


def vae_chunk(cfg) -> int:
    """Images the VAE encodes at a time: one with ``model.vae_slicing`` (an SDXL VAE at 1024 px
    needs ~2.5 GiB an image in float32), else a micro-batch."""
    return 1 if cfg.model.vae_slicing else cfg.train.micro_batch


def encode_texts(pipe, texts: list[str], device, size: tuple[int, int]) -> dict:
    """:func:`encode_text` of many prompts, ``TEXT_CHUNK`` at a time, as float32."""
    parts = [encode_text(pipe, texts[i:i + TEXT_CHUNK], device, size)
             for i in range(0, len(texts), TEXT_CHUNK)]
    return {k: torch.cat([p[k] for p in parts]).float() for k in parts[0]}


def encode_dataset(cfg, pipe, train_df: pd.DataFrame, device) -> TrainData:
    """Latents and text conditioning of every kept image, computed once (VAE and text encoders
    are frozen), on ``device``, a chunk at a time."""
    from craft.models.families import denoiser

    tc = cfg.train
    size = training_size(cfg, pipe)
    pixels = load_training_images(list(train_df["image_path"]), size)
    lat_mean, lat_std = encode_latents(pipe.vae, pixels, device, batch=vae_chunk(cfg))
    text_col = "variant" if tc.conditioning == "variant" and "variant" in train_df else "prompt"
    cond = encode_texts(pipe, list(train_df[text_col]), device, size)
    empty = empty_conditioning(pipe, device, size)
    weights = torch.tensor(train_df["weight"].to_numpy(float), dtype=torch.float32,
                           device=device)
    return TrainData(lat_mean, lat_std, cond, {k: v.float() for k, v in empty.items()}, weights,
                     pipe.vae.config.scaling_factor,
                     getattr(pipe.vae.config, "shift_factor", None) or 0.0,
                     DenoiserCall.for_pipe(pipe, size, tc.guidance_scale),
                     denoiser(pipe).dtype if tc.lora else torch.float32)


def offload_encoders(pipe, restore: list, keep: tuple[str, ...] = ()) -> None:
    """The text encoders and the VAE leave the GPU once the kept set is encoded (FLUX's T5-XXL
    alone is 9.5 GB); previews bring them back for a while (:func:`encoders_on`). ``keep``:
    the ones a method still needs (GRPO decodes every round with the VAE)."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = None if name in keep else getattr(pipe, name, None)
        if module is not None:
            _offload(module, restore)


@contextlib.contextmanager
def encoders_on(pipe, restore: list):
    from craft.run.watch import back_on_device, left_device

    moved = [(m, d) for m, d in restore if not _is_denoiser(pipe, m)]
    for module, dev in moved:
        module.to(dev)
        back_on_device(module)
    try:
        yield
    finally:
        for module, _ in moved:
            module.to("cpu")
            left_device(module)


def _is_denoiser(pipe, module) -> bool:
    from craft.models.families import denoiser

    return module is denoiser(pipe)


@contextlib.contextmanager
def tuned_pipeline(pipe, tr: Trainable):
    """``pipe`` generating with the weights being trained (EMA if kept): LoRA's adapters are
    already in the pipeline's denoiser; a full run's float32 copy is swapped in (no
    model-dtype copy is made). Either way under autocast to the pipeline's dtype when it is not
    float32: the trained module returns float32 (a full run's copy is float32; LoRA's carries
    accelerate's mixed-precision wrapper, which converts its outputs to float32), and a
    float16 / bfloat16 VAE refuses float32 latents (LoRA previews of the bf16 configs failed at
    step 0 so: craft rehearse found it)."""
    from craft.models.checkpoints import ema_weights
    from craft.models.families import denoiser, set_denoiser

    original = denoiser(pipe)
    tr.raw.eval()
    cast = contextlib.nullcontext()
    if not tr.lora:
        set_denoiser(pipe, tr.raw)
    if tr.model_dtype != torch.float32:
        cast = torch.autocast(pipe.device.type, dtype=tr.model_dtype)
    try:
        with ema_weights(tr.ema, tr.params), cast:
            yield pipe
    finally:
        set_denoiser(pipe, original)
        tr.raw.train()


def render_previews(cfg, pipe, tr: Trainable, out_dir: Path, step: int,
                    save: bool = True) -> tuple[list, list]:
    """Fixed-seed previews of the current (EMA) weights, saved under previews/step-N/."""
    from craft.run.fsutil import save_image_atomic
    from craft.stages.generation import SamplingParams, generate_images

    prompts = list(cfg.train.preview_prompts)
    params = SamplingParams(num_inference_steps=cfg.eval.num_inference_steps,
                            guidance_scale=cfg.eval.guidance_scale)
    with encoders_on(pipe, tr.restore), tuned_pipeline(pipe, tr):
        images = [im for _, b in generate_images(pipe, prompts, list(range(len(prompts))),
                                                 params) for im in b]
    if save:
        pdir = preview_dir(out_dir, step)
        pdir.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):  # the studio shows them while training goes on
            save_image_atomic(im, pdir / f"{i}.png", fsync=False)
    return images, prompts


def finish(cfg, pipe, tr: Trainable, out_dir: Path, steps: int, meta: dict,
           main: bool = True) -> Path:
    """out_dir/final: a LoRA run's adapters (+ the merged pipeline with ``train.save_merged``),
    a full run's complete pipeline; with a craft_train.json saying what made it. Every process
    calls it (a sharded model is gathered by all); the main process writes."""
    from craft.models.checkpoints import ema_weights, full_state, write_pipeline
    from craft.run.config import config_to_dict
    from craft.run.fsutil import atomic_dir
    from craft.models.lora import TRAIN_RECORD, merged_state, save_lora

    record = json.dumps({**meta, "steps": steps, "config": config_to_dict(cfg)}, indent=1)
    final = final_dir(out_dir)
    with ema_weights(tr.ema, tr.params):
        if tr.lora:
            state = merged_state(tr.raw, tr.model_dtype) if cfg.train.save_merged else None
        else:
            state = full_state(tr.raw, tr.model_dtype)
        if main:
            with atomic_dir(final) as tmp:
                if tr.lora:
                    save_lora(pipe, tr.raw, tmp)
                if state is not None:
                    write_pipeline(pipe, tmp, state, tr.raw if not tr.lora else None)
                (tmp / TRAIN_RECORD).write_text(record)
    if main:
        log.info("training done: %d steps; %s at %s", steps,
                 "LoRA adapters" if tr.lora else "tuned pipeline", final)
    return final


# ------------------------------------------------------------------------ the loop


@dataclasses.dataclass
class Session:
    """What every training method starts from: the accelerator, the pipeline on its device and
    a fresh noise scheduler (the training grid) with the UNets' w(t) table."""

    accelerator: object
    pipe: object
    noise_sched: object
    w_t: torch.Tensor | None


def open_session(cfg, out_dir: Path, pipe=None) -> Session:
    """Checks, the accelerator (accumulation to ``train.effective_batch``), the model."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from craft.run.devices import resolve_device
    from craft.models.loading import load_from_config
    from craft.models.families import is_flow

    tc = cfg.train
    check_train_options(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.model.device)
    mixed = resolve_mixed_precision(tc.mixed_precision, device)
    _forget_other_precision(mixed)
    with _without_accelerate_fsdp():
        accelerator = _accelerator(mixed, device)
    accelerator.gradient_accumulation_steps = gradient_accumulation(tc,
                                                                    accelerator.num_processes)
    torch.manual_seed(tc.seed)
    if pipe is None:
        pipe = load_from_config(cfg.model, device=str(accelerator.device))
    pipe.to(accelerator.device)
    check_flow_options(cfg, pipe)
    if is_flow(pipe):  # a fresh copy: its timesteps are the training grid (craft.models.flow)
        return Session(accelerator, pipe,
                       FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), None)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    return Session(accelerator, pipe, noise_sched, timestep_weights(
        noise_sched, tc.timestep_weighting, tc.snr_gamma).to(accelerator.device))


def run_meta(cfg, **extra) -> dict:
    """What every checkpoint and final/ of a run records about how it was trained."""
    tc = cfg.train
    return {"base": cfg.model.pretrained, "lora": tc.lora,
            "lora_rank": tc.lora_rank if tc.lora else None, "method": tc.method, **extra}


def train(cfg, train_df: pd.DataFrame, out_dir: str | Path, *,
          callbacks: TrainCallbacks | None = None, resume: bool = False, pipe=None,
          meta: dict | None = None, pairs=None) -> TrainResult:
    """Fine-tune ``cfg.model`` on ``train_df`` (columns image_path, prompt, weight[, variant])
    with ``train.method``'s micro-batch loss (craft/methods/: its ``micro_loss``).

    ``pipe`` may be passed to reuse an already loaded base pipeline: it is given back as it
    came (LoRA adapters removed, offloaded parts back on the device). ``meta`` is saved with
    every checkpoint (craft.stages.engine puts the run name and the kept-set digest there). Under
    several processes the main one saves (all of them, for a sharded model); every process
    returns. A pair method: ``pairs`` holds the (n_pairs, 2) rows of ``train_df`` that are each
    pair's winner and loser (craft.methods.dpo.pair_images).
    """
    from craft.methods.registry import get_method

    _check_training_frame(train_df)
    out_dir = Path(out_dir)
    ses = open_session(cfg, out_dir, pipe)
    pipe, accelerator = ses.pipe, ses.accelerator
    from craft.run.watch import section

    with section("encode"):
        data = encode_dataset(cfg, pipe, train_df, accelerator.device)
    if pairs is not None:
        data.pairs = torch.as_tensor(np.asarray(pairs), dtype=torch.long).reshape(-1, 2)
    micro_loss = get_method(cfg.train.method).micro_loss(cfg, data)
    restore: list = []
    offload_encoders(pipe, restore)
    tr = build_trainable(cfg, pipe, accelerator)
    tr.restore[:0] = restore
    meta = run_meta(cfg, n_train=len(data), **({"n_pairs": len(data.pairs)}
                                               if data.pairs is not None else {}), **(meta or {}))
    accum = accelerator.gradient_accumulation_steps

    def step_fn(step: int) -> dict:
        losses, extras = [], []
        for micro in range(accum):
            with accumulating(tr, accelerator, micro, accum):
                loss, extra = micro_loss(tr, ses, step, micro)
                backward(tr, accelerator, loss, accum)
                losses.append(loss.item())
                extras.append(extra)
        return {"loss": float(np.mean(losses)),
                **{k: float(np.mean([e[k] for e in extras])) for k in extras[0]}}

    try:
        return run_loop(cfg, pipe, tr, step_fn, out_dir, callbacks or TrainCallbacks(), resume,
                        meta, accelerator)
    finally:
        release(tr, pipe, accelerator)


def _accelerator(mixed: str, device):
    """The Accelerator training runs with. gradient_as_bucket_view: DDP's buckets are the
    gradients (no second copy of them). cache_enabled=False: autocast otherwise keeps a
    model-dtype cast of every float32 weight until the forward ends, another 2 bytes a
    parameter (22 GiB for FLUX.1-dev's full fine-tuning); the casts are redone where used
    (craft.planning simulates the same)."""
    from accelerate import Accelerator, AutocastKwargs, DistributedDataParallelKwargs

    return Accelerator(
        mixed_precision=mixed, cpu=device.type == "cpu",
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True),
                         AutocastKwargs(cache_enabled=False)])


@contextlib.contextmanager
def _without_accelerate_fsdp():
    """craft shards the denoiser itself (craft/models/sharding.py); accelerate's FSDP switch
    (``accelerate launch --use_fsdp`` sets ACCELERATE_USE_FSDP) is read as train.sharding=fsdp
    and kept away from the Accelerator, which would otherwise wrap the model a second way."""
    import os

    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def _forget_other_precision(mixed: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses an Accelerator with
    another mixed precision ("restart your runtime"); a long-lived process (the studio, a test
    session) trains runs with different settings, so the state is reset when it differs. The
    process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)


def learning_rate(tc, step: int) -> float:
    """``train.lr`` after a linear warm-up over ``train.lr_warmup_steps`` (lr * (step + 1) /
    warmup: no wasted step at lr 0)."""
    if tc.lr_warmup_steps and step < tc.lr_warmup_steps:
        return tc.lr * (step + 1) / tc.lr_warmup_steps
    return tc.lr


def _resume_step(out_dir: Path, tr: Trainable, meta: dict) -> int:
    """The step the last checkpoint of ``out_dir`` reached, its state loaded (0 without one)."""
    from craft.models.checkpoints import load_checkpoint

    ck = latest_checkpoint(out_dir)
    if ck is None:
        log.info("no checkpoint in %s; starting from step 0", out_dir)
        return 0
    return load_checkpoint(ck, tr.raw, tr.ema, tr.opt, meta)


def run_loop(cfg, pipe, tr: Trainable, step_fn: Callable[[int], dict], out_dir: Path,
             cb: TrainCallbacks, resume: bool, meta: dict, accelerator,
             boundary: int = 1) -> TrainResult:
    """Resume, the steps (checkpoints and previews on the way), the final save. ``step_fn``
    (step) runs the method's micro-batches (forward and backward) and returns its metrics
    (``loss`` and the method's own); clipping, the optimizer and the EMA step are here. A
    cancel is honoured at steps that are multiples of ``boundary`` (GRPO: between rounds, so
    the checkpoint it leaves resumes exactly)."""
    from craft.models.checkpoints import save_checkpoint
    from craft.run.watch import section

    tc = cfg.train
    main = accelerator.is_main_process
    start = _resume_step(out_dir, tr, meta) if resume else 0
    lr_at = functools.partial(learning_rate, tc)

    def checkpoint(step: int) -> None:
        with section("checkpoint"):
            path = save_checkpoint(out_dir, step, pipe=pipe, model=tr.raw, ema=tr.ema,
                                   opt=tr.opt, lora=tr.lora, meta=meta, dtype=tr.model_dtype,
                                   accelerator=accelerator)
        if path is not None and cb.on_checkpoint:
            cb.on_checkpoint(step, path)

    def preview(step: int) -> None:
        # a sharded model runs on every process together; only the main one keeps the images
        if tc.preview_every and tc.preview_prompts and (main or tr.sharded):
            with section("preview"):
                images, prompts = render_previews(cfg, pipe, tr, out_dir, step, save=main)
            if main and cb.on_preview:
                cb.on_preview(step, images, prompts)
            if main and trackers:
                trackers.images("previews", images, step)

    from craft.methods.trackers import open_run_trackers

    trackers = open_run_trackers(cfg, out_dir, str(meta.get("run_name") or out_dir.name), meta,
                                 main)
    try:
        status = "done"
        if start == 0:
            preview(0)
        for step in range(start, tc.steps):
            if step % boundary == 0 and cb.should_stop is not None and cb.should_stop():
                status = "cancelled"
                break
            t0 = time.perf_counter()
            for g in tr.opt.param_groups:
                g["lr"] = lr_at(step)
            metrics = step_fn(step)
            grad_norm = clip_gradients(tr, accelerator, tc.max_grad_norm)
            optimizer_step(tr)
            start = done = step + 1
            logged = {**metrics, "grad_norm": grad_norm, "lr": lr_at(step),
                      "step_time": time.perf_counter() - t0}
            if cb.on_step:
                cb.on_step(done, tc.steps, logged)
            if trackers:
                trackers.scalars({f"train/{k}": v for k, v in logged.items()}, done)
            if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.steps:
                checkpoint(done)
            if tc.preview_every and done % tc.preview_every == 0:
                preview(done)

        if status == "done" and tc.preview_every and start % tc.preview_every and start:
            preview(start)  # the last step's previews, whatever preview_every says
        if status == "done" or start > 0:
            checkpoint(start)
        if status == "done":
            with section("checkpoint"):
                finish(cfg, pipe, tr, out_dir, start, meta, main)
    finally:
        trackers.close()
    accelerator.wait_for_everyone()  # the main process's files are there for everyone now
    last_ckpt = latest_checkpoint(out_dir)
    if status == "cancelled":
        log.info("training cancelled at step %d; %s", start,
                 f"checkpoint {last_ckpt}" if last_ckpt else "no checkpoint (nothing trained yet)")
    return TrainResult(None, status, start, out_dir,
                       final_dir(out_dir) if status == "done" else None, last_ckpt)


def weighted_epochs(n_samples: int, steps: int, effective_batch: int) -> float:
    """How many passes over the kept set a run makes (the paper: ~150 with 100 images)."""
    return steps * effective_batch / max(1, n_samples)

