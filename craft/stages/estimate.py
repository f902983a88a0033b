"""How long a training run will take on this device, said before it starts, from what this run
already measured: the per-step times (``step_time`` in the store's training metrics) of the
latest earlier run of the same method on the same kind of device and base model.

Deliberately simple and said with its basis: ``steps x seconds per step`` of that run, scaled
when a step's work differs (effective batch; GRPO's images and sampler steps per update), plus
what that run spent outside its steps (loading, previews, checkpoints: from the times its steps
were logged). With
no such run there is no number: "no estimate yet". A measured GRPO step includes its sampling,
so GRPO's minutes and CRAFT's seconds both show before Start.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd


@dataclasses.dataclass(frozen=True)
class TrainTimeEstimate:
    """``seconds`` is None when nothing comparable was measured; ``basis`` says where the
    number comes from (or why there is none)."""

    seconds: float | None
    steps: int
    device: str  # "the CPU" / "a GPU"
    basis: str
    per_step_s: float | None = None
    overhead_s: float | None = None
    measured_in: str | None = None  # the earlier run's name

    def text(self) -> str:
        if self.seconds is None:
            return f"**Time on {self.device}:** no estimate yet ({self.basis})."
        return (f"**Estimated time on {self.device}:** about {format_duration(self.seconds)} "
                f"for {self.steps} steps (an estimate: {self.basis}).")


def format_duration(s: float) -> str:
    """12 s, 4 min 05 s, 1 h 20 min."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def device_kind(device: str | None) -> str:
    """``cpu`` or ``cuda`` for a config's device string (``auto``: what this machine has)."""
    d = str(device or "auto")
    if d == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except Exception:  # noqa: BLE001
            return "cpu"
    return "cuda" if d.startswith("cuda") else d


def step_work(cfg) -> float:
    """A step's work, in units that scale its time (the method says: images per step for the
    offline methods; for GRPO its round's sampling and training shared over its updates)."""
    from craft.methods.registry import get_method

    return get_method(cfg.train.method).step_work(cfg)


PAUSE_S = 600.0  # loading longer than this before the first step: the run was paused there


def outside_steps(metrics: pd.DataFrame, started: float) -> float | None:
    """Seconds a run spent outside its timed steps: loading before its first logged step, and
    previews / checkpoints between steps; None without timestamps. A gap between two steps
    far longer than a step (over a minute and 10 median steps) is a cancel and a later resume
    (the run keeps its row), not work, and is left out."""
    m = metrics.dropna(subset=["step_time"]) if "step_time" in metrics else metrics.iloc[:0]
    if m.empty or "created" not in m:
        return None
    created, times = m["created"].astype(float).to_numpy(), m["step_time"].to_numpy()
    total = max(0.0, created[0] - started - times[0])
    if total >= PAUSE_S:
        total = 0.0
    pause = max(60.0, 10 * float(pd.Series(times).median()))
    for gap, t in zip(created[1:] - created[:-1], times[1:]):
        if gap - t < pause:
            total += max(0.0, gap - t)
    return total


def estimate_train_time(store, cfg) -> TrainTimeEstimate:
    """The estimate for training ``cfg`` (``cfg.train.steps`` steps of ``cfg.train.method``)
    in the run of ``store``."""
    from craft.run.config import config_from_dict

    method, steps = cfg.train.method, int(cfg.train.steps)
    kind = device_kind(cfg.model.device)
    where = "the CPU" if kind == "cpu" else "a GPU"
    runs = store.train_runs_df()
    for r in (list(runs.itertuples())[::-1] if not runs.empty else []):
        try:
            past = config_from_dict(json.loads(r.config_json), f"training run {r.name}")
        except Exception:  # noqa: BLE001 - an old or foreign record: not comparable
            continue
        if past.train.method != method or device_kind(past.model.device) != kind \
                or past.model.pretrained != cfg.model.pretrained:
            continue
        m = store.metrics_df(int(r.id))
        times = m["step_time"].dropna() if "step_time" in m else pd.Series(dtype=float)
        if times.empty:
            continue
        per_step = float(times.mean())
        scale = step_work(cfg) / max(1e-9, step_work(past))
        overhead = outside_steps(m, float(r.started))
        seconds = steps * per_step * scale + (overhead or 0.0)
        basis = (f"{steps} × {per_step:.2f} s per step, the mean of {len(times)} steps of "
                 f"{r.name} here")
        if not math.isclose(scale, 1.0, rel_tol=0.01):
            basis += f", × {scale:.2g}: a step here is {scale:.2g}× the work of one of {r.name}'s"
        if overhead and overhead >= 1:
            basis += f", plus {overhead:.0f} s of loading and previews as in {r.name}"
        return TrainTimeEstimate(seconds, steps, where, basis, per_step * scale, overhead,
                                 r.name)
    return TrainTimeEstimate(None, steps, where,
                             f"no earlier {method} run on {where} with this base model in this "
                             f"run; the first one measures it")


__all__ = ["PAUSE_S", "TrainTimeEstimate", "device_kind", "estimate_train_time",
           "format_duration", "outside_steps", "step_work"]
