"""Early rejection: which of a variant's candidates has no realistic chance of being kept.

Composite Reward Filtering keeps a variant's image only if it beats its group's reference (the
mean of the original prompt's images, per required reward) and then ranks in the top K by the
composite. Most variants' images do neither. Part-way through sampling (``generation.
early_reject_at`` of the steps) the scheduler's prediction of the final image is decoded and
scored with the filter's rewards (craft.stages.trajectory).

A prediction part-way is blurrier than the image it becomes, so its scores are biased (in the
toy world a fidelity score 0.2 low after a quarter of the steps, more than the pool's spread).
They are therefore *calibrated* on the reference images, which always run to the end and whose
predictions at the same step are scored on the way: per reward, the final score is regressed on
the early one (``final ~ a + b * early``), and the residual's spread is the prediction's error
(``error_sd``; for the composite too). :class:`Judge` then predicts each variant's final scores
and stops it only when the prediction misses, by more than ``generation.early_reject_margin``
error standard deviations,

- the group's reference on a required reward (the filter's own test), or
- the running top-K cut-off: the K-th best composite among the finished candidates that pass,
  with the filter's per-prompt cap. Those are a subset of the final pool, so this cut-off is
  never above the final one.

A prediction that cannot be scored (NaN) always goes on. Scale: rewards are compared raw against
the reference mean, which is exactly the filter's test for ``filter.margin`` 0 under zscore or
minmax normalisation; the composite is z-scored with the reference images' statistics, an
approximation of the final pool's that the margin covers. Under rank normalisation, or with
near-duplicate removal (``filter.dedup_threshold``), a running cut-off is not conservative, so
only the reference test is used.

Everything here is numpy over score matrices; the sampling and the store are
craft.stages.generation's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import pandas as pd

MIN_CALIBRATION = 3  # reference images with both scores needed to fit the calibration


@dataclasses.dataclass
class Judge:
    """The decision rule of one generation call (picklable: sent to every process once)."""

    names: tuple[str, ...]  # the filter's rewards: the columns of every score matrix
    weights: np.ndarray  # composite weight per name (normalised; 0 outside the composite)
    required: np.ndarray  # per name: a reward the filter's level compares with the reference
    mean: np.ndarray  # the reference images' mean and standard deviation per name
    sd: np.ndarray
    refs: dict[int, np.ndarray]  # prompt_id -> mean raw reference score per name
    margin: float  # generation.early_reject_margin, in error standard deviations
    filter_margin: np.ndarray  # filter.margin per name, in reward standard deviations
    compare: bool  # the level compares with the reference (not 'none')
    top_k: int | None  # None: no running cut-off (every passing candidate is kept, or unsafe)
    cap: int | None
    include_reference: bool
    a: np.ndarray = None  # calibration: final ~ a + b * early, per name
    b: np.ndarray = None
    error_sd: np.ndarray = None  # the calibrated prediction's error per name ...
    composite_error_sd: float = 0.0  # ... and of the composite
    calibrated_on: int = 0  # reference images the calibration was fitted on
    cutoff: float = -math.inf
    finished: list = dataclasses.field(default_factory=list)  # (prompt_id, composite) passers

    def __post_init__(self) -> None:
        n = len(self.names)
        self.a = np.zeros(n) if self.a is None else np.asarray(self.a, float)
        self.b = np.ones(n) if self.b is None else np.asarray(self.b, float)
        self.error_sd = np.asarray(self.sd, float) if self.error_sd is None else \
            np.asarray(self.error_sd, float)

    # ---------------------------------------------------------------- scores

    def composite(self, raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(raw, float) - self.mean) / self.sd) @ self.weights

    def predict(self, early: np.ndarray) -> np.ndarray:
        """Predicted final scores of early (part-way) scores."""
        return self.a + self.b * np.asarray(early, float)

    def _reference(self, prompt_ids: Sequence[int]) -> np.ndarray:
        nan = np.full(len(self.names), np.nan)
        return np.stack([self.refs.get(int(p), nan) for p in prompt_ids]) if len(prompt_ids) \
            else np.zeros((0, len(self.names)))

    def passes(self, prompt_ids: Sequence[int], raw: np.ndarray, slack=0.0,
               without_reference: bool = False) -> np.ndarray:
        """Whether each score row beats its group's reference on every required reward by
        ``filter.margin`` standard deviations less ``slack`` (a number or one per name, in
        score units); rows whose group has no reference get ``without_reference``."""
        raw = np.asarray(raw, float).reshape(len(prompt_ids), len(self.names))
        if not self.compare:
            return np.ones(len(raw), dtype=bool)
        ref = self._reference(prompt_ids)
        req = self.required
        slack = np.broadcast_to(np.asarray(slack, float), (len(self.names),))[req]
        with np.errstate(invalid="ignore"):
            beats = raw[:, req] > ref[:, req] + self.filter_margin[req] * self.sd[req] - slack
        ok = beats.all(axis=1)
        no_ref = ~np.isfinite(ref[:, req]).all(axis=1)
        ok[no_ref] = without_reference
        return ok

    # ---------------------------------------------------------------- decisions

    def decide(self, prompt_ids: Sequence[int], early: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(go on?, predicted final scores, predicted composite) per early-score row. Stops
        only a scorable prediction that misses the reference or the running cut-off by more
        than the margin."""
        early = np.asarray(early, float).reshape(len(prompt_ids), len(self.names))
        pred = self.predict(early)
        comp = self.composite(pred)
        scorable = np.isfinite(pred).all(axis=1)
        hopeless = ~self.passes(prompt_ids, pred, slack=self.margin * self.error_sd,
                                without_reference=True)
        with np.errstate(invalid="ignore"):
            hopeless |= comp < self.cutoff - self.margin * self.composite_error_sd
        return ~(scorable & hopeless), pred, comp

    def add_finished(self, prompt_ids: Sequence[int], raw: np.ndarray,
                     is_reference: Sequence[bool]) -> None:
        """Finished candidates' final scores: those that pass and may be kept raise the
        running cut-off (called on the main process, which sends the cut-off out)."""
        if not len(prompt_ids):
            return
        raw = np.asarray(raw, float).reshape(len(prompt_ids), len(self.names))
        eligible = np.isfinite(raw).all(axis=1) & self.passes(prompt_ids, raw)
        if not self.include_reference:
            eligible &= ~np.asarray(is_reference, bool)
        comp = self.composite(raw)
        self.finished += [(int(p), float(c)) for p, c, e in zip(prompt_ids, comp, eligible) if e]
        self.cutoff = running_cutoff(self.finished, self.top_k, self.cap)

    def state(self) -> float:
        return self.cutoff

    def calibrate(self, early: np.ndarray, final: np.ndarray) -> None:
        """Fit ``final ~ a + b * early`` per reward on reference images that have both (rows
        with a NaN left out); the residuals' spread is the prediction's error. With fewer
        than MIN_CALIBRATION rows the early scores are taken as they are, with the reward's
        own spread as the error."""
        early, final = np.asarray(early, float), np.asarray(final, float)
        ok = np.isfinite(early).all(axis=1) & np.isfinite(final).all(axis=1)
        early, final = early[ok], final[ok]
        self.calibrated_on = int(len(early))
        if len(early) < MIN_CALIBRATION:
            return
        for j in range(len(self.names)):
            x, y = early[:, j], final[:, j]
            b = np.cov(x, y, ddof=0)[0, 1] / x.var() if x.var() > 0 else 0.0
            self.b[j] = b if np.isfinite(b) and b > 0 else 1.0
            self.a[j] = y.mean() - self.b[j] * x.mean()
            resid = y - (self.a[j] + self.b[j] * x)
            self.error_sd[j] = max(float(resid.std(ddof=min(2, len(x) - 1))), 1e-12)
        resid = self.composite(final) - self.composite(self.predict(early))
        self.composite_error_sd = float(resid.std(ddof=min(2, len(resid) - 1)))


