"""Model cards (craft/stages/model_card.py): the Hub's metadata from the training record, the training
facts per method, and a card that waits for its evaluation. The card of a real `craft run`,
parsed back against the evaluation record, is checked in tests/test_cli_stages.py."""

from __future__ import annotations

import json

import pandas as pd

from craft.stages.evaluation import EvalResult
from craft.stages.model_card import card_text, metadata, read_card, write_card


def _record(base="stabilityai/stable-diffusion-xl-base-1.0", family="sdxl", **extra) -> dict:
    return {"base": base, "lora": False, "lora_rank": None, "method": "craft", "n_train": 100,
            "run_name": "craft", "steps": 200, **extra,
            "config": {"model": {"family": family, "pretrained": base},
                       "train": {"effective_batch": 128, "micro_batch": 4, "lr": 5e-5,
                                 "ema_decay": 0.99, "seed": 0},
                       "filter": {"level": "hpa", "top_k": 100,
                                  "weights": {"hpsv2": 0.4, "pickscore": 0.4, "aes": 0.2}},
                       "rewards": {"names": ["hpsv2", "pickscore", "aes"]},
                       "dpo": {"pairs": "best_worst", "beta": 5000}}}


def test_metadata_names_the_base_its_license_and_the_method():
    meta = metadata(_record())
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert meta["license"] == "openrail++" and meta["library_name"] == "diffusers"
    assert {"text-to-image", "stable-diffusion-xl", "method-craft"} <= set(meta["tags"])
    flux = metadata(_record("black-forest-labs/FLUX.1-dev", "flux", lora=True, lora_rank=32))
    assert flux["license"] == "other" and flux["license_name"].startswith("flux-1-dev")
    assert "lora" in flux["tags"]
    local = metadata(_record("/models/my-sd15", "sd15"))
    assert "base_model" not in local and "license" not in local


def test_each_method_says_what_it_trained_on():
    dpo = card_text(_record(method="dpo", n_train=180), "dpo-1", extra={"n_pairs": 90})
    assert "90 winner/loser pairs (180 images)" in dpo and "beta 5000" in dpo
    craft = card_text(_record(), "craft-1",
                      extra={"coverage": {"prompts": 40, "largest": 6}})
    assert "100 kept images" in craft and "from 40 prompts, at most 6 from one" in craft
    assert "hpsv2 (weight 0.4)" in craft and "200 steps x batch 128" in craft
    assert "Not evaluated yet" in craft


def test_a_written_card_reads_back_with_its_evaluation(tmp_path):
    (tmp_path / "craft_train.json").write_text(json.dumps(_record()))
    summary = pd.DataFrame([
        {"model": "base", "reward": "hpsv2", "n": 10, "mean": 0.25, "se": 0.01, "diff": None,
         "diff_se": None, "win_rate": None},
        {"model": "craft-1", "reward": "hpsv2", "n": 10, "mean": 0.27, "se": 0.01,
         "diff": 0.02, "diff_se": 0.005, "win_rate": 0.8}])
    ev = EvalResult("eval", ["base", "craft-1"], pd.DataFrame(), summary, None,
                    warnings=["craft-1: diversity fell", "other: not mine"])
    meta, body = read_card(write_card(tmp_path, "craft-1", ev))
    [row] = meta["craft_evaluation"]["rows"]
    assert row["reward"] == "hpsv2" and row["diff"] == 0.02 and row["win_rate"] == 0.8
    assert row["ci95"][0] < 0.02 < row["ci95"][1]
    assert meta["craft_evaluation"]["warnings"] == ["craft-1: diversity fell"]
    assert "| hpsv2 | 0.2500 | 0.2700 | +0.0200 [+0.0102, +0.0298] | 80.0 |" in body
    assert write_card(tmp_path / "nothing-here") is None  # no training record: left alone
