"""Curation logic behind the Curate and Groups tabs, free of UI code (benchmarked and tested
directly): re-run Composite Reward Filtering on every control move, caption the kept images,
toggle manual overrides, export the kept set as a Hugging Face ``imagefolder``."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from craft.advantages import group_advantages, training_weights
from craft.filtering import LEVEL_ROLES, FilterResult, FilterSettings, apply_filter

VIEWS = ("kept", "passing, not kept", "manually excluded", "all, best first")
MAX_GALLERY = 60


def make_settings(cfg, weights: Mapping[str, float], normalization: str, level: str,
                  require: Sequence[str], margin: float, top_k: int | float | None,
                  include_reference: bool) -> FilterSettings:
    """Filter settings from the Curate controls (every reward of ``weights`` is in the
    composite; a weight of 0 leaves it out of R but it must still be scored)."""
    top = int(top_k) if top_k else None
    return FilterSettings(rewards=tuple(weights), weights={k: float(v) for k, v in weights.items()},
                          normalization=normalization, level=level, roles=dict(cfg.rewards.roles),
                          require=tuple(require or ()), margin=float(margin or 0.0), top_k=top,
                          include_reference=bool(include_reference))


@dataclasses.dataclass
class Curation:
    """One filter run: the annotated frame (with ``advantage``) and the counts."""

    result: FilterResult
    frame: pd.DataFrame
    settings: FilterSettings
    seconds: float

    @property
    def kept_ids(self) -> np.ndarray:
        return self.result.kept["candidate_id"].to_numpy()


def curate(df: pd.DataFrame, settings: FilterSettings,
           overrides: Mapping[int, str] | None = None, eps: float = 1e-6) -> Curation:
    """apply_filter + group advantages: what one slider move recomputes."""
    t0 = time.perf_counter()
    result = apply_filter(df, settings, overrides)
    adv = group_advantages(result.frame, "composite", "prompt_id", eps)
    frame = result.frame
    frame = frame.assign(advantage=adv.to_numpy())
    return Curation(result, frame, settings, time.perf_counter() - t0)


class CurationCache:
    """Remembers the last few filter runs keyed by (data version, settings, overrides), so the
    histogram, the grid and the Groups tab reuse the count step's work. Single-flight: a slider
    click fires ``input`` and ``release`` together, and the second waits for the first's result
    instead of computing it again on a busy CPU."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: dict[Any, Curation] = {}
        self._pending: dict[Any, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, compute) -> Curation:
        while True:
            with self._lock:
                hit = self._items.get(key)
                if hit is not None:
                    return hit
                pending = self._pending.get(key)
                if pending is None:
                    pending = self._pending[key] = threading.Event()
                    break
            pending.wait(30)
        try:
            value = compute()
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.pop(next(iter(self._items)))
            return value
        finally:
            with self._lock:
                self._pending.pop(key, None)
            pending.set()


def levels_line(c: Curation) -> str:
    passing = c.result.counts.passing
    parts = []
    for level in ("h", "ha", "hpa", "custom", "none"):
        if passing.get(level) is None:
            continue
        label = {"none": "no level", "custom": "custom"}.get(level, f"I_{level}")
        parts.append(f"{label}: {passing[level]}")
    return "Passing per level: " + " · ".join(parts)


def effective_count(c: Curation, adv_mode: str = "clamp", tau: float = 1.0) -> int:
    """Kept candidates whose loss weight is > 0. The kept *count* is min(K, passing) whatever the
    weights; the weights decide the composite, hence the advantages, hence how many kept images
    the loss actually sees (under ``clamp``, those above their group's mean R)."""
    adv = c.frame["advantage"].to_numpy()[c.frame["kept"].to_numpy()]
    adv = adv[np.isfinite(adv)]
    if adv.size == 0:
        return 0
    return int((training_weights(adv, adv_mode, tau) > 0).sum())


def kept_line(c: Curation, adv_mode: str = "clamp", tau: float = 1.0) -> str:
    counts = c.result.counts
    text = (f"Kept <b id='kept-number'>{counts.kept}</b> of {counts.scorable} scorable candidates"
            f" ({counts.groups} groups) · <span id='effective-number'>"
            f"{effective_count(c, adv_mode, tau)}</span> with training weight > 0")
    if c.result.cutoff is not None:
        text += f" · cut-off R ≥ <span id='cutoff-number'>{c.result.cutoff:+.3f}</span>"
    if counts.unscorable:
        text += f" · {counts.unscorable} unscorable (NaN) excluded"
    if counts.overrides_applied:
        inc = sum(v == "include" for v in counts.overrides_applied.values())
        text += f" · by hand: {inc} included, {len(counts.overrides_applied) - inc} excluded"
    return text


