"""The one selection: what a training method trains on, for given filter settings.

Every face asks here: ``craft filter``, ``craft export``, ``craft train`` (through the engine),
the studio's Curate, Groups, Export and Train's "will train on". :func:`select` builds the run's
:class:`Pool` and lets the method (craft/methods/) pick its rows from it, so the kept set a
page shows is the one a training run records. The pool is always ``cfg.model``'s own candidates
(never another model's), near-duplicates are dropped with the pool's own embeddings (computed
when missing), and the settings are checked once (craft.stages.filtering.FilterSettings).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

import pandas as pd

from craft import CraftError
from craft.methods.base import Selection
from craft.methods.registry import get_method


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
    """:class:`craft.stages.filtering.FilterSettings` from the config (overrides in
    ``changes``, checked)."""
    from craft.stages.filtering import FilterSettings

    return FilterSettings.from_config(cfg, **changes)


def scored_frame(store, cfg) -> pd.DataFrame:
    """:func:`candidate_frame`, refused while there is nothing to select from."""
    return check_scored(candidate_frame(store, cfg), cfg)


def check_scored(df: pd.DataFrame, cfg) -> pd.DataFrame:
    """``df`` (a :func:`candidate_frame`, perhaps cached by a face), refused while there is
    nothing to select from: no candidates of ``cfg.model``, or a reward with no score."""
    if df.empty:
        raise CraftError(f"no candidates of model {cfg.model.pretrained!r} in this run yet; "
                         "generate them first (`craft generate`, or Generate in the studio)")
    missing = [n for n in cfg.rewards.names if n not in df or df[n].isna().all()]
    if missing:
        raise CraftError(f"rewards {missing} have no scores in this run; score them first "
                         f"(`craft score`, or Score in the studio)")
    return df


def pool_embeddings(store, cfg) -> tuple:
    """(ids, vectors) of every training candidate in ``embed.encoder``'s space, embedding the
    ones not yet embedded first (the near-duplicate rule needs the whole pool)."""
    from craft.stages.embeddings import embed_candidates, space_name

    embed_candidates(store, cfg)
    return store.embeddings(space_name(cfg))


def training_prompts(store) -> pd.DataFrame:
    """The original training prompts (columns prompt_id, prompt): what an online method
    samples from."""
    p = store.prompts_df("train")
    if p.empty:
        raise CraftError("no training prompts in this run yet; add prompts first (`craft "
                         "prompts`, or Prompts in the studio)")
    return pd.DataFrame({"prompt_id": p["id"].astype(int), "prompt": p["text"]})


class Pool:
    """A run's candidates as a method selects from them; each part is read once, on demand
    (an online method reads only the prompts)."""

    def __init__(self, store, cfg, frame: pd.DataFrame | None = None,
                 embeddings: tuple | None = None):
        self.store, self.cfg = store, cfg
        if frame is not None:
            self.__dict__["scored"] = frame
        if embeddings is not None:
            self.__dict__["_emb"] = embeddings

    @functools.cached_property
    def scored(self) -> pd.DataFrame:
        return scored_frame(self.store, self.cfg)

    @functools.cached_property
    def overrides(self) -> dict:
        return self.store.overrides()

    @functools.cached_property
    def prompts(self) -> pd.DataFrame:
        return training_prompts(self.store)

    def embeddings(self) -> tuple:
        if "_emb" not in self.__dict__:
            self.__dict__["_emb"] = pool_embeddings(self.store, self.cfg)
        return self.__dict__["_emb"]


def select(store, cfg, settings=None, *, method: str | None = None,
           save_as: str | None = None, frame: pd.DataFrame | None = None,
           embeddings: tuple | None = None) -> Selection:
    """What ``method`` (default ``train.method``) trains on under ``settings`` (default: the
    config's filter). With ``save_as`` the selection is recorded in the store under that name.
    ``frame`` (a :func:`scored_frame` already read) and ``embeddings`` (what
    :func:`pool_embeddings` returned) save reading the store again (the studio caches both)."""
    m = get_method(method or cfg.train.method)
    settings = settings if settings is not None else filter_settings(cfg)
    sel = m.select(Pool(store, cfg, frame, embeddings), settings, cfg)
    if save_as:
        store.save_selection(save_as, sel.record, sel.rows if "candidate_id" in sel.rows
                             else [])
    return sel


def kept_set_method(cfg) -> str:
    """The method whose kept set a face shows or exports as images: ``train.method`` where it
    trains on the kept set (craft, sft), else craft (DPO's pairs and an online method's prompts
    are no kept set; the filter's kept set is craft's)."""
    name = cfg.train.method
    return name if get_method(name).data == "kept" else "craft"


def selection_record(settings, cfg, **extra) -> dict:
    """What a saved selection records about how it was made."""
    return dataclasses.asdict(settings) | {"advantage": cfg.advantage.mode,
                                           "tau": cfg.advantage.tau} | extra


def kept_digest(kept: pd.DataFrame, pairs=None) -> str:
    """A short fingerprint of a kept set (which candidates, with which weights; pairs: and
    which pairs), so processes and resumed runs can check they train on the same data."""
    key = "candidate_id" if "candidate_id" in kept else "prompt_id"  # online: its prompts
    weights = kept["weight"].astype(float) if "weight" in kept else [1.0] * len(kept)
    rows = sorted(zip(kept[key].astype(int), weights))
    text = ";".join(f"{c}:{w:.8g}" for c, w in rows)
    if pairs is not None:
        text += "|" + ";".join(f"{int(w)}>{int(lo)}" for w, lo in pairs)
    return hashlib.sha1(text.encode()).hexdigest()


def portable(frame: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """Image paths relative to the run, for sending to processes that may mount it elsewhere."""
    if "image_path" not in frame:  # prompts: no images
        return frame
    root = str(run_dir) + "/"
    return frame.assign(image_path=[str(p).removeprefix(root) for p in frame["image_path"]])


def localize(frame: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """The inverse of :func:`portable` on this process."""
    if "image_path" not in frame:
        return frame
    return frame.assign(image_path=[str(Path(run_dir) / p) for p in frame["image_path"]])


__all__ = ["Pool", "candidate_frame", "check_scored", "filter_settings", "kept_digest",
           "kept_set_method", "localize", "pool_embeddings", "portable", "scored_frame", "select",
           "selection_record", "training_prompts"]
