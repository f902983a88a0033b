"""The reward registry and protocol: names, errors that teach, batching, toy rewards, and the
offline availability checks (fast, no model code imported)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import craft
from craft.rewards import (FunctionReward, MissingWeightsError, Reward,
                           RewardError, UnknownRewardError, available_rewards, check_available,
                           load_reward, register_reward)
from craft.rewards import base as reward_base
from craft.toyworld.plugin import TOY_REWARD_NAMES

REAL = ["hpsv2", "hpsv21", "pickscore", "aes", "imagereward"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """No reward weights anywhere: an empty HF cache and empty package caches."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "hps"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def toy_batch(n: int = 6):
    from craft.toyworld.grammar import all_plain_prompts, parse_caption, sample_scene
    from craft.toyworld.render import render

    rng = random.Random(0)
    prompts = all_plain_prompts()[:n]
    images = []
    for p in prompts:
        c = parse_caption(p)
        images.append(render(sample_scene(rng, c["colour"], c["shape"], c["background"])))
    return images, prompts


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------

def test_every_name_is_registered():
    assert set(available_rewards()) == set(TOY_REWARD_NAMES) | set(REAL)
    assert available_rewards() == sorted(available_rewards())


def test_toy_names_match_the_toy_world():
    from craft.toyworld.rewards import TOY_REWARDS

    assert set(TOY_REWARD_NAMES) == set(TOY_REWARDS)


@pytest.mark.parametrize("call", [lambda: load_reward("hps"), lambda: check_available("hps"),
                                  lambda: load_reward(None)])
def test_unknown_name_lists_the_known_ones(call):
    with pytest.raises(ValueError) as err:
        call()
    assert isinstance(err.value, UnknownRewardError) and isinstance(err.value, craft.CraftError)
    for name in available_rewards():
        assert name in str(err.value)


def test_mps_explains_why_it_is_not_provided():
    with pytest.raises(UnknownRewardError, match="unpickling"):
        load_reward("mps")


def test_config_defaults_name_registered_rewards():
    from craft.run.config import RewardsConfig

    cfg = RewardsConfig()
    assert set(cfg.names) | set(cfg.eval_names) <= set(available_rewards())


# --------------------------------------------------------------------------------------------
# protocol and batching
# --------------------------------------------------------------------------------------------

class Recorder(Reward):
    name = "recorder"

    def __init__(self, batch_size):
        super().__init__(batch_size=batch_size)
        self.batches = []

    def _score_batch(self, images, prompts):
        self.batches.append(len(images))
        return [len(p) + im for im, p in zip(images, prompts)]


@pytest.mark.parametrize("n, batch_size, expected", [
    (0, 4, []), (3, 4, [3]), (4, 4, [4]), (9, 4, [4, 4, 1]), (5, 1, [1] * 5)])
def test_scores_in_batches_of_batch_size(n, batch_size, expected):
    r = Recorder(batch_size)
    out = r(list(range(n)), ["ab"] * n)
    assert r.batches == expected
    assert out.dtype == np.float64 and out.shape == (n,)
    np.testing.assert_array_equal(out, np.arange(n) + 2.0)


@pytest.mark.parametrize("images, prompts, match", [
    ([1, 2], ["a"], "2 images but 1 prompts"),
    ([1], "a prompt", "single string"),
    ([1], None, "one prompt per image"),
    ("img.png", ["a"], "list of PIL images"),
])
def test_bad_inputs_are_named(images, prompts, match):
    with pytest.raises(RewardError, match=match):
        Recorder(2).score(images, prompts)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_batch_size_must_be_a_positive_int(bad):
    with pytest.raises(RewardError, match="batch_size"):
        load_reward("toy_fidelity", batch_size=bad)


def test_register_a_custom_reward():
    @register_reward("test_constant", description="always 1")
    def factory(*, device, dtype, batch_size, path, value=1.0):
        return FunctionReward("test_constant", lambda ims, ps: [value] * len(ims),
                              batch_size=batch_size)

    try:
        assert "test_constant" in available_rewards()
        r = load_reward("test_constant", value=3.0)
        np.testing.assert_array_equal(r(["x", "y"], ["a", "b"]), [3.0, 3.0])
        assert check_available("test_constant") == {}
    finally:
        reward_base._REGISTRY.pop("test_constant")


@pytest.mark.parametrize("value, expected", [
    (None, "float32"), ("fp16", "float16"), ("bfloat16", "bfloat16"), ("torch.float16", "float16"),
    ("half", "float16")])
def test_resolve_dtype(value, expected):
    import torch

    from craft.run.devices import resolve_dtype

    assert resolve_dtype(value) == getattr(torch, expected)


def test_resolve_dtype_rejects_unknown():
    from craft import CraftError
    from craft.run.devices import resolve_dtype

    with pytest.raises(CraftError, match="float32, float16, bfloat16"):
        resolve_dtype("int8", key="reward dtype")


