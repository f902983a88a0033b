"""Group-advantage-weighted fine-tuning (CRAFT stage 3), one readable loop.

    L = mean_i  weight_i * w(t_i) * || eps_theta(x_t, t_i, c_i) - eps ||^2

over the kept candidates, where ``weight_i`` comes from the sample's group advantage
(craft.advantages) and ``c_i`` is the *original* prompt by default, which is what carries the
variants' quality over to plain prompts. The rest is ordinary diffusion fine-tuning: AdamW,
gradient accumulation to an effective batch, the base model's empty-prompt dropout (so
classifier-free guidance stays calibrated), an EMA of the tuned weights (what gets saved),
full UNet or LoRA, checkpoints in diffusers format, resume, and a cancel that stops within one
optimizer step and leaves a loadable checkpoint. It runs unchanged under ``accelerate launch``.

The loop talks to the outside through ``TrainCallbacks`` (progress, previews, cancel) and the run
store (metrics), never through prints, so the CLI and the studio drive it the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from craft import CraftError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainCallbacks:
    """How a caller watches and steers training; every member is optional."""

    on_step: Callable[[int, int, dict], None] | None = None  # (step, total, metrics)
    on_preview: Callable[[int, list, list], None] | None = None  # (step, images, prompts)
    on_checkpoint: Callable[[int, Path], None] | None = None
    should_stop: Callable[[], bool] | None = None  # checked before every micro-batch


@dataclasses.dataclass
class TrainResult:
    run_id: int | None
    status: str  # done | cancelled
    steps_done: int
    out_dir: Path
    final_dir: Path | None  # the complete tuned pipeline (status done)
    last_checkpoint: Path | None


# ------------------------------------------------------------------------ timestep weighting


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _prediction_type(scheduler) -> str:
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise CraftError(f"the model's scheduler has prediction_type={kind!r}; training supports "
                         f"{', '.join(PREDICTION_TYPES)}; fix scheduler/scheduler_config.json")
    return kind


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output: the noise (epsilon models: SD1.5, SDXL), the
    velocity alpha*eps - sigma*x0 (v-prediction: SD2.x-v, zero-terminal-SNR models) or x0."""
    kind = _prediction_type(scheduler)
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
    kind = _prediction_type(scheduler)
    abar = scheduler.alphas_cumprod.double()
    beta = scheduler.betas.double()
    snr = abar / (1 - abar)
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


# ------------------------------------------------------------------------ conditioning


