"""What a training method is: one small type that every layer asks, instead of each layer
comparing ``train.method`` with a name and deciding again.

A method says

- what it trains on, from the run's pool (:meth:`Method.select`: the kept set with its
  weights, pairs of images, or prompts to sample from);
- its loss or step (:meth:`Method.train`, built from the step helpers in
  craft/methods/steps.py and the loop in craft/methods/training.py);
- what it needs resident on the device and how many items a step pushes through the model
  (:meth:`Method.plan_shape`, read by craft/planning);
- how it describes itself: to the model card, the studio's Train tab and the trackers
  (:attr:`Method.title`, :meth:`Method.describe`, :meth:`Method.card_lines`).

Methods are chosen by name from craft/methods/registry.py. A new method is one module in this
package and one line in the registry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pandas as pd


@dataclasses.dataclass
class Selection:
    """What a method trains on, chosen from a pool with given filter settings.

    ``rows`` are the training rows: kept candidates (candidate_id, image_path, prompt, composite,
    advantage, weight, ...); for pairs, every image that appears in a pair; for an online
    method, the prompts it samples from (prompt_id, prompt). ``pairs`` holds one row per pair
    (craft.methods.dpo.PAIR_COLUMNS) for pair methods. ``record`` is what a saved selection and
    a training run record about how it was made. ``result`` is the filter's whole answer
    (craft.stages.filtering.FilterResult: every candidate with its levels, composite and
    advantage, and the counts) where the method filters, so a face shows the same computation
    the training run used."""

    method: str
    rows: pd.DataFrame
    record: dict
    pairs: pd.DataFrame | None = None
    result: Any = None

    @property
    def pair_ids(self) -> list | None:
        """[winner id, loser id] per pair (pair methods), else None."""
        if self.pairs is None:
            return None
        return self.pairs[["win_id", "lose_id"]].to_numpy().astype(int).tolist()


@dataclasses.dataclass(frozen=True)
class PlanShape:
    """What one training step of a method holds on the device (craft/planning/simulate.py).

    micro: images through the denoiser per micro-batch; accumulation: micro-batches per
    optimizer step on one process; anchor: a frozen copy of the base is resident (its
    predictions are part of the loss); n_data: encoded items kept resident (latents + text)."""

    micro: int
    accumulation: int
    anchor: bool
    n_data: int


class Method:
    """A training method. Subclasses set the class attributes and implement :meth:`select`
    and :meth:`train`; the other members have defaults that suit an offline method trained on
    images of the pool."""

    name: ClassVar[str]
    title: ClassVar[str]  # one line for the model card and the Train tab
    # what a training row is: "kept" (kept images), "pairs" (images in winner/loser pairs) or
    # "prompts" (an online method samples its own images from the prompts)
    data: ClassVar[str] = "kept"
    # trains on the filtered pool, so online rounds (train.rounds) and the anchor apply
    filtered_pool: ClassVar[bool] = True
    # the config section of its own settings (shown for it alone in the Train tab), if any
    settings_section: ClassVar[str | None] = None

    @property
    def data_label(self) -> str:
        """What it trains on, in words ("a kept set", "pairs", "prompts")."""
        return {"kept": "a kept set", "pairs": "pairs", "prompts": "prompts"}[self.data]

    @property
    def online(self) -> bool:
        """Samples and scores its own images while it trains (needs no candidate pool)."""
        return self.data == "prompts"

    # ---------------------------------------------------------------- what it trains on

    def weighting(self, cfg) -> str:
        """How kept images are weighted (an advantage.mode; "uniform" is weight 1 each)."""
        return cfg.advantage.mode

    def select(self, pool, settings, cfg) -> Selection:
        """The training rows from ``pool`` (craft.stages.selection.Pool) under ``settings``
        (craft.stages.filtering.FilterSettings)."""
        raise NotImplementedError

    def online_rewards(self, cfg) -> tuple[str, ...]:
        """The rewards it scores with while it trains (loaded before training starts)."""
        return tuple(cfg.rewards.names) if self.online else ()

    # ---------------------------------------------------------------- its loss or step

    def train(self, cfg, selection: Selection, out_dir, *, resume: bool = False, pipe=None,
              meta: dict | None = None, callbacks=None, hooks: dict | None = None):
        """Train ``cfg.model`` on ``selection.rows`` into ``out_dir`` and return a
        craft.methods.training.TrainResult. ``hooks`` carries method-specific callbacks from
        the stage (e.g. GRPO's on_round)."""
        raise NotImplementedError

    def micro_loss(self, cfg, data):
        """A method trained by craft/methods/training.py's loop: the function
        ``(trainable, session, step, micro) -> (loss, metrics)`` of one micro-batch of
        ``data`` (the encoded training rows)."""
        raise NotImplementedError(f"method {self.name} runs its own loop")

    def needs_base(self, cfg) -> bool:
        """Whether the loss compares with the frozen base (kept on the device)."""
        return cfg.train.anchor_weight > 0

    # ---------------------------------------------------------------- for the plan

    def plan_shape(self, cfg, processes: int, pool: int | None, family: str | None) -> PlanShape:
        """The step's shape (see :class:`PlanShape`) for the plan's memory simulation."""
        t = cfg.train
        return PlanShape(t.micro_batch, max(1, t.effective_batch // (t.micro_batch * processes)),
                         t.anchor_weight > 0, cfg.filter.top_k)

    def plan_samples(self, cfg, family: str | None = None) -> tuple[int, str, list[str]]:
        """(units a whole run pushes through the model, their name, notes) for the plan's
        time estimate."""
        t = cfg.train
        return t.steps * t.effective_batch, "sample", []

    data_stage: ClassVar[str | None] = "training: encode the kept set"  # the plan's stage

    def step_work(self, cfg) -> float:
        """A step's work in units its time scales with (the Train tab's estimate scales an
        earlier run's step time by it): images per optimizer step."""
        return float(cfg.train.effective_batch)

    # ---------------------------------------------------------------- how it describes itself

    def describe(self, record: dict) -> str:
        """A training run's selection in one line (the Train tab's runs table), from what the
        run recorded (``record``: Selection.record plus the run's facts)."""
        raise NotImplementedError

    def will_train_on(self, selection: Selection, cfg) -> str:
        """What Start would train on, said before it starts (the Train tab)."""
        raise NotImplementedError

    def card_lines(self, config: dict, record: dict, extra: dict) -> list[str]:
        """The model card's "Trained on" lines, from the run's saved config (as a dict), its
        record (craft.methods.training.run_meta) and what it measured (``extra``)."""
        raise NotImplementedError

    def tracker_facts(self, cfg) -> dict[str, Any]:
        """The hyperparameters a tracker run records besides the config."""
        return {"method": self.name}

    def __repr__(self) -> str:
        return f"<method {self.name}>"


__all__ = ["Method", "PlanShape", "Selection"]
