"""Settings shared by several pages on one run: saved field by field, never over a change made
elsewhere.

Why: two people (or one person's two windows) open on one run each hold a copy of the settings
in their page. Saving a page's whole form on some event (a tab refresh did) silently reverted
what the other page had set. Here a page keeps what it last loaded or saved of each setting
(``seen``: key -> value, a ``gr.State``), and a change is one field at a time, compared and set
under the run's lock:

- the field still holds what the page believed: it is saved, the page's ``seen`` follows;
- someone changed this very field since: nothing is saved, and the page says which value is
  there now and offers to reload (no silent overwrite);
- other fields changed elsewhere: the change is saved (it touches only its own field), and the
  page says which of its values are stale and offers to reload (no silent revert);
- leaving a box without changing its value is not a change: nothing happens.
"""

from __future__ import annotations

import html
from typing import Any

from craft import CraftError
from craft.run.config import config_to_dict

RELOAD_HINT = "press “Reload settings” to see the run's current values"


def value_of(cfg, key: str) -> Any:
    """The config value of a bound ``section.name[.entry]`` key."""
    section, name, *entry = key.split(".")
    value = config_to_dict(cfg)[section][name]
    return value.get(entry[0], 0.0) if entry else value


def snapshot(settings, cfg) -> dict[str, Any]:
    """What a page shows of ``cfg``: every bound key's config value."""
    data = config_to_dict(cfg)
    out = {}
    for b in settings.bindings:
        section, name, *entry = b.key.split(".")
        v = data[section][name]
        out[b.key] = v.get(entry[0], 0.0) if entry else v
    return out


def stale_keys(ctx, seen: dict[str, Any]) -> list[str]:
    """Keys whose value in the run differs from what the page holds."""
    if not seen:
        return []
    now = {k: value_of(ctx.cfg, k) for k in seen}
    return [k for k, v in seen.items() if now[k] != v]


def commit(ctx, settings, changes: dict[str, Any], seen: dict[str, Any]
           ) -> tuple[dict[str, Any], str]:
    """Save ``changes`` (key -> control value) into the run, field by field, if each still holds
    what the page believed. Returns (the page's new ``seen``, a message: "" when all is well).
    Raises CraftError for a value the config refuses (the caller shows it)."""
    with ctx._lock:
        cfg = ctx.cfg
        new_seen = dict(seen)
        saved, refused = [], []
        for key, ui_value in changes.items():
            candidate = settings.config_with(cfg, key, ui_value)
            new, stored = value_of(candidate, key), value_of(cfg, key)
            believed = seen.get(key, stored)
            if new == stored:  # not a change (or the same change made elsewhere)
                new_seen[key] = stored
                continue
            if stored != believed:
                refused.append((key, stored, new))
                continue
            cfg = candidate
            new_seen[key] = new
            saved.append(key)
        if saved:
            ctx.set_config(cfg)
            ctx.schedule_save()
    return new_seen, conflict_text(refused, stale_keys(ctx, new_seen))


def conflict_text(refused: list[tuple[str, Any, Any]], stale: list[str]) -> str:
    parts = [f"<b>{html.escape(k)}</b> was changed in another window to "
             f"<b>{html.escape(repr(now))}</b>; your {html.escape(repr(mine))} was not saved"
             for k, now, mine in refused]
    others = [k for k in stale if k not in {r[0] for r in refused}]
    if others:
        parts.append("changed in another window since this page loaded them: "
                     + ", ".join(f"<b>{html.escape(k)}</b>" for k in others[:8])
                     + (" …" if len(others) > 8 else ""))
    if not parts:
        return ""
    return "<span class='settings-stale'>⚠ " + "; ".join(parts) + f"; {RELOAD_HINT}.</span>"


def try_commit(ctx, settings, key: str, value: Any, seen: dict[str, Any]):
    """:func:`commit` for one control; a half-typed (invalid) value is neither saved nor an
    error yet."""
    try:
        return commit(ctx, settings, {key: value}, seen)
    except CraftError:
        return seen, None


__all__ = ["commit", "conflict_text", "snapshot", "stale_keys", "try_commit", "value_of"]
