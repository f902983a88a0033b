"""A scored toy run without a diffusion model: scenes drawn from the toy world's prior are
*rendered* (original prompts leave size / position / sharpness / texture to chance; each variant
pins the attributes its words name), stored as candidates and scored with the real toy rewards.

The studio's browser tests and its benchmark use it to fill a run with real images and real
scores in seconds, independent of the (slow on a CPU) toy diffusion model. It is what the toy
base model is trained to imitate, so the curation it shows is the curation CRAFT does.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from craft.run.store import NewCandidate, RunStore

# Stored as candidates of the toy config's model (model.pretrained in configs/toy.yaml): the
# studio and the engine select only the run's own model's candidates, never another's.
MODEL = "assets/toy-base"


def _variant_scene(rng: random.Random, plain: dict, variant: str):
    from craft.toyworld.grammar import Scene, parse_caption, sample_scene

    base = sample_scene(rng, plain["colour"], plain["shape"], plain["background"])
    named = {k: v for k, v in parse_caption(variant).items()
             if k in ("size", "position", "sharpness", "texture")}
    return Scene(base.colour, base.shape, base.background,
                 named.get("size", base.size), named.get("position", base.position),
                 named.get("sharpness", base.sharpness), named.get("texture", base.texture),
                 seed=base.seed)


def populate(store: RunStore, n_prompts: int = 8, num_variants: int = 2, seeds: int = 2,
             seed: int = 0, model: str = MODEL, rewards: Sequence[str] | None = None,
             eval_prompts: int = 4, batch: int = 500) -> int:
    """Fill ``store`` with ``n_prompts`` toy prompts, their template variants, (1+V)·S rendered
    candidates per prompt, and their toy reward scores. Returns the number of candidates."""
    from craft.toyworld.grammar import parse_caption, template_variants, toy_prompt_split
    from craft.toyworld.render import render
    from craft.toyworld.rewards import MIXES, components

    rewards = list(rewards or ("toy_fidelity", "toy_selection", "toy_aesthetic", "toy_heldout"))
    train, held = toy_prompt_split()
    rng = random.Random(seed)
    prompts = rng.sample(train, min(n_prompts, len(train))) if n_prompts <= len(train) else \
        [train[i % len(train)] for i in range(n_prompts)]
    prompts = list(dict.fromkeys(prompts))
    ids = store.add_prompts(prompts, "train", "toy")
    if eval_prompts:
        store.add_prompts(held[:eval_prompts], "eval", "toy-heldout")
    pending: list[NewCandidate] = []
    texts: list[str] = []
    written = 0

    def flush() -> None:
        nonlocal written
        if not pending:
            return
        cids = store.add_candidates(pending)
        rows = []
        for cid, cand, prompt in zip(cids, pending, texts):
            comp = components(np.asarray(cand.image), prompt)
            for r in rewards:
                rows.append((cid, r, sum(w * comp[k] for k, w in MIXES[r].items())))
        store.add_scores(rows)
        written += len(pending)
        pending.clear()
        texts.clear()

    for pid, prompt in zip(ids, prompts):
        variants = template_variants(prompt, num_variants, seed) if num_variants else []
        vids = store.add_variants(pid, [(i, v, "template") for i, v in enumerate(variants, 1)])
        vdf = store.variants_df("train")
        vid0 = int(vdf[(vdf["prompt_id"] == pid) & (vdf["idx"] == 0)]["id"].iloc[0])
        plain = parse_caption(prompt)
        for vid, text in [(vid0, prompt), *zip(vids, variants)]:
            for s in range(seeds):
                scene_rng = random.Random(f"{seed}:{prompt}:{text}:{s}")
                scene = _variant_scene(scene_rng, plain, text)
                pending.append(NewCandidate(pid, vid, s, model, {"renderer": True},
                                            render(scene)))
                texts.append(prompt)
                if len(pending) >= batch:
                    flush()
    flush()
    return written


def populate_bulk(store: RunStore, n_prompts: int, images: Sequence[bytes], variants: int = 4,
                  seeds: int = 2, rewards: Sequence[str] = ("toy_fidelity", "toy_selection",
                                                            "toy_aesthetic", "toy_heldout"),
                  model: str = MODEL, seed: int = 0) -> int:
    """A pool at the paper's scale in a minute, for benchmarks: ``n_prompts`` prompts x
    (1 + ``variants``) x ``seeds`` candidates, each an image file holding one of ``images``
    (PNG bytes, e.g. rendered by :func:`populate`), with random scores, written in bulk (the
    layout and rows are what generation and scoring write). Returns the number of candidates."""
    import json
    import time

    from craft.run.store import image_relpath

    rng = random.Random(seed)
    pids = store.add_prompts([f"a red circle on a blue background, number {i}"
                              for i in range(n_prompts)])
    conn = store._conn()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO variants(prompt_id, idx, text, expander) VALUES (?,?,?,?)",
                     [(p, j, f"a large sharp red circle, number {p}.{j}", "template")
                      for p in pids for j in range(1, variants + 1)])
    conn.execute("COMMIT")
    rows, now = [], time.time()
    for r in store.variants_df().itertuples():
        for s in range(seeds):
            rel = image_relpath(r.prompt_id, r.id, s, model)
            (store.run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (store.run_dir / rel).write_bytes(images[rng.randrange(len(images))])
            rows.append((r.prompt_id, r.id, s, model, json.dumps({}), rel, now))
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO candidates(prompt_id, variant_id, seed, model, params_json, "
                     "image_path, created) VALUES (?,?,?,?,?,?,?)", rows)
    conn.execute("COMMIT")
    ids = [r[0] for r in conn.execute("SELECT id FROM candidates")]
    conn.execute("BEGIN")
    for name in rewards:
        conn.executemany("INSERT INTO scores VALUES (?,?,?,?)",
                         [(i, name, rng.random(), now) for i in ids])
    conn.execute("COMMIT")
    return len(ids)


__all__ = ["MODEL", "populate", "populate_bulk"]
