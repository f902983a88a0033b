"""Composite Reward Filtering: hand-computed tables first, then properties over random pools."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from craft.stages.filtering import (FilterError, FilterSettings, apply_filter, level_counts, normalize,
                             required_rewards)

NAN, INF = float("nan"), float("inf")
ROLES = {"h": "hps", "p": "pick", "a": "aes"}
WEIGHTS = {"hps": 0.4, "pick": 0.4, "aes": 0.2}


def make_settings(**changes) -> FilterSettings:
    values = dict(weights=WEIGHTS, roles=ROLES, level="hpa", top_k=None)
    values.update(changes)
    return FilterSettings(**values)


def frame(rows) -> pd.DataFrame:
    """rows: (candidate_id, prompt_id, variant_idx, hps, pick, aes)."""
    df = pd.DataFrame(rows, columns=["candidate_id", "prompt_id", "variant_idx", "hps", "pick",
                                     "aes"])
    df.insert(3, "seed", range(len(df)))
    return df


# Two groups whose pass sets can be read off the raw numbers: with margin 0, z-score and
# min-max are increasing affine maps, so "beats the reference" on the normalised scale is the
# same comparison on the raw scale. Reference (variant 0) means -- group 1: hps 2, pick 1, aes 6;
# group 2: hps 0, pick 0, aes 0.
TWO_GROUPS = frame([
    (1, 1, 0, 2.0, 1.0, 5.0),    # reference seed: ties hps with the reference -> passes nothing
    (2, 1, 0, 2.0, 1.0, 7.0),    # reference seed: ties hps too
    (3, 1, 1, 2.5, 2.0, 7.0),    # beats h, p, a -> I_hpa
    (4, 1, 1, 2.5, 0.5, 6.5),    # beats h, a    -> I_ha
    (5, 1, 2, 2.5, 3.0, 5.0),    # beats h, p    -> I_h only
    (6, 1, 2, 1.5, 3.0, 8.0),    # loses on h    -> none
    (7, 1, 3, 2.0, 3.0, 8.0),    # equal on h is not better -> none
    (10, 2, 0, 0.0, 0.0, 0.0),   # the group's only reference seed
    (11, 2, 1, 1.0, 1.0, 1.0),   # -> I_hpa
    (12, 2, 1, 1.0, -1.0, 1.0),  # -> I_ha
    (13, 2, 2, -1.0, 1.0, 1.0),  # -> none
    (14, 2, 2, NAN, 5.0, 5.0),   # unscorable: never passes, reported
])
SCORABLE_IDS = {1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13}


def kept_ids(result) -> set[int]:
    return set(result.kept["candidate_id"])


@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
@pytest.mark.parametrize("level, expected", [
    ("none", SCORABLE_IDS),
    ("h", {3, 4, 5, 11, 12}),
    ("ha", {3, 4, 11, 12}),
    ("hpa", {3, 11}),
])
def test_two_group_levels_by_hand(level, expected, normalization):
    result = apply_filter(TWO_GROUPS, make_settings(level=level, normalization=normalization))
    assert kept_ids(result) == expected
    assert set(result.frame.loc[result.frame["passes"], "candidate_id"]) == expected
    assert result.counts.passing[level] == len(expected)


def test_two_group_counts_and_references():
    result = apply_filter(TWO_GROUPS, make_settings(normalization="minmax"))
    c = result.counts
    assert (c.total, c.scorable, c.unscorable, c.unscorable_ids) == (12, 11, 1, (14,))
    assert c.passing == {"none": 11, "h": 5, "ha": 4, "hpa": 2}
    assert (c.groups, c.groups_without_reference, c.kept) == (2, (), 2)
    f = result.frame.set_index("candidate_id")
    # min-max over the scorable pool: aes spans [0, 8], so group 1's reference mean 6 -> 0.75.
    assert f.loc[3, "ref_aes"] == pytest.approx(0.75)
    assert f.loc[3, "norm_aes"] == pytest.approx(7 / 8)
    assert math.isnan(f.loc[14, "norm_pick"])  # an unscorable row is out of every statistic
    assert f.loc[3, "beats_pick"] and not f.loc[4, "beats_pick"]
    assert not f.loc[14, "scorable"] and not f.loc[14, "passes"]


def test_composite_is_weighted_sum_and_top_k_takes_the_best():
    s = make_settings(level="h", weights={"hps": 2, "pick": 2, "aes": 1}, top_k=2)
    assert s.normalized_weights == pytest.approx({"hps": 0.4, "pick": 0.4, "aes": 0.2})
    result = apply_filter(TWO_GROUPS, s)
    f = result.frame
    norm = normalize(TWO_GROUPS[TWO_GROUPS["hps"].notna()], ["hps", "pick", "aes"])
    expected = 0.4 * norm["hps"] + 0.4 * norm["pick"] + 0.2 * norm["aes"]
    np.testing.assert_allclose(f.loc[norm.index, "composite"], expected)
    passing = f[f["passes"]].sort_values("composite", ascending=False)
    assert list(result.kept["candidate_id"]) == list(passing["candidate_id"][:2])
    assert list(passing["rank"]) == list(range(1, 6))
    assert result.cutoff == pytest.approx(passing["composite"].iloc[1])
    assert f["rank"].isna().sum() == len(f) - 5


def test_ties_are_broken_by_candidate_id_whatever_the_row_order():
    df = frame([(1, 1, 0, 0.0, 0.0, 0.0), (9, 1, 1, 1.0, 1.0, 1.0), (4, 1, 1, 1.0, 1.0, 1.0),
                (6, 1, 1, 1.0, 1.0, 1.0)])
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        result = apply_filter(df.iloc[order], make_settings(top_k=2))
        assert list(result.kept["candidate_id"]) == [4, 6]


def test_group_without_reference_cannot_pass_but_level_none_keeps_it():
    df = pd.concat([TWO_GROUPS, frame([(20, 3, 1, 9.0, 9.0, 9.0), (21, 4, 0, NAN, 1, 1),
                                       (22, 4, 1, 9.0, 9.0, 9.0)])], ignore_index=True)
    result = apply_filter(df, make_settings(level="h"))
    assert result.counts.groups_without_reference == (3, 4)  # 4's only reference is unscorable
    assert not kept_ids(result) & {20, 21, 22}
    assert {20, 22} <= kept_ids(apply_filter(df, make_settings(level="none")))


def test_margin_is_in_normalised_units():
    df = frame([(1, 1, 0, 0.0, 0.0, 0.0), (2, 1, 1, 1.0, 1.0, 1.0), (3, 1, 1, 2.0, 2.0, 2.0)])
    # min-max: the reference is 0, candidates 0.5 and 1.0 on every reward.
    assert kept_ids(apply_filter(df, make_settings(normalization="minmax", margin=0.5))) == {3}
    assert kept_ids(apply_filter(df, make_settings(normalization="minmax", margin=0.4))) == {2, 3}


@pytest.mark.parametrize("include_reference, expected", [(True, {2, 3}), (False, {3})])
def test_reference_images_are_selectable_only_when_allowed(include_reference, expected):
    df = frame([(1, 1, 0, 0.0, 0.0, 0.0), (2, 1, 0, 2.0, 2.0, 2.0), (3, 1, 1, 3.0, 3.0, 3.0)])
    result = apply_filter(df, make_settings(include_reference=include_reference))
    assert kept_ids(result) == expected
    assert result.counts.passing["hpa"] == len(expected)


def test_overrides_apply_last_but_never_keep_the_unscorable():
    overrides = {3: "exclude", 6: "include", 14: "include", 99: "include"}
    result = apply_filter(TWO_GROUPS, make_settings(), overrides)
    assert kept_ids(result) == {6, 11}
    assert result.counts.overrides_applied == {3: "exclude", 6: "include"}
    assert set(result.counts.overrides_ignored) == {14, 99}
    f = result.frame.set_index("candidate_id")
    assert f.loc[6, "override"] == "include" and pd.isna(f.loc[7, "override"])
    assert result.cutoff == pytest.approx(min(f.loc[6, "composite"], f.loc[11, "composite"]))


def test_an_excluded_image_is_replaced_only_when_asked():
    """K = 1 of the passing candidates: excluding the kept one leaves nothing kept, unless
    replace_excluded gives its place to the next passing candidate."""
    top1 = apply_filter(TWO_GROUPS, make_settings(top_k=1))
    everyone = apply_filter(TWO_GROUPS, make_settings())
    assert len(kept_ids(top1)) == 1 and len(kept_ids(everyone)) >= 2
    (first,) = kept_ids(top1)
    plain = apply_filter(TWO_GROUPS, make_settings(top_k=1), {first: "exclude"})
    assert kept_ids(plain) == set()
    replaced = apply_filter(TWO_GROUPS, make_settings(top_k=1, replace_excluded=True),
                            {first: "exclude"})
    assert len(kept_ids(replaced)) == 1 and kept_ids(replaced) <= kept_ids(everyone) - {first}


def test_bad_override_action_is_an_error_that_names_the_choices():
    with pytest.raises(FilterError, match="include.*exclude"):
        apply_filter(TWO_GROUPS, make_settings(), {3: "keep"})


def test_refiltering_an_annotated_frame_gives_the_same_selection():
    first = apply_filter(TWO_GROUPS, make_settings(level="h", top_k=3))
    again = apply_filter(first.frame, make_settings(level="h", top_k=3))
    assert list(again.kept["candidate_id"]) == list(first.kept["candidate_id"])
    assert list(again.frame.columns) == list(first.frame.columns)


def test_level_counts_matches_each_level():
    counts = level_counts(TWO_GROUPS, make_settings(level="custom", require=("aes",)))
    assert counts == {"none": 11, "h": 5, "ha": 4, "hpa": 2}
    partial = level_counts(TWO_GROUPS, FilterSettings(weights=WEIGHTS, roles={"h": "hps"},
                                                      level="h"))
    assert partial == {"none": 11, "h": 5, "ha": None, "hpa": None}


@pytest.mark.parametrize("level, expected", [
    ("none", []), ("h", ["hps"]), ("ha", ["hps", "aes"]), ("hpa", ["hps", "pick", "aes"])])
def test_required_rewards_by_level(level, expected):
    assert required_rewards(make_settings(level=level)) == expected


def test_custom_level_requires_the_listed_rewards():
    s = make_settings(level="custom", require=("pick", "aes"))
    assert required_rewards(s) == ["pick", "aes"]
    assert kept_ids(apply_filter(TWO_GROUPS, s)) == {3, 6, 7, 11, 13}


@pytest.mark.parametrize("method, values, expected", [
    ("zscore", [1.0, 2.0, 3.0], [-math.sqrt(1.5), 0.0, math.sqrt(1.5)]),
    ("zscore", [1.0, INF, 3.0, NAN], [-1.0, NAN, 1.0, NAN]),
    ("minmax", [1.0, 2.0, 3.0, NAN], [0.0, 0.5, 1.0, NAN]),
    ("rank", [10.0, 20.0, 20.0, 30.0], [0.0, 0.5, 0.5, 1.0]),
    ("rank", [30.0, -INF, 10.0], [1.0, NAN, 0.0]),
    ("zscore", [0.1, 0.1, 0.1], [0.0, 0.0, 0.0]),
    ("minmax", [4.0, 4.0, NAN], [0.0, 0.0, NAN]),
    ("rank", [7.0, 7.0], [0.0, 0.0]),
    ("rank", [5.0], [0.0]),
    ("zscore", [NAN, NAN], [NAN, NAN]),
])
def test_normalize_table(method, values, expected):
    out = normalize(pd.DataFrame({"r": values}), ["r"], method)
    np.testing.assert_allclose(out["r"].to_numpy(), expected, equal_nan=True)


@pytest.mark.parametrize("changes, words", [
    (dict(weights={"hps": -0.1, "pick": 1.0, "aes": 1.0}),
     ["weights", "'hps'", "-0.1", "negative", ">= 0"]),
    (dict(weights={"hps": 0.0, "pick": 0.0, "aes": 0.0}), ["weights", "all be zero"]),
    (dict(rewards=("hps", "pick"), weights={"hps": 1, "pick": 1, "aes": 1}),
     ["weights", "['aes']", "not in rewards"]),
    (dict(rewards=("hps", "pick"), weights={"hps": 1}), ["has no weight", "['pick']"]),
    (dict(roles={"h": "hps"}), ["level", "'hpa'", "roles", "'p'", "custom"]),
    (dict(roles={**ROLES, "x": "hps"}), ["roles", "['x']"]),
    (dict(level="custom"), ["require", "custom"]),
    (dict(level="hp"), ["level", "'hp'", "one of"]),
    (dict(normalization="l2"), ["normalization", "'l2'", "zscore"]),
    (dict(top_k=0), ["top_k", "0", ">= 1", "None"]),
    (dict(margin=float("nan")), ["margin", "finite"]),
    (dict(rewards="hps"), ["rewards", "not one string"]),
])
def test_settings_errors_teach(changes, words):
    with pytest.raises(FilterError) as err:
        make_settings(**changes)
    for word in words:
        assert word in str(err.value)


def test_unknown_reward_column_lists_the_known_ones():
    s = make_settings(weights={"hps": 1, "pick": 1, "aesthetic": 1},
                      roles={"h": "hps", "p": "pick", "a": "aesthetic"})
    with pytest.raises(FilterError, match=r"\['aesthetic'\].*\['hps', 'pick', 'aes'\]"):
        apply_filter(TWO_GROUPS, s)


def test_duplicate_candidate_ids_are_rejected():
    with pytest.raises(FilterError, match="candidate_id.*unique"):
        apply_filter(pd.concat([TWO_GROUPS, TWO_GROUPS.iloc[:1]]), make_settings())


def test_settings_are_hashable_picklable_plain_data_and_default_to_equal_weights():
    caller_weights = {"hps": 1, "aes": 3}
    s = FilterSettings(rewards=("hps", "aes"), weights=caller_weights, roles={"h": "hps"},
                       level="h")
    caller_weights["hps"] = -5  # the settings hold their own copy
    assert s.weights == {"hps": 1.0, "aes": 3.0} and type(s.weights) is dict
    assert FilterSettings(rewards=("hps", "aes"), roles={"h": "hps"}, level="h").weights == {
        "hps": 1.0, "aes": 1.0}
    assert s.used_rewards == ("hps", "aes")
    assert pickle.loads(pickle.dumps(s)) == s and hash(dataclasses.replace(s)) == hash(s)
    assert json.loads(json.dumps(dataclasses.asdict(s)))["weights"] == {"hps": 1.0, "aes": 3.0}


def test_from_config_mirrors_the_filter_and_rewards_sections():
    cfg = SimpleNamespace(
        filter=SimpleNamespace(weights={"hps": 0.5, "aes": 0.5}, normalization="rank",
                               level="ha", require=(), margin=0.1, top_k=7,
                               include_reference=False, per_prompt_cap=None,
                               dedup_threshold=None, replace_excluded=True),
        rewards=SimpleNamespace(roles={"h": "hps", "a": "aes"}))
    s = FilterSettings.from_config(cfg, top_k=3)
    assert (s.rewards, s.level, s.normalization, s.margin, s.top_k, s.include_reference,
            s.replace_excluded) == (
        ("hps", "aes"), "ha", "rank", 0.1, 3, False, True)


# --------------------------------------------------------------------------------------------
# Properties over random pools (small groups, ties, missing references, NaN/inf sprinkled in).

REWARDS = ("hps", "pick", "aes")
values = st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]),
                   st.floats(-100, 100, allow_nan=False, allow_infinity=False))


@st.composite
def pools(draw):
    rows = []
    for prompt_id in range(draw(st.integers(1, 4))):
        n_ref, n_var = draw(st.integers(0, 3)), draw(st.integers(0, 5))
        for k in range(n_ref + n_var):
            variant = 0 if k < n_ref else 1 + k % 3
            rows.append([prompt_id, variant, *(draw(values) for _ in REWARDS)])
    if not rows:
        rows.append([0, 0, 0.0, 0.0, 0.0])
    df = pd.DataFrame(rows, columns=["prompt_id", "variant_idx", *REWARDS])
    df.insert(0, "candidate_id", draw(st.permutations(range(100, 100 + len(df)))))
    for _ in range(draw(st.integers(0, 2))):  # poison a few cells
        i, r = draw(st.integers(0, len(df) - 1)), draw(st.sampled_from(REWARDS))
        df.loc[i, r] = draw(st.sampled_from([NAN, INF, -INF]))
    return df


common = dict(normalization=st.sampled_from(["zscore", "rank", "minmax"]),
              margin=st.sampled_from([0.0, 0.05, -0.05]), include_reference=st.booleans())
fast = hyp_settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@fast
@given(df=pools(), **common)
def test_stricter_levels_keep_subsets(df, normalization, margin, include_reference):
    kept = {level: kept_ids(apply_filter(df, make_settings(
        level=level, normalization=normalization, margin=margin,
        include_reference=include_reference)))
        for level in ("none", "h", "ha", "hpa")}
    assert kept["hpa"] <= kept["ha"] <= kept["h"] <= kept["none"]


@fast
@given(df=pools(), k1=st.integers(1, 10), k2=st.integers(1, 10), **common)
def test_kept_set_grows_with_k(df, k1, k2, normalization, margin, include_reference):
    k1, k2 = sorted((k1, k2))
    s = make_settings(level="h", normalization=normalization, margin=margin,
                      include_reference=include_reference)
    small = apply_filter(df, dataclasses.replace(s, top_k=k1))
    large = apply_filter(df, dataclasses.replace(s, top_k=k2))
    assert kept_ids(small) <= kept_ids(large)
    assert small.counts.kept == min(k1, small.counts.passing["h"])


@fast
@given(df=pools(), level=st.sampled_from(["none", "h", "ha", "hpa"]), **common)
def test_nan_or_inf_never_passes_or_is_kept(df, level, normalization, margin, include_reference):
    bad = df.loc[~np.isfinite(df[list(REWARDS)]).all(axis=1), "candidate_id"]
    s = make_settings(level=level, normalization=normalization, margin=margin,
                      include_reference=include_reference)
    result = apply_filter(df, s, overrides={cid: "include" for cid in bad})
    f = result.frame
    assert not f.loc[f["candidate_id"].isin(bad), ["passes", "kept"]].to_numpy().any()
    assert set(result.counts.unscorable_ids) == set(bad)
    for col in ("composite", "norm_hps", "norm_pick", "norm_aes"):
        assert np.isfinite(f.loc[f["scorable"], col]).all()
    if result.cutoff is not None:
        assert math.isfinite(result.cutoff)


def test_an_empty_pool_gives_an_empty_selection_not_an_error():
    result = apply_filter(TWO_GROUPS.iloc[:0], make_settings(top_k=5))
    assert (result.counts.total, result.counts.kept, result.cutoff) == (0, 0, None)
    assert result.kept.empty and "composite" in result.kept.columns


def test_settings_from_a_validated_config_equal_checked_settings():
    """from_config trusts the config's own checks; the result equals settings built (and
    checked) field by field, and hashes alike (the studio caches by settings)."""
    import dataclasses

    from craft.run.config import load_config

    cfg = load_config(None, ["filter.level=ha", "filter.margin=0.1", "filter.top_k=7"])
    trusted = FilterSettings.from_config(cfg)
    checked = FilterSettings(**{f.name: getattr(trusted, f.name)
                                for f in dataclasses.fields(FilterSettings)})
    assert trusted == checked and hash(trusted) == hash(checked)
    assert FilterSettings.from_config(cfg, top_k=3).top_k == 3
    with pytest.raises(FilterError, match="top_k"):
        FilterSettings.from_config(cfg, top_k=0)  # a change from outside is checked


def test_per_prompt_cap_keeps_each_prompts_best_and_reports_coverage():
    """A cap of 1 keeps at most one candidate per original prompt (its best by R); top-K then
    counts among what the cap leaves; what the cap drops is marked and counted; a hand include
    beats the cap."""
    rng = np.random.default_rng(0)
    rows = [(100 * g + i, g, 0 if i < 2 else 1 + i % 3, *rng.normal(size=3))
            for g in range(1, 6) for i in range(12)]
    df = frame(rows)
    free = apply_filter(df, make_settings(level="none"))
    capped = apply_filter(df, make_settings(level="none", per_prompt_cap=2))
    assert free.counts.kept == 60 and free.counts.kept_prompts == 5
    assert free.counts.largest_kept == 12
    per_group = capped.kept.groupby("prompt_id").size()
    assert (per_group == 2).all() and len(per_group) == 5 and capped.counts.kept == 10
    assert capped.counts.capped == 50 and capped.frame["capped"].sum() == 50
    assert capped.counts.largest_kept == 2 and capped.counts.kept_prompts == 5
    for g, group in df.assign(R=free.frame["composite"]).groupby("prompt_id"):
        best = set(group.nlargest(2, "R")["candidate_id"])
        assert best == set(capped.kept.loc[capped.kept["prompt_id"] == g, "candidate_id"])
    top3 = apply_filter(df, make_settings(level="none", per_prompt_cap=2, top_k=3))
    assert top3.counts.kept == 3 and top3.kept["prompt_id"].value_counts().max() <= 2
    dropped = int(capped.frame.loc[capped.frame["capped"], "candidate_id"].iloc[0])
    forced = apply_filter(df, make_settings(level="none", per_prompt_cap=2), {dropped: "include"})
    assert dropped in set(forced.kept["candidate_id"]) and forced.counts.kept == 11
    with pytest.raises(FilterError, match="per_prompt_cap"):
        make_settings(per_prompt_cap=0)


def test_per_prompt_cap_from_the_config():
    from craft.run.config import ConfigError, load_config

    cfg = load_config(None, ["filter.per_prompt_cap=3"])
    assert FilterSettings.from_config(cfg).per_prompt_cap == 3
    with pytest.raises(ConfigError, match="filter.per_prompt_cap"):
        load_config(None, ["filter.per_prompt_cap=0"])
