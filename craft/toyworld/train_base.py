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

    family: str = "sd15"  # sd15: the UNet base (assets/toy-base); sd3: the MMDiT flow base
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
    vae_from: str = ""  # a trained toy VAE folder to reuse instead of training one ("": train)

    @classmethod
    def for_family(cls, family: str) -> "BaseTrainConfig":
        """The defaults that made the shipped base of ``family`` (sd15: assets/toy-base;
        sd3: assets/toy-flow, on the VAE of assets/toy-base)."""
        if family not in FAMILIES:
            from craft import CraftError

            raise CraftError(f"--family {family!r} is not one of {list(FAMILIES)}")
        if family == "sd3":
            return cls(family="sd3", unet_steps=7_000, unet_lr=6e-4,
                       vae_from="assets/toy-base/vae")
        return cls()


FAMILIES = ("sd15", "sd3")


def resolve_vae(path: str) -> Path:
    from craft.run.config import resolve_path

    found = resolve_path(path)
    if found is None or not (found / "config.json").is_file():
        from craft import CraftError

        raise CraftError(f"vae_from={path!r}: no trained VAE folder there (config.json + "
                         "weights); train the UNet toy base first (craft toy train-base) or "
                         "--set vae_from= to train a VAE")
    return found


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
    if cfg.vae_from:
        from diffusers import AutoencoderKL
        log.info("using the trained toy VAE at %s", cfg.vae_from)
        return AutoencoderKL.from_pretrained(resolve_vae(cfg.vae_from))
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


