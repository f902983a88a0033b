"""Training recipes: the shipped configs that run a baseline as its authors run it
(configs/toy-grpo.yaml, toy-dpo.yaml and the flow base's), offered to a run of the same model.

A recipe is what its config sets in the training sections (train, grpo, dpo) that differs from
the run's settings; applying it sets those fields and nothing else, so a run's prompts, pool,
rewards and filter stay as they are (a recipe changes how to train, not what on). The Train tab
and `craft train --config configs/toy-grpo.yaml` read the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from craft.run.config import PROJECT_ROOT, config_to_dict, load_config

RECIPE_SECTIONS = ("train", "grpo", "dpo")
RECIPES_DIR = PROJECT_ROOT / "configs"


def recipes_for(cfg, root: Path = RECIPES_DIR) -> dict[str, Path]:
    """Label ("grpo: configs/toy-grpo.yaml") -> config path of the shipped recipes for
    ``cfg``'s model: the configs in ``root`` of the same ``model.pretrained`` (CRAFT's own
    among them, to go back to it)."""
    out: dict[str, Path] = {}
    for path in sorted(root.glob("*.yaml")):
        try:
            other = load_config(path)
        except Exception:  # noqa: BLE001 - a broken file is not a recipe; `craft check` says why
            continue
        if other.model.pretrained == cfg.model.pretrained:
            shown = path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path
            out[f"{other.train.method}: {shown}"] = path
    return out


def recipe_changes(path: str | Path, cfg) -> dict[str, Any]:
    """``section.field`` -> value for every field of the training sections the recipe at
    ``path`` sets differently from ``cfg``."""
    want, have = config_to_dict(load_config(path)), config_to_dict(cfg)
    return {f"{section}.{name}": value
            for section in RECIPE_SECTIONS for name, value in want[section].items()
            if have[section].get(name) != value}


__all__ = ["RECIPES_DIR", "RECIPE_SECTIONS", "recipe_changes", "recipes_for"]
