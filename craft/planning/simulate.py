"""Each stage of a run, executed on fake tensors at the real sizes: peak bytes by category and
FLOPs per image or per training sample.

The simulations mirror what the stages hold on the device (read with the stage code beside
them):

- **generation** (craft.stages.generation): the whole pipeline on the GPU in the model dtype; prompts
  encoded once per batch (with the empty prompt for CFG); ``num_inference_steps`` denoiser calls
  on the latents (twice the batch under classifier-free guidance; FLUX.1-dev feeds the guidance
  as an input instead); the VAE decodes the batch (one image at a time with
  ``model.vae_slicing``; in float32 for a float16 VAE that asks for ``force_upcast``, SDXL's).
- **scoring** (craft.stages.scoring): every reward model loaded at once in float32, one batch of
  ``rewards.batch_size`` images through each; the diffusion pipeline is off the GPU.
- **training** (craft.methods.training): first the data (VAE and text encoders on the device, the kept
  images encoded a micro-batch at a time), then the encoders leave the device and the steps run:
  LoRA adapters in float32 on the pipeline's own denoiser (weights in the model dtype), or a
  float32 master copy for full fine-tuning (the model-dtype base leaves the device unless the
  anchor needs it); the encoded set; AdamW moments; the EMA; gradients kept across micro-batches
  when there is accumulation; one micro-batch forward (the anchor's base forward too) and
  backward under the config's autocast, then the optimizer step.
- **checkpoint + previews**: what stays after a step, plus the largest weight cast for saving,
  plus the encoders back on the device for the fixed-seed previews.
- **evaluation** (craft.stages.evaluation): one pipeline at a time at ``eval.batch_size``, then each
  evaluation reward alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from craft.planning.memtrack import MemoryTracker, fake_mode, materialize, module_bytes
from craft.planning.specs import ModelSpec, reward_arch

GIB = 2 ** 30


@dataclasses.dataclass
class Sim:
    """One stage's simulated peak on one device, and its FLOPs."""

    parts: dict[str, int]  # bytes by category at the peak
    flops: float = 0.0  # per ``unit``
    unit: str = "image"
    notes: tuple[str, ...] = ()
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in self.parts.items() if v}


class _Run:
    """Fake mode + memory tracker (which counts the FLOPs too), entered together."""

    def __init__(self):
        self.mode = fake_mode()
        self.mem = MemoryTracker(count_flops=True)

    @contextlib.contextmanager
    def active(self):
        with self.mode, self.mem:
            yield self

    def module(self, meta: torch.nn.Module, category: str = "weights") -> torch.nn.Module:
        with _no_modes():
            m = materialize(meta, self.mode)
        self.mem.track_module(m, frozen=category)
        return m

    @contextlib.contextmanager
    def flops(self, into: list):
        before = self.mem.flops
        yield
        into.append(self.mem.flops - before)


def _meta(spec: ModelSpec, name: str, dtype: torch.dtype) -> torch.nn.Module:
    with _no_modes():
        return _cast(spec.components[name].build(), dtype).eval().requires_grad_(False)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Floating parameters and buffers to ``dtype`` in place (on meta; without diffusers'
    ``to()``, which warns about float32 modules the planned load keeps anyway)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
    return module


def _dt(spec: ModelSpec) -> torch.dtype:
    """The weights' dtype in the simulation: bfloat16 stands in for float16 (the same bytes;
    CPU autocast, which the simulation runs under, has no float16)."""
    return torch.bfloat16 if spec.dtype == torch.float16 else spec.dtype


