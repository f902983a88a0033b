"""The CRAFT stages over a run store, in the order data flows; the CLI and the studio call these.

prompts -> variants -> candidates -> scores -> selection -> training -> evaluation. Each stage
reads what the previous one stored and writes its own result, so any stage can be re-run or
resumed on its own (``craft generate`` after a crash, a new filter in the studio, ...).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import pandas as pd

from craft import CraftError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


def prepare_prompts(store, cfg, progress: ProgressFn | None = None) -> dict:
    """Load the training and evaluation prompt sets into the store and expand the variants."""
    from craft.expansion import expand_prompts, expander_from_config
    from craft.prompts import load_prompts

    p = cfg.prompts
    train = load_prompts(p.source, p.format, p.column, p.max_prompts, seed=p.seed)
    held = load_prompts(p.eval_source, "auto", None, p.max_eval_prompts, seed=p.seed)
    overlap = set(train.prompts) & set(held.prompts)
    if overlap:
        raise CraftError(f"{len(overlap)} prompt(s) are in both prompts.source and "
                         f"prompts.eval_source, e.g. {sorted(overlap)[0]!r}; evaluation prompts "
                         "must be held out")
    train_ids = store.add_prompts(train.prompts, "train", str(p.source))
    store.add_prompts(held.prompts, "eval", str(p.eval_source))
    have = store.variants_df("train").groupby("prompt_id")["idx"].max()
    todo = [(pid, text) for pid, text in zip(train_ids, train.prompts)
            if have.get(pid, 0) < p.num_variants]
    if todo and p.num_variants:
        exp = expand_prompts([t for _, t in todo], expander_from_config(p), p.num_variants,
                             p.seed, progress=progress)
        for k, (pid, _) in enumerate(todo):
            store.add_variants(pid, exp.rows(k))
    info = {"train_prompts": len(train.prompts), "eval_prompts": len(held.prompts),
            "skipped": len(train.skipped) + len(held.skipped), "expanded": len(todo),
            "train_summary": train.summary(), "eval_summary": held.summary()}
    log.info("prompts: %s", info)
    return info


def candidate_frame(store, cfg, split: str = "train") -> pd.DataFrame:
    """Candidates of ``cfg.model`` joined with their scores: the frame the filter reads."""
    cands = store.candidates_df(model=cfg.model.pretrained, split=split)
    names = sorted(set(cfg.rewards.names) | set(cfg.rewards.eval_names))
    scores = store.scores_df(names)
    df = cands.rename(columns={"id": "candidate_id"}).join(scores, on="candidate_id")
    for n in names:
        if n not in df:
            df[n] = float("nan")
    return df


def filter_settings(cfg, **changes):
    """:class:`craft.filtering.FilterSettings` from the config (studio overrides in ``changes``)."""
    from craft.filtering import FilterSettings

    return FilterSettings.from_config(cfg, **changes)


def training_set(store, cfg, settings=None, save_as: str | None = "craft") -> pd.DataFrame:
    """The kept candidates with their advantage weights (the set CRAFT fine-tunes on).

    Manual include/exclude overrides from the store are applied last. With ``save_as`` the
    selection is recorded in the store, so a training run can say exactly what it saw.
    """
    from craft.advantages import select_for_training

    df = candidate_frame(store, cfg)
    missing = [n for n in cfg.rewards.names if df[n].isna().all()]
    if df.empty:
        raise CraftError("no candidates in this run yet; run `craft generate` first")
    if missing:
        raise CraftError(f"rewards {missing} have no scores in this run; run `craft score` first")
    settings = settings or filter_settings(cfg)
    a = cfg.advantage
    kept = select_for_training(df, settings, a.mode, a.tau, a.eps, store.overrides())
    if save_as:
        store.save_selection(save_as, dataclasses.asdict(settings) | {"advantage": a.mode},
                             kept[["candidate_id", "composite", "advantage", "weight"]])
    return kept


def random_subset(store, cfg, n: int, seed: int = 0) -> pd.DataFrame:
    """The control that tells alignment from drift: ``n`` of the model's own *plain-prompt*
    samples drawn at random, unfiltered, each with weight 1."""
    df = candidate_frame(store, cfg)
    plain = df[df["variant_idx"] == 0]
    if len(plain) < n:
        raise CraftError(f"the control needs {n} plain-prompt candidates but the run has "
                         f"{len(plain)}; generate more seeds (generation.seeds_per_prompt)")
    return plain.sample(n=n, random_state=seed).assign(weight=1.0)
