"""The GPUs a plan is made for: memory, peak throughput, and what the simulation cannot see.

Peak throughputs are the dense (no sparsity) 16-bit tensor-core figures of NVIDIA's data
sheets; memory is what ``torch.cuda.get_device_properties(...).total_memory`` reports on such
a card (a little under the marketed GB). A run's time is its FLOPs (counted by
torch.utils.flop_counter on the real architecture) divided by the GPUs' peak times a
*utilization* that no simulation can know: :data:`DEFAULT_UTILIZATION` is an assumption, stated
in every plan, and ``benchmarks/gpu.py`` measures the real one on the first GPU lent.
"""

from __future__ import annotations

import dataclasses

from craft import CraftError


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # as CUDA reports it
    tflops: float  # dense bf16/fp16 tensor-core peak, TFLOP/s (data sheet)
    source: str


GPUS = {g.name: g for g in (
    Gpu("H100", 79.1, 989.4, "H100 SXM5 80GB data sheet: 989.4 TFLOPS BF16 dense"),
    Gpu("H200", 139.8, 989.4, "H200 SXM 141GB data sheet: 989.4 TFLOPS BF16 dense"),
    Gpu("A100-80GB", 79.2, 312.0, "A100 SXM 80GB data sheet: 312 TFLOPS BF16 dense"),
    Gpu("A100-40GB", 39.4, 312.0, "A100 40GB data sheet: 312 TFLOPS BF16 dense"),
    Gpu("L40S", 44.4, 362.1, "L40S data sheet: 362.05 TFLOPS BF16 dense"),
    Gpu("RTX4090", 23.6, 165.2, "RTX 4090 (Ada whitepaper): 165.2 TFLOPS BF16, FP32 accumulate"),
    Gpu("L4", 22.0, 121.0, "L4 data sheet: 121 TFLOPS BF16 dense"),
    Gpu("A10G", 22.1, 70.0, "AWS A10G: ~70 TFLOPS BF16 dense"),
)}
DEFAULT_GPU = "H100"  # the paper's Table 7 reports H100 hours

# Fraction of the peak a diffusion workload reaches. An assumption (the plan says so): large
# transformer training reaches 0.35-0.5 of peak; UNet convolutions and small-batch sampling
# usually less. benchmarks/gpu.py measures it.
DEFAULT_UTILIZATION = 0.35

# What fake tensors cannot see, added to every simulated peak (and said in every plan):
CUDA_OVERHEAD_GIB = 1.0  # the CUDA context, cuBLAS / cuDNN workspaces, fused-attention scratch
# Relative to the simulated peak: the caching allocator's fragmentation, and the simulation's own
# error, measured on this CPU at up to 8.5 % below a real training step's live bytes
# (benchmarks/real_scale.md, section 2).
FRAGMENTATION = 0.15
MARGIN_TEXT = (f"each simulated peak gets +{FRAGMENTATION:.0%} for the allocator's "
               f"fragmentation and the simulation's own error (up to 8.5 % low on this CPU's "
               f"checks) and +{CUDA_OVERHEAD_GIB:g} GiB for the CUDA context and the "
               "cuBLAS / cuDNN / attention workspaces, which fake tensors do not allocate; "
               "CPU autocast's operator lists stand in for CUDA's")


def with_margin(simulated_gib: float) -> float:
    return simulated_gib * (1 + FRAGMENTATION) + CUDA_OVERHEAD_GIB


def resolve_gpu(name: str | None, memory_gib: float | None) -> Gpu:
    """The GPU to plan for: a named one (``--gpu``), or ``--gpu-memory`` GiB of an H100-class
    card (throughput of the default GPU), or the default H100."""
    if name is not None:
        key = {k.lower(): k for k in GPUS}.get(name.lower().replace(" ", ""))
        if key is None:
            raise CraftError(f"--gpu {name!r} is not a GPU the plan knows; use one of "
                             f"{', '.join(GPUS)}, or give --gpu-memory GiB")
        gpu = GPUS[key]
        return dataclasses.replace(gpu, memory_gib=memory_gib) if memory_gib else gpu
    base = GPUS[DEFAULT_GPU]
    if memory_gib is None:
        return base
    if not memory_gib > 0:
        raise CraftError(f"--gpu-memory {memory_gib}: must be a positive number of GiB, e.g. 80")
    return Gpu(f"GPU of {memory_gib:g} GiB", float(memory_gib), base.tflops,
               f"{base.name} throughput assumed ({base.source})")


def local_gpu() -> Gpu | None:
    """The CUDA device of this machine (its name and memory; the peak of the known GPU whose
    name it contains, else the default's), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    name = props.name.replace(" ", "").upper()
    known = next((g for k, g in GPUS.items() if k.split("-")[0].upper() in name), GPUS[DEFAULT_GPU])
    return Gpu(props.name, props.total_memory / 2**30, known.tflops,
               f"this machine's {props.name}; throughput of the {known.name} ({known.source})")


def hours(flops: float, gpus: int, gpu: Gpu, utilization: float) -> float:
    return flops / (gpus * gpu.tflops * 1e12 * utilization) / 3600


__all__ = ["CUDA_OVERHEAD_GIB", "DEFAULT_GPU", "DEFAULT_UTILIZATION", "FRAGMENTATION", "GPUS",
           "Gpu", "MARGIN_TEXT", "hours", "local_gpu", "resolve_gpu", "with_margin"]
