"""Training checkpoints and the tuned model on disk, without a second copy of the model on the
device.

- A **LoRA** checkpoint (or final/) holds the adapters (``pytorch_lora_weights.safetensors``,
  craft.models.lora) and, for resuming, their float32 values, the EMA and AdamW state; final/ is the
  adapter file plus craft_train.json (a merged pipeline too with ``train.save_merged``).
- A **full** checkpoint holds the denoiser in the model dtype (``unet/`` or ``transformer/``,
  diffusers format) and the resumable state; final/ is the complete pipeline. The weights are
  streamed to the CPU one tensor at a time in the model dtype: the float32 master copy is never
  copied on the device (``export`` used to deep-copy it at every checkpoint and preview).
- A **sharded** (FSDP) run gathers the full weights a tensor at a time for ``unet/`` and writes
  its resumable state with torch.distributed.checkpoint, each process its shard
  (``state/``), so resuming needs no process to hold the whole model.

The resumable state names every trainable tensor with its shape; resuming refuses a checkpoint
whose names or shapes differ (a changed LoRA rank or target list, another base), instead of
pairing tensors by position.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from craft import CraftError

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
SHARDED_STATE = "state"  # torch.distributed.checkpoint folder of a sharded run
WEIGHT_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"  # diffusers' names
MAX_SHARD = "10GB"  # diffusers' default shard size


def latest_checkpoint(out_dir: Path) -> Path | None:
    from craft.run.layout import checkpoint_dirs

    ckpts = [p for p in checkpoint_dirs(out_dir) if (p / STATE_FILE).exists()]
    return ckpts[-1] if ckpts else None


def checkpoint_meta(ckpt: Path) -> dict:
    """The ``meta`` a checkpoint was saved with (run name, kept-set digest, ...)."""
    return _read_state(Path(ckpt))["meta"]


def checkpoint_folder(model) -> str:
    """The folder of a checkpoint's denoiser: ``unet`` or ``transformer``, as in a pipeline."""
    # by the class's ancestry: FSDP2 renames a sharded module's class (FSDPUNet2D...)
    return "unet" if any(c.__name__.startswith("UNet") for c in type(model).__mro__) \
        else "transformer"


def checkpoint_denoiser(ckpt: Path) -> Path | None:
    """The denoiser folder of a training checkpoint (``unet/`` or ``transformer/``), or None."""
    for name in ("unet", "transformer"):
        if (Path(ckpt) / name / "config.json").is_file():
            return Path(ckpt) / name
    return None


def is_checkpoint(path: Path) -> bool:
    """A training checkpoint evaluation can load (a denoiser folder or adapters)."""
    from craft.run.layout import LORA_WEIGHTS

    return checkpoint_denoiser(path) is not None or (Path(path) / LORA_WEIGHTS).is_file()


