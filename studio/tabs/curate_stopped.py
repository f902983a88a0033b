"""Curate's account of the candidates early rejection stopped (craft.stages.early_reject).

A stopped candidate has no image, so it cannot sit in the grid; it must not vanish either. The
header says how many there are and how many the page's settings could keep once finished
(craft.stages.stopped.keepable_stopped: the one rule ``craft generate --finish-stopped`` uses),
the why-panel of an image names the stopped candidates of its prompt ("stopped at step s,
predicted composite c"), and the "Stopped early" table lists them all. Finishing them is a
generate job (StageCall("generate", finish_stopped="keepable")) on the device queue.
"""

from __future__ import annotations

import pandas as pd

from studio.tabs.curate_views import Curation

TABLE_COLUMNS = ["#", "prompt", "from", "seed", "stopped at step", "predicted composite",
                 "could be kept now"]


def stopped_frame(store, cfg, settings) -> pd.DataFrame:
    """The run model's stopped training candidates with ``could_keep`` under ``settings``
    (empty, with the column, when there are none: the common case costs one small query)."""
    from craft.stages.stopped import keepable_stopped

    if not store.stopped_keys(cfg.model.pretrained):
        return pd.DataFrame({"could_keep": pd.Series(dtype=bool)})
    return keepable_stopped(store, cfg, settings)


def _steps(cfg) -> int:
    return int(cfg.generation.num_inference_steps)


def stopped_line(df: pd.DataFrame, cfg) -> str:
    """The header's sentence (Markdown), "" when nothing was stopped."""
    if df.empty:
        return ""
    n, could = len(df), int(df["could_keep"].sum())
    steps = sorted({int(s) for s in df["step"]})
    at = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    comp = df["composite"].dropna()
    pred = (f"; predicted composite {comp.min():+.2f} to {comp.max():+.2f}" if len(comp) else "")
    head = (f"**{n} candidate{'s' if n != 1 else ''} stopped early** (at {at} of "
            f"{_steps(cfg)}{pred}; no image, their seeds reproduce them).")
    if could:
        return (f"{head} **{could}** of them could be kept under these settings once "
                "finished: press “Finish the stopped candidates these settings could keep” "
                "under “Stopped early”.")
    return f"{head} None of them could be kept under these settings."


def stopped_table(df: pd.DataFrame, cfg) -> pd.DataFrame:
    """One row per stopped candidate, those the settings could keep first."""
    if df.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    df = df.sort_values(["could_keep", "composite"], ascending=[False, False])
    return pd.DataFrame({
        "#": [f"s{int(i)}" for i in df["id"]],
        "prompt": df["prompt"].astype(str).to_numpy(),
        "from": [f"variant {int(v)}" for v in df["variant_idx"]],
        "seed": df["seed"].astype(int).to_numpy(),
        "stopped at step": [f"{int(s)} of {_steps(cfg)}" for s in df["step"]],
        "predicted composite": df["composite"].round(3).to_numpy(),
        "could be kept now": ["yes" if k else "no" for k in df["could_keep"]]})


def group_note(c: Curation, df: pd.DataFrame, candidate_id: int, cfg) -> str:
    """The why-panel's lines on the stopped candidates of the selected image's prompt."""
    if df.empty:
        return ""
    hit = c.frame.loc[c.frame["candidate_id"] == candidate_id]
    if hit.empty:
        return ""
    mine = df[df["prompt_id"] == int(hit["prompt_id"].iloc[0])]
    if mine.empty:
        return ""
    rows = [f"- variant {int(r.variant_idx)}, seed {int(r.seed)}: stopped at step {int(r.step)} "
            f"of {_steps(cfg)}, predicted composite {r.composite:+.3f}"
            + (" (could be kept now: finish it)" if r.could_keep else "")
            for r in mine.itertuples()]
    return "\n".join(["", f"**Stopped early in this prompt's group ({len(mine)}):**", *rows])


__all__ = ["TABLE_COLUMNS", "group_note", "stopped_frame", "stopped_line", "stopped_table"]
