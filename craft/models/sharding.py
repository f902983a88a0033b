"""Sharded full fine-tuning (FSDP2: torch's ``fully_shard``) of the denoiser.

Why craft shards the model itself instead of leaving it to accelerate's FSDP plugin: accelerate
turns FSDP on only for GPU launches, and this project must be tested on CPU processes (gloo),
where torch's ``fully_shard`` works the same. The call is the one accelerate's FSDP2 path makes
(``fully_shard`` on each block, then on the root, with a ``MixedPrecisionPolicy``); the units
are the denoiser's repeated blocks (:func:`shard_units`), which the run plan uses too
(craft.planning), so the plan's all-gather buffers are the ones training allocates.

Each process then holds 1/N of the float32 master weights, their gradients and the AdamW state;
a block's full weights exist only while it runs (all-gathered in the compute dtype, freed after
the forward and gathered again for the backward).
"""

from __future__ import annotations

import os

import logging

import torch

log = logging.getLogger(__name__)

# The repeated blocks of the denoisers craft trains: each becomes one FSDP unit.
UNIT_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock",
                "FluxTransformerBlock", "FluxSingleTransformerBlock")


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that become FSDP units: every block of :data:`UNIT_CLASSES`, outermost
    first (a matched block's own sub-blocks are left inside it)."""
    units, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if type(m).__name__ in UNIT_CLASSES:
            units.append(m)
            inside.add(name)
    return units


def largest_unit_numel(model: torch.nn.Module) -> int:
    """Parameters of the largest FSDP unit (or of the root's own rest, if larger): what one
    all-gather materialises at once."""
    units = shard_units(model)
    in_units = {id(p) for u in units for p in u.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in in_units)
    return max([rest, *(sum(p.numel() for p in u.parameters()) for u in units)])


def fully_shard_model(model: torch.nn.Module, compute_dtype: torch.dtype | None,
                      reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard ``model`` across the default process group, in place; parameters stay float32
    (the master copy), compute runs in ``compute_dtype`` (None: float32), gradients are
    reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    units = shard_units(model)
    for unit in units:
        fully_shard(unit, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    log.info("sharded %s into %d FSDP units + root", type(model).__name__, len(units))
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)



def effective_sharding(cfg) -> str:
    """``train.sharding``, or fsdp when the user's accelerate config turns FSDP on."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return cfg.train.sharding


__all__ = ["UNIT_CLASSES", "fully_shard_model", "is_sharded", "largest_unit_numel",
           "shard_units"]
