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

    ``run`` is a :class:`craft.run.Run` (or, in a single process, a RunStore).
    """
    from craft.rewards import load_reward
    from craft.run import as_run

    run = as_run(run)
    dist = run.dist
    names = list(names or cfg.rewards.names)
    jobs = None
    if run.is_main:
        cands = run.store.candidates_df(split=split)
        root = str(run.run_dir) + "/"
        jobs = []
        for name in names:
            have = set() if force else run.store.scored_keys(name)
            todo = cands[~cands["id"].isin(have)]
            # paths relative to the run: other machines may mount it elsewhere
            jobs.append((name, list(zip(todo["id"].tolist(),
                                        [p.removeprefix(root) for p in todo["image_path"]],
                                        todo["prompt"].tolist()))))
    jobs = dist.broadcast(jobs)
    total = sum(len(t) for _, t in jobs)
    bs = cfg.rewards.batch_size
    device = str(dist.model_device(cfg.rewards.device, key="rewards.device"))
    done = written = 0
    if run.is_main and progress and total:
        progress(0, total)
    for name, todo in jobs:
        if not todo:
            continue
        reward = load_reward(name, device=device, batch_size=bs, path=cfg.rewards.paths.get(name))
        mine = todo[dist.rank::dist.world]
        rounds = -(-len(todo[0::dist.world]) // bs)
        for k in range(rounds):
            if dist.any(should_stop is not None and should_stop()):
                return dist.broadcast(written)
            chunk = mine[k * bs:(k + 1) * bs]
            rows = []
            if chunk:
                images = [Image.open(run.run_dir / rel).convert("RGB") for _, rel, _ in chunk]
                values = reward(images, [p for *_, p in chunk])
                rows = [(cid, name, float(v)) for (cid, _, _), v in zip(chunk, values)]
            gathered = dist.gather(rows)
            if run.is_main:
                flat = [r for part in gathered for r in part]
                written += run.store.add_scores(flat)
                done += len(flat)
                if progress:
                    progress(done, total)
        log.info("scored %d candidates with %s", len(todo), name)
    return dist.broadcast(written)
