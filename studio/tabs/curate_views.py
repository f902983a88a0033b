"""Curation logic behind the Curate and Groups tabs, free of UI code (benchmarked and tested
directly): re-run Composite Reward Filtering on every control move; page through any view of
the pool with a badge per image; say in words and numbers why an image is or is not kept; what
a move changed (entered / left); how much of the pool the kept set covers."""

from __future__ import annotations

import dataclasses
import html
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from craft.stages.advantages import filter_with_advantages, training_weights
from craft.stages.filtering import LEVEL_ROLES, FilterResult, FilterSettings

# The views of the pool the grid pages through (the last two are filled by the map and by
# "more like this").
VIEWS = ("kept", "changed by the last move", "passing, not kept", "fails the level",
         "excluded by hand", "included by hand", "all, best first", "map selection",
         "similar to the selected image", "near-duplicates in the kept set")
EXTERNAL_VIEWS = ("changed by the last move", "map selection", "similar to the selected image",
                  "near-duplicates in the kept set")
PAGE_SIZE = 60


# Where the Curate controls say what to change when a setting is refused (the rule itself is
# the config's: craft.run.config.FilterConfig, through craft.stages.filtering.FilterSettings).
PAGE_HINTS = {
    "filter.require": "on this page: tick one or more of {rewards} under the custom level",
    "filter.weights": "on this page: give at least one of {rewards} a weight above 0",
}


def make_settings(cfg, weights: Mapping[str, float], normalization: str, level: str,
                  require: Sequence[str], margin: float, top_k: int | float | None,
                  include_reference: bool, per_prompt_cap: int | float | None = None,
                  dedup_threshold: float | None = None,
                  replace_excluded: bool = False) -> FilterSettings:
    """Filter settings from the Curate controls, through the one validation the engine uses
    (craft.stages.selection.filter_settings), so the page selects with what ``craft train``
    reads once the controls are saved. A reward the config does not weigh and the page leaves
    at 0 stays out of the composite, as in the config (weights keep the config's order, so the
    composite is summed alike). Problems are said with this page's controls too."""
    from craft.stages.filtering import FilterError
    from craft.stages.selection import filter_settings

    page = {str(r): float(v or 0.0) for r, v in weights.items()}
    if any(w > 0 for w in page.values()):  # else all stay: the config's rule says what is wrong
        order = [*(r for r in cfg.filter.weights if r in page), *page]
        page = {r: page[r] for r in dict.fromkeys(order)
                if page[r] > 0 or r in cfg.filter.weights}
    try:
        return filter_settings(
            cfg, weights=page, normalization=normalization, level=level,
            require=tuple(require or ()), margin=float(margin or 0.0),
            top_k=int(top_k) if top_k else None, include_reference=bool(include_reference),
            per_prompt_cap=int(per_prompt_cap) if per_prompt_cap else None,
            dedup_threshold=float(dedup_threshold) if dedup_threshold else None,
            replace_excluded=bool(replace_excluded))
    except FilterError as e:
        hint = PAGE_HINTS.get((getattr(e, "keys", None) or ("",))[0])
        if hint is None:
            raise
        raise FilterError(f"{e} ({hint.format(rewards=', '.join(weights))})") from None


@dataclasses.dataclass
class Curation:
    """One selection as the studio shows it: the filter's annotated frame (with
    ``advantage``), its counts, and ``selection``, what craft.stages.selection.select gave for
    the run's method (its rows carry the training weights; DPO's its pairs). ``note`` says why
    the kept set shown is craft's rather than the method's own selection."""

    result: FilterResult
    frame: pd.DataFrame
    settings: FilterSettings
    seconds: float
    selection: Any = None  # craft.methods.base.Selection (None: a bare :func:`curate`)
    note: str | None = None

    @property
    def kept_ids(self) -> np.ndarray:
        return self.result.kept["candidate_id"].to_numpy()


