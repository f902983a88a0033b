"""Device memory and FLOPs of model code, measured as it runs: on fake tensors (nothing is
allocated, so a 12 B-parameter model "runs" on this CPU in seconds) or on real ones.

Why this exists: the run plan (craft.plan) must say, before GPUs are reserved, how much memory
each stage of a config needs at the real sizes. torch can execute the real architectures on
``FakeTensorMode`` tensors, which carry shapes and dtypes but no data; what is missing is an
account of the bytes they would occupy. torch.distributed._tools' ``MemTracker`` keeps that
account per module, but it walks every module's record on every operator: an SDXL UNet
(~2,000 modules) optimizer step took over ten minutes here. :class:`MemoryTracker` keeps only
what the plan reports: the live bytes of every tensor storage, by category, the peak and the
breakdown at the peak. (It also counts FLOPs with torch.utils.flop_counter's formulas:
``FlopCounterMode`` itself keeps every backward temporary alive through its module hooks, which
inflated a simulated FLUX backward by 40 GiB.) Storages are counted once (views share them) and rounded up to 512
bytes, as CUDA's caching allocator rounds its allocations.

Categories: ``weights`` (frozen parameters and buffers), ``trainable`` (parameters that train:
the float32 master copy or the LoRA adapters), ``gradients``, ``optimizer`` (AdamW moments),
``ema``, ``data`` (the encoded training set), ``activations`` (what the forward pass creates) and ``temporary`` (what the backward
pass creates besides gradients). A tensor is tagged when it is created, by the phase the caller
sets (:meth:`MemoryTracker.phase`); gradients are re-tagged as they are accumulated.

What it cannot see (the plan adds a stated margin for them): the CUDA context and library
workspaces (cuBLAS, cuDNN, fused-attention kernels), allocator fragmentation and caching, and
differences between the CPU's and CUDA's autocast operator lists.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("weights", "trainable", "gradients", "optimizer", "ema", "data", "activations",
              "temporary")
ALLOC_ROUND = 512  # bytes: CUDA's caching allocator rounds every block up to this


def _rounded(n: int) -> int:
    return (n + ALLOC_ROUND - 1) // ALLOC_ROUND * ALLOC_ROUND


def _storages(t: torch.Tensor) -> list:
    """The untyped storages behind ``t`` (a DTensor's: its local shard's)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    out, todo = [], [t]
    while todo:
        x = todo.pop()
        if is_traceable_wrapper_subclass(x):
            attrs, _ = x.__tensor_flatten__()
            todo += [getattr(x, a) for a in attrs if isinstance(getattr(x, a), torch.Tensor)]
        else:
            out.append(x.untyped_storage())
    return out


class MemoryTracker(TorchDispatchMode):
    """Live bytes by category while its context is active; ``peak`` and ``peak_by_category``.

    Tensors created before the context (model weights, optimizer state) are counted with
    :meth:`track`, or :meth:`track_module` / :meth:`track_optimizer`.
    """

    def __init__(self, count_flops: bool = False) -> None:
        super().__init__()
        self.flops = 0  # FLOPs of the operators run inside (with count_flops)
        self._flop_registry = None
        if count_flops:
            from torch.utils.flop_counter import flop_registry

            self._flop_registry = flop_registry
        self._live: dict[int, tuple[int, str]] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.by_category: dict[str, int] = defaultdict(int)
        self.total = 0
        self.peak = 0
        self.peak_by_category: dict[str, int] = {}
        self.current_phase = "activations"

    # -------------------------------------------------------------- accounting

    def track(self, tensor: torch.Tensor, category: str) -> None:
        """Count ``tensor``'s storage under ``category`` (re-tags it if already counted as
        something transient, e.g. a gradient first seen as a backward temporary)."""
        if category not in CATEGORIES:
            raise ValueError(f"category {category!r} is not one of {CATEGORIES}")
        for st in _storages(tensor):
            key = st._cdata
            if key in self._live:
                size, old = self._live[key]
                if old != category and old in ("activations", "temporary"):
                    self.by_category[old] -= size
                    self.by_category[category] += size
                    self._live[key] = (size, category)
                continue
            size = _rounded(st.nbytes())
            if size == 0:
                continue
            self._live[key] = (size, category)
            self.by_category[category] += size
            self.total += size
            self._refs[key] = weakref.ref(st, lambda _, k=key: self._release(k))
            if self.total > self.peak:
                self.peak = self.total
                self.peak_by_category = {k: v for k, v in self.by_category.items() if v}

    def _release(self, key: int) -> None:
        size, category = self._live.pop(key, (0, None))
        self._refs.pop(key, None)
        if category is not None:
            self.by_category[category] -= size
            self.total -= size

    def track_module(self, module: torch.nn.Module, trainable: str = "trainable",
                     frozen: str = "weights") -> None:
        """Count a module's parameters (by whether they train) and buffers, and re-tag the
        gradients of its trainable parameters as they are accumulated."""
        for p in module.parameters():
            self.track(p, trainable if p.requires_grad else frozen)
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(
                    lambda q: self.track(q.grad, "gradients") if q.grad is not None else None)
        for b in module.buffers():
            self.track(b, frozen)

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    self.track(v, "optimizer")

    @contextlib.contextmanager
    def phase(self, name: str):
        """Tag what is created inside as ``name`` (activations, temporary, optimizer, ema)."""
        before, self.current_phase = self.current_phase, name
        try:
            yield self
        finally:
            self.current_phase = before

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (the state between two phases)."""
        self.peak = self.total
        self.peak_by_category = {k: v for k, v in self.by_category.items() if v}

    def live_bytes(self, category: str | None = None) -> int:
        return self.total if category is None else self.by_category.get(category, 0)

    # -------------------------------------------------------------- the mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):  # let DTensor run its local ops through us
            return NotImplemented
        kwargs = kwargs or {}
        registry = self._flop_registry
        if registry is not None and func._overloadpacket not in registry \
                and func is not torch.ops.prim.device.default:
            # a composite op (linear, sdpa under inference mode): run its decomposition through
            # this mode, as FlopCounterMode does, so the matmuls inside are counted
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if registry is not None:
            self.flops += registry[func._overloadpacket](*args, **kwargs, out_val=out) \
                if func._overloadpacket in registry else 0
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t, self.current_phase)
        return out


# ------------------------------------------------------------------ fake models


def fake_mode():
    """A FakeTensorMode that also accepts real constant tensors created by model code."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def materialize(module: torch.nn.Module, mode, device: str = "cpu") -> torch.nn.Module:
    """Give a module built on the meta device fake parameters and buffers on ``device``,
    keeping every dtype and ``requires_grad``. (``module.to_empty`` cannot: it swaps tensors,
    which fake tensors refuse.) Returns the module, changed in place."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                with mode:
                    t = torch.empty(p.shape, dtype=p.dtype, device=device)
                m._parameters[name] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                with mode:
                    m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return module


def module_bytes(module: torch.nn.Module, trainable: bool | None = None) -> int:
    """Bytes of a module's parameters (all, only trainable, or only frozen) and, for
    ``trainable`` None or False, its buffers."""
    total = sum(p.numel() * p.element_size() for p in module.parameters()
                if trainable is None or p.requires_grad == trainable)
    if not trainable:
        total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total


__all__ = ["CATEGORIES", "MemoryTracker", "fake_mode", "materialize", "module_bytes"]
