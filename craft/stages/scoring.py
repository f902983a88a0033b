"""Score stored candidates with the configured rewards, always against the *original* prompt.

Each reward model loads once per process and scores in batches; scores are cached in the run
store, so a rerun scores only what is missing (``force=True`` re-scores everything). A NaN score
is stored as "not applicable" and later excluded by the filter, never treated as a number.

Under ``accelerate launch`` the main process lists what is missing, every process scores its
share (every n-th candidate) and sends the values back; the main process writes them. The
processes move in rounds of one batch each, so a killed launch loses at most one round.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from PIL import Image

log = logging.getLogger(__name__)


def score_candidates(run, cfg, names: Sequence[str] | None = None, force: bool = False,
                     split: str | None = None, progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> int:
    """Score every candidate (of ``split``, default all) with ``names`` (default
    ``cfg.rewards.names``); returns the number of scores written (on every process).

    ``run`` is a :class:`craft.run.handle.Run` (or, in a single process, a RunStore). Every reward is
    loaded once per process before the first batch, and each batch's images are decoded once
    for all the rewards they miss.
    """
    from craft.rewards.configured import build_reward
    from craft.run.handle import as_run

    run = as_run(run)
    dist = run.dist
    names = list(names or cfg.rewards.names)
    todo = None
    if run.is_main:
        cands = run.store.candidates_df(split=split)
        have = {n: set() if force else run.store.scored_keys(n) for n in names}
        root = str(run.run_dir) + "/"
        todo = []  # (candidate id, image path relative to the run, prompt, rewards it misses)
        for cid, path, prompt in zip(cands["id"].tolist(), cands["image_path"], cands["prompt"]):
            missing = tuple(n for n in names if cid not in have[n])
            if missing:  # paths relative to the run: other machines may mount it elsewhere
                todo.append((cid, path.removeprefix(root), prompt, missing))
    todo = dist.broadcast(todo)
    needed = [n for n in names if any(n in t[3] for t in todo)]
    total = sum(len(t[3]) for t in todo)
    bs = cfg.rewards.batch_size
    device = str(dist.model_device(cfg.rewards.device, key="rewards.device"))
    rewards = {n: build_reward(cfg, n, device=device, batch_size=bs) for n in needed}
    dist.barrier()  # every process has its rewards: the rounds start together
    done = written = 0
    if run.is_main and progress and total:
        progress(0, total)

    def work(chunk):
        images = [Image.open(run.run_dir / rel).convert("RGB") for _, rel, _, _ in chunk]
        rows = []
        for name, reward in rewards.items():
            pick = [i for i, t in enumerate(chunk) if name in t[3]]
            if pick:
                values = reward([images[i] for i in pick], [chunk[i][2] for i in pick])
                rows += [(chunk[i][0], name, float(v)) for i, v in zip(pick, values)]
        return rows

    def commit(rows):
        nonlocal written, done
        written += run.store.add_scores(rows)
        done += len(rows)
        if progress:
            progress(done, total)

    dist.in_rounds(todo, bs, work, commit, should_stop)
    if todo:
        log.info("scored %d candidates with %s", len(todo), ", ".join(needed))
    return dist.broadcast(written)
