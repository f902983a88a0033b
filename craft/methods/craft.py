"""CRAFT: group-advantage-weighted fine-tuning on the kept set (DESIGN.md §1, stage 3).

It trains on the candidates Composite Reward Filtering keeps, each weighted by its group
advantage (craft/stages/advantages.py), with the weighted denoising loss of
craft/methods/steps.py; the loop is craft/methods/training.py's.
"""

from __future__ import annotations

import dataclasses

import pandas as pd

from craft.methods.base import Method, Selection
from craft.stages.advantages import filter_with_advantages, kept_with_weights
from craft.stages.filtering import coverage


class KeptSetMethod(Method):
    """A method that fine-tunes on the kept set, each image weighted by :meth:`weighting`."""

    data = "kept"
    filtered_pool = True

    def select(self, pool, settings, cfg) -> Selection:
        a = cfg.advantage
        emb = pool.embeddings() if settings.dedup_threshold is not None else None
        result, frame = filter_with_advantages(pool.scored, settings, a.eps, pool.overrides,
                                               emb)
        result = dataclasses.replace(result, frame=frame)  # with the advantages
        kept = kept_with_weights(frame, self.weighting(cfg), a.tau)
        from craft.stages.selection import selection_record

        hand = pd.Series(pool.overrides, dtype=object).value_counts().to_dict()
        return Selection(self.name, kept, selection_record(
            settings, cfg, method=self.name, weighting=self.weighting(cfg),
            coverage=coverage(kept), by_hand={k: int(v) for k, v in hand.items()}),
            result=result)

    def train(self, cfg, selection, out_dir, *, resume=False, pipe=None, meta=None,
              callbacks=None, hooks=None):
        from craft.methods.training import train

        return train(cfg, selection.rows, out_dir, resume=resume, pipe=pipe, meta=meta,
                     callbacks=callbacks)

    def micro_loss(self, cfg, data):
        from craft.methods.steps import weighted_loss

        tc = cfg.train

        def loss(tr, ses, step, micro):
            acc = ses.accelerator
            return weighted_loss(tr.model, ses.noise_sched, ses.w_t, data, tc, step, micro,
                                 acc.process_index, acc, tr.base), {}

        return loss

    def weight_words(self, cfg) -> str:
        return f"each weighted by its advantage ({self.weighting(cfg)})"

    def describe(self, record: dict) -> str:
        from craft.stages.filtering import short_reward_name

        weights = record.get("weights") or {}
        w = ", ".join(f"{short_reward_name(k)} {v:g}" for k, v in weights.items())
        cap = f", cap {record['per_prompt_cap']}" if record.get("per_prompt_cap") else ""
        if record.get("margin"):
            cap += f", margin {record['margin']:g}"
        if record.get("dedup_threshold") is not None:
            cap += f", no near-duplicates ≥ {record['dedup_threshold']:g}"
        hand = record.get("by_hand") or {}
        cap += "".join(f", {n} {what}d by hand" for what, n in sorted(hand.items()) if n)
        return (f"{self.prefix}{record.get('level', '?')}, K {record.get('top_k')}{cap}, "
                f"{record.get('normalization', '')} ({w})")

    prefix = ""

    def will_train_on(self, selection: Selection, cfg) -> str:
        from craft.methods.training import weighted_epochs

        f, t, kept = cfg.filter, cfg.train, selection.rows
        cov = coverage(kept)
        return (f"**Start will train on {len(kept)} images** from {cov['prompts']} prompts: "
                f"the kept set of Curate's current settings (level {f.level}, K {f.top_k}"
                + (f", at most {f.per_prompt_cap} per prompt" if f.per_prompt_cap else "")
                + (f", near-duplicates ≥ {f.dedup_threshold:g} dropped"
                   if f.dedup_threshold is not None else "")
                + f"), {self.weight_words(cfg)}; {t.steps} steps × {t.effective_batch} samples "
                  f"≈ {weighted_epochs(len(kept), t.steps, t.effective_batch):.0f} passes over "
                  f"it")

    def card_lines(self, config: dict, record: dict, extra: dict) -> list[str]:
        f = config.get("filter", {})
        cov = extra.get("coverage") or {}
        return [f"- **Trained on:** {record.get('n_train')} kept images of the model's own "
                f"candidates (Composite Reward Filtering, level `{f.get('level')}`, "
                f"top_k {f.get('top_k')})"
                + (f" from {cov['prompts']} prompts, at most {cov['largest']} from one"
                   if cov.get("prompts") else "")]


class Craft(KeptSetMethod):
    name = "craft"
    title = "CRAFT (advantage-weighted fine-tuning on the kept set)"


CRAFT = Craft()

__all__ = ["CRAFT", "Craft", "KeptSetMethod"]
