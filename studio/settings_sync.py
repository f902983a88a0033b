"""Settings shared by several pages on one run: saved field by field, never over a change made
elsewhere.

Why: two people (or one person's two windows) open on one run each hold a copy of the settings
in their page. Saving a page's whole form on some event (a tab refresh did) silently reverted
what the other page had set. Here a page keeps what it last loaded or saved of each setting
(``seen``: key -> value, a ``gr.State``), and a change is one field at a time, compared and set
under the run's lock:

- the field still holds what the page believed: it is saved, the page's ``seen`` follows;
- someone changed this very field since: nothing is saved, the control goes back to the saved
  value and the page says so ("top-K (filter.top_k) is 50, set in another window; your 80 was
  not saved"): no silent overwrite, and no control showing a value that was not saved;
- the value is not one the control or the config takes (outside the box's bounds, not a
  number, refused by the config's own checks): nothing is saved, the control goes back to the
  saved value and the page says why, with the bounds and the value typed;
- other fields changed elsewhere: the change is saved (it touches only its own field), and the
  page says which of its values are stale and offers to reload (no silent revert);
- leaving a box without changing its value is not a change: nothing happens;
- while a box is being typed in (a keystroke), a half-typed value is neither saved nor an
  error, and a refused change leaves the box as typed: Enter or leaving the box decides.

The other windows' changes reach a page by its polls (studio.app's settings line, Curate's
poll of :meth:`RunContext.changes <studio.context.RunContext.changes>`), never by a silent
change of its controls.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from craft import CraftError
from craft.run.config import ConfigError, config_to_dict

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


@dataclass
class Outcome:
    """What became of a page's changes (:func:`apply`).

    ``invalid``: (key, what is wrong, the page's value): refused by the control's bounds or the
    config's own checks. ``conflicts``: (key, the run's value, the page's value): the field was
    changed in another window since the page last saw it. Both are refused; ``reset`` holds
    their saved values as their controls show them (the page puts them back). ``stale``: other
    fields changed elsewhere since the page loaded them."""

    seen: dict[str, Any]
    saved: list[str] = field(default_factory=list)
    invalid: list[tuple[str, str, Any]] = field(default_factory=list)
    conflicts: list[tuple[str, Any, Any]] = field(default_factory=list)
    reset: dict[str, Any] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return bool(self.invalid or self.conflicts)

    def parts(self, settings) -> list[str]:
        """Each refusal in words (HTML): the field, why, the value typed, the value kept."""
        parts = [invalid_part(settings, k, why, mine, self.reset.get(k))
                 for k, why, mine in self.invalid]
        return parts + [conflict_part(settings, k, now, mine)
                        for k, now, mine in self.conflicts]

    def text(self, settings) -> str:
        """The page's message: each refusal, then the fields that are stale; "" when all is
        well."""
        refused = {k for k, *_ in (*self.invalid, *self.conflicts)}
        return banner(self.parts(settings), [k for k in self.stale if k not in refused],
                      settings)


def apply(ctx, settings, changes: dict[str, Any], seen: dict[str, Any], final: bool = True
          ) -> Outcome:
    """Save ``changes`` (key -> control value) into the run field by field: a value the
    control's bounds or the config refuse is not saved; nor is a field changed in another
    window since the page saw it. ``final`` (the user has finished typing: Enter, leaving the
    box, a slider's release, a click): the refused fields' ``seen`` become the saved values,
    which the page then shows (``reset``); otherwise (a keystroke) the page keeps its value."""
    from studio.settings import control_problem

    with ctx._lock:
        cfg = ctx.cfg
        out = Outcome(dict(seen))
        for key, ui_value in changes.items():
            binding = settings.bindings[settings.index(key)]
            stored = value_of(cfg, key)
            problem, candidate = control_problem(binding.component, ui_value), None
            if problem is None:
                try:
                    candidate = settings.config_with(cfg, key, ui_value)
                except (CraftError, ValueError, TypeError) as e:
                    problem = " ".join(str(e).split())
            if problem is not None:
                out.invalid.append((key, problem, ui_value))
            else:
                new, believed = value_of(candidate, key), seen.get(key, stored)
                if new == stored:  # not a change (or the same change made elsewhere)
                    out.seen[key] = stored
                    continue
                if stored == believed:
                    cfg = candidate
                    out.seen[key] = new
                    out.saved.append(key)
                    continue
                out.conflicts.append((key, stored, ui_value))
            out.reset[key] = binding.to_ui(stored)
            if final:
                out.seen[key] = stored
        if out.saved:
            ctx.set_config(cfg)
            ctx.schedule_save()
    out.stale = stale_keys(ctx, out.seen)
    return out


def commit(ctx, settings, changes: dict[str, Any], seen: dict[str, Any]
           ) -> tuple[dict[str, Any], str]:
    """:func:`apply` for a change made by the program on the user's behalf (a chosen prompt
    source): returns (the page's new ``seen``, a message: "" when all is well); raises
    ConfigError for a value the config refuses (the caller shows it)."""
    out = apply(ctx, settings, changes, seen, final=False)
    if out.invalid:
        key, why, _ = out.invalid[0]
        raise ConfigError(why if why.startswith(key) else f"{key}: {why}", keys=(key,))
    return out.seen, out.text(settings)


def _name(settings, key: str) -> str:
    from studio.settings import label_of

    try:
        label = label_of(settings.component(key), key) if settings is not None else key
    except KeyError:
        label = key
    return html.escape(key if label == key else f"{label} ({key})")


def _ui(settings, key: str, value: Any) -> str:
    """A config value as its control shows it."""
    from studio.settings import shown

    try:
        value = settings.bindings[settings.index(key)].to_ui(value)
    except (AttributeError, KeyError, ValueError, TypeError):
        pass
    return html.escape(shown(value))


def invalid_part(settings, key: str, why: str, mine: Any, kept: Any) -> str:
    from studio.settings import shown

    kept = "" if kept is None else f" (it stays {html.escape(shown(kept))})"
    yours = "the box held no number and was not saved" if mine is None or mine == "" else \
        f"your <b>{html.escape(shown(mine))}</b> was not saved"
    return f"<b>{_name(settings, key)}</b> {html.escape(why)}; {yours}{kept}"


def conflict_part(settings, key: str, now: Any, mine: Any) -> str:
    from studio.settings import shown

    return (f"<b>{_name(settings, key)}</b> is <b>{_ui(settings, key, now)}</b>, set in another "
            f"window; your {html.escape(shown(mine))} was not saved")


def banner(parts: list[str], stale: list[str], settings=None) -> str:
    """The settings line of a page: ``parts`` (refusals), then the ``stale`` fields."""
    parts = list(parts)
    if stale:
        parts.append("changed in another window since this page loaded them: "
                     + ", ".join(f"<b>{_name(settings, k)}</b>" for k in stale[:8])
                     + (" …" if len(stale) > 8 else "") + f"; {RELOAD_HINT}")
    if not parts:
        return ""
    return "<span class='settings-stale'>⚠ " + "; ".join(parts) + ".</span>"


def conflict_text(refused: list[tuple[str, Any, Any]], stale: list[str], settings=None) -> str:
    """The banner for refused conflicts (key, the run's value, the page's) and stale keys."""
    return banner([conflict_part(settings, k, now, mine) for k, now, mine in refused],
                  [k for k in stale if k not in {r[0] for r in refused}], settings)


def settings_text(ctx, settings, seen: dict[str, Any] | None, notice: str = "") -> str:
    """A page's settings line: its last refused change (``notice``), then the settings changed
    in another window since the page saw them (``seen``); "" when there is nothing to say."""
    return banner([notice] if notice else [], stale_keys(ctx, seen or {}), settings)


def notice_after(outcome: Outcome, settings, notice: str) -> str:
    """A page's refusal notice after ``outcome``: its refusals; none once a change of the page
    is saved; else as it was."""
    parts = outcome.parts(settings)
    return "; ".join(parts) if parts else ("" if outcome.saved else notice)


def try_commit(ctx, settings, key: str, value: Any, seen: dict[str, Any]):
    """:func:`commit` for one control; a half-typed (invalid) value is neither saved nor an
    error yet."""
    try:
        return commit(ctx, settings, {key: value}, seen)
    except CraftError:
        return seen, None


__all__ = ["Outcome", "apply", "banner", "commit", "conflict_text", "notice_after",
           "settings_text", "snapshot", "stale_keys", "try_commit", "value_of"]
