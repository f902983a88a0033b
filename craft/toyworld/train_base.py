"""Train the toy base model from scratch: first the VAE, then the UNet and text encoder together.

The run is seeded and resumable: each phase writes a checkpoint under ``work_dir`` and a rerun
continues from the last one. The shipped model in ``assets/toy-base`` is the output of
``craft toy train-base`` with the defaults below.

Choices that matter for CRAFT (measured in benchmarks/toy_base.md):
- Captions mention each rich attribute with probability ``mention_prob`` independently of its
  value, so a plain caption's images follow the world's prior (mostly small, off-centre or
  blurry) while every rich word, whenever present, is true and binds.
- 10 % empty captions, so classifier-free guidance works, as on SD1.5.
- An EMA of the weights is what gets saved.
- The VAE's ``scaling_factor`` is measured on the training latents (1 / std), not copied.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import model as toymodel
from .grammar import ATTRIBUTES, caption, sample_scene
from .render import render_array

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int, dict], None]  # (phase, step, total, metrics)


@dataclasses.dataclass(frozen=True)
class BaseTrainConfig:
    """Settings of ``craft toy train-base``; the defaults made the shipped model."""

    seed: int = 0
    num_scenes: int = 40_000  # rendered training images (captions are re-drawn every step)
    vae_steps: int = 1_200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 10_000
    unet_batch: int = 32
    unet_lr: float = 1e-3  # peak; linear warm-up then cosine decay to 10 %
    warmup_steps: int = 300
    mention_prob: float = 0.5  # probability that a caption names each rich attribute
    cond_dropout: float = 0.1  # probability of an empty caption
    min_snr_gamma: float = 5.0  # loss weight min(SNR, gamma)/SNR: faster, steadier training
    ema_decay: float = 0.999
    checkpoint_every: int = 500  # steps
    threads: int = 2  # torch CPU threads


def _scenes_and_images(cfg: BaseTrainConfig):
    rng = random.Random(cfg.seed)
    scenes = [sample_scene(rng) for _ in range(cfg.num_scenes)]
    images = np.stack([render_array(s) for s in scenes])
    return scenes, images


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_lambda(cfg: BaseTrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def train_vae(cfg: BaseTrainConfig, images: np.ndarray, work_dir: Path,
              progress: ProgressFn | None = None):
    vae_dir = work_dir / "vae"
    if (vae_dir / "config.json").exists():
        from diffusers import AutoencoderKL
        log.info("VAE already trained at %s; reusing it", vae_dir)
        return AutoencoderKL.from_pretrained(vae_dir)
    torch.manual_seed(cfg.seed)
    vae = toymodel.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(dataclasses.replace(cfg, warmup_steps=100), cfg.vae_steps))
    gen = np.random.default_rng(cfg.seed)
    data = _to_tensor(images)
    for step in range(cfg.vae_steps):
        x = data[gen.integers(0, len(data), cfg.vae_batch)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        loss = rec_loss + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress("vae", step + 1, cfg.vae_steps, {"loss": rec_loss.item()})
    vae.eval()
    with torch.no_grad():
        x = data[:2000]
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
        sample = torch.cat([vae.encode(data[i:i + 500]).latent_dist.sample()
                            for i in range(0, min(4000, len(data)), 500)])
    scaling = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scaling)
    psnr = 10 * math.log10(1.0 / mse)
    log.info("VAE: PSNR %.1f dB on 2000 training images; scaling_factor %.4f", psnr, scaling)
    vae.save_pretrained(vae_dir)
    (work_dir / "vae_metrics.txt").write_text(f"psnr_db={psnr:.2f}\nscaling_factor={scaling:.5f}\n")
    return vae


def _encode_all(vae, images: np.ndarray, work_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    cache = work_dir / "latents.pt"
    if cache.exists():
        d = torch.load(cache)
        return d["mean"], d["std"]
    data = _to_tensor(images)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(data), 500):
            dist = vae.encode(data[i:i + 500]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    torch.save({"mean": mean, "std": std}, cache)
    return mean, std


def _draw_caption(scene, rng: random.Random, cfg: BaseTrainConfig) -> str:
    if rng.random() < cfg.cond_dropout:
        return ""
    return caption(scene, mention=[a for a in ATTRIBUTES if rng.random() < cfg.mention_prob])


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1.0 - decay)


def train_denoiser(cfg: BaseTrainConfig, scenes, latents: tuple[torch.Tensor, torch.Tensor],
                   scaling: float, tokenizer, work_dir: Path, progress: ProgressFn | None = None,
                   should_stop: Callable[[], bool] | None = None):
    torch.manual_seed(cfg.seed)
    unet = toymodel.build_unet()
    text_encoder = toymodel.build_text_encoder(tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    # fused: one kernel for all tensors; the default per-tensor loop was 45 % of a CPU step.
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, cfg.unet_steps))
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    noise_sched = toymodel.build_scheduler()
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    start = 0
    ckpt_path = work_dir / "denoiser.ckpt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        unet.load_state_dict(ck["unet"])
        text_encoder.load_state_dict(ck["text"])
        ema_unet.load_state_dict(ck["ema_unet"])
        ema_text.load_state_dict(ck["ema_text"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start = ck["step"]
        log.info("resuming denoiser training from step %d", start)
    # Per-step randomness derives from (seed, step), so a resumed run draws what it would have.
    mean, std = latents
    t0 = time.time()
    for step in range(start, cfg.unet_steps):
        rng = random.Random(f"{cfg.seed}:{step}")
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(scenes), (cfg.unet_batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        captions = [_draw_caption(scenes[i], rng, cfg) for i in idx.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        cond = text_encoder(ids)[0]
        pred = unet(xt, t, cond).sample
        w = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        if progress:
            progress("denoiser", step + 1, cfg.unet_steps,
                     {"loss": float(loss), "grad_norm": float(gnorm),
                      "s_per_step": (time.time() - t0) / (step + 1 - start)})
        done = step + 1 == cfg.unet_steps
        stop = should_stop is not None and should_stop()
        if (step + 1) % cfg.checkpoint_every == 0 or done or stop:
            from craft.fsutil import atomic_file

            with atomic_file(ckpt_path) as f:
                torch.save({"unet": unet.state_dict(), "text": text_encoder.state_dict(),
                            "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                            "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "step": step + 1}, f)
        if stop:
            log.info("stopped at step %d; rerun to resume", step + 1)
            return None
    return ema_unet, ema_text


def train_base(out_dir: str | Path, work_dir: str | Path, cfg: BaseTrainConfig = BaseTrainConfig(),
               progress: ProgressFn | None = None,
               should_stop: Callable[[], bool] | None = None) -> Path | None:
    """Train the whole toy base model and save it as a diffusers pipeline at ``out_dir``.

    Returns ``out_dir``, or None when ``should_stop`` ended it early (rerun to resume).
    """
    torch.set_num_threads(cfg.threads)
    from craft.distributed import setup_process

    setup_process()  # flush denormals (the rule lives there)
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = toymodel.load_tokenizer(toymodel.write_tokenizer(work_dir / "tokenizer"))
    log.info("rendering %d training scenes", cfg.num_scenes)
    scenes, images = _scenes_and_images(cfg)
    vae = train_vae(cfg, images, work_dir, progress)
    latents = _encode_all(vae, images, work_dir)
    del images
    result = train_denoiser(cfg, scenes, latents, vae.config.scaling_factor, tokenizer, work_dir,
                            progress, should_stop)
    if result is None:
        return None
    unet, text_encoder = result
    pipe = toymodel.assemble_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    log.info("saved the toy base model to %s", out_dir)
    return out_dir