def caption(row: Any, rewards: Sequence[str], short: Mapping[str, str]) -> str:
    parts = [f"{short[r]} {getattr(row, r):.2f}" for r in rewards]
    head = "★orig" if row.variant_idx == 0 else f"v{row.variant_idx}"
    marks = ""
    if row.override == "include":
        marks = " · ✋ included"
    elif row.override == "exclude":
        marks = " · ✋ excluded"
    r = row.composite
    a = row.advantage
    return (f"R {r:+.2f} · A {a:+.2f} · " + " ".join(parts)
            + f" · {head} s{getattr(row, 'seed_idx', row.seed)}{marks}\n{row.prompt}")


def gallery_rows(c: Curation, view: str, limit: int = MAX_GALLERY) -> pd.DataFrame:
    f = c.frame
    if view == "kept":
        sel = f["kept"].to_numpy()
    elif view == "passing, not kept":
        sel = f["passes"].to_numpy() & ~f["kept"].to_numpy()
    elif view == "manually excluded":
        sel = (f["override"] == "exclude").to_numpy()
    else:
        sel = f["scorable"].to_numpy()
    idx = np.flatnonzero(sel)
    comp = f["composite"].to_numpy()[idx]
    order = idx[np.lexsort((f["candidate_id"].to_numpy()[idx], -np.nan_to_num(comp, nan=-1e9)))]
    return f.iloc[order[:limit]]


def gallery_items(rows: pd.DataFrame, rewards: Sequence[str], short: Mapping[str, str]
                  ) -> tuple[list[tuple[str, str]], list[int]]:
    items = [(row.image_path, caption(row, rewards, short)) for row in rows.itertuples()]
    return items, [int(x) for x in rows["candidate_id"]]


def toggle_action(c: Curation, candidate_id: int, current: str | None) -> str | None:
    """A click's new override: an overridden candidate goes back to automatic; a kept one is
    excluded by hand; any other (scorable) one is included by hand."""
    if current is not None:
        return None
    row = c.frame.loc[c.frame["candidate_id"] == candidate_id]
    if row.empty:
        raise ValueError(f"candidate {candidate_id} is not in this run's scored candidates")
    return "exclude" if bool(row["kept"].iloc[0]) else "include"


def level_pass_table(frame: pd.DataFrame, settings: FilterSettings) -> pd.DataFrame:
    """Per candidate: pass (True/False) at each paper level whose roles are mapped."""
    out = {}
    base = frame["scorable"].to_numpy() & frame["has_reference"].to_numpy()
    for level, roles in LEVEL_ROLES.items():
        if level == "none" or not all(r in settings.roles for r in roles):
            continue
        ok = base.copy()
        for role in roles:
            col = f"beats_{settings.roles[role]}"
            if col in frame:
                ok &= frame[col].to_numpy()
            else:
                ok &= False
        out[f"I_{level}"] = ok
    return pd.DataFrame(out, index=frame.index)


def groups_table(c: Curation) -> pd.DataFrame:
    """One row per group (original prompt): sizes, reference and best composite, pass counts
    per level, kept."""
    f = c.frame
    levels = level_pass_table(f, c.settings)
    g = pd.DataFrame({"prompt_id": f["prompt_id"], "prompt": f["prompt"],
                      "composite": f["composite"], "is_ref": f["variant_idx"] == 0,
                      "kept": f["kept"], "advantage": f["advantage"]})
    for col in levels:
        g[col] = levels[col].to_numpy()
    agg = g.groupby("prompt_id", sort=False).agg(
        prompt=("prompt", "first"), candidates=("composite", "size"),
        best_R=("composite", "max"), kept=("kept", "sum"),
        **{f"pass {c}": (c, "sum") for c in levels.columns})
    ref = g[g["is_ref"]].groupby("prompt_id")["composite"].mean()
    agg.insert(2, "reference_R", ref.reindex(agg.index))
    agg["best_R"] = agg["best_R"].round(3)
    agg["reference_R"] = agg["reference_R"].round(3)
    agg["gain_R"] = (agg["best_R"] - agg["reference_R"]).round(3)
    return agg.reset_index().sort_values("kept", ascending=False, kind="stable")


def kept_rows(c: Curation, adv_mode: str = "clamp", tau: float = 1.0) -> pd.DataFrame:
    """The kept candidates of a filter run with their training weights, best first: what
    training and export receive (craft.stages.training_set computes the same)."""
    kept = c.frame.loc[c.frame["kept"].to_numpy()].sort_values(
        ["composite", "candidate_id"], ascending=[False, True], kind="stable")
    return kept.assign(weight=training_weights(kept["advantage"].to_numpy(), adv_mode, tau))


__all__ = ["Curation", "CurationCache", "MAX_GALLERY", "VIEWS", "caption", "curate", "effective_count",
           "kept_rows", "gallery_items", "gallery_rows", "groups_table", "kept_line",
           "level_pass_table", "levels_line", "make_settings", "toggle_action"]