def select_curation(store, cfg, settings: FilterSettings, frame: pd.DataFrame,
                    embeddings=None) -> Curation:
    """What Curate, Groups, Export and Train's "will train on" show: the engine's selection
    (craft.stages.selection.select, what ``craft train`` records) for ``train.method``, on
    ``frame`` (the run's own candidates, cached by the page) with ``embeddings`` (the pool's,
    cached) when the settings drop near-duplicates. An online method selects no images: the
    kept set shown is craft's. A method that cannot select from this pool (e.g. no DPO pairs)
    has the reason in ``note`` (Start would fail with it) and craft's kept set shown."""
    from craft import CraftError
    from craft.methods.registry import get_method
    from craft.stages.selection import check_scored, select

    t0 = time.perf_counter()
    check_scored(frame, cfg)
    method, note = cfg.train.method, None
    if get_method(method).data == "prompts":
        method, note = "craft", (f"train.method {cfg.train.method} samples its own images, so "
                                 f"it uses no kept set; shown: craft's")
    try:
        sel = select(store, cfg, settings, method=method, frame=frame, embeddings=embeddings)
    except CraftError as e:
        if get_method(method).data == "kept":
            raise
        note = f"train.method {method} cannot train on this pool now: {e}"
        sel = select(store, cfg, settings, method="craft", frame=frame, embeddings=embeddings)
    result = sel.result
    return Curation(result, result.frame, settings, time.perf_counter() - t0, sel, note)


