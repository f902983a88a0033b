"""What alignment costs and its controls, on inputs whose answer is known: the diversity metric
(pixels, a tiny DINOv2), drift warnings, the toy precision reward, the near-duplicate rule, the
uniform (plain SFT) weights and the anchor regulariser (weight 0 = the plain loss exactly)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from craft import MissingWeightsError

from craft.stages import diversity
from craft.stages.advantages import select_for_training, training_weights
from craft.run.config import load_config
from craft.stages.evaluation import drift_warnings
from craft.stages.filtering import FilterError, FilterSettings, apply_filter, coverage
from test_training import images  # noqa: F401  (a fixture: six small training images)

# ------------------------------------------------------------------------ diversity


def solid(rgb, size=8) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def test_identical_images_have_zero_diversity_and_known_distances_are_exact():
    embed, metric = diversity.make_embedder(load_config(None))
    assert metric == "rms"
    same = embed([solid((10, 20, 30))] * 4)
    assert diversity.mean_pairwise_distance(same, metric) == 0.0
    # black, black, white: pairs (0, 255, 255) -> mean 170 in 0-255 RMS units
    v = embed([solid((0, 0, 0)), solid((0, 0, 0)), solid((255, 255, 255))])
    assert diversity.mean_pairwise_distance(v, "rms") == pytest.approx(170.0)
    # cosine: identical rows 0, orthogonal rows 1
    e = np.eye(3)
    assert diversity.mean_pairwise_distance(np.stack([e[0]] * 3), "cosine") == 0.0
    assert diversity.mean_pairwise_distance(e, "cosine") == pytest.approx(1.0)
    assert np.isnan(diversity.mean_pairwise_distance(e[:1], "cosine"))  # no pair


def test_diversity_summary_is_paired_per_prompt():
    rows = []
    for model, spread in (("base", (0, 200)), ("tuned", (0, 100))):
        for p in ("a", "b", "c"):
            for s, level in enumerate(spread):
                rows.append({"model": model, "prompt": p, "seed": s, "v": level})
    frame = pd.DataFrame(rows)
    vectors = np.repeat(frame[["v"]].to_numpy(float), 12, axis=1)
    div = diversity.per_prompt(frame, vectors, "rms")
    assert div.set_index(["model", "prompt"])["diversity"].to_dict() == {
        ("base", "a"): 200.0, ("base", "b"): 200.0, ("base", "c"): 200.0,
        ("tuned", "a"): 100.0, ("tuned", "b"): 100.0, ("tuned", "c"): 100.0}
    rows = {r["model"]: r for r in diversity.summarize(div, ["base", "tuned"])}
    assert rows["tuned"]["diff"] == -100.0 and rows["tuned"]["win_rate"] == 0.0
    assert rows["base"]["n"] == 3 and rows["base"]["mean"] == 200.0


def _tiny_dinov2(folder):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, image_size=28, patch_size=14)
                ).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}
                      ).save_pretrained(folder)


def test_dinov2_diversity_from_a_tiny_model_and_the_offline_error(tmp_path):
    _tiny_dinov2(tmp_path / "dino")
    cfg = load_config(None, ["eval.diversity_encoder=dinov2",
                             f"eval.diversity_model={tmp_path / 'dino'}"])
    diversity.check_encoder(cfg)
    embed, metric = diversity.make_embedder(cfg)
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
             for _ in range(3)]
    v = embed(noise + [noise[0]] * 2)
    assert v.shape == (5, 32) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert diversity.mean_pairwise_distance(v[3:], metric) == pytest.approx(0.0, abs=1e-6)
    assert diversity.mean_pairwise_distance(v[:3], metric) > 1e-4
    missing = load_config(None, ["eval.diversity_encoder=dinov2",
                                 f"eval.diversity_model={tmp_path / 'nothing'}"])
    with pytest.raises(MissingWeightsError, match="eval.diversity_model"):
        diversity.check_encoder(missing)


# ------------------------------------------------------------------------ drift warnings


def _summary(rows):
    return pd.DataFrame(rows, columns=["model", "reward", "diff", "diff_se"])


def test_drift_warns_only_when_a_training_reward_rises_and_a_watched_one_falls():
    up = ("tuned", "toy_aesthetic", 0.3, 0.01)
    down = ("tuned", "toy_precision", -0.05, 0.01)
    flat = ("tuned", "toy_precision", -0.01, 0.01)
    warn = drift_warnings(_summary([up, down]), ["base", "tuned"], ["toy_aesthetic"],
                          ["toy_precision"])
    assert len(warn) == 1 and "toy_precision fell by 0.05" in warn[0] and "5.0 SE" in warn[0]
    assert not drift_warnings(_summary([up, flat]), ["base", "tuned"], ["toy_aesthetic"],
                              ["toy_precision"])  # within 2 SE
    assert not drift_warnings(_summary([("tuned", "toy_aesthetic", 0.0, 0.01), down]),
                              ["base", "tuned"], ["toy_aesthetic"], ["toy_precision"])


# ------------------------------------------------------------------------ toy precision


def test_toy_precision_rewards_an_exact_outline_and_colour():
    from craft.toyworld.grammar import PALETTE
    from craft.toyworld.rewards import toy_fidelity, toy_precision

    def draw(shape, colour="red", stretch=1.0):
        im = Image.new("RGB", (32, 32), PALETTE["blue"])
        from PIL import ImageDraw

        d = ImageDraw.Draw(im)
        r = 9
        box = [16 - r * stretch, 16 - r, 16 + r * stretch, 16 + r]
        if shape == "circle":
            d.ellipse(box, fill=PALETTE[colour])
        else:
            d.rectangle(box, fill=PALETTE[colour])
        return im

    prompt = ["a red circle on a blue background"]
    exact = toy_precision([draw("circle")], prompt)[0]
    stretched = toy_precision([draw("circle", stretch=0.6)], prompt)[0]
    off_colour = toy_precision([draw("circle", "orange")], prompt)[0]
    assert exact > 0.85
    assert stretched < exact - 0.2 and off_colour < exact - 0.2
    # fidelity barely tells the stretched circle from the exact one
    assert toy_fidelity([draw("circle", stretch=0.6)], prompt)[0] > 0.8
    assert np.isnan(toy_precision([draw("circle")], ["not a toy prompt"])[0])


# ------------------------------------------------------------------------ filter controls


def pool(n_groups=3, per=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        for k in range(per):
            rows.append({"candidate_id": g * per + k, "prompt_id": g, "variant_idx": int(k > 1),
                         "seed": k, "r1": rng.normal() + (k > 1), "r2": rng.normal() + (k > 1)})
    return pd.DataFrame(rows)


SETTINGS = dict(rewards=("r1", "r2"), weights={"r1": 1.0, "r2": 1.0}, level="custom",
                require=("r1",), roles={})


def test_near_duplicates_are_dropped_and_the_next_candidate_takes_their_place():
    df = pool()
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(len(df), 8))
    plain = apply_filter(df, FilterSettings(top_k=4, **SETTINGS))
    order = plain.kept["candidate_id"].tolist()
    vectors[order[1]] = vectors[order[0]]  # the second best is a copy of the best
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb = (df["candidate_id"].to_numpy(), vectors)
    s = FilterSettings(top_k=4, dedup_threshold=0.99, **SETTINGS)
    res = apply_filter(df, s, embeddings=emb)
    kept = res.kept["candidate_id"].tolist()
    assert order[1] not in kept and order[0] in kept and len(kept) == 4
    assert kept[:3] == [order[0], order[2], order[3]]  # the fifth best moved up
    assert res.counts.duplicates == 1 and bool(res.frame.set_index(
        "candidate_id").at[order[1], "near_duplicate"])
    # off (None) is today's selection, embeddings or not
    assert apply_filter(df, FilterSettings(top_k=4, **SETTINGS),
                        embeddings=emb).kept["candidate_id"].tolist() == order
    with pytest.raises(FilterError, match="dedup_threshold"):
        apply_filter(df, s)
    with pytest.raises(FilterError, match="cosine similarity"):
        FilterSettings(dedup_threshold=1.5, **SETTINGS)


def test_coverage_of_a_kept_set():
    kept = pd.DataFrame({"prompt_id": [1, 1, 1, 2]})
    assert coverage(kept) == {"kept": 4, "prompts": 2, "largest": 3, "largest_share": 0.75}
    assert coverage(kept.iloc[:0])["prompts"] == 0


def test_uniform_mode_is_plain_sft_on_the_same_images():
    df = pool()
    s = FilterSettings(top_k=5, **SETTINGS)
    a = select_for_training(df, s, "clamp")
    u = select_for_training(df, s, "uniform")
    assert a["candidate_id"].tolist() == u["candidate_id"].tolist()
    assert (u["weight"] == 1.0).all() and not (a["weight"] == 1.0).all()
    assert training_weights([-1.0, 3.0], "uniform").tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------ anchor regulariser


def _setup(tiny_model_dir, tiny_pipe, images, **train):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from conftest import tiny_config
    from craft.methods.training import encode_dataset, timestep_weights

    over = {"train.micro_batch": 4, "train.effective_batch": 4, "train.cond_dropout": 0.5}
    over.update({f"train.{k}": v for k, v in train.items()})
    cfg = tiny_config(tiny_model_dir, **over)
    images = images[:4]
    df = pd.DataFrame({"image_path": images, "weight": [1.0, 0.5, 2.0, 1.0],
                       "prompt": ["a red circle on a blue background"] * 4})
    acc = Accelerator(cpu=True)
    sched = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    w_t = timestep_weights(sched, "uniform")
    return cfg, acc, sched, w_t, encode_dataset(cfg, tiny_pipe, df, torch.device("cpu"))


def test_anchor_weight_zero_is_the_plain_loss_exactly(tiny_model_dir, tiny_pipe, images):
    import copy

    from craft.methods.training import micro_batch_loss

    cfg, acc, sched, w_t, data = _setup(tiny_model_dir, tiny_pipe, images, anchor_weight=0.0)
    tuned = copy.deepcopy(tiny_pipe.unet)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
        plain = micro_batch_loss(tuned, sched, w_t, data, cfg.train, 3, 0, 0, acc)
        zero = micro_batch_loss(tuned, sched, w_t, data, cfg.train, 3, 0, 0, acc,
                                tiny_pipe.unet)
        assert torch.equal(plain, zero)
        cfg1, *_ = _setup(tiny_model_dir, tiny_pipe, images, anchor_weight=1.0)
        anchored = micro_batch_loss(tuned, sched, w_t, data, cfg1.train, 3, 0, 0, acc,
                                    tiny_pipe.unet)
        assert anchored > plain  # the tuned copy moved away from the base: a positive penalty
        # at the base itself the penalty is 0: the same loss as without it
        at_base = micro_batch_loss(copy.deepcopy(tiny_pipe.unet), sched, w_t, data,
                                   cfg1.train, 3, 0, 0, acc, tiny_pipe.unet)
        plain_base = micro_batch_loss(copy.deepcopy(tiny_pipe.unet), sched, w_t, data,
                                      cfg.train, 3, 0, 0, acc)
        assert torch.allclose(at_base, plain_base, rtol=0, atol=1e-7)


def test_anchor_keeps_the_tuned_model_nearer_the_base(tmp_path, tiny_model_dir, tiny_pipe,
                                                      images):
    from diffusers import UNet2DConditionModel

    from conftest import tiny_config
    from craft.methods.training import train

    base = {k: v.detach().clone() for k, v in tiny_pipe.unet.state_dict().items()}

    def distance(anchor):
        cfg = tiny_config(tiny_model_dir, **{
            "train.steps": 6, "train.lr": 1e-3, "train.weight_decay": 0.0,
            "train.checkpoint_every": 0, "train.preview_every": 0, "train.ema_decay": 0.0,
            "train.micro_batch": 4, "train.effective_batch": 4,
            "train.anchor_weight": anchor})
        df = pd.DataFrame({"image_path": images[:4], "weight": [1.0] * 4,
                           "prompt": ["a red circle on a blue background"] * 4})
        out = train(cfg, df, tmp_path / f"a{anchor}", pipe=tiny_pipe)
        tuned = UNet2DConditionModel.from_pretrained(out.final_dir / "unet").state_dict()
        return sum(float((tuned[k].float() - base[k].float()).pow(2).sum()) for k in base)

    free, held = distance(0.0), distance(50.0)
    assert held < 0.9 * free, (free, held)