def native_size(pipe) -> tuple[int, int]:
    """The model's native (height, width) in pixels."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return size, size


def encode_text(pipe, prompts: list[str], device, size: tuple[int, int] | None = None) -> dict:
    """UNet conditioning for ``prompts``: hidden states, plus SDXL's pooled embeds and time ids.

    SDXL's time ids are (original size, crop top-left, target size) = ``(h, w, 0, 0, h, w)`` for
    uncropped training images of ``size`` = (h, w) pixels (default: the native size), as the
    pipeline builds them when it generates at that size.
    """
    from craft.generation import is_sdxl

    with torch.no_grad():
        if is_sdxl(pipe):
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=False)
            h, w = size or native_size(pipe)
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=device,
                                    dtype=embeds.dtype).repeat(len(prompts), 1)
            return {"hidden": embeds, "text_embeds": pooled, "time_ids": time_ids}
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return {"hidden": embeds}


def empty_conditioning(pipe, device, size: tuple[int, int] | None = None) -> dict:
    """The conditioning that replaces a caption under prompt dropout: whatever the pipeline
    uses as the unconditional branch of classifier-free guidance, so that dropout keeps
    guidance calibrated. That is the encoding of "" for SD1.5, and zeros for SDXL models saved
    with ``force_zeros_for_empty_prompt`` (the SDXL default)."""
    from craft.generation import is_sdxl

    empty = encode_text(pipe, [""], device, size)
    if is_sdxl(pipe) and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        empty["hidden"] = torch.zeros_like(empty["hidden"])
        empty["text_embeds"] = torch.zeros_like(empty["text_embeds"])
    return empty


def _gather(cond: dict, idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in cond.items()}


def _unet_forward(unet, xt, t, cond: dict):
    extra = {}
    if "text_embeds" in cond:
        extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"],
                                      "time_ids": cond["time_ids"]}
    return unet(xt, t, cond["hidden"], **extra).sample


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
                         f"{sorted(need)} (build it with craft.stages.training_set)")
    if len(df) == 0:
        raise CraftError("the training set is empty: no candidate passed the filter. Loosen "
                         "filter.level (e.g. ha or h), lower filter.margin, or generate more "
                         "candidates")
    w = df["weight"].to_numpy(float)
    if not np.isfinite(w).all():
        raise CraftError("training weights contain NaN/inf; this is a bug in the selection step")


# ------------------------------------------------------------------------ checkpoints


def _trainable(unet) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def export_unet(unet, ema_params: list[torch.Tensor] | None, lora: bool):
    """A plain UNet (no adapters) holding the weights to ship: EMA if kept, LoRA merged in."""
    out = copy.deepcopy(unet)
    if ema_params is not None:
        with torch.no_grad():
            for p, e in zip(_trainable(out), ema_params):
                p.copy_(e)
    if lora:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in out.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()
        state = {k.replace(".base_layer.", "."): v for k, v in out.state_dict().items()
                 if "lora_" not in k}
        plain = type(unet).from_config(unet.config)
        plain.load_state_dict(state)
        out = plain
    return out


def _as_dtype(module, dtype):
    """Cast only when needed: diffusers warns on every ``.to(dtype)`` of a UNet."""
    return module if next(module.parameters()).dtype == dtype else module.to(dtype=dtype)


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((p for p in out_dir.glob("checkpoint-*") if (p / "state.pt").exists()),
                   key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def _save_checkpoint(out_dir: Path, step: int, unet, ema_params, opt, lora: bool,
                     meta: dict) -> Path:
    """Write checkpoint-<step>/ atomically: a complete diffusers UNet + the resumable state."""
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_unet(unet, ema_params, lora).save_pretrained(tmp / "unet", safe_serialization=True)
    torch.save({"step": step, "trainable": [p.detach().cpu() for p in _trainable(unet)],
                "ema": None if ema_params is None else [e.cpu() for e in ema_params],
                "opt": opt.state_dict(), "meta": meta}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def save_pipeline(pipe, unet, out: Path) -> Path:
    """The base pipeline with ``unet`` swapped in, saved complete in diffusers format."""
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    original = pipe.unet
    pipe.unet = unet
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        pipe.unet = original
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ------------------------------------------------------------------------ the loop


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

    from craft.models import resolve_device

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


def train(cfg, train_df: pd.DataFrame, out_dir: str | Path, *, store=None,
          run_name: str = "craft", callbacks: TrainCallbacks | None = None,
          resume: bool = False, pipe=None) -> TrainResult:
    """Fine-tune ``cfg.model`` on ``train_df`` (columns image_path, prompt, weight[, variant]).

    ``store`` (a RunStore) receives the run row and per-step metrics. ``pipe`` may be passed to
    reuse an already loaded base pipeline (it is not modified).
    """
    from accelerate import Accelerator

    from craft.config import config_to_dict
    from craft.generation import SamplingParams, generate_images
    from craft.models import load_from_config, resolve_device

    tc = cfg.train
    cb = callbacks or TrainCallbacks()
    _check_training_frame(train_df)
    check_train_options(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    device = resolve_device(cfg.model.device)
    mp = resolve_mixed_precision(tc.mixed_precision, device)
    accelerator = Accelerator(mixed_precision=mp, cpu=device.type == "cpu")
    n_proc = accelerator.num_processes
    if tc.effective_batch % (tc.micro_batch * n_proc):
        raise CraftError(
            f"train.effective_batch={tc.effective_batch} is not a multiple of micro_batch "
            f"({tc.micro_batch}) x processes ({n_proc}); choose effective_batch as a multiple of "
            f"{tc.micro_batch * n_proc}")
    accum = tc.effective_batch // (tc.micro_batch * n_proc)
    torch.manual_seed(tc.seed)

    if pipe is None:
        pipe = load_from_config(cfg.model)
    pipe.to(accelerator.device)
    base_unet = pipe.unet
    unet = copy.deepcopy(base_unet).float()
    unet.train()
    unet.requires_grad_(not tc.lora)
    if tc.lora:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha,
                                    init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = _trainable(unet)
    if tc.use_8bit_adam:
        import bitsandbytes as bnb  # present: check_train_options said so

        opt = bnb.optim.AdamW8bit(params, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2),
                                  weight_decay=tc.weight_decay)
    else:
        # fused: one kernel for all tensors (the per-tensor default loop dominated CPU steps)
        opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2),
                                weight_decay=tc.weight_decay, fused=True)
    unet, opt = accelerator.prepare(unet, opt)
    raw_unet = accelerator.unwrap_model(unet)

    # Frozen parts: latents and text conditioning are computed once.
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    w_t = timestep_weights(noise_sched, tc.timestep_weighting, tc.snr_gamma).to(accelerator.device)
    # Train at the resolution the candidates were generated at (the native one by default).
    native_h, native_w = native_size(pipe)
    size = (cfg.generation.height or native_h, cfg.generation.width or native_w)
    pixels = load_training_images(list(train_df["image_path"]), size)
    lat_mean, lat_std = encode_latents(pipe.vae, pixels, accelerator.device)
    scaling = pipe.vae.config.scaling_factor
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    text_col = "variant" if tc.conditioning == "variant" and "variant" in train_df else "prompt"
    cond = encode_text(pipe, list(train_df[text_col]), accelerator.device, size)
    empty = empty_conditioning(pipe, accelerator.device, size)
    cond = {k: v.float() for k, v in cond.items()}
    empty = {k: v.float() for k, v in empty.items()}
    weights = torch.tensor(train_df["weight"].to_numpy(float), dtype=torch.float32,
                           device=accelerator.device)
    n = len(train_df)

    ema = None
    if tc.ema_decay > 0:
        ema = [p.detach().clone().float() for p in _trainable(raw_unet)]

    run_id = None
    if store is not None and accelerator.is_main_process:
        run_id = store.create_train_run(run_name, config_to_dict(cfg), checkpoint_dir=str(out_dir))
    start = 0
    if resume:
        ck = latest_checkpoint(out_dir)
        if ck is None:
            log.info("resume requested but no checkpoint in %s; starting from step 0", out_dir)
        else:
            state = torch.load(ck / "state.pt", map_location="cpu", weights_only=False)
            with torch.no_grad():
                for p, v in zip(_trainable(raw_unet), state["trainable"]):
                    p.copy_(v)
                if ema is not None and state["ema"] is not None:
                    for e, v in zip(ema, state["ema"]):
                        e.copy_(v)
            opt.load_state_dict(state["opt"])
            start = state["step"]
            log.info("resumed from %s (step %d)", ck, start)

    def lr_at(step: int) -> float:
        if tc.lr_warmup_steps and step < tc.lr_warmup_steps:
            return tc.lr * (step + 1) / tc.lr_warmup_steps
        return tc.lr

    preview_params = SamplingParams(num_inference_steps=cfg.eval.num_inference_steps,
                                    guidance_scale=cfg.eval.guidance_scale)
    meta = {"run_name": run_name, "n_train": n, "base": cfg.model.pretrained}

    def preview(step: int) -> None:
        if not (accelerator.is_main_process and tc.preview_every and tc.preview_prompts):
            return
        prompts = list(tc.preview_prompts)
        tuned = _as_dtype(export_unet(raw_unet, ema, tc.lora), pipe.unet.dtype).eval()
        original = pipe.unet
        pipe.unet = tuned
        try:
            images = [im for _, b in generate_images(pipe, prompts, list(range(len(prompts))),
                                                     preview_params) for im in b]
        finally:
            pipe.unet = original
        pdir = out_dir / "previews" / f"step-{step:06d}"
        pdir.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(pdir / f"{i}.png")
        if cb.on_preview:
            cb.on_preview(step, images, prompts)

    def checkpoint(step: int) -> Path | None:
        if not accelerator.is_main_process:
            return None
        path = _save_checkpoint(out_dir, step, raw_unet, ema, opt, tc.lora, meta)
        if cb.on_checkpoint:
            cb.on_checkpoint(step, path)
        return path

    status, last_ckpt = "done", latest_checkpoint(out_dir)
    if start == 0 and accelerator.is_main_process and tc.preview_every:
        preview(0)
    try:
        for step in range(start, tc.steps):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            total_loss = 0.0
            stopped = False
            for micro in range(accum):
                if cb.should_stop is not None and cb.should_stop():
                    stopped = True
                    break
                gen = torch.Generator().manual_seed(
                    ((tc.seed * 1_000_003 + step) * 1009 + micro) * 97 + accelerator.process_index)
                idx = torch.randint(0, n, (tc.micro_batch,), generator=gen)
                dev_idx = idx.to(accelerator.device)
                x0 = lat_mean[dev_idx] + lat_std[dev_idx] * torch.randn(
                    lat_mean[dev_idx].shape, generator=gen).to(accelerator.device)
                x0 = (x0 - shift) * scaling
                noise = torch.randn(x0.shape, generator=gen).to(accelerator.device)
                t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),),
                                  generator=gen).to(accelerator.device)
                xt = noise_sched.add_noise(x0, noise, t)
                c = _gather(cond, dev_idx)
                drop = (torch.rand(len(idx), generator=gen) < tc.cond_dropout).to(
                    accelerator.device)
                if drop.any():
                    for k in c:
                        c[k] = torch.where(drop.view(-1, *[1] * (c[k].dim() - 1)),
                                           empty[k].expand_as(c[k]), c[k])
                with accelerator.autocast():
                    pred = _unet_forward(unet, xt, t, c)
                target = training_target(noise_sched, x0, noise, t)
                per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(
                    dim=tuple(range(1, pred.dim())))
                loss = (weights[dev_idx] * w_t[t] * per_sample).mean() / accum
                accelerator.backward(loss)
                total_loss += loss.item()
            if stopped:
                opt.zero_grad(set_to_none=True)
                status = "cancelled"
                break
            grad_norm = (accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                         if tc.max_grad_norm > 0 else
                         torch.norm(torch.stack([p.grad.norm() for p in params
                                                 if p.grad is not None])))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                with torch.no_grad():
                    decay = min(tc.ema_decay, (1 + step) / (10 + step))
                    live = [p.detach().float() for p in _trainable(raw_unet)]
                    torch._foreach_lerp_(ema, live, 1 - decay)
            done = step + 1
            metrics = {"loss": total_loss, "grad_norm": float(grad_norm), "lr": lr_at(step),
                       "step_time": time.perf_counter() - t0}
            if store is not None and run_id is not None:
                store.add_metrics(run_id, [{"step": done, **metrics}])
            if cb.on_step:
                cb.on_step(done, tc.steps, metrics)
            if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.steps:
                last_ckpt = checkpoint(done) or last_ckpt
            if tc.preview_every and done % tc.preview_every == 0:
                preview(done)
            start = done
    except BaseException as e:
        if store is not None and run_id is not None:
            store.update_train_run(run_id, status="failed", error=f"{type(e).__name__}: {e}")
        raise

    final_dir = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if status == "cancelled":
            if start > 0:
                last_ckpt = checkpoint(start)
            log.info("training cancelled at step %d; checkpoint %s", start, last_ckpt)
        else:
            last_ckpt = checkpoint(start)
            tuned = _as_dtype(export_unet(raw_unet, ema, tc.lora), pipe.unet.dtype)
            final_dir = save_pipeline(pipe, tuned, out_dir / "final")
            (out_dir / "final" / "craft_train.json").write_text(json.dumps(
                {**meta, "steps": start, "config": config_to_dict(cfg)}, indent=1))
            log.info("training done: %d steps; tuned pipeline at %s", start, final_dir)
        if store is not None and run_id is not None:
            store.update_train_run(run_id, status=status,
                                   checkpoint_dir=str(final_dir or last_ckpt or out_dir))
    return TrainResult(run_id, status, start, out_dir, final_dir, last_ckpt)


def weighted_epochs(n_samples: int, steps: int, effective_batch: int) -> float:
    """How many passes over the kept set a run makes (the paper: ~150 with 100 images)."""
    return steps * effective_batch / max(1, n_samples)