def curate(df: pd.DataFrame, settings: FilterSettings,
           overrides: Mapping[int, str] | None = None, eps: float = 1e-6,
           embeddings=None) -> Curation:
    """The filter on a bare frame (craft.stages.advantages.filter_with_advantages), for
    benchmarks; the studio's tabs select with :func:`select_curation`, the engine's path."""
    t0 = time.perf_counter()
    result, frame = filter_with_advantages(df, settings, eps, overrides, embeddings)
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
    the loss actually sees (under ``clamp``, those above their group's mean R). The weights are
    the selection's (sft: 1 each); ``adv_mode`` / ``tau`` only for a kept set no method weighs
    (a bare :func:`curate`, or DPO's filter)."""
    rows = _kept_selection_rows(c)
    if rows is not None:
        return int((rows["weight"].to_numpy(float) > 0).sum())
    adv = c.frame["advantage"].to_numpy()[c.frame["kept"].to_numpy()]
    adv = adv[np.isfinite(adv)]
    if adv.size == 0:
        return 0
    return int((training_weights(adv, adv_mode, tau) > 0).sum())


SCORABLE = ("every reward the settings use has a finite score for it; an image with a NaN "
            "score has no composite and is left out, never counted as a number")


def k_note(action: str, replace: bool = False) -> str:
    """What a manual decision does to the kept set's size (said where it is made)."""
    if action == "exclude" and replace:
        return " · the next passing candidate takes its place in the top K"
    return {"exclude": " · the kept set is one smaller: an image excluded by hand is not "
                       "replaced (tick “the next candidate replaces an excluded image” to keep "
                       "K)",
            "keep": " · it is kept on top of the top K automatic picks",
            "auto": ""}.get(action, "")


def kept_line(c: Curation, adv_mode: str = "clamp", tau: float = 1.0,
              changed: Mapping[int, str] | None = None) -> str:
    """The kept count and what it rests on; with ``changed``, what the last move changed."""
    counts = c.result.counts
    text = (f"Kept <b id='kept-number'>{counts.kept}</b> of {counts.scorable} "
            f"<abbr title='{SCORABLE}'>scorable</abbr> candidates"
            f" ({counts.groups} groups) · <span id='effective-number'>"
            f"{effective_count(c, adv_mode, tau)}</span> with training weight > 0")
    if c.result.cutoff is not None:
        text += f" · cut-off R ≥ <span id='cutoff-number'>{c.result.cutoff:+.3f}</span>"
    if counts.unscorable:
        text += f" · {counts.unscorable} unscorable (NaN) excluded"
    if counts.overrides_applied:
        inc = sum(v == "include" for v in counts.overrides_applied.values())
        text += (f" · by hand: {inc} included (on top of the top K), "
                 f"{len(counts.overrides_applied) - inc} excluded ("
                 + ("replaced by the next candidates" if c.settings.replace_excluded
                    else "not replaced") + ")")
    sel = c.selection
    if sel is not None and sel.pairs is not None:
        images = len(sel.rows)
        text += (f"<br><span id='pairs-line'>train.method {sel.method} trains on "
                 f"<b id='pairs-number'>{len(sel.pairs)}</b> winner/loser pairs of {images} "
                 "images from whole groups, not on the kept set (images excluded by hand are "
                 "never paired)</span>")
    if c.note:
        text += f"<br><span id='method-note'>{html.escape(c.note)}</span>"
    text += nothing_kept(c)
    if changed is not None:
        entered = sum(v == "entered" for v in changed.values())
        left = len(changed) - entered
        text += (f"<br><span id='moved-line'>Last move: <b id='moved-entered'>+{entered}</b> "
                 f"entered, <b id='moved-left'>−{left}</b> left the kept set"
                 + (" (the same count, other images: see the view “changed by the last move”)"
                    if entered and entered == left else "") + "</span>")
    return text


def nothing_kept(c: Curation) -> str:
    """Why the settings keep nothing and what to change on this page ("" when something is
    kept): no scorable candidate, none passing the level, every passing one excluded by hand
    or left out by the cap / the reference rule / the near-duplicate rule."""
    n, s = c.result.counts, c.settings
    if n.kept:
        return ""
    passing = n.passing.get(s.level)
    excluded = sum(v == "exclude" for v in n.overrides_applied.values())
    if not n.scorable:
        why = ("no candidate has a finite score on every reward the weights use; press Score "
               "on the Score tab, or set the weight of an unscored reward to 0")
    elif passing == 0 and s.level != "none":
        from craft.stages.filtering import required_rewards

        why = (f"no candidate beats its group's reference on "
               f"{', '.join(required_rewards(s))} by more than the margin ({s.margin:g}); "
               "lower the margin or choose a weaker level (I_h, or none)")
    elif excluded and passing is not None and excluded >= passing:
        why = ("every candidate that passes is excluded by hand; see the view “excluded by "
               "hand”, or press “Clear all overrides”")
    else:
        why = ("the candidates that pass are all left out (original-prompt images not allowed, "
               "the per-prompt cap or near-duplicates); tick “original-prompt images may be "
               "kept”, raise the cap or set the near-duplicate box to 0")
    sel = c.selection
    train = ("; Start on the Train tab refuses to train on nothing" if sel is None
             or sel.rows.empty else "")
    return (f"<br><span id='nothing-kept' class='studio-error'>⚠ Nothing is kept with these "
            f"settings: {html.escape(why)}{train}.</span>")


def view_ids(c: Curation, view: str, extra: Sequence[int] = ()) -> np.ndarray:
    """Candidate ids of ``view``, best composite first (ties by id). ``extra`` holds the ids
    of the views made elsewhere: the last move's changes, the map selection, the neighbours
    of the selected image (those keep their own order)."""
    f = c.frame
    if view in EXTERNAL_VIEWS:
        known = set(f["candidate_id"].tolist())
        return np.array([i for i in extra if i in known], dtype=np.int64)
    kept, passes = f["kept"].to_numpy(), f["passes"].to_numpy()
    override = f["override"].astype(object).to_numpy()
    sel = {"kept": kept, "passing, not kept": passes & ~kept,
           "fails the level": f["scorable"].to_numpy() & ~passes,
           "excluded by hand": override == "exclude",
           "included by hand": override == "include",
           "all, best first": f["scorable"].to_numpy()}.get(view)
    if sel is None:
        raise ValueError(f"unknown view {view!r}; choose one of {list(VIEWS)}")
    idx = np.flatnonzero(sel)
    comp = f["composite"].to_numpy()[idx]
    ids = f["candidate_id"].to_numpy()[idx]
    return ids[np.lexsort((ids, -np.nan_to_num(comp, nan=-1e9)))]


def page_of(ids: np.ndarray, page: int, size: int = PAGE_SIZE) -> tuple[np.ndarray, int, int]:
    """The ids on ``page`` (1-based, clamped), the page and the number of pages."""
    pages = max(1, -(-len(ids) // size))
    page = min(max(1, int(page or 1)), pages)
    return ids[(page - 1) * size:page * size], page, pages


def showing_line(n_page: int, page: int, pages: int, total: int, view: str,
                 size: int = PAGE_SIZE) -> str:
    if total == 0:
        return f"Nothing to show in “{view}”."
    first = (page - 1) * size + 1
    return (f"Showing {first}–{first + n_page - 1} of {total} · page {page} of {pages} · "
            f"view “{view}”")


def failed_rewards(row: Any, settings: FilterSettings) -> list[str]:
    """The rewards of the level that ``row`` does not beat its group's reference on."""
    from craft.stages.filtering import required_rewards

    if settings.level == "none":
        return []
    return [r for r in required_rewards(settings) if not bool(getattr(row, f"beats_{r}", False))]


def badges(row: Any, settings: FilterSettings, changed: Mapping[int, str] | None = None
           ) -> list[tuple[str, str]]:
    """(css class, text) badges for one candidate: kept, by hand, reference, what it fails."""
    out = []
    if row.override == "exclude":
        out.append(("excluded", "✋ excluded"))
    elif row.override == "include":
        out.append(("included", "✋ included"))
    if row.kept:
        out.append(("kept", "kept"))
    if row.variant_idx == 0:
        out.append(("reference", "★ ref"))
    if not row.scorable:
        out.append(("fails", "unscorable"))
    elif not row.passes:
        failed = failed_rewards(row, settings)
        out.append(("fails", "fails " + ", ".join(short_reward(r) for r in failed)
                    if failed else "no reference"))
    elif getattr(row, "capped", False):
        out.append(("capped", "over cap"))
    elif getattr(row, "near_duplicate", False):
        out.append(("capped", "near-duplicate"))
    if changed and int(row.candidate_id) in changed:
        out.append((changed[int(row.candidate_id)], changed[int(row.candidate_id)]))
    return out


def short_reward(reward: str) -> str:
    """``toy_fidelity`` -> ``fid``; real names keep their first 6 letters (``hpsv21``)."""
    base = reward[4:] if reward.startswith("toy_") else reward
    return base[:3] if reward.startswith("toy_") else base[:6]


def caption(row: Any, rewards: Sequence[str]) -> str:
    """The full caption (shown on hover and in the zoom): composite, advantage, each reward."""
    parts = " · ".join(f"{r} {getattr(row, r):.3f}" for r in rewards)
    head = "original prompt (★)" if row.variant_idx == 0 else f"variant {row.variant_idx}"
    return (f"#{int(row.candidate_id)} · R {row.composite:+.3f} · A {row.advantage:+.3f} · "
            f"{parts} · {head}, seed {getattr(row, 'seed_idx', row.seed)}\n"
            f"prompt: {row.prompt}\nvariant: {row.variant}")


def grid_items(c: Curation, ids: Sequence[int], rewards: Sequence[str],
               changed: Mapping[int, str] | None = None) -> list[dict]:
    """What the grid shows of each candidate: image, short and full caption, badges."""
    f = c.frame
    pos = pd.Index(f["candidate_id"]).get_indexer(list(ids))  # no copy of the whole pool
    rows = f.iloc[pos[pos >= 0]]
    return [{"id": int(r.candidate_id), "path": r.image_path,
             "short": f"R {r.composite:+.2f} · A {r.advantage:+.2f}",
             "title": caption(r, rewards), "badges": badges(r, c.settings, changed)}
            for r in rows.itertuples()]


def moved(previous: Sequence[int] | None, now: Sequence[int]) -> dict[int, str]:
    """What a move changed in the kept set: id -> "entered" / "left"."""
    if previous is None:
        return {}
    before, after = set(previous), set(now)
    return {**{i: "entered" for i in sorted(after - before)},
            **{i: "left" for i in sorted(before - after)}}


def explain(c: Curation, candidate_id: int, rewards: Sequence[str]) -> str:
    """Why one candidate is or is not kept, in words and numbers (Markdown): the level's
    rewards against its group's reference and the margin, its composite against the cut-off
    and its rank, the per-prompt cap, any manual override."""
    from craft.stages.filtering import required_rewards

    f = c.frame
    hit = f.loc[f["candidate_id"] == candidate_id]
    if hit.empty:
        return f"Candidate #{candidate_id} is not in this run's scored pool."
    row = next(hit.itertuples())
    s, res = c.settings, c.result
    cutoff = res.cutoff
    origin = "the original prompt (a reference image ★)" if row.variant_idx == 0 else \
        f"variant {row.variant_idx}: “{_md(row.variant)}”"
    head = f"**#{candidate_id}** · prompt “{_md(row.prompt)}” · generated from {origin}"
    required = required_rewards(s) if s.level != "none" else []
    if not row.scorable:
        missing = [r for r in s.used_rewards if not np.isfinite(getattr(row, r, np.nan))]
        verdict = (f"**Not kept: unscorable.** {', '.join(missing)} has no finite score, so it "
                   "has no composite and cannot be weighted in training.")
    elif row.override == "exclude":
        would = "it would be kept otherwise" if row.passes and not row.capped and (
            cutoff is None or row.composite >= cutoff) else "it would not be kept anyway"
        verdict = f"**Not kept: excluded by hand** ({would}). Undo or “back to automatic” " \
                  "restores the automatic choice."
    elif row.override == "include" and row.kept:
        verdict = "**Kept: included by hand**, whatever the level, K and the cap say."
    elif row.kept:
        verdict = (f"**Kept**: it passes the level and ranks {int(row.rank)} by R among "
                   f"{int(res.frame['rank'].notna().sum())} eligible passing candidates "
                   f"(K = {s.top_k or 'all'}; its R {row.composite:+.3f} ≥ cut-off "
                   f"{cutoff:+.3f}).")
    elif not row.has_reference and s.level != "none":
        verdict = ("**Not kept: its group has no scorable reference image** (no image of the "
                   "original prompt), so nothing can beat the reference.")
    elif not row.passes:
        failed = failed_rewards(row, s)
        verdict = (f"**Not kept: fails level {s.level}** — it does not beat its group's "
                   f"reference by more than the margin ({s.margin:g}) on "
                   f"{', '.join(failed)}.")
    elif row.variant_idx == 0 and not s.include_reference:
        verdict = ("**Not kept: an original-prompt image**, and “original-prompt images may be "
                   "kept” is off.")
    elif getattr(row, "capped", False):
        verdict = (f"**Not kept: per-prompt cap** — its prompt already has "
                   f"{s.per_prompt_cap} better images (by R) in the kept set.")
    elif getattr(row, "near_duplicate", False):
        verdict = (f"**Not kept: a near-duplicate** — its embedding has cosine similarity "
                   f"≥ {s.dedup_threshold:g} with a better kept image, so the next passing "
                   "candidate took its place.")
    else:
        verdict = (f"**Not kept: below the cut-off** — it passes the level, but its R "
                   f"{row.composite:+.3f} is under the cut-off {cutoff:+.3f} of the top "
                   f"K = {s.top_k} (it ranks {int(row.rank)} of "
                   f"{int(res.frame['rank'].notna().sum())})." if cutoff is not None else
                   "**Not kept**: nothing is kept with these settings.")
    lines = [head, "", verdict, "",
             f"| reward | raw | normalised ({s.normalization}) | group's ref. | "
             f"in level {s.level} | beats ref. + {s.margin:g} |",
             "|---|---|---|---|---|---|"]
    for r in rewards:
        norm, ref = getattr(row, f"norm_{r}", np.nan), getattr(row, f"ref_{r}", np.nan)
        need = "yes" if r in required else "no"
        beats = getattr(row, f"beats_{r}", None)
        lines.append(f"| {r} | {getattr(row, r):.3f} | {norm:+.3f} | {ref:+.3f} | {need} | "
                     f"{'✓ yes' if beats else '✗ no'} |")
    weights = " + ".join(f"{w:.2f}·{short_reward(r)}" for r, w in s.normalized_weights.items())
    lines += ["", f"Composite R = {weights} = **{row.composite:+.3f}**; group advantage "
                  f"A = **{row.advantage:+.3f}** (within its prompt's group)."]
    return "\n".join(lines)


def _md(text: str) -> str:
    """User text inside Markdown: shown as typed, never read as markup."""
    import html

    return html.escape(str(text), quote=False).replace("*", "\\*").replace("_", "\\_")


def coverage_line(c: Curation) -> str:
    """How much of the pool the kept set draws from (live, under the kept count)."""
    n = c.result.counts
    if not n.kept:
        return ""
    prompt = ""
    if n.largest_prompt is not None:
        text = c.frame.loc[c.frame["prompt_id"] == n.largest_prompt, "prompt"].iloc[0]
        prompt = f" (“{_md(text[:60])}”)"
    cap = f" · per-prompt cap {c.settings.per_prompt_cap} left out {n.capped}" \
        if c.settings.per_prompt_cap else ""
    if c.settings.dedup_threshold is not None:
        cap += f" · {n.duplicates} near-duplicates dropped"
    return (f"Coverage: <span id='coverage-prompts'>{n.kept_prompts}</span> of {n.groups} "
            f"prompts · largest share <span id='coverage-largest'>{n.largest_kept}</span> "
            f"images ({100 * n.largest_kept / n.kept:.0f} %) from one prompt{prompt}{cap}")


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
    total = max(1, int(agg["kept"].sum()))
    agg["kept share %"] = (100 * agg["kept"] / total).round(1)
    return agg.reset_index().sort_values("kept", ascending=False, kind="stable")


def _kept_selection_rows(c: Curation) -> pd.DataFrame | None:
    """The selection's rows when it is a kept set (craft, sft), else None."""
    sel = c.selection
    if sel is None or sel.pairs is not None or "candidate_id" not in sel.rows:
        return None
    return sel.rows


def kept_rows(c: Curation, adv_mode: str = "clamp", tau: float = 1.0) -> pd.DataFrame:
    """The kept candidates with their training weights, best first: what training and export
    receive (the selection's rows: sft weighs each 1). A kept set no method weighs (a bare
    :func:`curate`, DPO's filter) is weighted by ``adv_mode`` as craft would
    (craft.stages.advantages.kept_with_weights)."""
    from craft.stages.advantages import kept_with_weights

    rows = _kept_selection_rows(c)
    return rows if rows is not None else kept_with_weights(c.frame, adv_mode, tau)


def training_weights_by_id(c: Curation, adv_mode: str = "clamp", tau: float = 1.0
                           ) -> pd.Series:
    """candidate_id -> the weight training gives the image (absent: it is not trained on):
    the selection's rows (a kept set's weights; DPO: 1 for every image in a pair)."""
    sel = c.selection
    rows = sel.rows if sel is not None and "candidate_id" in sel.rows else kept_rows(
        c, adv_mode, tau)
    return rows.set_index("candidate_id")["weight"]


__all__ = ["Curation", "CurationCache", "PAGE_SIZE", "VIEWS", "badges", "caption", "coverage_line",
           "curate", "effective_count", "explain", "failed_rewards", "grid_items",
           "groups_table", "k_note", "kept_line", "kept_rows", "level_pass_table", "levels_line",
           "make_settings", "moved", "nothing_kept", "page_of", "select_curation",
           "short_reward",
           "showing_line", "toggle_action", "training_weights_by_id", "view_ids"]
