"""Score stored candidates with the configured rewards, always against the *original* prompt.

Each reward model loads once and scores in batches; scores are cached in the run store, so a
rerun scores only what is missing (``force=True`` re-scores everything). A NaN score is stored as
"not applicable" and later excluded by the filter, never treated as a number.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from PIL import Image

log = logging.getLogger(__name__)


def score_candidates(store, cfg, names: Sequence[str] | None = None, force: bool = False,
                     split: str | None = None, progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> int:
    """Score every candidate (of ``split``, default all) with ``names`` (default
    ``cfg.rewards.names``); returns the number of scores written."""
    from craft.rewards import load_reward

    names = list(names or cfg.rewards.names)
    cands = store.candidates_df(split=split)
    jobs = []
    for name in names:
        have = set() if force else store.scored_keys(name)
        todo = cands[~cands["id"].isin(have)]
        jobs.append((name, todo))
    total = sum(len(t) for _, t in jobs)
    done = written = 0
    bs = cfg.rewards.batch_size
    for name, todo in jobs:
        if todo.empty:
            continue
        reward = load_reward(name, device=cfg.rewards.device, batch_size=bs,
                             path=cfg.rewards.paths.get(name))
        for i in range(0, len(todo), bs):
            if should_stop is not None and should_stop():
                return written
            chunk = todo.iloc[i:i + bs]
            images = [Image.open(p).convert("RGB") for p in chunk["image_path"]]
            values = reward(images, list(chunk["prompt"]))
            written += store.add_scores(zip(chunk["id"].tolist(), [name] * len(chunk),
                                            [float(v) for v in values]))
            done += len(chunk)
            if progress:
                progress(done, total)
        log.info("scored %d candidates with %s", len(todo), name)
    return written
