"""Device and dtype names from configs, resolved once for the diffusion model, the rewards and
the LLM expander alike.

Why one place: the three used to carry their own rules, and they disagreed on what ``auto``
meant and on which spellings were accepted. ``key`` names the config field in error messages
(``model.device``, ``rewards.device``), so the user learns which setting to fix.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from craft import CraftError

# Building a model from weights goes through accelerate's init_empty_weights, which patches
# torch.nn.Module for the whole process while it runs: two threads loading at once (two studio
# jobs on two runs) got each other's modules on the meta device ("Cannot copy out of meta
# tensor"). Every pipeline, reward and adapter load, and every build on meta, holds this lock.
LOAD_LOCK = threading.RLock()

if TYPE_CHECKING:  # torch is imported on first use: the reward registry imports this module
    import torch

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


class DeviceError(CraftError, ValueError):
    """A device or dtype setting that cannot be used on this machine."""


def resolve_device(device: str | torch.device | None = "auto", key: str = "model.device"
                   ) -> torch.device:
    """``auto`` (or None) is CUDA when available, else the CPU; an unusable CUDA device is an
    error that says so, instead of a CUDA failure deep inside a model load."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{key}={device!r} is not a device; use 'auto', 'cpu', 'cuda' or "
                          "'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?)")
            raise DeviceError(f"{key}={str(device)!r} but no CUDA device is available here "
                              f"({why}); use --set {key}=cpu (or auto)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"{key}={str(device)!r} but this machine has {count} CUDA "
                              f"device(s) (cuda:0..cuda:{count - 1}); pick one of those")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = None, device: torch.device | None = None,
                  key: str = "model.dtype") -> torch.dtype:
    """None is float32; ``auto`` is float16 on CUDA and float32 elsewhere; names and their
    usual aliases (fp16, half, bf16, torch.float16) map to torch dtypes.

    With a CPU ``device``, float16 is refused: it is slow there and many CPU kernels lack it.
    """
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    if name == "auto":
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise DeviceError(f"{key}={dtype!r} is not a dtype; use one of auto, float32, float16, "
                          "bfloat16")
    out = getattr(torch, _DTYPES[name])
    if out == torch.float16 and device is not None and device.type == "cpu":
        raise DeviceError(f"{key}='float16' but the model runs on the CPU, where float16 is "
                          f"slow and many kernels lack it; use --set {key}=float32 (or auto, "
                          "which picks float16 on CUDA and float32 on the CPU)")
    return out


def free_memory() -> None:
    """Free now what was just let go of but sits in a reference cycle (a training state:
    accelerate's forward wrapper refers back to the module), which ``del`` alone leaves on the
    device until the cyclic collector happens to run."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["DeviceError", "LOAD_LOCK", "free_memory", "resolve_device", "resolve_dtype"]
