"""Early rejection: which of a variant's candidates has no realistic chance of being kept.

Composite Reward Filtering keeps a variant's image only if it beats its group's reference (the
mean of the original prompt's images, per required reward) and then ranks in the top K by the
composite. Most variants' images do neither. Part-way through sampling (``generation.
early_reject_at`` of the steps) the scheduler's prediction of the final image is decoded and
scored with the filter's rewards (craft.stages.trajectory), and :class:`Judge` decides, against

- the group's reference scores (the original prompt's images always run to the end and are
  scored first), and
- the running top-K cut-off (the K-th best composite among the finished candidates that pass,
  with the filter's per-prompt cap): a subset of the final pool, so this cut-off is never above
  the final one,

whether the image goes on. It stops only when the prediction misses a required reward's
reference, or the cut-off, by more than ``generation.early_reject_margin`` standard deviations
(of that reward over the reference images; the composite is on the same scale). A prediction
that cannot be scored (NaN) always goes on.

Scale: rewards are compared raw against the reference mean, which is exactly the filter's test
for ``filter.margin`` 0 under zscore or minmax normalisation; the composite is z-scored with the
reference images' statistics, an approximation of the final pool's that the margin covers. Under
rank normalisation, or with near-duplicate removal (``filter.dedup_threshold``), a running
cut-off is not conservative, so only the reference test is used.

Everything here is numpy over a frame of scores; the sampling and the store are
craft.stages.generation's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import pandas as pd


@dataclasses.dataclass
class Judge:
    """The decision rule of one generation call (picklable: sent to every process once)."""

    names: tuple[str, ...]  # the filter's rewards: the columns of every score matrix
    weights: np.ndarray  # composite weight per name (normalised; 0 outside the composite)
    required: np.ndarray  # per name: a reward the filter's level compares with the reference
    mean: np.ndarray  # the reference images' mean and standard deviation per name
    sd: np.ndarray
    refs: dict[int, np.ndarray]  # prompt_id -> mean raw reference score per name
    margin: float  # generation.early_reject_margin, in standard deviations
    filter_margin: np.ndarray  # filter.margin per name, in standard deviations (module doc)
    compare: bool  # the level compares with the reference (not 'none')
    top_k: int | None  # None: no running cut-off (every passing candidate is kept, or unsafe)
    cap: int | None
    include_reference: bool
    cutoff: float = -math.inf
    finished: list = dataclasses.field(default_factory=list)  # (prompt_id, composite) passers

    # ---------------------------------------------------------------- scores

    def composite(self, raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(raw, float) - self.mean) / self.sd) @ self.weights

    def _reference(self, prompt_ids: Sequence[int]) -> np.ndarray:
        nan = np.full(len(self.names), np.nan)
        return np.stack([self.refs.get(int(p), nan) for p in prompt_ids]) if len(prompt_ids) \
            else np.zeros((0, len(self.names)))

    def passes(self, prompt_ids: Sequence[int], raw: np.ndarray, slack: float = 0.0,
               without_reference: bool = False) -> np.ndarray:
        """Whether each score row beats its group's reference on every required reward by
        ``filter.margin - slack`` standard deviations; rows whose group has no reference get
        ``without_reference``."""
        raw = np.asarray(raw, float).reshape(len(prompt_ids), len(self.names))
        if not self.compare:
            return np.ones(len(raw), dtype=bool)
        ref = self._reference(prompt_ids)
        req = self.required
        with np.errstate(invalid="ignore"):
            beats = raw[:, req] > ref[:, req] + (self.filter_margin[req] - slack) * self.sd[req]
        ok = beats.all(axis=1)
        no_ref = ~np.isfinite(ref[:, req]).all(axis=1)
        ok[no_ref] = without_reference
        return ok

    # ---------------------------------------------------------------- decisions

    def decide(self, prompt_ids: Sequence[int], raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(go on?, predicted composite) per predicted-score row. Stops only a scorable
        prediction that misses the reference or the running cut-off by more than the margin."""
        raw = np.asarray(raw, float).reshape(len(prompt_ids), len(self.names))
        comp = self.composite(raw)
        scorable = np.isfinite(raw).all(axis=1)
        hopeless = ~self.passes(prompt_ids, raw, slack=self.margin, without_reference=True)
        with np.errstate(invalid="ignore"):
            hopeless |= comp < self.cutoff - self.margin
        return ~(scorable & hopeless), comp

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


def build_judge(frame: pd.DataFrame, settings, margin: float) -> Judge:
    """The rule for a pool whose reference images are finished and scored: ``frame`` has
    prompt_id, variant_idx and one column per reward of ``settings.used_rewards`` (raw), one row
    per finished candidate; ``settings`` a craft.stages.filtering.FilterSettings."""
    names = tuple(settings.used_rewards)
    raw = frame[list(names)].to_numpy(float) if len(frame) else np.zeros((0, len(names)))
    is_ref = frame["variant_idx"].to_numpy() == 0 if len(frame) else np.zeros(0, bool)
    ref_rows = raw[is_ref & np.isfinite(raw).all(axis=1)]
    mean = ref_rows.mean(axis=0) if len(ref_rows) else np.zeros(len(names))
    sd = ref_rows.std(axis=0) if len(ref_rows) > 1 else np.ones(len(names))
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    refs = {}
    if len(ref_rows):
        ok = is_ref & np.isfinite(raw).all(axis=1)
        by = pd.DataFrame(raw[ok], columns=names).assign(p=frame["prompt_id"].to_numpy()[ok])
        refs = {int(p): g[list(names)].to_numpy(float).mean(axis=0) for p, g in by.groupby("p")}
    w = settings.normalized_weights
    from craft.stages.filtering import required_rewards

    required = set(required_rewards(settings)) if settings.level != "none" else set()
    safe_cutoff = settings.normalization != "rank" and settings.dedup_threshold is None
    fm = float(settings.margin) * (np.ones(len(names)) if settings.normalization == "zscore"
                                   else _range_in_sd(ref_rows, sd))
    judge = Judge(names, np.array([w.get(n, 0.0) for n in names]),
                  np.array([n in required for n in names]), mean, sd, refs, float(margin), fm,
                  settings.level != "none", settings.top_k if safe_cutoff else None,
                  settings.per_prompt_cap, bool(settings.include_reference))
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


__all__ = ["Judge", "build_judge", "cost_sentence", "running_cutoff"]
