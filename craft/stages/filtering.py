"""Composite Reward Filtering (CRF): which candidates are kept for fine-tuning.

Everything here is a pure function of a candidates frame and a :class:`FilterSettings`, because
the studio re-runs the whole selection on every slider move: it must be cheap (vectorised numpy,
no Python loop over rows or groups; ~100k candidates x 4 rewards in tens of milliseconds) and it
must give the same answer every time (ties are broken by ``candidate_id``).

The frame holds one row per candidate: ``candidate_id`` (unique), ``prompt_id`` (the group),
``variant_idx`` (0 = generated from the original prompt, i.e. the group's reference images;
>= 1 = from a variant), ``seed``, and one float column per reward, all scored against the
original prompt, NaN where missing.

Decisions the paper leaves open, taken here:

- *Scorable.* A candidate with a NaN or infinite value in any reward the settings name (composite
  rewards, role rewards, ``require``) is unscorable: it is left out of the normalisation pool and
  of the group reference, never passes, is never kept (not even by a manual "include"), and is
  reported by id. The set of named rewards does not depend on ``level``, so switching level
  changes neither the scorable set nor the normalised values, and the levels nest exactly
  (``hpa`` passes a subset of ``ha``, which passes a subset of ``h``).
- *Reference.* Per group and reward, the mean of the normalised scores of the group's scorable
  ``variant_idx == 0`` candidates. A group with no such candidate has no reference: none of its
  candidates can pass a comparing level (h/ha/hpa/custom); level ``none`` compares nothing, so
  it is unaffected. Such groups are reported.
- *Reference images* may pass (one seed of the original prompt can beat the mean of its seeds),
  but they are eligible for top-K only when ``include_reference`` is true.
- *Manual overrides* are applied last and beat every automatic rule (level, margin, top-K,
  ``include_reference``) except scorability: an unscorable candidate has no composite and no
  advantage, so it could not be weighted in training; such an "include" is ignored and reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, NoReturn

import numpy as np
import pandas as pd

from craft import CraftError
from craft.run.choices import LEVEL_ROLES, LEVELS, NORMALIZATIONS, OVERRIDE_ACTIONS, ROLES
from craft.run.config import ConfigError, FilterConfig

logger = logging.getLogger(__name__)

ID_COLUMNS: tuple[str, ...] = ("candidate_id", "prompt_id", "variant_idx", "seed")
# Columns apply_filter (and the advantage stage) write; never mistaken for reward columns, and
# replaced rather than duplicated when an annotated frame is filtered again.
DERIVED_PREFIXES: tuple[str, ...] = ("norm_", "ref_", "beats_")
DERIVED_COLUMNS: tuple[str, ...] = ("scorable", "has_reference", "passes", "composite", "rank",
                                    "capped", "near_duplicate", "kept", "override", "advantage",
                                    "weight")


class FilterError(CraftError, ValueError):
    """Filter settings or a candidates frame that the user has to fix."""


def _fail(name: str, value: Any, rule: str, fix: str) -> NoReturn:
    raise FilterError(f"{name} = {value!r}: {rule}; {fix}")


def _set(obj: Any, name: str, value: Any) -> None:
    """Assign to a frozen dataclass while validating it (normalising types on the way in)."""
    object.__setattr__(obj, name, value)


def _config_field(name: str, help: str | None = None) -> Any:
    """A FilterSettings field with craft.run.config.FilterConfig's default and help text: the
    config holds the one set of defaults (and, through :meth:`FilterSettings._check_config`,
    the one set of checks) for every field the two share."""
    f = _CONFIG_FIELDS[name]
    return field(default=f.default, metadata={"help": help or f.metadata["help"]})


_CONFIG_FIELDS = {f.name: f for f in fields(FilterConfig)}
# What FilterSettings allows beyond the config, said after the config's own message.
_SETTINGS_NOTES = {"filter.top_k": " (here: an integer >= 1, or None to keep every passing "
                                   "candidate)"}


def _plain(value: Any) -> Any:
    """numpy scalars (studio controls, frames) as Python values, for the config's type checks."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class FilterSettings:
    """Everything that decides the selection; a value, so equal settings give equal results.

    The fields the config's ``filter`` section has take its defaults and pass its checks
    (craft.run.config.FilterConfig: one set of rules, with errors that name the config key);
    ``rewards`` and ``roles`` come from elsewhere in a config (:meth:`from_config`) and are
    checked here. ``weights`` and ``roles`` are plain dicts (copied on construction) so that
    settings go through ``dataclasses.asdict``, JSON and YAML unchanged; treat them as read-only
    and build new settings with ``dataclasses.replace`` (which validates again). Hashable, so
    the studio can cache selections by settings.
    """

    rewards: tuple[str, ...] = field(default=(), metadata={
        "help": "Rewards in the composite R; empty = the keys of weights."})
    weights: dict[str, float] = field(default_factory=dict, metadata={
        "help": "Reward -> relative importance in R (>= 0; normalised to sum 1); empty = equal."})
    normalization: str = _config_field("normalization")
    level: str = _config_field("level")
    roles: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Role letter (h, p, a) -> reward name, e.g. {'h': 'hpsv2'}."})
    require: tuple[str, ...] = _config_field("require")
    margin: float = _config_field("margin")
    top_k: int | None = _config_field("top_k", help=(
        "Keep at most K passing candidates, best composite first; None = all."))
    include_reference: bool = _config_field("include_reference")
    per_prompt_cap: int | None = _config_field("per_prompt_cap")
    dedup_threshold: float | None = _config_field("dedup_threshold", help=(
        "Drop a passing candidate whose embedding has cosine similarity >= this with an "
        "already kept, better one (the next passing candidate takes its place); None = off. "
        "Needs embeddings (apply_filter's ``embeddings``)."))
    replace_excluded: bool = _config_field("replace_excluded")

    def __post_init__(self) -> None:
        if isinstance(self.rewards, str) or isinstance(self.require, str):
            which = "rewards" if isinstance(self.rewards, str) else "require"
            _fail(which, getattr(self, which), "must be a sequence of reward names, not one "
                  "string", f"write {which}=({getattr(self, which)!r},)")
        if not isinstance(self.weights, Mapping) or not isinstance(self.roles, Mapping):
            which = "weights" if not isinstance(self.weights, Mapping) else "roles"
            _fail(which, getattr(self, which), "must be a mapping", "pass a dict")
        _set(self, "rewards", tuple(self.rewards) or tuple(self.weights))
        if not self.rewards:
            _fail("rewards", self.rewards, "the composite needs at least one reward",
                  "name rewards, e.g. rewards=('hpsv2', 'pickscore', 'aes'), or give weights")
        if len(set(self.rewards)) != len(self.rewards):
            _fail("rewards", self.rewards, "lists a reward twice", "list each reward once")
        self._check_weights()
        _set(self, "roles", {str(k): str(v) for k, v in self.roles.items()})
        bad_roles = sorted(set(self.roles) - set(ROLES))
        if bad_roles:
            _fail("roles", dict(self.roles), f"roles {bad_roles} are not among {list(ROLES)}",
                  "map h (HPS-like), p (PickScore-like) and a (aesthetic) to reward names")
        self._check_config()
        missing = [r for r in LEVEL_ROLES.get(self.level, ()) if r not in self.roles]
        if missing:
            _fail("level", self.level, f"compares roles {list(LEVEL_ROLES[self.level])} but "
                  f"roles has no {missing} (roles = {dict(self.roles)})",
                  f"add {missing} to roles, or use level='custom' with require=(...)")

    def _check_weights(self) -> None:
        """Which rewards are weighted (the values are the config's to check)."""
        weights = {str(k): v for k, v in self.weights.items()} or {r: 1.0 for r in self.rewards}
        stray = [r for r in weights if r not in self.rewards]
        if stray:
            _fail("weights", weights, f"names {stray}, which are not in rewards "
                  f"{list(self.rewards)}", "add them to rewards or drop their weights")
        unweighted = [r for r in self.rewards if r not in weights]
        if unweighted:
            _fail("weights", weights, f"has no weight for rewards {unweighted}",
                  "give each composite reward a weight (0 keeps it out of R but still requires "
                  "it to be scored) or drop it from rewards")
        _set(self, "weights", weights)

    def _check_config(self) -> None:
        """Every field the config's ``filter`` section shares, checked (and normalised: a
        list becomes a tuple, an int weight a float) by FilterConfig itself."""
        values = {name: _plain(getattr(self, name)) for name in _CONFIG_FIELDS}
        if values["top_k"] is None:  # every passing candidate: a value only settings take
            del values["top_k"]
        try:
            checked = FilterConfig(**values)
        except ConfigError as e:
            err = FilterError(f"{e}{_SETTINGS_NOTES.get(e.keys[0], '') if e.keys else ''}")
            err.keys = e.keys
            raise err from None
        for name in values:
            _set(self, name, getattr(checked, name))
        _set(self, "weights", dict(self.weights))

    def __hash__(self) -> int:
        return hash((self.rewards, tuple(sorted(self.weights.items())), self.normalization,
                     self.level, tuple(sorted(self.roles.items())), self.require, self.margin,
                     self.top_k, bool(self.include_reference), self.per_prompt_cap,
                     self.dedup_threshold, bool(self.replace_excluded)))

    @property
    def normalized_weights(self) -> dict[str, float]:
        """Weights summing to 1, so R stays on the normalised reward scale whatever the sliders."""
        total = sum(self.weights.values())
        return {r: self.weights[r] / total for r in self.rewards}

    @property
    def used_rewards(self) -> tuple[str, ...]:
        """Every reward the settings name; a candidate must have all of them to be scorable."""
        names = [*self.rewards, *(self.roles[r] for r in ROLES if r in self.roles), *self.require]
        return tuple(dict.fromkeys(names))

    @classmethod
    def from_config(cls, config: Any, **changes: Any) -> "FilterSettings":
        """Settings from a ``CraftConfig`` (its ``filter`` section and ``rewards.roles``), so the
        CLI, the engine and the studio select exactly alike; ``changes`` override single fields
        (the studio's controls). Checked like any settings (the same rules as the config's)."""
        f, r = config.filter, config.rewards
        values = {name: getattr(f, name) for name in _CONFIG_FIELDS}
        values.update(rewards=tuple(f.weights), weights=dict(f.weights), roles=dict(r.roles))
        if "weights" in changes and "rewards" not in changes:
            changes = {**changes, "rewards": tuple(changes["weights"])}
        return cls(**{**values, **changes})


