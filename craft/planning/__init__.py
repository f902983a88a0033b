"""Plan a run before GPUs are reserved: per-stage memory and time at the real sizes, simulated
on fake tensors (craft.planning.simulate), with a verdict and the cheapest change that fits
(craft.planning.plan). ``craft plan CONFIG`` prints it."""

from craft.planning.hardware import GPUS, Gpu, resolve_gpu
from craft.planning.plan import RunPlan, StagePlan, make_plan

__all__ = ["GPUS", "Gpu", "RunPlan", "StagePlan", "make_plan", "resolve_gpu"]