def _no_modes():
    """Building meta modules must not run under the fake mode, the tracker or the counter."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


# ------------------------------------------------------------------------ inputs


def _latents(spec: ModelSpec, b: int) -> torch.Tensor:
    den = spec.components[spec.denoiser].config
    c = den.get("in_channels", 4)
    if spec.family == "flux":
        c //= 4  # packed 2x2 in the call
    return torch.randn(b, c, spec.height // spec.vae_scale_factor,
                       spec.width // spec.vae_scale_factor)


def _text_lengths(spec: ModelSpec) -> dict[str, int]:
    out = {}
    for name in spec.text_encoders:
        out[name] = (spec.t5_tokens or 77) if spec.components[name].cls == "T5EncoderModel" \
            else spec.clip_tokens
    return out


def _conditioning(spec: ModelSpec, b: int, dtype) -> dict:
    """Fake conditioning of the denoiser's call (craft.methods.training.DenoiserCall's keys)."""
    den = spec.components[spec.denoiser].config
    if spec.family == "sd3":
        n = spec.clip_tokens + (spec.t5_tokens or spec.clip_tokens)
        return {"hidden": torch.randn(b, n, den["joint_attention_dim"], dtype=dtype),
                "pooled": torch.randn(b, den["pooled_projection_dim"], dtype=dtype)}
    if spec.family == "flux":
        return {"hidden": torch.randn(b, spec.t5_tokens or 512, den["joint_attention_dim"],
                                      dtype=dtype),
                "pooled": torch.randn(b, den["pooled_projection_dim"], dtype=dtype)}
    cond = {"hidden": torch.randn(b, spec.clip_tokens, den["cross_attention_dim"], dtype=dtype)}
    if den.get("addition_embed_type") == "text_time":
        pooled = den["projection_class_embeddings_input_dim"] - 6 * den["addition_time_embed_dim"]
        cond.update(text_embeds=torch.randn(b, pooled, dtype=dtype),
                    time_ids=torch.randn(b, 6, dtype=dtype))
    return cond


def _call(spec: ModelSpec, guidance: float = 3.5):
    from craft.methods.training import DenoiserCall

    return DenoiserCall(spec.family, spec.height, spec.width, spec.vae_scale_factor,
                        guidance if spec.flux_guidance else None)


def _timesteps(spec: ModelSpec, b: int) -> torch.Tensor:
    if spec.family in ("sd3", "flux"):
        return torch.full((b,), 500.0)
    return torch.full((b,), 500, dtype=torch.long)


def _encode_text(spec: ModelSpec, encoders: dict, b: int) -> None:
    for name, length in _text_lengths(spec).items():
        with torch.no_grad():
            encoders[name](torch.zeros(b, length, dtype=torch.long))


def _vae_upcast(spec: ModelSpec) -> bool:
    return spec.dtype == torch.float16 and bool(spec.components["vae"].config.get(
        "force_upcast", False))


# ------------------------------------------------------------------------ generation


@functools.lru_cache(maxsize=64)
def _generation_cached(spec: ModelSpec, batch: int, steps: int, cfg_on: bool,
                       vae_slicing: bool) -> Sim:
    r = _Run()
    text, den, vae = [], [], []
    with r.active():
        encoders = {n: r.module(_meta(spec, n, _dt(spec))) for n in spec.text_encoders}
        model = r.module(_meta(spec, spec.denoiser, _dt(spec)))
        vae_dtype = torch.float32 if _vae_upcast(spec) else _dt(spec)
        vae_mod = r.module(_meta(spec, "vae", vae_dtype))
        with r.flops(text):
            _encode_text(spec, encoders, batch * (2 if cfg_on else 1))
        b = batch * (2 if cfg_on else 1)
        x = _latents(spec, b).to(_dt(spec))
        cond = _conditioning(spec, b, _dt(spec))
        with torch.no_grad(), r.flops(den):
            _call(spec)(model, x, _timesteps(spec, b).to(_dt(spec) if spec.family in
                                                          ("sd3", "flux") else torch.long),
                        cond)
        del x, cond
        dec = 1 if vae_slicing else batch
        z = torch.randn(dec, vae_mod.config.latent_channels, spec.height // spec.vae_scale_factor,
                        spec.width // spec.vae_scale_factor, dtype=vae_dtype)
        with torch.no_grad(), r.flops(vae):
            vae_mod.decode(z)
    flops = (text[0] + steps * den[0] + vae[0] * (batch / dec)) / batch
    notes = []
    if _vae_upcast(spec):
        notes.append("the float16 VAE decodes in float32 (force_upcast)")
    return Sim(dict(r.mem.peak_by_category), flops, "image", tuple(notes),
               {"weights": r.mem.live_bytes("weights"),
                "encoders": sum(module_bytes(e) for e in encoders.values()),
                # per image: one denoiser step (both guidance passes), the text encoding, the
                # VAE decode (early rejection prices its steps and its preview decode apart)
                "step_flops": den[0] / batch, "text_flops": text[0] / batch,
                "decode_flops": vae[0] / dec})


def simulate_generation(spec: ModelSpec, batch: int, steps: int, guidance: float,
                        vae_slicing: bool) -> Sim:
    cfg_on = guidance > 1 and not spec.flux_guidance and spec.family != "flux"
    return _generation_cached(spec, batch, steps, cfg_on, vae_slicing)


# ------------------------------------------------------------------------ rewards


@functools.lru_cache(maxsize=32)
def simulate_reward(name: str, batch: int) -> Sim | None:
    """One reward model in float32 and one batch through it; None for a reward without a
    known GPU architecture."""
    arch = reward_arch(name)
    if arch is None:
        return None
    r = _Run()
    flops: list = []
    with r.active():
        with _no_modes():
            meta = arch.build().float().eval().requires_grad_(False)
        model = r.module(meta)
        with torch.inference_mode(), r.flops(flops):
            arch.call(model, batch)
    return Sim(dict(r.mem.peak_by_category), flops[0] / batch, "image", (arch.what,),
               {"weights": r.mem.live_bytes("weights")})


# ------------------------------------------------------------------------ training


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """The training settings the simulation depends on (hashable, for the cache)."""

    micro_batch: int
    accumulation: int
    lora: bool
    lora_rank: int
    lora_alpha: float
    gradient_checkpointing: bool
    mixed_precision: str  # no | fp16 | bf16
    ema: bool
    eight_bit_adam: bool
    anchor: bool
    n_kept: int
    guidance: float
    vae_slicing: bool

    @classmethod
    def from_config(cls, cfg, processes: int = 1, pool: int | None = None,
                    family: str | None = None) -> TrainSetup:
        """The simulated step of ``cfg``'s training method, as the denoiser sees it:

        - craft / sft: ``micro_batch`` kept images, gradients held over the accumulation;
        - dpo: winners and losers of ``micro_batch`` pairs in one forward pass, and the same
          batch through the frozen reference (the anchor's: LoRA's adapters off, or the base
          weights a full run keeps); its data are the paired images (``pool``: the candidates
          the pairs are drawn from, when known);
        - grpo: ``micro_batch`` (image, sampler step) items, doubled by classifier-free
          guidance, the frozen base only with a KL term; its data are each process's round of
          latent trajectories."""
        from craft.methods.registry import get_method

        t = cfg.train
        mp = t.mixed_precision if t.mixed_precision != "auto" else "bf16"
        shape = get_method(t.method).plan_shape(cfg, processes, pool, family)
        micro, accumulation, anchor, n_data = (shape.micro, shape.accumulation, shape.anchor,
                                               shape.n_data)
        return cls(micro, accumulation, t.lora, t.lora_rank, t.lora_alpha,
                   cfg.model.gradient_checkpointing, mp, t.ema_decay > 0, t.use_8bit_adam,
                   anchor, n_data, t.guidance_scale, cfg.model.vae_slicing)


def _trainable(spec: ModelSpec, s: TrainSetup) -> torch.nn.Module:
    from craft.methods.training import LORA_TARGETS

    if not s.lora:
        return _cast(spec.components[spec.denoiser].build(), torch.float32).train()
    model = _meta(spec, spec.denoiser, _dt(spec)).train()
    from peft import LoraConfig

    with torch.device("meta"):
        model.add_adapter(LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha,
                                     init_lora_weights="gaussian",
                                     target_modules=LORA_TARGETS[spec.denoiser]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


@functools.lru_cache(maxsize=64)
def _step_cached(spec: ModelSpec, s: TrainSetup) -> Sim:
    """A steady-state step without EMA and with plain AdamW (both are added exactly by
    :func:`simulate_training`: they are resident tensors of known size)."""
    r = _Run()
    fw: list = []
    base_bytes = 0
    with r.active():
        with _no_modes():
            model = materialize(_trainable(spec, s), r.mode)
        r.mem.track_module(model)
        if s.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        base = None
        if s.anchor and not s.lora:
            base = r.module(_meta(spec, spec.denoiser, _dt(spec)))
            base_bytes = module_bytes(base)
        with r.mem.phase("data"):
            n = s.n_kept
            lat = _latents(spec, n)
            data = [lat, lat.clone(), *_conditioning(spec, n, torch.float32).values()]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        with r.mem.phase("optimizer"):  # AdamW's moments appear at the first step
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
        opt.zero_grad(set_to_none=True)
        r.mem.track_optimizer(opt)
        if s.accumulation > 1:  # from the second micro-batch on, gradients are held
            with r.mem.phase("temporary"):
                for p in params:
                    p.grad = torch.zeros_like(p)
            for p in params:
                r.mem.track(p.grad, "gradients")
        r.mem.reset_peak()
        resident = dict(r.mem.by_category)
        mp = {"bf16": torch.bfloat16, "fp16": torch.bfloat16}.get(s.mixed_precision)
        # its tensors are freed on return but for the timesteps and the anchor's reference
        # output, held (as they were) to the end of this step
        held = _micro_batch_backward(r, spec, s, model, base, mp, fw)  # noqa: F841
        with r.mem.phase("temporary"):
            opt.step()
        step_peak = dict(r.mem.peak_by_category)
        opt.zero_grad(set_to_none=True)
        after = dict(r.mem.by_category)
        largest = max((p.numel() for p in model.parameters()), default=0)
        from craft.models.sharding import largest_unit_numel

        unit = largest_unit_numel(model)
        trainable_numel = sum(p.numel() for p in params)
        del data
    return Sim(step_peak, fw[0] / s.micro_batch, "sample", (), {
        "resident": resident, "after_step": after, "largest_param": largest,
        "unit_numel": unit, "trainable_numel": trainable_numel, "base_bytes": base_bytes,
        "compute_bytes": 2 if mp else 4})


def _micro_batch_backward(r: _Run, spec: ModelSpec, s: TrainSetup, model, base, mp,
                          fw: list) -> tuple:
    """One micro-batch's forward (with the anchor's reference pass) and backward, as
    craft.methods.training.micro_batch_loss and its autocast (``mp``) make them; the forward's
    FLOPs are appended to ``fw``. Returns (timesteps, the anchor's reference output or None):
    the caller holds them to the end of the step; every other tensor it made but the gradients
    is gone when it returns, before the optimizer step."""
    # as craft.methods.training's autocast: no cache of cast weights
    autocast = (torch.autocast("cpu", dtype=mp, cache_enabled=False) if mp
                else contextlib.nullcontext())
    in_dtype = _dt(spec) if s.lora else torch.float32
    b = s.micro_batch
    call = _call(spec, s.guidance)
    with r.flops(fw):
        # as craft.methods.training.micro_batch_loss: x0, noise, the noisy input and the target in
        # float32, the gathered conditioning, then both cast to what the denoiser takes
        x0, noise = _latents(spec, b), _latents(spec, b)
        xt, target = x0 * 0.5 + noise * 0.5, noise - x0
        gathered = _conditioning(spec, b, torch.float32)
        x = xt.to(in_dtype)
        cond = {k: v.to(in_dtype) for k, v in gathered.items()}
        t = _timesteps(spec, b)
        ref = None
        with autocast:
            pred = call(model, x, t, cond)
            loss = (pred.float() - target).pow(2).mean()
            if s.anchor:
                ref_model = base if base is not None else model
                with torch.no_grad():
                    if s.lora:
                        model.disable_adapters()
                    ref = call(ref_model, x, t, cond)
                    if s.lora:
                        model.enable_adapters()
                loss = loss + (pred.float() - ref.float()).pow(2).mean()
        with r.mem.phase("temporary"):
            loss.backward()
    del pred, loss, x, cond, x0, noise, xt, target, gathered
    return t, ref


@functools.lru_cache(maxsize=16)
def _data_encoding(spec: ModelSpec, vae_batch: int, text_batch: int) -> Sim:
    """The pipeline on the device while the kept set is encoded (a chunk at a time)."""
    r = _Run()
    with r.active():
        # held to the end: the tracker counts a module only while it lives (an unnamed one was
        # freed at once, and the plan priced this stage without the denoiser; craft rehearse
        # found it)
        denoiser = r.module(_meta(spec, spec.denoiser, _dt(spec)))
        encoders = {n: r.module(_meta(spec, n, _dt(spec))) for n in spec.text_encoders}
        vae_dtype = torch.float32 if _vae_upcast(spec) else _dt(spec)
        vae = r.module(_meta(spec, "vae", vae_dtype))
        _encode_text(spec, encoders, text_batch)
        with torch.no_grad():
            vae.encode(torch.randn(vae_batch, 3, spec.height, spec.width, dtype=vae_dtype))
        del denoiser
    return Sim(dict(r.mem.peak_by_category), 0.0, "sample")


def simulate_training(spec: ModelSpec, setup: TrainSetup) -> dict[str, Sim]:
    """``{"data": ..., "step": ...}``: encoding the kept set, and a steady-state step.

    The step is simulated once per setting that changes what runs (micro-batch, LoRA,
    checkpointing, precision, anchor, whether gradients are held across micro-batches); the EMA
    (a float32 copy of the trainable weights) and 8-bit AdamW (moments at 2 bytes a parameter
    instead of 8: bitsandbytes is not simulated) are then added to every snapshot exactly."""
    from craft.methods.training import TEXT_CHUNK

    data = _data_encoding(spec, 1 if setup.vae_slicing else setup.micro_batch,
                          min(TEXT_CHUNK, setup.n_kept))
    core = dataclasses.replace(setup, ema=False, eight_bit_adam=False, vae_slicing=False,
                               accumulation=min(setup.accumulation, 2))
    step = _step_cached(spec, core)
    extra = dict(step.extra)
    snaps = {k: dict(extra[k]) for k in ("resident", "after_step")}
    peak = dict(step.parts)
    notes = []
    for d in (peak, *snaps.values()):
        if setup.ema:
            d["ema"] = d.get("ema", 0) + extra["trainable_numel"] * 4
        if setup.eight_bit_adam and "optimizer" in d:
            d["optimizer"] //= 4
    if setup.eight_bit_adam:
        notes.append("8-bit AdamW: moments counted at 2 bytes per parameter instead of 8 "
                     "(bitsandbytes is not simulated)")
    extra.update(snaps)
    return {"data": data, "step": Sim(peak, step.flops, "sample", tuple(notes), extra)}


__all__ = ["GIB", "Sim", "TrainSetup", "simulate_generation", "simulate_reward",
           "simulate_training"]