class _UNetObjective:
    """SD1.5-style: a UNet predicting the noise, min-SNR weighted, one CLIP text encoder."""

    def __init__(self, cfg: BaseTrainConfig, tokenizer, vae):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.modules = {"unet": toymodel.build_unet(),
                        "text": toymodel.build_text_encoder(tokenizer)}
        self.noise_sched = toymodel.build_scheduler()
        alphas = self.noise_sched.alphas_cumprod
        self.snr = alphas / (1 - alphas)
        self.shift, self.scaling = 0.0, vae.config.scaling_factor

    def loss(self, m: dict, x0: torch.Tensor, captions: list[str], gen: torch.Generator):
        ids = self.tokenizer(captions, padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.noise_sched.config.num_train_timesteps, (len(x0),),
                          generator=gen)
        xt = self.noise_sched.add_noise(x0, noise, t)
        pred = m["unet"](xt, t, m["text"](ids)[0]).sample
        w = torch.clamp(self.snr[t], max=self.cfg.min_snr_gamma) / self.snr[t]
        return (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    def pipeline(self, vae, m: dict):
        return toymodel.assemble_pipeline(vae, m["text"], self.tokenizer, m["unet"])


class _FlowObjective:
    """SD3-style: an MMDiT transformer on the flow-matching velocity, timesteps drawn by
    craft.models.flow (the rule CRAFT fine-tuning uses too), two CLIP text encoders."""

    def __init__(self, cfg: BaseTrainConfig, tokenizer, vae, latents, work_dir: Path):
        from . import flow_model

        self.fm = flow_model
        self.tokenizer_3 = toymodel.load_t5_tokenizer(toymodel.write_t5_tokenizer(
            work_dir / "tokenizer_3", flow_model.T5_TOKENS))
        self.modules = {"transformer": flow_model.build_transformer(),
                        "text": flow_model.build_text_encoder(tokenizer),
                        "text_2": flow_model.build_text_encoder(tokenizer),
                        "text_3": flow_model.build_t5(self.tokenizer_3)}
        self.noise_sched = flow_model.build_scheduler()
        # The VAE's latent mean and scale, measured on these latents (SD3 pipelines decode
        # latents / scaling_factor + shift_factor).
        mean, std = latents
        sample = mean[:4000] + std[:4000] * torch.randn(mean[:4000].shape,
                                                        generator=torch.Generator().manual_seed(0))
        self.shift = float(sample.mean())
        self.scaling = float(1.0 / (sample - self.shift).std())
        vae.register_to_config(shift_factor=self.shift, scaling_factor=self.scaling)
        self.tokenizer = tokenizer
        self.pipe = self.pipeline(vae, self.modules, self.noise_sched)

    def loss(self, m: dict, x0: torch.Tensor, captions: list[str], gen: torch.Generator):
        from craft.models.flow import noisy, sample_sigmas, velocity_target

        noise = torch.randn(x0.shape, generator=gen)
        sigmas, timesteps = sample_sigmas(self.noise_sched, len(x0), "logit_normal",
                                          generator=gen)
        # self.pipe was assembled from these very modules (m is self.modules)
        embeds, pooled = self.fm.encode_captions(self.pipe, captions, x0.device)
        pred = m["transformer"](hidden_states=noisy(x0, noise, sigmas), timestep=timesteps,
                                encoder_hidden_states=embeds, pooled_projections=pooled).sample
        return (pred - velocity_target(x0, noise)).pow(2).mean()

    def pipeline(self, vae, m: dict, scheduler=None):
        return self.fm.assemble_pipeline(vae, (m["text"], m["text_2"], m["text_3"]),
                                         self.tokenizer, self.tokenizer_3, m["transformer"],
                                         scheduler or self.fm.build_scheduler())


def train_denoiser(cfg: BaseTrainConfig, scenes, latents: tuple[torch.Tensor, torch.Tensor],
                   objective, work_dir: Path, progress: ProgressFn | None = None,
                   should_stop: Callable[[], bool] | None = None) -> dict | None:
    """The denoiser and its text encoder(s), trained together; returns their EMA copies by
    name (None when stopped early). ``objective`` is a _UNetObjective or _FlowObjective, built
    under ``torch.manual_seed(cfg.seed)`` (train_base)."""
    live = objective.modules
    ema = {k: copy.deepcopy(v) for k, v in live.items()}
    params = [p for m in live.values() for p in m.parameters()]
    # fused: one kernel for all tensors; the default per-tensor loop was 45 % of a CPU step.
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, cfg.unet_steps))
    start = 0
    ckpt_path = work_dir / "denoiser.ckpt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        for k in live:
            live[k].load_state_dict(ck[k])
            ema[k].load_state_dict(ck[f"ema_{k}"])
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
        # dropout inside the modules (T5's, 0.1) draws from the global generator: seed it per
        # step too, so that a resumed run draws what the uninterrupted one drew
        torch.manual_seed(cfg.seed * 1_000_003 + step + 1)
        idx = torch.randint(0, len(scenes), (cfg.unet_batch,), generator=gen)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        x0 = (x0 - objective.shift) * objective.scaling
        captions = [_draw_caption(scenes[i], rng, cfg) for i in idx.tolist()]
        loss = objective.loss(live, x0, captions, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        for k in live:
            _ema_update(ema[k], live[k], decay)
        if progress:
            progress("denoiser", step + 1, cfg.unet_steps,
                     {"loss": float(loss), "grad_norm": float(gnorm),
                      "s_per_step": (time.time() - t0) / (step + 1 - start)})
        done = step + 1 == cfg.unet_steps
        stop = should_stop is not None and should_stop()
        if (step + 1) % cfg.checkpoint_every == 0 or done or stop:
            from craft.run.fsutil import atomic_file

            with atomic_file(ckpt_path) as f:
                torch.save({**{k: v.state_dict() for k, v in live.items()},
                            **{f"ema_{k}": v.state_dict() for k, v in ema.items()},
                            "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "step": step + 1}, f)
        if stop:
            log.info("stopped at step %d; rerun to resume", step + 1)
            return None
    return ema


def train_base(out_dir: str | Path, work_dir: str | Path, cfg: BaseTrainConfig = BaseTrainConfig(),
               progress: ProgressFn | None = None,
               should_stop: Callable[[], bool] | None = None) -> Path | None:
    """Train the whole toy base model and save it as a diffusers pipeline at ``out_dir``.

    Returns ``out_dir``, or None when ``should_stop`` ended it early (rerun to resume).
    """
    torch.set_num_threads(cfg.threads)
    from craft.run.distributed import setup_process

    setup_process()  # flush denormals (the rule lives there)
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = toymodel.load_tokenizer(toymodel.write_tokenizer(work_dir / "tokenizer"))
    log.info("rendering %d training scenes", cfg.num_scenes)
    scenes, images = _scenes_and_images(cfg)
    vae = train_vae(cfg, images, work_dir, progress)
    latents = _encode_all(vae, images, work_dir)
    del images
    torch.manual_seed(cfg.seed)  # the initial weights: the objective builds the modules
    objective = (_FlowObjective(cfg, tokenizer, vae, latents, work_dir) if cfg.family == "sd3"
                 else _UNetObjective(cfg, tokenizer, vae))
    result = train_denoiser(cfg, scenes, latents, objective, work_dir, progress, should_stop)
    if result is None:
        return None
    pipe = objective.pipeline(vae, result)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    log.info("saved the toy base model to %s", out_dir)
    return out_dir
