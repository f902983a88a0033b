"""Group advantages and loss weights: hand-computed tables, then properties."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from craft.stages.advantages import (AdvantageError, group_advantages, select_for_training,
                              training_weights)
from craft.stages.filtering import FilterSettings

NAN = float("nan")


def groups(*members) -> pd.DataFrame:
    """members: (prompt_id, composite) pairs."""
    return pd.DataFrame(members, columns=["prompt_id", "composite"])


@pytest.mark.parametrize("members, expected", [
    # population std of (1, 3) is 1: A = -1, +1 (minus a hair for eps).
    ([(1, 1.0), (1, 3.0)], [-1.0, 1.0]),
    # (0, 0, 3): mean 1, std sqrt(2).
    ([(1, 0.0), (1, 0.0), (1, 3.0)], [-1 / math.sqrt(2), -1 / math.sqrt(2), 2 / math.sqrt(2)]),
    # zero variance and single members: exactly 0.
    ([(1, 0.1), (1, 0.1), (1, 0.1), (2, 5.0)], [0.0, 0.0, 0.0, 0.0]),
    # NaN/inf rows get NaN and do not move their group's statistics.
    ([(1, 1.0), (1, NAN), (1, 3.0), (1, float("inf"))], [-1.0, NAN, 1.0, NAN]),
    # groups are independent, whatever their order in the frame.
    ([(2, 10.0), (1, 1.0), (2, 20.0), (1, 3.0)], [-1.0, -1.0, 1.0, 1.0]),
])
def test_group_advantages_table(members, expected):
    adv = group_advantages(groups(*members))
    np.testing.assert_allclose(adv.to_numpy(), expected, rtol=1e-5, equal_nan=True)
    zero = [e == 0.0 for e in expected]
    assert (adv.to_numpy()[zero] == 0.0).all()  # exactly, not 1e-17


def test_group_advantages_errors_teach():
    with pytest.raises(AdvantageError, match="value_col = 'reward'.*apply_filter"):
        group_advantages(groups((1, 1.0)), value_col="reward")
    with pytest.raises(AdvantageError, match="eps = -1.*>= 0"):
        group_advantages(groups((1, 1.0)), eps=-1)


@pytest.mark.parametrize("mode, tau, advantages, expected", [
    ("clamp", 1.0, [-1.0, 1.0, 3.0], [0.0, 0.75, 2.25]),
    ("raw", 1.0, [-1.0, 1.0, 3.0], [-1.0, 1.0, 3.0]),
    ("softmax", 1.0, [0.0, 0.0], [1.0, 1.0]),
    ("softmax", 1.0, [0.0, math.log(3)], [0.5, 1.5]),
    ("softmax", 0.5, [0.0, math.log(3) / 2], [0.5, 1.5]),
    ("clamp", 1.0, [], []),
])
def test_training_weights_table(mode, tau, advantages, expected):
    np.testing.assert_allclose(training_weights(advantages, mode, tau), expected)


def test_clamp_with_no_positive_advantage_falls_back_to_uniform_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="craft.stages.advantages"):
        w = training_weights([-1.0, 0.0, -2.0])
    np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])
    assert "uniform" in caplog.text


@pytest.mark.parametrize("args, match", [
    (([1.0, NAN],), "non-finite.*positions \\[1\\]"),
    (([1.0], "mean"), "mode = 'mean'.*clamp"),
    (([1.0], "softmax", 0.0), "tau = 0.0.*> 0"),
])
def test_training_weights_errors_teach(args, match):
    with pytest.raises(AdvantageError, match=match):
        training_weights(*args)


def test_select_for_training_uses_whole_group_statistics():
    # One group, one reward. The reference (composite lowest) is in the group statistics even
    # though it is never kept; weights are renormalised over the kept rows only.
    df = pd.DataFrame({"candidate_id": [1, 2, 3, 4], "prompt_id": [7] * 4,
                       "variant_idx": [0, 1, 1, 1], "seed": [0] * 4,
                       "r": [0.0, 1.0, 2.0, 5.0]})
    s = FilterSettings(weights={"r": 1.0}, roles={"h": "r"}, level="h",
                       normalization="minmax", top_k=2)
    out = select_for_training(df, s)
    assert list(out["candidate_id"]) == [4, 3]
    # min-max composite: 0, .2, .4, 1 -> mean .4, population std .3742
    comp = np.array([0.0, 0.2, 0.4, 1.0])
    adv = (comp - comp.mean()) / (comp.std() + 1e-6)
    np.testing.assert_allclose(out["advantage"], [adv[3], adv[2]], atol=1e-12)
    np.testing.assert_allclose(out["weight"], [2.0, 0.0], atol=1e-12)  # A_3 = 0 clamps to 0
    assert out["weight"].mean() == pytest.approx(1.0)


def test_select_for_training_never_returns_unscorable_or_nan_weights():
    df = pd.DataFrame({"candidate_id": [1, 2, 3], "prompt_id": [1, 1, 1],
                       "variant_idx": [0, 1, 1], "seed": [0, 0, 0], "r": [0.0, NAN, 1.0]})
    out = select_for_training(df, FilterSettings(weights={"r": 1.0}, roles={"h": "r"},
                                                 level="h", top_k=None),
                              overrides={2: "include"})
    assert list(out["candidate_id"]) == [3]
    assert np.isfinite(out[["composite", "advantage", "weight"]].to_numpy()).all()


# --------------------------------------------------------------------------------------------
# Properties

fast = hyp_settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
composite = st.one_of(st.sampled_from([0.0, 1.0, -0.5]), st.floats(-1e3, 1e3))


@st.composite
def grouped(draw):
    members = draw(st.lists(st.tuples(st.integers(0, 4), composite), min_size=1, max_size=30))
    df = groups(*members)
    for _ in range(draw(st.integers(0, 2))):
        df.loc[draw(st.integers(0, len(df) - 1)), "composite"] = draw(
            st.sampled_from([NAN, float("inf")]))
    return df


@fast
@given(df=grouped())
def test_advantages_average_zero_and_constant_groups_are_exactly_zero(df):
    adv = group_advantages(df)
    finite = np.isfinite(df["composite"])
    assert adv[~finite].isna().all() and adv[finite].notna().all()
    for _, idx in df[finite].groupby("prompt_id").groups.items():
        a, values = adv[idx], df.loc[idx, "composite"]
        if values.nunique() == 1:
            assert (a == 0.0).all()
        else:
            assert abs(a.mean()) < 1e-6


@fast
@given(df=grouped())
def test_unscorable_rows_do_not_move_the_others(df):
    finite = np.isfinite(df["composite"])
    np.testing.assert_array_equal(group_advantages(df)[finite],
                                  group_advantages(df[finite]))


@fast
@given(adv=st.lists(st.floats(-50, 50), min_size=1, max_size=40),
       mode=st.sampled_from(["clamp", "softmax"]), tau=st.floats(0.01, 10))
def test_weights_are_finite_nonnegative_and_mean_one(adv, mode, tau):
    w = training_weights(adv, mode, tau)
    assert w.shape == (len(adv),)
    assert np.isfinite(w).all() and (w >= 0).all()
    assert w.mean() == pytest.approx(1.0, rel=1e-9)
