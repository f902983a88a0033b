"""Candidates early rejection stopped (craft.stages.early_reject): which of them given filter
settings could keep, and finishing them.

A stopped candidate has no image, only its key, the step it stopped at, the denoiser
evaluations it cost and its early scores (the filter's rewards on the scheduler's prediction of
its final image). Its seed reproduces it exactly: :func:`finish_stopped` generates it from the
start to the last step and records it as an ordinary candidate (scored by the score stage like
any other), so a filter setting looser than the one generation ran with loses nothing for good.

:func:`keepable_stopped` answers "which stopped candidates could these settings keep?": each
stopped candidate enters the current pool with its predicted final scores raised by the safety
margin (``generation.early_reject_margin`` standard deviations of the prediction's error), and
the filter runs on the pool; those it keeps could be kept once finished. The studio's Curate
offers the same call.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from craft import CraftError

log = logging.getLogger(__name__)


def keepable_stopped(store, cfg, settings=None, margin: float | None = None) -> pd.DataFrame:
    """The stopped candidates of ``cfg.model`` (``RunStore.stopped_df``) with ``could_keep``:
    whether the filter ``settings`` (default: the config's) keeps it in the current pool were
    its final scores its predicted ones plus ``margin`` error standard deviations (default
    ``generation.early_reject_margin``). A candidate without a prediction for a reward the
    settings name could be kept (nothing says otherwise)."""
    from dataclasses import replace

    from craft.stages.filtering import ID_COLUMNS, FilterSettings, apply_filter
    from craft.stages.selection import candidate_frame

    stopped = store.stopped_df(model=cfg.model.pretrained, split="train")
    if stopped.empty:
        return stopped.assign(could_keep=pd.Series(dtype=bool))
    settings = replace(settings or FilterSettings.from_config(cfg), dedup_threshold=None)
    margin = cfg.generation.early_reject_margin if margin is None else float(margin)
    names = list(settings.used_rewards)
    pool = candidate_frame(store, cfg)
    nan = pd.Series(np.nan, index=stopped.index)
    best = pd.DataFrame({n: stopped.get(f"predicted_{n}", nan)
                         + margin * stopped.get(f"error_sd_{n}", nan) for n in names},
                        index=stopped.index).astype(float)
    unknown = best.isna().any(axis=1).to_numpy()
    extra = stopped[["prompt_id", "variant_idx", "seed"]].assign(
        candidate_id=-stopped["id"].to_numpy(), **{n: best[n] for n in names})
    frame = pd.concat([pool[[*ID_COLUMNS, *names]], extra[[*ID_COLUMNS, *names]]],
                      ignore_index=True)
    kept = set(apply_filter(frame, settings).kept["candidate_id"].tolist())
    out = stopped.copy()
    out["could_keep"] = [(-int(i) in kept) or bool(u) for i, u in zip(out["id"], unknown)]
    return out


def stopped_todo(store, cfg, which="keepable", settings=None) -> list[tuple]:
    """What :func:`finish_stopped` generates: ``which`` = "keepable" (the stopped candidates
    :func:`keepable_stopped` says the settings could keep), "all", or stopped-candidate ids.
    Refuses candidates stopped under other sampling settings than the config's (their seed
    reproduces them only with the settings they were sampled with)."""
    from craft.stages.generation import sampling_params

    if which == "keepable":
        df = keepable_stopped(store, cfg, settings)
        df = df[df["could_keep"]] if len(df) else df
    else:
        df = store.stopped_df(model=cfg.model.pretrained, split="train")
        if which != "all":
            df = df[df["id"].isin([int(i) for i in which])]
    record = {**sampling_params(cfg.generation).as_dict(), "scheduler": cfg.generation.scheduler}
    other = [p for p in df["params_json"] if json.loads(p) != record]
    if other:
        raise CraftError(f"{len(other)} stopped candidate(s) were sampled with {other[0]}, but "
                         f"the config samples with {json.dumps(record, sort_keys=True)}; set "
                         "generation (num_inference_steps, guidance_scale, height, width, "
                         "scheduler) as they were to finish them")
    return [(int(r.prompt_id), int(r.variant_id), int(r.seed), str(r.variant),
             int(r.variant_idx), str(r.prompt), int(r.evaluations)) for r in df.itertuples()]


def finish_stopped(run, cfg, which="keepable", settings=None, pipe=None, progress=None,
                   should_stop=None) -> dict:
    """Finish stopped candidates (:func:`stopped_todo`'s ``which``) on every process of the
    run, each to the last step from its seed; they become ordinary candidates (score them
    next). Returns ``{"finished": n, "asked": m}``."""
    from craft.run.handle import as_run
    from craft.stages.generation import finish_candidates

    run = as_run(run)
    todo = run.dist.on_main(lambda: stopped_todo(run.store, cfg, which, settings))
    written = finish_candidates(run, cfg, todo, pipe=pipe, progress=progress,
                                should_stop=should_stop)
    log.info("finished %d of %d stopped candidates", written, len(todo))
    return {"finished": written, "asked": len(todo)}


__all__ = ["finish_stopped", "keepable_stopped", "stopped_todo"]
