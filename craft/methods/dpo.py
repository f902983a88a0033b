"""Diffusion-DPO (Wallace et al. 2023) on pairs drawn from the pool: the paper's offline
preference-optimisation baseline, on the same candidates and rewards CRAFT filters.

A pair is two candidates of one original prompt's group, the winner the one with the higher
composite (the same composite Composite Reward Filtering ranks by). Both are noised with the
*same* noise at the *same* timestep; with ``e`` the tuned model's squared error and ``r`` the
frozen reference's (the base the anchor already uses),

    L = -log sigmoid( -beta / 2 * ((e_w - e_l) - (r_w - r_l)) )

so the loss falls as the tuned model denoises the winner better (and the loser worse) than the
reference does. It is diffusers' ``train_diffusion_dpo.py`` loss; for the flow-matching families
(SD3 / FLUX) the errors are of the velocity target, as the flow DPO trainers (Flow-Factory,
flow_grpo) write it. At the start the tuned model is the reference, the inner term is 0 and the
loss is log 2; its gradient there is ``beta / 4 * grad(e_w - e_l)``.

Pure functions and one micro-batch loss; the loop is craft.methods.training's.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from craft import CraftError

PAIR_COLUMNS = ["prompt_id", "win_id", "lose_id", "win_composite", "lose_composite", "gap"]


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor,
             ref_l: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """The Diffusion-DPO loss of a batch of pairs from per-pair squared errors, with what a user
    watches: the implicit accuracy (share of pairs where the tuned model prefers the winner more
    than the reference does) and the mean inner term."""
    inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    loss = -F.logsigmoid(inside).mean()
    return loss, {"dpo_accuracy": float((inside > 0).float().mean()),
                  "dpo_margin": float(inside.detach().mean())}


def build_pairs(frame: pd.DataFrame, rule: str = "best_worst", margin: float = 0.0,
                max_pairs: int | None = None) -> pd.DataFrame:
    """Winner / loser pairs from each original prompt's group of a filter frame (columns
    prompt_id, candidate_id, composite; craft.stages.advantages.filter_with_advantages makes it).

    Unscorable candidates (NaN composite) and manually excluded ones (``override`` =
    'exclude', when the column is there) are never paired. ``best_worst``: the best against the
    worst of every group whose gap exceeds ``margin``; ``above_margin``: every pair of a group
    whose gap exceeds ``margin``. With ``max_pairs`` the widest gaps are kept (ties by ids, so
    the same pool gives the same pairs). Rows come widest gap first.
    """
    need = {"prompt_id", "candidate_id", "composite"}
    if not need <= set(frame.columns):
        raise CraftError(f"pairs need the columns {sorted(need)}; got {list(frame.columns)} "
                         f"(build the frame with craft.stages.advantages.filter_with_advantages)")
    if not math.isfinite(margin) or margin < 0:
        raise CraftError(f"dpo.margin = {margin!r}: must be a finite number >= 0")
    df = frame[np.isfinite(frame["composite"].to_numpy(float))]
    if "override" in df.columns:
        df = df[df["override"].astype(object) != "exclude"]
    parts = []
    for pid, g in df.groupby("prompt_id", sort=True):
        g = g.sort_values(["composite", "candidate_id"], ascending=[False, True])
        ids, comp = g["candidate_id"].to_numpy(), g["composite"].to_numpy(float)
        if len(g) < 2:
            continue
        if rule == "best_worst":
            wi, li = np.array([0]), np.array([len(g) - 1])
        elif rule == "above_margin":
            wi, li = np.triu_indices(len(g), k=1)
        else:
            from craft.run.choices import PAIR_RULES

            raise CraftError(f"dpo.pairs = {rule!r}: not a pair rule; use one of "
                             f"{list(PAIR_RULES)}")
        gap = comp[wi] - comp[li]
        ok = gap > margin
        parts.append(pd.DataFrame({"prompt_id": pid, "win_id": ids[wi][ok], "lose_id": ids[li][ok],
                                   "win_composite": comp[wi][ok], "lose_composite": comp[li][ok],
                                   "gap": gap[ok]}))
    pairs = (pd.concat(parts, ignore_index=True) if parts
             else pd.DataFrame({c: [] for c in PAIR_COLUMNS}))
    pairs = pairs.sort_values(["gap", "win_id", "lose_id"], ascending=[False, True, True],
                              kind="stable", ignore_index=True)
    if max_pairs is not None:
        pairs = pairs.head(int(max_pairs)).reset_index(drop=True)
    return pairs.astype({"prompt_id": int, "win_id": int, "lose_id": int})


def pair_images(pairs: pd.DataFrame, frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The training frame of a pair set: each image once (candidate_id, image_path, prompt,
    weight 1, in candidate order) and the (n_pairs, 2) row indices of winner and loser in it."""
    if pairs.empty:
        raise CraftError("no DPO pairs: no group has two scorable candidates whose composite "
                         "differs by more than dpo.margin; lower dpo.margin or generate more "
                         "seeds (generation.seeds_per_prompt)")
    ids = np.unique(np.concatenate([pairs["win_id"].to_numpy(), pairs["lose_id"].to_numpy()]))
    images = frame.set_index("candidate_id").loc[ids].reset_index().assign(weight=1.0)
    return images, pair_index(images, pairs[["win_id", "lose_id"]].to_numpy())


def pair_index(images: pd.DataFrame, pair_ids) -> np.ndarray:
    """(n_pairs, 2) row positions in ``images`` of each (winner id, loser id) pair: the training
    frame may come back in another order (a resumed run reads its recorded images)."""
    pos = {int(c): i for i, c in enumerate(images["candidate_id"])}
    try:
        return np.array([[pos[int(w)], pos[int(lo)]] for w, lo in pair_ids],
                        dtype=np.int64).reshape(-1, 2)
    except KeyError as e:
        raise CraftError(f"DPO pair names candidate {e.args[0]}, which is not among the "
                         f"training images; the recorded pairs and images disagree") from None


__all__ = ["PAIR_COLUMNS", "build_pairs", "dpo_loss", "pair_images", "pair_index"]
