"""What the page says, in the page's words.

The engine's messages are written for the command line ("score them first (`craft score`, or
Score in the studio)"); shown in the studio they name the page's buttons instead ("press Score
on the Score tab first"): :func:`for_page` rewrites them, in one place (ui.error_md applies it
to every message the studio shows as an error). A message about something missing knows when
the whole loop of the run is running and is about to make it (:func:`loop_note`), and a tab
whose stage the whole loop ran says so instead of "No job yet." (:func:`loop_line`).
"""

from __future__ import annotations

import re

# What each stage's button is, where it is.
BUTTONS = {
    "prompts": "press “Add prompts to the run” on the Prompts tab",
    "generate": "press Generate on the Generate tab",
    "score": "press Score on the Score tab",
    "train": "press “Start training” on the Train tab",
    "evaluate": "press Compare on the Compare tab",
    "filter": "set the filter on the Curate tab",
    "export": "press “Export kept set” on the Curate tab",
    "run": "press “Run the whole loop” (top of the page)",
}
_STAGE = "|".join(BUTTONS)

# (pattern, replacement) pairs, tried in order: the engine's hints, then any remaining
# "`craft <stage> …`" (a stage's command becomes its button).
REWRITES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\s*\(`craft (" + _STAGE + r")\b[^`]*`, or [^)]*\)"),
     r" (\g<1>-BUTTON)"),
    (re.compile(r"run the (prompts|generate) stage first \(`craft \w+[^`]*`\)"),
     r"\g<1>-BUTTON first"),
    (re.compile(r"train and publish first \(`craft train[^`]*`\), or pass --tuned PATH"),
     "train first (train-BUTTON)"),
    (re.compile(r"run `craft (" + _STAGE + r")\b[^`]*` \(([^)]*)\) first"),
     r"\g<1>-BUTTON first (\g<2>)"),
    (re.compile(r"run `craft (" + _STAGE + r")\b[^`]*` first"), r"\g<1>-BUTTON first"),
    (re.compile(r"\(Curate in the studio, or filter\.level / filter\.top_k\)"),
     "on the Curate tab (a lower margin, a weaker level, a larger top-K)"),
    (re.compile(r"\(the studio's map, or `craft filter`, which embeds the pool\)"),
     "(open “Map of the pool” on the Curate tab and press “Compute the map”)"),
    (re.compile(r"`craft (" + _STAGE + r")\b[^`]*`"), r"\g<1>-BUTTON"),
]
_BUTTON = re.compile(r"\b(" + _STAGE + r")-BUTTON")

# Words that mark a message about something not made yet (a stage the loop runs).
MISSING = re.compile(r"\bfirst\b|\bno (candidates|prompts|scores|tuned model|evaluation)\b|"
                     r"have no scores|nothing to train on", re.IGNORECASE)


def for_page(text: str) -> str:
    """``text`` with the command-line hints replaced by the page's buttons, and, when it is
    about something missing while the whole loop of this run is running, a note saying so."""
    for pattern, replacement in REWRITES:
        text = pattern.sub(replacement, text)
    text = _BUTTON.sub(lambda m: BUTTONS[m.group(1)], text)
    if MISSING.search(text):
        text += loop_note()
    return text


def _loop_job():
    """The whole loop's latest job of the run of the event being handled, or None (also when
    no run is bound: a message built outside an event)."""
    try:
        from studio.jobs import JOBS
        from studio.session import current

        return JOBS.for_run(str(current().run_dir)).latest("loop")
    except Exception:  # noqa: BLE001 - wording must never break a message
        return None


def _stage(snap) -> str:
    stage = str(snap.info.get("stage", "")).split(":")[-1].strip() or "prompts"
    return f"{stage} {snap.done}/{snap.total}" if snap.total else stage


def loop_note() -> str:
    """" · the whole loop is running …" while this run's whole loop runs, else ""."""
    snap = _loop_job()
    if snap is None or not snap.running:
        return ""
    return (f" · the whole loop of this run is running (now: {_stage(snap)}) and makes it: "
            "wait for it (its progress is under “Run the whole loop”, top of the page), or "
            "cancel it there")


# The job kinds whose stage the whole loop runs (studio.loop: craft.stages.calls.STAGES).
LOOP_KINDS = {"prompts": "prompts", "generate": "generate", "score": "score", "train": "train",
              "compare": "evaluate"}


def loop_line(kind: str) -> str | None:
    """What a tab's job line says when the tab has no job of its own but the whole loop ran
    (or runs) its stage: the loop's latest job; None when there is none (\"No job yet.\")."""
    if kind not in LOOP_KINDS:
        return None
    snap = _loop_job()
    if snap is None:
        return None
    if snap.running:
        return (f"No {kind} job of its own · the whole loop is running (now: {_stage(snap)}): "
                f"{snap.summary()}")
    return f"No {kind} job of its own · the whole loop's last job: {snap.summary()}"


__all__ = ["BUTTONS", "LOOP_KINDS", "for_page", "loop_line", "loop_note"]
