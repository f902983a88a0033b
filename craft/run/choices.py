"""The names the config offers as choices and the modules that act on them share.

Why a module of its own: the config validates these names (its ``Literal`` choices are these
tuples, and the studio's dropdowns are built from the config), the stages compute with them and
the store constrains its rows by them; defined in one of those, the others would import a heavy
module (torch, pandas, sqlite) or keep a copy that drifts. Nothing here imports anything but
the method registry's name table.
"""

from __future__ import annotations

from craft.methods.registry import BUILTIN_METHODS

# Reward roles the paper's levels compare: h = HPS-like, p = PickScore-like, a = aesthetic.
ROLES: tuple[str, ...] = ("h", "p", "a")
# Each CRF level and the roles a candidate must beat its group reference on (I_h, I_ha, I_hpa);
# "none" compares nothing (every scorable candidate passes); "custom" uses filter.require.
LEVEL_ROLES: dict[str, tuple[str, ...]] = {"none": (), "h": ("h",), "ha": ("h", "a"),
                                           "hpa": ("h", "p", "a")}
LEVELS: tuple[str, ...] = ("h", "ha", "hpa", "custom", "none")
NORMALIZATIONS: tuple[str, ...] = ("zscore", "rank", "minmax")
# A manual curation decision on one candidate; absent = automatic.
OVERRIDE_ACTIONS: tuple[str, ...] = ("include", "exclude")


# advantage.mode: how group advantages become loss weights (craft.stages.advantages)
ADVANTAGE_MODES: tuple[str, ...] = ("clamp", "raw", "softmax", "uniform")
# prompts.format (craft.stages.prompts)
PROMPT_FORMATS: tuple[str, ...] = ("auto", "txt", "csv", "tsv", "json", "jsonl", "parquet",
                                   "hpdv2", "parti", "pickapic")
# model.family: "auto" detects; "toy" is the UNet toy base (loads as sd15) (craft.models.loading)
MODEL_FAMILIES: tuple[str, ...] = ("auto", "sd15", "sdxl", "sd3", "flux", "toy")
# train.timestep_weighting: w(t) of the UNets' noise objective, w(sigma) of the flow objective
UNET_WEIGHTINGS: tuple[str, ...] = ("uniform", "elbo", "min_snr")
FLOW_WEIGHTINGS: tuple[str, ...] = ("uniform", "sigma_sqrt", "cosmap")
TIMESTEP_WEIGHTINGS: tuple[str, ...] = (*UNET_WEIGHTINGS, *FLOW_WEIGHTINGS[1:])
# train.timestep_sampling: the flow models' sigma density (craft.models.flow)
TIMESTEP_SAMPLING: tuple[str, ...] = ("logit_normal", "mode", "uniform")
# train.method: the registered training methods (craft/methods/registry.py: a name table that
# imports nothing above craft, so the config checks names against the registry itself)
TRAIN_METHODS: tuple[str, ...] = BUILTIN_METHODS
# grpo.reuse and grpo.step_selection: how a GRPO round feeds its updates (craft.methods.grpo)
GRPO_REUSE: tuple[str, ...] = ("split", "whole")
GRPO_STEP_SELECTION: tuple[str, ...] = ("first", "random")
# dpo.pairs: how winner / loser pairs are drawn from each original prompt's group (craft.methods.dpo)
PAIR_RULES: tuple[str, ...] = ("best_worst", "above_margin")
# train.report_to: the experiment trackers a training run logs to (craft.methods.trackers)
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb")


def parse_report_to(value: str) -> list[str]:
    """``train.report_to`` as a list of tracker names ("none" or "" -> none). The config's
    check (craft/run/config.py TrainConfig) refuses names that are not in TRACKERS."""
    return [v.strip() for v in str(value or "").split(",") if v.strip() and v.strip() != "none"]


# rewards.remote.NAME.encoding: how a served reward's images travel (craft/rewards/wire.py)
IMAGE_ENCODINGS: tuple[str, ...] = ("png", "raw")
# eval.diversity_encoder (craft.stages.diversity) and embed.encoder (craft.stages.embeddings)
DIVERSITY_ENCODERS: tuple[str, ...] = ("pixels", "dinov2", "clip", "none")
EMBED_ENCODERS: tuple[str, ...] = ("pixels", "clip")

__all__ = ["ADVANTAGE_MODES", "DIVERSITY_ENCODERS", "EMBED_ENCODERS", "FLOW_WEIGHTINGS",
           "GRPO_REUSE", "GRPO_STEP_SELECTION",
           "IMAGE_ENCODINGS", "LEVELS", "LEVEL_ROLES", "MODEL_FAMILIES", "NORMALIZATIONS", "OVERRIDE_ACTIONS",
           "PAIR_RULES", "PROMPT_FORMATS", "ROLES", "TIMESTEP_SAMPLING", "TIMESTEP_WEIGHTINGS",
           "TRACKERS", "TRAIN_METHODS", "UNET_WEIGHTINGS", "parse_report_to"]