def running_cutoff(finished: list[tuple[int, float]], top_k: int | None,
                   cap: int | None) -> float:
    """The K-th best composite among passing candidates, at most ``cap`` of one prompt (the
    filter's own order of rules); -inf while fewer than K pass (or without a K)."""
    if top_k is None or len(finished) < top_k:
        return -math.inf
    order = sorted(finished, key=lambda pc: -pc[1])
    if cap is not None:
        seen: dict[int, int] = {}
        kept = []
        for p, c in order:
            seen[p] = seen.get(p, 0) + 1
            if seen[p] <= cap:
                kept.append(c)
        order = [(0, c) for c in kept]
    return float(order[top_k - 1][1]) if len(order) >= top_k else -math.inf


def build_judge(frame: pd.DataFrame, settings, margin: float, early: np.ndarray | None = None,
                final: np.ndarray | None = None) -> Judge:
    """The rule for a pool whose reference images are finished and scored: ``frame`` has
    prompt_id, variant_idx and one column per reward of ``settings.used_rewards`` (raw), one row
    per finished candidate; ``settings`` a craft.stages.filtering.FilterSettings; ``early`` and
    ``final`` (rows of reference images: their scores part-way and at the end) calibrate it."""
    from craft.stages.filtering import required_rewards

    names = tuple(settings.used_rewards)
    raw = frame[list(names)].to_numpy(float) if len(frame) else np.zeros((0, len(names)))
    is_ref = frame["variant_idx"].to_numpy() == 0 if len(frame) else np.zeros(0, bool)
    ok = is_ref & np.isfinite(raw).all(axis=1)
    ref_rows = raw[ok]
    mean = ref_rows.mean(axis=0) if len(ref_rows) else np.zeros(len(names))
    sd = ref_rows.std(axis=0) if len(ref_rows) > 1 else np.ones(len(names))
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    refs = {}
    if len(ref_rows):
        by = pd.DataFrame(ref_rows, columns=names).assign(p=frame["prompt_id"].to_numpy()[ok])
        refs = {int(p): g[list(names)].to_numpy(float).mean(axis=0) for p, g in by.groupby("p")}
    w = settings.normalized_weights
    required = set(required_rewards(settings)) if settings.level != "none" else set()
    safe_cutoff = settings.normalization != "rank" and settings.dedup_threshold is None
    fm = float(settings.margin) * (np.ones(len(names)) if settings.normalization == "zscore"
                                   else _range_in_sd(ref_rows, sd))
    judge = Judge(names, np.array([w.get(n, 0.0) for n in names]),
                  np.array([n in required for n in names]), mean, sd, refs, float(margin), fm,
                  settings.level != "none", settings.top_k if safe_cutoff else None,
                  settings.per_prompt_cap, bool(settings.include_reference))
    judge.composite_error_sd = float(np.sqrt(judge.weights ** 2 @ np.ones(len(names))))
    if early is not None and final is not None:
        judge.calibrate(early, final)
    judge.add_finished(frame["prompt_id"].tolist(), raw, is_ref)
    return judge


def _range_in_sd(ref_rows: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """minmax normalisation's unit (the range) per reward in standard deviations, from the
    references (the rank normalisation's margin is read the same way: an approximation)."""
    if len(ref_rows) < 2:
        return np.ones(len(sd))
    spread = (ref_rows.max(axis=0) - ref_rows.min(axis=0)) / sd
    return np.where(np.isfinite(spread), spread, 1.0)


def cost_sentence(cost: dict) -> str:
    """What a pool's generation cost (``RunStore.generation_cost``), as ``craft generate``
    and the studio's Generate tab say it."""
    spent, plain = cost["evaluations"], cost["plain_evaluations"]
    share = f" ({spent / plain:.0%} of it)" if plain else ""
    text = (f"{spent} evaluations; {cost['stopped']} candidates stopped early; the plain "
            f"sampler would have spent {plain}{share}")
    if cost.get("uncounted"):
        text += (f"; {cost['uncounted']} candidates generated before costs were recorded are "
                 "not counted")
    return text


__all__ = ["MIN_CALIBRATION", "Judge", "build_judge", "cost_sentence", "running_cutoff"]
