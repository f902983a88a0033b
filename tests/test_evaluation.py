"""Base vs tuned evaluation: shared seeds, every eval reward, paired statistics, grid, store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from craft import CraftError
from craft.stages.evaluation import evaluate, format_table, summarize
from craft.run.store import RunStore


def test_summarize_paired_difference_se_and_win_rate_with_ties():
    base = [1.0, 2.0, 3.0, 4.0, 5.0]
    diffs = [1.0, -1.0, 0.0, 2.0, np.nan]  # the NaN pair is unscorable: left out
    rows = []
    for i, (b, d) in enumerate(zip(base, diffs)):
        rows.append({"model": "base", "prompt": f"p{i % 2}", "seed": i, "r": b})
        rows.append({"model": "tuned", "prompt": f"p{i % 2}", "seed": i, "r": b + d})
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=3)  # pairing must not rely on order
    s = summarize(frame, ["base", "tuned"], ["r"]).set_index("model")
    assert s.loc["base", "n"] == 5 and s.loc["base", "mean"] == pytest.approx(3.0)
    assert s.loc["base", "se"] == pytest.approx(np.std(base, ddof=1) / np.sqrt(5))
    assert np.isnan(s.loc["base", "diff"]) and np.isnan(s.loc["base", "win_rate"])
    finite = np.array([1.0, -1.0, 0.0, 2.0])
    assert s.loc["tuned", "n"] == 4
    assert s.loc["tuned", "diff"] == pytest.approx(finite.mean())
    assert s.loc["tuned", "diff_se"] == pytest.approx(finite.std(ddof=1) / 2.0)
    assert s.loc["tuned", "win_rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_summarize_identical_models_tie_everywhere():
    frame = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "prompt": ["x", "y", "z"] * 2,
                          "seed": [1, 2, 3] * 2, "r": [0.1, 0.5, 0.2] * 2})
    s = summarize(frame, ["a", "b"], ["r"]).set_index("model")
    assert s.loc["b", "diff"] == 0 and s.loc["b", "diff_se"] == 0
    assert s.loc["b", "win_rate"] == 0.5
    table = format_table(summarize(frame, ["a", "b"], ["r"]))
    assert "b win%" in table and "50.0" in table and "+0.0000" in table


@pytest.fixture
def tuned_dir(tmp_path, tiny_model_dir):
    """A copy of the tiny pipeline with a perturbed UNet, saved in diffusers format."""
    from craft.models.loading import load_pipeline

    pipe = load_pipeline(tiny_model_dir, family="sd15", dtype="float32", device="cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path / "tuned"
    pipe.save_pretrained(out)
    return str(out)


def test_evaluate_writes_images_scores_summary_grid_and_store_row(tmp_path, tiny_model_dir,
                                                                  tuned_dir, tiny_pipe):
    from craft.stages.engine import prepare_prompts

    cfg = tiny_config(tiny_model_dir)  # 2 eval prompts x 2 seeds, 3 steps
    models = {"base": tiny_model_dir, "same": tiny_model_dir, "tuned": tuned_dir}
    with RunStore(tmp_path / "run") as store:
        prepare_prompts(store, cfg)
        progress = []
        result = evaluate(store, cfg, models, name="ev", pipes={"base": tiny_pipe},
                          progress=lambda d, t: progress.append((d, t)))
        evals = store.evaluations_df()
    out = tmp_path / "run" / "eval" / "ev"
    n = cfg.eval.num_prompts * cfg.eval.seeds_per_prompt
    assert progress[-1] == (3 * n, 3 * n)
    for label in models:
        assert sorted(p.name for p in (out / label).glob("*.png")) == \
            [f"{i:05d}.png" for i in range(n)]
    scores = result.scores
    assert len(scores) == 3 * n
    # Shared seeds: every model saw the same (prompt, seed) list.
    pairs = {m: list(zip(g["prompt"], g["seed"])) for m, g in scores.groupby("model")}
    assert pairs["base"] == pairs["same"] == pairs["tuned"]
    assert len(set(pairs["base"])) == n
    for r in cfg.rewards.eval_names:
        assert r in scores and scores[r].notna().all(), r
    assert abs(scores["composite"].mean()) < 1e-9  # one z-scale pooled over all models
    # Same model, same seeds: identical images and a tie on every reward.
    a = np.stack([np.asarray(Image.open(p)) for p in scores[scores.model == "base"].image_path])
    b = np.stack([np.asarray(Image.open(p)) for p in scores[scores.model == "same"].image_path])
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2

    s = result.summary
    assert set(s["reward"]) == {"composite", *cfg.rewards.eval_names, "diversity"}
    assert len(s) == 3 * (2 + len(cfg.rewards.eval_names))
    same = s[s.model == "same"].set_index("reward")
    div = same.loc["diversity"]
    same = same.drop("diversity")
    assert (same["win_rate"] == 0.5).all() and (same["diff"].abs() < 1e-6).all()
    # the same images (to within 2 pixel levels) are as diverse as the base's
    assert abs(div["diff"]) < 0.5 and div["n"] == len(set(scores.prompt))
    tuned = s[s.model == "tuned"].set_index("reward")
    base_scores = scores[scores.model == "base"].sort_values(["prompt", "seed"])
    tuned_scores = scores[scores.model == "tuned"].sort_values(["prompt", "seed"])
    for r in cfg.rewards.eval_names:
        d = tuned_scores[r].to_numpy() - base_scores[r].to_numpy()
        assert tuned.loc[r, "diff"] == pytest.approx(d.mean())
        assert tuned.loc[r, "win_rate"] == pytest.approx(((d > 0) + 0.5 * (d == 0)).mean())

    assert result.grid_path == out / "side_by_side.png" and result.grid_path.exists()
    with Image.open(result.grid_path) as grid:
        assert grid.size[0] > 300 and grid.size[1] > 20
    assert (out / "scores.csv").exists()
    assert len(evals) == 1 and result.evaluation_id == int(evals["id"].iloc[0])
    row = evals.iloc[0]
    assert row["name"] == "ev" and row["base_model"] == tiny_model_dir
    stored = json.loads(row["results_json"])
    assert len(stored["summary"]) == len(s)
    assert "tuned" in result.table() and "composite" in result.table()

    # A rerun reuses the images already written (no pipeline is loaded or called).
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("0*.png")}
    with RunStore(tmp_path / "run") as store:
        again = evaluate(store, cfg, models, name="ev",
                         pipes={k: _NoCalls() for k in models})
    assert {p: p.stat().st_mtime_ns for p in out.rglob("0*.png")} == mtimes
    pd.testing.assert_frame_equal(again.summary, result.summary)

    # Another model under the same label (retrained, or another path) is not shown the old
    # model's images: they are made again (here: the base under the label "tuned").
    with RunStore(tmp_path / "run") as store:
        other = evaluate(store, cfg, {"base": tiny_model_dir, "tuned": tiny_model_dir},
                         name="ev", reuse=False)
    assert all(p.stat().st_mtime_ns != mtimes[p] for p in (out / "tuned").glob("0*.png"))
    o = other.summary.set_index(["model", "reward"])
    assert abs(o.loc[("tuned", "composite"), "diff"]) < 1e-6  # the base against itself


class _NoCalls:
    def __getattr__(self, name):
        raise AssertionError(f"the pipeline was used ({name}) although every image exists")


def test_evaluate_needs_two_models_and_eval_prompts(tmp_path, tiny_model_dir):
    cfg = tiny_config(tiny_model_dir)
    with RunStore(tmp_path / "run") as store:
        with pytest.raises(CraftError, match="at least one model to compare"):
            evaluate(store, cfg, {"base": tiny_model_dir})
        with pytest.raises(CraftError, match="no evaluation prompts"):
            evaluate(store, cfg, {"base": tiny_model_dir, "tuned": tiny_model_dir})


def test_evaluate_fails_before_any_work_when_a_model_is_missing(tmp_path, tiny_model_dir,
                                                                tiny_pipe):
    from craft.models.loading import MissingWeightsError
    from craft.stages.engine import prepare_prompts

    cfg = tiny_config(tiny_model_dir)
    with RunStore(tmp_path / "run") as store:
        prepare_prompts(store, cfg)
        with pytest.raises(MissingWeightsError, match="model 'tuned'"):
            evaluate(store, cfg, {"base": tiny_model_dir, "tuned": str(tmp_path / "nope")},
                     pipes={"base": tiny_pipe})
    assert not list((tmp_path / "run").rglob("*.png"))  # not even the base images
