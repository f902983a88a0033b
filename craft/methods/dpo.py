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

import dataclasses
import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from craft import CraftError
from craft.methods.base import Method, PlanShape, Selection
from craft.methods.steps import (base_prediction, micro_batch_generator, noised_batch, predict,
                                 sq_error)

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
    if rule == "best_worst":  # one pair a group: vectorised (Curate recomputes it per change)
        pairs = _best_worst(df, margin)
    else:
        pairs = _all_pairs(df, rule, margin)
    pairs = pairs.sort_values(["gap", "win_id", "lose_id"], ascending=[False, True, True],
                              kind="stable", ignore_index=True)
    if max_pairs is not None:
        pairs = pairs.head(int(max_pairs)).reset_index(drop=True)
    return pairs.astype({"prompt_id": int, "win_id": int, "lose_id": int})


def _best_worst(df: pd.DataFrame, margin: float) -> pd.DataFrame:
    """Each group's best against its worst (ties: the lower id is the better), gap > margin."""
    g = df.sort_values(["prompt_id", "composite", "candidate_id"],
                       ascending=[True, False, True], kind="stable")
    by = g.groupby("prompt_id", sort=True)
    first, last, size = by.head(1), by.tail(1), by.size().to_numpy()
    comp_w, comp_l = first["composite"].to_numpy(float), last["composite"].to_numpy(float)
    gap = comp_w - comp_l
    ok = (size >= 2) & (gap > margin)
    out = pd.DataFrame({"prompt_id": first["prompt_id"].to_numpy()[ok],
                        "win_id": first["candidate_id"].to_numpy()[ok],
                        "lose_id": last["candidate_id"].to_numpy()[ok],
                        "win_composite": comp_w[ok], "lose_composite": comp_l[ok],
                        "gap": gap[ok]})
    return out if len(out) else pd.DataFrame({c: [] for c in PAIR_COLUMNS})


def _all_pairs(df: pd.DataFrame, rule: str, margin: float) -> pd.DataFrame:
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
    return (pd.concat(parts, ignore_index=True) if parts
            else pd.DataFrame({c: [] for c in PAIR_COLUMNS}))


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


def dpo_micro_batch_loss(model, noise_sched, w_t, data, tc, beta: float, step: int,
                         micro: int, process: int, accelerator, ref_model
                         ) -> tuple[torch.Tensor, dict]:
    """One micro-batch of Diffusion-DPO (craft.methods.dpo): ``train.micro_batch`` pairs, winners and
    losers in one forward pass with shared noise, timestep and dropout; the reference is the
    frozen base (LoRA: the same module with its adapters off). Unweighted over t, as the DPO
    derivation absorbs the ELBO weight into beta."""
    device = accelerator.device
    gen = micro_batch_generator(tc, step, micro, process)
    k = torch.randint(0, len(data.pairs), (tc.micro_batch,), generator=gen)
    idx = torch.cat([data.pairs[k, 0], data.pairs[k, 1]]).to(device)
    nb = noised_batch(noise_sched, w_t, data, tc, idx, gen, device, share=2)
    err = sq_error(predict(model, data, nb, accelerator), nb.target)
    ref = sq_error(base_prediction(ref_model, data, nb.xt, nb.t, nb.cond, accelerator),
                    nb.target)
    n = len(k)
    return dpo_loss(err[:n], err[n:], ref[:n], ref[n:], beta)


