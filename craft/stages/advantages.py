"""Group advantages and the per-sample loss weights they become.

CRAFT weights each selected image's noise-prediction loss by its group advantage
``A_i = (R_i - mean_group R) / (std_group R + eps)``: how many group standard deviations it is
better than its siblings (the images of the same original prompt). That weighting is what makes
the SFT loss a first-order lower bound of the group-RL objective (supplementary, Theorem 3.1), so
the statistics are taken over the *whole* scorable group, before filtering, exactly as a group-RL
method would see it; computing them over the kept rows only would measure an image against a
pre-selected elite and shrink every advantage toward zero.

Pure functions; no I/O.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from craft import CraftError
from craft.stages.filtering import FilterSettings, apply_filter
from craft.run.choices import ADVANTAGE_MODES

logger = logging.getLogger(__name__)

MODES = ADVANTAGE_MODES  # advantage.mode (craft.run.choices)


class AdvantageError(CraftError, ValueError):
    """Advantage inputs or options that the user has to fix."""


def group_advantages(df: pd.DataFrame, value_col: str = "composite",
                     group_col: str = "prompt_id", eps: float = 1e-6) -> pd.Series:
    """Per-group standardised reward (population std, as the paper's group statistics).

    Rows whose value is NaN/inf are unscorable: they get NaN and do not enter their group's mean
    or std. A group whose scorable values are all equal (including a single-member group) carries
    no preference signal and gets exactly 0 rather than rounding noise divided by eps.
    Returns a float Series named ``advantage`` aligned with ``df``'s index.
    """
    for name, col in (("value_col", value_col), ("group_col", group_col)):
        if col not in df.columns:
            raise AdvantageError(f"{name} = {col!r}: not a column of the frame (columns: "
                                 f"{list(df.columns)}); run apply_filter first for 'composite', "
                                 f"or pass the column that holds the reward / group id")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps < 0:
        raise AdvantageError(f"eps = {eps!r}: must be a finite number >= 0; the paper's small "
                             f"stabiliser is 1e-6")
    values = df[value_col].to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    codes, uniques = pd.factorize(df[group_col], use_na_sentinel=False)
    n_groups = len(uniques)
    c, v = codes[finite], values[finite]
    count = np.bincount(c, minlength=n_groups).astype(np.float64)
    safe_count = np.maximum(count, 1.0)
    mean = np.bincount(c, weights=v, minlength=n_groups) / safe_count
    dev = v - mean[c]
    dev -= (np.bincount(c, weights=dev, minlength=n_groups) / safe_count)[c]  # 2nd pass: exact 0
    std = np.sqrt(np.bincount(c, weights=dev * dev, minlength=n_groups) / safe_count)
    lo = np.full(n_groups, np.inf)
    hi = np.full(n_groups, -np.inf)
    np.minimum.at(lo, c, v)
    np.maximum.at(hi, c, v)
    constant = lo[c] == hi[c]
    adv = np.full(values.shape, np.nan)
    adv[finite] = np.where(constant, 0.0, dev / (std[c] + eps))
    return pd.Series(adv, index=df.index, name="advantage")


def training_weights(advantages: Any, mode: str = "clamp", tau: float = 1.0) -> np.ndarray:
    """Loss weights for the selected samples from their advantages.

    - ``clamp`` (default): ``max(A, 0)``, renormalised to mean 1 over the given set, so the
      learning rate means the same whatever the advantage scale. A selected image can have
      ``A < 0`` (it beat the reference but not its group's mean); clamping keeps it from pulling
      the wrong way. If every weight clamps to 0, there is no signal to rank them by, so it falls
      back to uniform 1 (plain SFT on the selection) and logs a warning.
    - ``raw``: ``A`` as is. A negative weight turns gradient descent on that image's denoising
      loss into ascent: the model is pushed *away* from an image it was shown, the group-RL
      reading of "worse than average". Faithful to the paper's loss, but it can destabilise SFT
      on a few samples; use with care.
    - ``softmax``: ``softmax(A / tau)`` scaled to mean 1; always positive, ``tau`` sets how
      sharply the best samples dominate (small tau -> nearly only the best).
    - ``uniform``: every weight 1, i.e. plain SFT on the selection (the paper's Table 6
      baseline), so the advantage weighting can be measured against it on the same images.

    Non-finite advantages are rejected rather than passed on: a NaN weight would turn the whole
    batch loss into NaN.
    """
    if mode not in MODES:
        raise AdvantageError(f"mode = {mode!r}: must be one of {list(MODES)}; 'clamp' is the "
                             f"default")
    a = np.asarray(advantages, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise AdvantageError(f"advantages: {bad.size} non-finite value(s) at positions "
                             f"{bad[:10].tolist()}; only scorable candidates have advantages: "
                             f"drop unscorable rows (or use select_for_training, which does)")
    if a.size == 0:
        return a
    if mode == "raw":
        return a.copy()
    if mode == "uniform":
        return np.ones_like(a)
    if mode == "softmax":
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) \
                or not math.isfinite(tau) or tau <= 0:
            raise AdvantageError(f"tau = {tau!r}: must be a finite number > 0; 1.0 is a sound "
                                 f"start, smaller is sharper")
        z = a / tau
        e = np.exp(z - z.max())
        return e * (a.size / e.sum())
    w = np.maximum(a, 0.0)
    top = w.max()
    if not top > 0:
        logger.warning("all %d selected advantages are <= 0: no sample beats its group mean, so "
                       "falling back to uniform weights (plain SFT on the selection)", a.size)
        return np.ones_like(a)
    w = w / top  # scale by the max first: subnormal or huge advantages must not overflow
    return w * (a.size / w.sum())


def filter_with_advantages(df: pd.DataFrame, settings: FilterSettings, eps: float = 1e-6,
                           overrides: Mapping[Any, str] | None = None,
                           embeddings: tuple[np.ndarray, np.ndarray] | None = None):
    """The selection rule, once: CRF (craft.stages.filtering.apply_filter) and each candidate's group
    advantage over its *whole* group (see the module docstring). Returns (the FilterResult, its
    frame with an ``advantage`` column): what ``craft filter`` / ``craft train`` select from
    and what the studio's Curate and Groups show."""
    result = apply_filter(df, settings, overrides, embeddings)
    frame = result.frame.assign(
        advantage=group_advantages(result.frame, "composite", "prompt_id", eps).to_numpy())
    return result, frame


def select_for_training(df: pd.DataFrame, settings: FilterSettings, adv_mode: str = "clamp",
                        tau: float = 1.0, eps: float = 1e-6,
                        overrides: Mapping[Any, str] | None = None,
                        embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    """The training set: the kept rows with ``composite``, ``advantage`` and ``weight``.

    Advantages are computed over each whole group *before* filtering (see the module docstring);
    weights are then normalised over the kept rows only, since those are the batch the loss sees.
    Rows come best composite first.
    """
    _, frame = filter_with_advantages(df, settings, eps, overrides, embeddings)
    return kept_with_weights(frame, adv_mode, tau)


def kept_with_weights(frame: pd.DataFrame, adv_mode: str = "clamp", tau: float = 1.0
                      ) -> pd.DataFrame:
    """The kept rows of a :func:`filter_with_advantages` frame, best composite first, with
    their loss weights (normalised over the kept rows: the batch the loss sees)."""
    kept = frame.loc[frame["kept"].to_numpy()].sort_values(
        ["composite", "candidate_id"], ascending=[False, True], kind="stable")
    return kept.assign(weight=training_weights(kept["advantage"].to_numpy(), adv_mode, tau))


__all__ = ["AdvantageError", "MODES", "filter_with_advantages", "group_advantages",
           "kept_with_weights", "select_for_training", "training_weights"]