@contextlib.contextmanager
def ema_weights(ema, params):
    """The EMA weights in the live parameters for a while (previews, saving), then back:
    diffusers' ``EMAModel.store / copy_to / restore``, no copy of the model."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


# ------------------------------------------------------------------------ weights


def full_state(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights on the CPU in ``dtype``, one tensor at a time (a sharded model's
    are gathered a tensor at a time too: every process must call this). Host memory: a
    memory meter watching a CPU run leaves the copies out of the device's account."""
    from craft.models.sharding import is_sharded
    from craft.run.watch import host

    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        with host():  # cpu_offload: the full weights are gathered into host memory
            state = get_model_state_dict(model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
            return {k: v.to(dtype, copy=True) for k, v in state.items()}  # own storage each
    with host():
        return {k: v.detach().to("cpu", dtype, copy=True)
                for k, v in model.state_dict().items()}


def save_denoiser(model, folder: Path, dtype: torch.dtype, state: dict | None = None) -> Path:
    """A diffusers model folder (config.json + safetensors, sharded past 10 GB as diffusers
    shards) from ``model``'s config and ``state`` (default: :func:`full_state`)."""
    from huggingface_hub import save_torch_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(str(folder))
    save_torch_state_dict(state if state is not None else full_state(model, dtype), str(folder),
                          filename_pattern=WEIGHT_PATTERN, max_shard_size=MAX_SHARD)
    return folder


def write_pipeline(pipe, folder: Path, denoiser_state: dict | None = None,
                   denoiser_model=None) -> Path:
    """The pipeline saved complete in diffusers format into ``folder``, with its denoiser's
    weights replaced by ``denoiser_state`` (a CPU state dict, e.g. from :func:`full_state`;
    ``denoiser_model`` gives its config, default the pipeline's own denoiser)."""
    from craft.models.families import denoiser, denoiser_name

    name = denoiser_name(pipe)
    folder = Path(folder)
    for comp_name, comp in pipe.components.items():
        if comp is None:
            continue
        if comp_name == name and denoiser_state is not None:
            save_denoiser(denoiser_model or denoiser(pipe), folder / comp_name,
                          next(iter(denoiser_state.values())).dtype, denoiser_state)
        elif isinstance(comp, torch.nn.Module):
            comp.save_pretrained(str(folder / comp_name), safe_serialization=True)
        else:  # tokenizers, schedulers
            comp.save_pretrained(str(folder / comp_name))
    pipe.save_config(str(folder))  # model_index.json
    return folder


# ------------------------------------------------------------------------ resumable state


def trainable_named(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(out_dir: Path, step: int, *, pipe, model, ema, opt, lora: bool, meta: dict,
                    dtype: torch.dtype, accelerator) -> Path | None:
    """Write checkpoint-<step>/ atomically; every process calls it (a sharded run's processes
    all write), the main process returns the path."""
    from craft.run.fsutil import TMP_PREFIX, replace_dir
    from craft.run.layout import checkpoint_dir
    from craft.models.sharding import is_sharded

    main = accelerator.is_main_process
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    sharded = is_sharded(model)
    if not sharded and not main:
        return None
    if main:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if sharded:
        accelerator.wait_for_everyone()
    named = trainable_named(model)
    params = [p for _, p in named]
    with ema_weights(ema, params):
        if lora:
            if main:
                from craft.models.lora import save_lora

                save_lora(pipe, model, tmp)
        else:
            state = full_state(model, dtype)
            if main:
                save_denoiser(model, tmp / checkpoint_folder(model), dtype, state)
            del state
    record = {"step": step, "names": [n for n, _ in named],
              "shapes": [list(p.shape) for _, p in named], "meta": meta, "sharded": sharded}
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, opt_sd = get_state_dict(model, opt)
        ema_sd = {} if ema is None else {f"ema.{n}": t for (n, _), t in
                                         zip(named, ema.shadow_params)}
        dcp.save({"model": model_sd, "optim": opt_sd, **ema_sd,
                  "ema_step": torch.tensor(0 if ema is None else ema.optimization_step)},
                 checkpoint_id=str(tmp / SHARDED_STATE))
        accelerator.wait_for_everyone()
    else:
        record.update(trainable=[p.detach().cpu() for p in params],
                      ema=None if ema is None else ema.state_dict(), opt=opt.state_dict())
    if main:
        torch.save(record, tmp / STATE_FILE)
        replace_dir(tmp, final)
    if sharded:
        accelerator.wait_for_everyone()
    return final if main else None


def _read_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)


def load_checkpoint(ckpt: Path, model, ema, opt, meta: dict) -> int:
    """Restore the trainable weights, EMA and AdamW from ``ckpt``; returns its step.

    Refused, before anything is changed: another kept set (a different digest), or trainable
    tensors that differ in number, name or shape (a changed LoRA rank or target list, another
    base or full vs LoRA)."""
    state = _read_state(ckpt)
    saved = state["meta"].get("kept_digest")
    if saved is not None and meta.get("kept_digest") not in (None, saved):
        raise CraftError(f"{ckpt} was trained on another kept set (digest {saved[:12]}, now "
                         f"{meta['kept_digest'][:12]}); resume needs the same selection: train "
                         f"under a new run name, or delete {ckpt.parent} to start this one "
                         f"again")
    named = trainable_named(model)
    _check_same_tensors(ckpt, state, named, meta)
    from craft.models.sharding import is_sharded

    if bool(state.get("sharded")) != is_sharded(model):
        how = ("sharded (FSDP): resume with train.sharding=fsdp on several processes"
               if state.get("sharded") else "unsharded: resume with train.sharding=none")
        raise CraftError(f"{ckpt} was saved {how}, as it was trained (this run is "
                         f"{'sharded' if is_sharded(model) else 'not sharded'})")
    params = [p for _, p in named]
    if state.get("sharded"):
        _load_sharded(ckpt, model, ema, opt, named)
    else:
        with torch.no_grad():
            for p, v in zip(params, state["trainable"]):
                p.copy_(v)
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
            ema.to(device=params[0].device)  # loaded on the CPU
        opt.load_state_dict(state["opt"])
    log.info("resumed from %s (step %d)", ckpt, state["step"])
    return int(state["step"])


def _check_same_tensors(ckpt: Path, state: dict, named, meta: dict) -> None:
    names = state.get("names")
    shapes = [tuple(s) for s in state.get("shapes") or []]
    if names is None:  # an older checkpoint: counts and shapes by position
        shapes = [tuple(t.shape) for t in state["trainable"]]
        names = [f"#{i}" for i in range(len(shapes))]
        mine = [(f"#{i}", tuple(p.shape)) for i, (_, p) in enumerate(named)]
    else:
        mine = [(n, tuple(p.shape)) for n, p in named]
    theirs = list(zip(names, shapes))
    if theirs == mine:
        return
    what = _describe(state["meta"], meta)
    diff = next(((a, b) for a, b in zip(theirs, mine) if a != b), None)
    detail = (f"first difference: saved {diff[0][0]} {list(diff[0][1])} vs now {diff[1][0]} "
              f"{list(diff[1][1])}" if diff else
              f"saved {len(theirs)} trainable tensors, this run has {len(mine)}")
    raise CraftError(f"{ckpt} does not fit this run's trainable weights ({what}; {detail}); "
                     f"resume with the settings it was trained with, or train under a new "
                     f"run name (or delete {ckpt.parent} to start this one again)")


def _describe(saved: dict, now: dict) -> str:
    parts = []
    for key, label in (("lora", "LoRA"), ("lora_rank", "LoRA rank"), ("base", "base model")):
        if key in saved and key in now and saved[key] != now[key]:
            parts.append(f"{label} {saved[key]} then, {now[key]} now")
    return "; ".join(parts) or "the trainable tensors changed"


def _load_sharded(ckpt: Path, model, ema, opt, named) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    ema_sd = {} if ema is None else {f"ema.{n}": t for (n, _), t in
                                     zip(named, ema.shadow_params)}
    target = {"model": model_sd, "optim": opt_sd, **ema_sd, "ema_step": torch.tensor(0)}
    dcp.load(target, checkpoint_id=str(ckpt / SHARDED_STATE))
    set_state_dict(model, opt, model_state_dict=target["model"],
                   optim_state_dict=target["optim"])
    if ema is not None:
        ema.optimization_step = int(target["ema_step"])


__all__ = ["STATE_FILE", "checkpoint_denoiser", "checkpoint_folder", "checkpoint_meta",
           "ema_weights", "full_state", "is_checkpoint", "latest_checkpoint", "load_checkpoint",
           "save_checkpoint", "save_denoiser", "trainable_named", "write_pipeline"]