def short_reward_name(reward: str) -> str:
    """A reward's name in a narrow column: ``toy_fidelity`` -> ``fid``; real names keep their
    first 6 letters (``hpsv2``)."""
    base = reward[4:] if reward.startswith("toy_") else reward
    return base[:3] if reward.startswith("toy_") else base[:6]


def required_rewards(settings: FilterSettings) -> list[str]:
    """The rewards a candidate must beat its group reference on at ``settings.level``."""
    if settings.level == "custom":
        return list(dict.fromkeys(settings.require))
    return list(dict.fromkeys(settings.roles[r] for r in LEVEL_ROLES[settings.level]))


# --------------------------------------------------------------------------------------------
# Normalisation


def _average_rank01(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions) scaled to [0, 1]."""
    n = x.size
    order = np.argsort(x)  # stability is irrelevant: tie blocks share their mean rank
    xs = x[order]
    starts_mask = np.empty(n, dtype=bool)
    starts_mask[0] = True
    np.not_equal(xs[1:], xs[:-1], out=starts_mask[1:])
    starts = np.flatnonzero(starts_mask)
    if starts.size == 1:
        return np.zeros(n)
    ends = np.append(starts[1:], n) - 1
    avg = (starts + ends) / 2.0  # 0-based average position of each tie block
    ranks = np.empty(n)
    ranks[order] = avg[np.cumsum(starts_mask) - 1]
    return ranks / (n - 1)


def _normalize_column(x: np.ndarray, method: str) -> np.ndarray:
    """Normalise the finite entries of ``x``; others become NaN. A constant column maps to 0 so
    a reward that cannot tell candidates apart neither dominates nor poisons the composite."""
    out = np.full(x.shape, np.nan)
    finite = np.isfinite(x)
    v = x[finite]
    if v.size == 0:
        return out
    lo, hi = v.min(), v.max()
    if lo == hi:
        out[finite] = 0.0
    elif method == "zscore":
        mean = v.mean()
        std = np.sqrt(np.mean((v - mean) ** 2))
        out[finite] = (v - mean) / std if std > 0 else 0.0
    elif method == "minmax":
        out[finite] = (v - lo) / (hi - lo)
    else:
        out[finite] = _average_rank01(v)
    return out


def _normalize_matrix(values: np.ndarray, method: str) -> np.ndarray:
    return np.column_stack([_normalize_column(values[:, j], method)
                            for j in range(values.shape[1])]) if values.shape[1] else values


def normalize(df: pd.DataFrame, rewards: list[str] | tuple[str, ...],
              method: str = "zscore") -> pd.DataFrame:
    """Put rewards with different raw scales (HPS ~0.3, AES ~6) on one scale so that weights mean
    relative importance. Statistics run over the whole pool, per reward, ignoring NaN/inf (which
    stay NaN). Returns a frame with the same index and one column per reward (raw names)."""
    if method not in NORMALIZATIONS:
        _fail("method", method, f"must be one of {list(NORMALIZATIONS)}", "use 'zscore'")
    missing = [r for r in rewards if r not in df.columns]
    if missing:
        _fail("rewards", list(rewards), f"columns {missing} are not in the frame",
              f"use reward columns among {reward_columns(df)}")
    values = df[list(rewards)].to_numpy(dtype=np.float64)
    return pd.DataFrame(_normalize_matrix(values, method), index=df.index, columns=list(rewards))


def reward_columns(df: pd.DataFrame) -> list[str]:
    """Numeric columns that can be rewards (everything but ids and filter/advantage output)."""
    return [c for c in df.columns
            if c not in ID_COLUMNS and c not in DERIVED_COLUMNS
            and not str(c).startswith(DERIVED_PREFIXES)
            and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]


# --------------------------------------------------------------------------------------------
# Filtering


@dataclass(frozen=True)
class FilterCounts:
    """What the studio and the CLI report next to a selection."""

    total: int
    scorable: int
    unscorable: int
    unscorable_ids: tuple
    groups: int
    groups_without_reference: tuple
    # Level -> candidates that pass it and may be selected (references only when
    # include_reference); None where the roles for that level are not mapped.
    passing: dict[str, int | None]
    kept: int
    overrides_applied: dict = field(default_factory=dict)
    overrides_ignored: dict = field(default_factory=dict)
    # Coverage of the kept set: how many original prompts it draws from, and the largest
    # number of kept images of one prompt (which prompt: largest_prompt).
    kept_prompts: int = 0
    largest_kept: int = 0
    largest_prompt: Any = None
    capped: int = 0  # passing candidates left out by per_prompt_cap
    duplicates: int = 0  # passing candidates left out as near-duplicates of a better kept one


@dataclass(frozen=True)
class FilterResult:
    """The annotated pool, the selection, and the numbers around it."""

    frame: pd.DataFrame  # every candidate with norm_/ref_/beats_ columns, passes, composite, ...
    kept: pd.DataFrame  # the selected rows, best composite first
    counts: FilterCounts
    cutoff: float | None  # lowest composite among the kept rows (the histogram's cut line)
    settings: FilterSettings


def _check_frame(df: pd.DataFrame, settings: FilterSettings) -> None:
    if not isinstance(df, pd.DataFrame):
        _fail("df", type(df).__name__, "must be a pandas DataFrame of candidates",
              "build one with columns candidate_id, prompt_id, variant_idx, seed and rewards")
    missing = [c for c in ("candidate_id", "prompt_id", "variant_idx") if c not in df.columns]
    if missing:
        _fail("df.columns", list(df.columns), f"lacks the id columns {missing}",
              "load candidates with their ids (candidate_id, prompt_id, variant_idx)")
    for col in ("candidate_id", "prompt_id", "variant_idx"):
        if df[col].isna().any():
            _fail(f"df[{col!r}]", f"{int(df[col].isna().sum())} missing",
                  "must be set for every candidate", "drop or repair rows without ids")
    unknown = [r for r in settings.used_rewards if r not in df.columns]
    if unknown:
        _fail("rewards", list(unknown), "are named by the filter settings (rewards, weights, "
              "roles or require) but are not columns of the candidates frame",
              f"use reward columns among {reward_columns(df)}, or score those rewards first")
    not_numeric = [r for r in settings.used_rewards if not pd.api.types.is_numeric_dtype(df[r])]
    if not_numeric:
        _fail("rewards", not_numeric, "columns must be numeric", "store scores as floats")
    if df["candidate_id"].duplicated().any():
        dup = df.loc[df["candidate_id"].duplicated(), "candidate_id"].unique()[:5].tolist()
        _fail("df['candidate_id']", dup, "must be unique", "drop duplicate candidate rows")


def _overrides_mask(df: pd.DataFrame, overrides: Mapping | None, scorable: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """Positions to force in / out; ignored overrides with the reason, for the report."""
    n = len(df)
    include, exclude = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    applied: dict = {}
    ignored: dict = {}
    if not overrides:
        return include, exclude, applied, ignored
    bad = {k: v for k, v in overrides.items() if v not in OVERRIDE_ACTIONS}
    if bad:
        _fail("overrides", bad, f"actions must be one of {list(OVERRIDE_ACTIONS)}",
              "map candidate_id -> 'include' or 'exclude'; drop the key to undo an override")
    ids = list(overrides)
    pos = pd.Index(df["candidate_id"]).get_indexer(ids)
    for cid, p in zip(ids, pos):  # one entry per hand click: tiny, not a loop over rows
        action = overrides[cid]
        if p < 0:
            ignored[cid] = "unknown candidate_id"
        elif action == "include" and not scorable[p]:
            ignored[cid] = "unscorable (a used reward is NaN/inf), so it cannot be weighted"
        else:
            (include if action == "include" else exclude)[p] = True
            applied[cid] = action
    if ignored:
        logger.warning("ignored %d manual override(s): %s", len(ignored), ignored)
    return include, exclude, applied, ignored


def apply_filter(df: pd.DataFrame, settings: FilterSettings,
                 overrides: Mapping[Any, str] | None = None,
                 embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> FilterResult:
    """Run CRF: normalise, compare with the group reference, composite, top-K, overrides.

    A candidate passes when it is scorable, its group has a reference, and for every required
    reward its normalised score is strictly greater than the reference + margin (so a candidate
    that merely ties the original prompt's images does not count as an improvement).
    ``embeddings`` = (candidate ids, L2-normalised vectors), needed only with
    ``settings.dedup_threshold``.
    """
    _check_frame(df, settings)
    names = list(settings.used_rewards)
    raw = df[names].to_numpy(dtype=np.float64, copy=True)
    scorable = np.isfinite(raw).all(axis=1)
    raw[~scorable] = np.nan  # unscorable rows stay out of every statistic
    norm = _normalize_matrix(raw, settings.normalization)
    g = _groups(df, norm, scorable, settings.margin)
    col = {name: j for j, name in enumerate(names)}
    eligible = scorable & (~g.is_ref | bool(settings.include_reference))
    passes, level_pass = _passing(settings, scorable, g, col, eligible)
    w = settings.normalized_weights
    composite = norm[:, [col[r] for r in settings.rewards]] @ np.array(
        [w[r] for r in settings.rewards])
    cand_ids = df["candidate_id"].to_numpy()
    sel = _select(df, settings, passes & eligible, composite, cand_ids, g.codes, scorable,
                  overrides, embeddings)
    frame = _annotated(df, names, norm, g, scorable, passes, composite, sel)
    kept_pos = np.flatnonzero(sel.kept)
    kept_pos = kept_pos[np.lexsort((cand_ids[kept_pos], -composite[kept_pos]))]
    counts = _counts(settings, g, scorable, cand_ids, kept_pos, level_pass, sel)
    cutoff = float(composite[kept_pos].min()) if kept_pos.size else None
    return FilterResult(frame=frame, kept=frame.iloc[kept_pos], counts=counts, cutoff=cutoff,
                        settings=settings)


@dataclass(frozen=True)
class _Groups:
    """The groups (original prompts) of a pool and each candidate against its group's reference."""

    codes: np.ndarray  # group code per candidate
    uniques: np.ndarray  # prompt_id per group code
    is_ref: np.ndarray  # generated from the original prompt (variant 0)
    group_has_ref: np.ndarray  # per group: a scorable reference image exists
    has_ref: np.ndarray  # per candidate: its group has a reference
    ref: np.ndarray  # per candidate and reward: the group's reference (mean normalised score)
    beats: np.ndarray  # per candidate and reward: normalised score > reference + margin


def _groups(df: pd.DataFrame, norm: np.ndarray, scorable: np.ndarray, margin: float) -> _Groups:
    codes, uniques = pd.factorize(df["prompt_id"], sort=False)
    n_groups = len(uniques)
    is_ref = df["variant_idx"].to_numpy() == 0
    ref_rows = is_ref & scorable
    ref_count = np.bincount(codes[ref_rows], minlength=n_groups).astype(np.float64)
    group_has_ref = ref_count > 0
    ref = np.empty_like(norm)
    with np.errstate(invalid="ignore", divide="ignore"):
        for j in range(norm.shape[1]):  # one pass per reward column
            sums = np.bincount(codes[ref_rows], weights=norm[ref_rows, j], minlength=n_groups)
            ref[:, j] = np.where(group_has_ref, sums / ref_count, np.nan)[codes]
        beats = norm > ref + margin  # NaN on either side compares False
    return _Groups(codes, np.asarray(uniques), is_ref, group_has_ref, group_has_ref[codes], ref,
                   beats)


def _passing(settings: FilterSettings, scorable: np.ndarray, g: _Groups, col: dict,
             eligible: np.ndarray) -> tuple[np.ndarray, dict[str, int | None]]:
    """Who passes ``settings.level``, and how many eligible candidates pass each level."""

    def passing(required: list[str], compare: bool) -> np.ndarray:
        ok = scorable.copy()
        if compare:
            ok &= g.has_ref
            for r in required:
                ok &= g.beats[:, col[r]]
        return ok

    passes = passing(required_rewards(settings), settings.level != "none")
    level_pass: dict[str, int | None] = {}
    for level, roles in LEVEL_ROLES.items():
        if all(r in settings.roles for r in roles):
            level_pass[level] = int((passing([settings.roles[r] for r in roles],
                                             level != "none") & eligible).sum())
        else:
            level_pass[level] = None
    if settings.level == "custom":
        level_pass["custom"] = int((passes & eligible).sum())
    return passes, level_pass


@dataclass(frozen=True)
class _Selected:
    """What top-K, the per-prompt cap, near-duplicates and the overrides decided."""

    kept: np.ndarray
    rank: np.ndarray  # 1-based rank among the ranked candidates, 0 = not ranked
    capped: np.ndarray
    duplicate: np.ndarray
    include: np.ndarray
    exclude: np.ndarray
    applied: dict
    ignored: dict


def _select(df: pd.DataFrame, settings: FilterSettings, candidates: np.ndarray,
            composite: np.ndarray, cand_ids: np.ndarray, codes: np.ndarray,
            scorable: np.ndarray, overrides, embeddings) -> _Selected:
    """Rank the passing, eligible ``candidates`` by composite (ties by id), apply the cap,
    near-duplicates and top-K, then the manual overrides."""
    n = len(df)
    pool = np.flatnonzero(candidates)
    ranked = pool[np.lexsort((cand_ids[pool], -composite[pool]))]
    capped = np.zeros(n, dtype=bool)
    if settings.per_prompt_cap is not None and ranked.size:
        over = _rank_within_group(codes[ranked]) >= settings.per_prompt_cap
        capped[ranked[over]] = True
        ranked = ranked[~over]
    duplicate = np.zeros(n, dtype=bool)
    if settings.dedup_threshold is not None and ranked.size:
        ranked = _drop_near_duplicates(ranked, cand_ids, embeddings, settings, duplicate)
    include, exclude, applied, ignored = _overrides_mask(df, overrides, scorable)
    if settings.replace_excluded:  # an excluded image's place in the top K goes to the next
        ranked = ranked[~exclude[ranked]]
    rank_values = np.zeros(n, dtype=np.int64)
    rank_values[ranked] = np.arange(1, ranked.size + 1)
    kept = np.zeros(n, dtype=bool)
    kept[ranked[:settings.top_k]] = True
    kept = (kept | include) & ~exclude
    return _Selected(kept, rank_values, capped, duplicate, include, exclude, applied, ignored)


def _annotated(df: pd.DataFrame, names: list[str], norm: np.ndarray, g: _Groups,
               scorable: np.ndarray, passes: np.ndarray, composite: np.ndarray,
               sel: _Selected) -> pd.DataFrame:
    """``df`` with the filter's columns (replacing those of an earlier run of the filter)."""
    added: dict[str, Any] = {}
    for j, name in enumerate(names):
        added[f"norm_{name}"] = norm[:, j]
    for j, name in enumerate(names):
        added[f"ref_{name}"] = g.ref[:, j]
    for j, name in enumerate(names):
        added[f"beats_{name}"] = g.beats[:, j]
    override_codes = np.where(sel.include, 0, np.where(sel.exclude, 1, -1))
    added.update(
        scorable=scorable, has_reference=g.has_ref, passes=passes, composite=composite,
        rank=pd.arrays.IntegerArray(sel.rank, sel.rank == 0), capped=sel.capped,
        near_duplicate=sel.duplicate, kept=sel.kept,
        override=pd.Categorical.from_codes(override_codes, categories=list(OVERRIDE_ACTIONS)))
    base = df.drop(columns=[c for c in df.columns if c in added or c in DERIVED_COLUMNS])
    return pd.concat([base, pd.DataFrame(added, index=df.index)], axis=1)


def _counts(settings: FilterSettings, g: _Groups, scorable: np.ndarray, cand_ids: np.ndarray,
            kept_pos: np.ndarray, level_pass: dict, sel: _Selected) -> FilterCounts:
    n, n_groups = len(scorable), len(g.uniques)
    groups_without_ref = tuple(g.uniques[~g.group_has_ref].tolist())
    if groups_without_ref and settings.level != "none":
        logger.info("%d group(s) have no scorable reference image; their candidates cannot "
                    "pass level %s", len(groups_without_ref), settings.level)
    per_group = np.bincount(g.codes[kept_pos], minlength=n_groups)
    largest = int(per_group.argmax()) if kept_pos.size else -1
    return FilterCounts(
        total=n, scorable=int(scorable.sum()), unscorable=int(n - scorable.sum()),
        unscorable_ids=tuple(cand_ids[~scorable].tolist()), groups=n_groups,
        groups_without_reference=groups_without_ref, passing=level_pass,
        kept=int(kept_pos.size), overrides_applied=sel.applied, overrides_ignored=sel.ignored,
        kept_prompts=int((per_group > 0).sum()),
        largest_kept=int(per_group[largest]) if largest >= 0 else 0,
        largest_prompt=g.uniques[largest] if largest >= 0 else None,
        capped=int(sel.capped.sum()), duplicates=int(sel.duplicate.sum()))


def coverage(kept: pd.DataFrame) -> dict:
    """How widely a kept set draws: prompts it comes from, the most kept images of one prompt
    and that prompt's share of the set. A set from few prompts teaches few compositions."""
    per = kept["prompt_id"].value_counts() if len(kept) else pd.Series(dtype=int)
    top = int(per.max()) if len(per) else 0
    return {"kept": int(len(kept)), "prompts": int(len(per)), "largest": top,
            "largest_share": round(top / len(kept), 4) if len(kept) else 0.0}


def _drop_near_duplicates(ranked: np.ndarray, cand_ids: np.ndarray, embeddings, settings,
                          duplicate: np.ndarray) -> np.ndarray:
    """Walk the ranked passing candidates best first and skip each one whose embedding is at
    least ``dedup_threshold``-similar (cosine) to one already taken, until K are taken: the
    kept set then holds no near-copies and is still the best K of what is left. Marks the
    skipped rows in ``duplicate``; the candidates after the K-th are not examined."""
    if embeddings is None:
        _fail("embeddings", None, "are needed when dedup_threshold is set",
              "compute the pool's embeddings first (the studio's map, or `craft filter`, which "
              "embeds the pool), or set filter.dedup_threshold to null")
    ids, vectors = embeddings
    pos = pd.Index(np.asarray(ids)).get_indexer(cand_ids[ranked])
    if (pos < 0).any():
        missing = cand_ids[ranked][pos < 0][:5].tolist()
        _fail("embeddings", f"{int((pos < 0).sum())} passing candidates without one "
              f"(e.g. {missing})", "every passing candidate needs an embedding for "
              "dedup_threshold", "embed the whole pool again (new candidates were added)")
    vecs = np.asarray(vectors, dtype=np.float32)[pos]
    k = settings.top_k if settings.top_k is not None else ranked.size
    taken: list[int] = []
    for i in range(ranked.size):
        if len(taken) >= k:
            break
        if taken and float((vecs[taken] @ vecs[i]).max()) >= settings.dedup_threshold:
            duplicate[ranked[i]] = True
            continue
        taken.append(i)
    keep = np.ones(ranked.size, dtype=bool)
    keep[duplicate[ranked]] = False
    return ranked[keep]


def _rank_within_group(codes: np.ndarray) -> np.ndarray:
    """For a sequence of group codes (in rank order), each entry's position among the earlier
    entries of its group: 0 for a group's best, 1 for its second, ... (vectorised)."""
    order = np.argsort(codes, kind="stable")  # groups contiguous, rank order kept inside
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    lengths = np.diff(np.r_[starts, codes.size])
    within = np.arange(codes.size) - np.repeat(starts, lengths)
    out = np.empty(codes.size, dtype=np.int64)
    out[order] = within
    return out


def level_counts(df: pd.DataFrame, settings: FilterSettings) -> dict[str, int | None]:
    """How many candidates pass each paper level (none/h/ha/hpa) under these settings, so the
    studio can show what a stricter or looser level would leave before the user switches."""
    counts = apply_filter(df, settings).counts.passing
    return {level: counts[level] for level in LEVEL_ROLES}


__all__ = [
    "FilterCounts", "FilterError", "FilterResult", "FilterSettings", "LEVELS", "LEVEL_ROLES",
    "NORMALIZATIONS", "ROLES", "apply_filter", "level_counts", "normalize", "required_rewards",
    "coverage", "reward_columns",
]
