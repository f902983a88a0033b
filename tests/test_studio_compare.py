"""Compare's small parts without a browser: the evaluation list names every model of an
evaluation, and the mean chart gives the base its grey and each tuned model its own colour."""

from __future__ import annotations

import json
import types

import pandas as pd


def test_an_evaluation_of_several_models_is_listed_with_all_of_them():
    from studio.tabs.compare import evaluation_choices

    ev = pd.DataFrame({"id": [1, 2], "tuned_model": [
        "/runs/r/train/craft/final",
        json.dumps({"craft": "/r/train/craft/final", "dpo": "/r/train/dpo/final",
                    "grpo": "/r/train/grpo/final", "sft": "/r/train/sft/final"})]})
    ctx = types.SimpleNamespace(store=types.SimpleNamespace(evaluations_df=lambda: ev))
    assert evaluation_choices(ctx) == [("#2 craft, dpo, grpo, sft", 2), ("#1 craft/final", 1)]


def test_the_base_and_each_tuned_model_have_their_own_colours():
    from studio.plots import COLORS, mean_reward_bars

    summary = pd.DataFrame({"model": ["craft", "base", "dpo", "grpo", "sft"] * 2,
                            "reward": ["a"] * 5 + ["b"] * 5, "mean": range(10),
                            "se": [0.1] * 10})
    fig = mean_reward_bars(summary)
    colors = {bar.name: bar.marker.color for bar in fig.data}
    assert colors["base"] == COLORS["base"] and fig.data[0].name == "base"
    assert len(set(colors.values())) == 5