def test_unique_prompts():
    assert reward_base.unique_prompts(["b", "a", "b", "c", "a"]) == (["b", "a", "c"],
                                                                     [0, 1, 0, 2, 1])


# --------------------------------------------------------------------------------------------
# toy rewards through the registry
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TOY_REWARD_NAMES)
def test_toy_reward_matches_the_toy_world(name):
    from craft.toyworld.rewards import TOY_REWARDS

    images, prompts = toy_batch(5)
    r = load_reward(name, batch_size=2)
    assert r.name == name and callable(r)
    got = r(images, prompts)
    np.testing.assert_allclose(got, TOY_REWARDS[name](images, prompts))
    np.testing.assert_array_equal(got, r.score(images, prompts))
    assert np.isfinite(got).all()


def test_toy_reward_nan_outside_the_grammar():
    images, prompts = toy_batch(2)
    out = load_reward("toy_fidelity")(images, [prompts[0], "a photo of a cat"])
    assert np.isfinite(out[0]) and np.isnan(out[1])


def test_toy_reward_rejects_a_weights_path():
    with pytest.raises(RewardError, match="rewards.paths.toy_fidelity"):
        load_reward("toy_fidelity", path="/tmp/x.pt")


# --------------------------------------------------------------------------------------------
# availability: missing weights teach, without loading anything
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, hub, file", [
    ("hpsv2", "xswu/HPSv2", "HPS_v2_compressed.pt"),
    ("hpsv21", "xswu/HPSv2", "HPS_v2.1_compressed.pt"),
    ("pickscore", "yuvalkirstain/PickScore_v1", None),
    ("aes", "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"),
])
@pytest.mark.parametrize("how", ["check", "load"])
def test_missing_weights_name_the_file_the_places_and_the_fix(name, hub, file, how, tmp_path):
    call = check_available if how == "check" else load_reward
    with pytest.raises(MissingWeightsError) as err:
        call(name)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, craft.CraftError)
    assert "\n" not in msg
    assert hub in msg and (file is None or file in msg)
    assert str(tmp_path / "hf") in msg  # where it looked
    assert f"hf download {hub}" in msg and "huggingface-cli download" in msg
    assert f"--set rewards.paths.{name}=" in msg


@pytest.mark.parametrize("name", ["hpsv21", "pickscore", "aes"])
def test_a_given_path_that_does_not_exist_is_reported(name, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingWeightsError, match=f"path={missing}"):
        check_available(name, path=missing)


def test_import_and_check_stay_light():
    """Importing the registry and checking availability import no torch / model code, so the
    CLI and the studio can list and check rewards in well under a second."""
    code = (
        "import sys, json, craft.rewards as r\n"
        "before = sorted(m for m in ('torch', 'open_clip', 'transformers', 'scipy') "
        "if m in sys.modules)\n"
        "try:\n    r.check_available('hpsv21')\nexcept r.MissingWeightsError:\n    pass\n"
        "after = sorted(m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules)\n"
        "print(json.dumps([before, after]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], []]


# --------------------------------------------------------------------------------------------
# torch rewards: prepare / forward split, prefetch
# --------------------------------------------------------------------------------------------

class Doubler(reward_base.TorchReward):
    """Records which thread prepared each batch; the forward doubles the prepared values."""

    name = "doubler"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.prepared_in = []

    def _prepare(self, images, prompts):
        import threading

        self.prepared_in.append(threading.current_thread().name)
        if "boom" in prompts:
            raise RuntimeError("bad image")
        return np.asarray(images, dtype=np.float64)

    def _forward(self, prepared):
        import torch

        assert torch.is_inference_mode_enabled()
        return prepared * 2


@pytest.mark.parametrize("prefetch", [False, True])
def test_prefetch_overlaps_preparation_without_changing_scores(prefetch):
    r = Doubler(batch_size=3, prefetch=prefetch)
    out = r(list(range(10)), ["p"] * 10)
    np.testing.assert_array_equal(out, np.arange(10) * 2.0)
    assert len(r.prepared_in) == 4
    assert all(("doubler-prep" in t) == prefetch for t in r.prepared_in)


def test_prefetch_defaults_on_for_accelerators_only():
    assert Doubler().prefetch is False  # cpu
    assert Doubler(device="cuda").prefetch is True  # no CUDA needed to construct
    assert Doubler(device="cuda", prefetch=False).prefetch is False


def test_an_error_while_preparing_a_prefetched_batch_surfaces():
    r = Doubler(batch_size=2, prefetch=True)
    with pytest.raises(RuntimeError, match="bad image"):
        r(list(range(6)), ["p", "p", "p", "p", "boom", "p"])


def test_a_near_miss_suggests_the_name():
    with pytest.raises(UnknownRewardError, match="did you mean 'pickscore'"):
        load_reward("pickscor")