class DiffusionDPO(Method):
    """Diffusion-DPO on winner / loser pairs of each prompt's whole group (the kept-set filter
    does not apply; manual excludes do)."""

    name = "dpo"
    title = "Diffusion-DPO on pairs of the pool"
    data = "pairs"
    filtered_pool = False
    settings_section = "dpo"
    data_stage = "training: encode the pairs' images"

    def select(self, pool, settings, cfg) -> Selection:
        from craft.stages.advantages import filter_with_advantages
        from craft.stages.selection import selection_record

        # pairs come from each whole group: the kept-set rules (near-duplicates among them)
        # do not apply, manual excludes do
        if settings.dedup_threshold is not None:
            settings = dataclasses.replace(settings, dedup_threshold=None)
        result, frame = filter_with_advantages(pool.scored, settings, cfg.advantage.eps,
                                               pool.overrides)
        result = dataclasses.replace(result, frame=frame)  # with the advantages
        d = cfg.dpo
        pairs = build_pairs(frame, d.pairs, d.margin, d.max_pairs)
        images, _ = pair_images(pairs, frame)
        ids = pairs[["win_id", "lose_id"]].to_numpy().astype(int).tolist()
        return Selection(self.name, images, selection_record(
            settings, cfg, method=self.name, dpo=dataclasses.asdict(d), n_pairs=len(ids),
            pairs=ids), pairs=pairs, result=result)

    def train(self, cfg, selection, out_dir, *, resume=False, pipe=None, meta=None,
              callbacks=None, hooks=None):
        from craft.methods.training import train

        return train(cfg, selection.rows, out_dir, resume=resume, pipe=pipe, meta=meta,
                     callbacks=callbacks, pairs=pair_index(selection.rows, selection.pair_ids))

    def micro_loss(self, cfg, data):
        if data.pairs is None or len(data.pairs) == 0:
            raise CraftError("train.method=dpo needs winner / loser pairs (craft.methods.dpo."
                             "build_pairs); none were given")
        tc, beta = cfg.train, cfg.dpo.beta

        def loss(tr, ses, step, micro):
            acc = ses.accelerator
            return dpo_micro_batch_loss(tr.model, ses.noise_sched, ses.w_t, data, tc, beta, step,
                                        micro, acc.process_index, acc, tr.base)

        return loss

    def needs_base(self, cfg) -> bool:
        return True  # the reference of the loss

    def plan_shape(self, cfg, processes, pool, family) -> PlanShape:
        t, d = cfg.train, cfg.dpo
        n_data = 2 * (d.max_pairs or cfg.filter.top_k)
        return PlanShape(2 * t.micro_batch,
                         max(1, t.effective_batch // (t.micro_batch * processes)), True,
                         min(n_data, pool) if pool is not None else n_data)

    def plan_samples(self, cfg, family=None):
        t = cfg.train
        return 2 * t.steps * t.effective_batch, "pair image", [
            f"Diffusion-DPO: {t.micro_batch} pairs a micro-batch = {2 * t.micro_batch} images "
            "through the tuned model and the frozen reference"]

    def describe(self, record: dict) -> str:
        d = record.get("dpo", {})
        return (f"DPO: {record.get('n_pairs')} pairs ({d.get('pairs')}, β {d.get('beta'):g}, "
                f"margin {d.get('margin'):g})")

    def will_train_on(self, selection, cfg) -> str:
        t, pairs = cfg.train, selection.pairs
        return (f"**Start will train on {len(pairs)} pairs** of {len(selection.rows)} images "
                f"from {pairs['prompt_id'].nunique()} prompts ({cfg.dpo.pairs}, composite gap "
                f"> {cfg.dpo.margin:g}, β {cfg.dpo.beta:g}); {t.steps} steps × "
                f"{t.effective_batch} pairs" + (
                    ". Early rejection (generation.early_reject) stops the groups' worst "
                    "candidates, so the losers are the worst *finished* ones: for DPO's own "
                    "pool generate with it off (configs/toy-dpo.yaml)"
                    if cfg.generation.early_reject else ""))

    def card_lines(self, config: dict, record: dict, extra: dict) -> list[str]:
        d = config.get("dpo", {})
        n_pairs = extra.get("n_pairs", record.get("n_pairs"))
        return [f"- **Trained on:** {n_pairs} winner/loser pairs ({record.get('n_train')} "
                f"images) from the model's own candidates, rule `{d.get('pairs')}`, beta "
                f"{d.get('beta')}"]


DPO = DiffusionDPO()


__all__ = ["DPO", "DiffusionDPO", "PAIR_COLUMNS", "build_pairs", "dpo_loss", "pair_images", "pair_index"]
