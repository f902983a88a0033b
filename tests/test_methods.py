"""The training methods beside CRAFT on the tiny model: SFT (the kept set, weight 1),
Diffusion-DPO (pairs from the pool, loss by hand, the zero-gradient identity, resume on the
recorded pairs), and what each records. (Two processes and kill -9: tests/test_scaleout.py.)"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from craft import CraftError
from test_training import images  # noqa: F401 (a fixture: six 16x16 training images)
from craft.methods.dpo import build_pairs, dpo_loss, pair_images, pair_index


# ------------------------------------------------------------------------ the DPO loss


def test_dpo_loss_equals_a_hand_computation():
    err_w, err_l = torch.tensor([0.2, 0.5]), torch.tensor([0.3, 0.1])
    ref_w, ref_l = torch.tensor([0.25, 0.4]), torch.tensor([0.25, 0.2])
    loss, extra = dpo_loss(err_w, err_l, ref_w, ref_l, beta=10.0)
    # inside = -beta/2 * ((e_w - e_l) - (r_w - r_l)): -5 * (-0.1 - 0) = 0.5; -5 * (0.4 - 0.2) = -1
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert extra["dpo_accuracy"] == 0.5 and extra["dpo_margin"] == pytest.approx(-0.25)
    # at the start (tuned = reference) the loss is log 2 whatever the errors
    same, _ = dpo_loss(err_w, err_l, err_w, err_l, beta=5000.0)
    assert same.item() == pytest.approx(math.log(2), rel=1e-7)


@pytest.fixture(scope="module")
def two_images(images) -> list[str]:
    return images[:2]


def _dpo_setup(tiny_model_dir, tiny_pipe, paths, pairs):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from craft.methods.training import _forget_other_precision, encode_dataset, timestep_weights

    cfg = tiny_config(tiny_model_dir, **{"train.method": "dpo", "train.micro_batch": 3,
                                         "train.effective_batch": 3, "dpo.beta": 500.0})
    df = pd.DataFrame({"image_path": paths, "weight": 1.0,
                       "prompt": ["a red circle on a blue background"] * len(paths)})
    data = encode_dataset(cfg, tiny_pipe, df, torch.device("cpu"))
    data.lat_std = torch.zeros_like(data.lat_std)  # x0 = the posterior mean: one x0 per image
    data.pairs = torch.tensor(pairs)
    sched = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    # float32: accelerate's process-wide state may still hold an earlier test's bf16 autocast
    _forget_other_precision("no")
    acc = Accelerator(cpu=True, mixed_precision="no")
    return cfg, acc, sched, timestep_weights(sched, "uniform"), data


def _grad(model, loss) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_dpo_gradient_is_zero_at_the_reference_with_equal_pair_errors(tiny_model_dir,
                                                                     tiny_pipe_copy, two_images):
    """Tuned = reference: the gradient is beta/4 * grad(e_w - e_l), so a pair whose winner and
    loser are the same image (equal errors under the shared noise) pushes nowhere, while a pair
    of two different images does."""
    import copy

    from craft.methods.dpo import dpo_micro_batch_loss

    tiny_pipe = tiny_pipe_copy  # a fresh pipeline: nothing another test did to it counts
    tiny_pipe.unet.eval()
    tuned = copy.deepcopy(tiny_pipe.unet).requires_grad_(True)
    cfg, acc, sched, w_t, data = _dpo_setup(tiny_model_dir, tiny_pipe, two_images, [[0, 0]])
    loss, _ = dpo_micro_batch_loss(tuned, sched, w_t, data, cfg.train, 500.0, 3, 0, 0, acc,
                                   tiny_pipe.unet)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    zero = _grad(tuned, loss)
    data.pairs = torch.tensor([[0, 1]])
    loss, _ = dpo_micro_batch_loss(tuned, sched, w_t, data, cfg.train, 500.0, 3, 0, 0, acc,
                                   tiny_pipe.unet)
    moving = _grad(tuned, loss)
    assert moving.abs().max() > 1e-4
    assert zero.abs().max() <= 1e-4 * moving.abs().max()  # rounding of beta / 4 x 0


def test_dpo_pairs_share_noise_and_timestep_and_the_flow_form_uses_velocity(world_flow_pipe):
    """The winner and loser halves of a micro-batch are noised alike; on a flow model the target
    is the velocity eps - x0 (the flow DPO form)."""
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler

    from craft.models.flow import velocity_target
    from craft.methods.steps import micro_batch_generator as _generator, noised_batch

    pipe, data, cfg = world_flow_pipe
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    gen = _generator(cfg.train, 0, 0, 0)
    idx = torch.tensor([0, 1, 1, 0])
    nb = noised_batch(sched, None, data, cfg.train, idx, gen, torch.device("cpu"), share=2)
    assert torch.equal(nb.t[:2], nb.t[2:])
    x0 = (data.lat_mean[idx] - data.shift) * data.scaling  # lat_std is 0 in the fixture
    noise_w = nb.target[:2] + x0[:2]
    noise_l = nb.target[2:] + x0[2:]
    assert torch.allclose(noise_w, noise_l, atol=1e-6)  # the same eps for winner and loser
    assert torch.allclose(nb.target, velocity_target(x0, noise_w.repeat(2, 1, 1, 1)), atol=1e-6)
    del Accelerator


@pytest.fixture(scope="module")
def world_flow_pipe(tiny_flow_model_dir, two_images):
    from craft.models.loading import load_pipeline
    from craft.methods.training import encode_dataset

    pipe = load_pipeline(tiny_flow_model_dir, family="sd3", dtype="float32", device="cpu")
    cfg = tiny_config(tiny_flow_model_dir, **{"model.family": "sd3",
                                              "generation.scheduler": "default",
                                              "train.method": "dpo"})
    df = pd.DataFrame({"image_path": two_images, "weight": 1.0,
                       "prompt": ["a red circle on a blue background"] * 2})
    data = encode_dataset(cfg, pipe, df, torch.device("cpu"))
    data.lat_std = torch.zeros_like(data.lat_std)
    return pipe, data, cfg


# ------------------------------------------------------------------------ pairs


def _frame():
    # two groups: prompt 1 with composites 3, 1, 0.5, NaN; prompt 2 with 2, 2 (no preference)
    return pd.DataFrame({
        "prompt_id": [1, 1, 1, 1, 2, 2], "candidate_id": [10, 11, 12, 13, 20, 21],
        "composite": [1.0, 3.0, 0.5, np.nan, 2.0, 2.0],
        "image_path": [f"/x/{i}.png" for i in range(6)], "prompt": ["p1"] * 4 + ["p2"] * 2,
        "advantage": 0.0})


def test_pair_rules():
    bw = build_pairs(_frame(), "best_worst")
    assert bw[["win_id", "lose_id"]].values.tolist() == [[11, 12]]  # the tie group gives none
    allp = build_pairs(_frame(), "above_margin")
    assert allp[["win_id", "lose_id"]].values.tolist() == [[11, 12], [11, 10], [10, 12]]
    assert allp["gap"].tolist() == [2.5, 2.0, 0.5]  # widest first
    assert build_pairs(_frame(), "above_margin", margin=1.0)["win_id"].tolist() == [11, 11]
    assert len(build_pairs(_frame(), "above_margin", max_pairs=1)) == 1
    ex = _frame().assign(override=pd.Categorical([None, "exclude", None, None, None, None],
                                                 categories=["include", "exclude"]))
    assert build_pairs(ex, "best_worst")[["win_id", "lose_id"]].values.tolist() == [[10, 12]]
    with pytest.raises(CraftError, match="not a pair rule"):
        build_pairs(_frame(), "everything")
    images, index = pair_images(allp, _frame())
    assert images["candidate_id"].tolist() == [10, 11, 12] and (images["weight"] == 1).all()
    assert index.tolist() == [[1, 2], [1, 0], [0, 2]]
    shuffled = images.iloc[::-1].reset_index(drop=True)  # a resumed run reads them in any order
    assert pair_index(shuffled, [[11, 12]]).tolist() == [[1, 0]]
    with pytest.raises(CraftError, match="no DPO pairs"):
        pair_images(build_pairs(_frame(), "best_worst", margin=10), _frame())


# ------------------------------------------------------------------------ through the engine


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_model_dir):
    """A tiny run with candidates and scores (the engine's own stages)."""
    from craft.stages.engine import open_run, stage_generate, stage_prompts, stage_score

    run_dir = tmp_path_factory.mktemp("methods") / "run"
    cfg = tiny_config(tiny_model_dir)
    run = open_run(run_dir, cfg)
    stage_prompts(run, cfg)
    stage_generate(run, cfg)
    stage_score(run, cfg)
    return run_dir


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_a_method_trains_records_what_it_trained_on_and_resumes(scored_run, tiny_model_dir,
                                                                method):
    import json

    from craft.stages.engine import open_run, stage_train

    over = {"train.method": method, "train.steps": 4, "train.checkpoint_every": 2,
            "dpo.pairs": "above_margin"}
    cfg = tiny_config(tiny_model_dir, **over)
    run = open_run(scored_run, cfg)
    stop = {"n": 0}

    def should_stop():  # cancel after 2 steps, then resume
        stop["n"] += 1
        return stop["n"] > 2

    first = stage_train(run, cfg, f"{method}-a", should_stop=should_stop)
    assert first.status == "cancelled" and first.steps_done == 2
    again = stage_train(run, cfg, f"{method}-a", resume=True)
    assert again.status == "done" and again.steps_done == 4
    rec = run.store.train_run_by_name(f"{method}-a")
    sel = json.loads(run.store.selections_df().set_index("id").loc[
        int(rec["selection_id"]), "settings_json"])
    items = run.store.selection_items_df(int(rec["selection_id"]))
    assert sel["method"] == method
    metrics = run.store.metrics_df(int(rec["id"]))
    assert metrics["step"].tolist() == [1, 2, 3, 4]
    if method == "sft":
        assert (items["weight"] == 1.0).all()
    else:
        assert sel["n_pairs"] == len(sel["pairs"]) > 0
        ids = set(items["candidate_id"])
        assert all(w in ids and lo in ids for w, lo in sel["pairs"])
        assert metrics["dpo_accuracy"].between(0, 1).all()
        meta = json.loads((again.final_dir / "craft_train.json").read_text())
        assert meta["method"] == "dpo" and meta["n_pairs"] == sel["n_pairs"]
    # the resumed run equals one that never stopped
    straight = stage_train(run, cfg, f"{method}-b")
    a = (again.final_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (straight.final_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b


# ------------------------------------------------------------------------ GRPO


def test_ddim_step_log_prob_is_the_gaussian_density():
    from diffusers import DDIMScheduler

    from craft.methods.grpo import ddim_step

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False)
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t, prev_t = torch.tensor([901, 501, 51]), torch.tensor([801, 401, -49])
    st = ddim_step(sched.alphas_cumprod, float(sched.alphas_cumprod[0]), eps, t, prev_t, x,
                   eta=1.0, noise=noise)
    for j in range(3):  # independently: DDIM eq. 12 with sigma^2 = the DDPM posterior variance
        a_t = sched.alphas_cumprod[t[j]]
        a_p = sched.alphas_cumprod[prev_t[j]] if prev_t[j] >= 0 else sched.alphas_cumprod[0]
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        x0 = (x[j] - (1 - a_t).sqrt() * eps[j]) / a_t.sqrt()
        mean = a_p.sqrt() * x0 + (1 - a_p - var).sqrt() * eps[j]
        dist = torch.distributions.Normal(mean, var.sqrt())
        assert torch.allclose(st.prev[j], mean + var.sqrt() * noise[j], atol=1e-5)
        assert st.log_prob[j].item() == pytest.approx(dist.log_prob(st.prev[j]).mean().item(),
                                                      abs=1e-4)


def test_flow_sde_step_log_prob_is_the_gaussian_density():
    from craft.methods.grpo import flow_sde_step

    g = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sigma, nxt = torch.tensor([1.0, 0.4]), torch.tensor([0.9, 0.3])
    st = flow_sde_step(sigma, nxt, 0.9, v, x, noise_level=0.7, noise=noise)
    for j in range(2):
        s = min(float(sigma[j]), 0.9) if sigma[j] >= 1 else float(sigma[j])
        std_t = math.sqrt(float(sigma[j]) / (1 - s)) * 0.7
        dt = float(nxt[j] - sigma[j])
        mean = (x[j] * (1 + std_t ** 2 / (2 * sigma[j]) * dt)
                + v[j] * (1 + std_t ** 2 * (1 - sigma[j]) / (2 * sigma[j])) * dt)
        std = std_t * math.sqrt(-dt)
        dist = torch.distributions.Normal(mean, std)
        assert torch.allclose(st.mean[j], mean, atol=1e-5)
        assert st.log_prob[j].item() == pytest.approx(dist.log_prob(st.prev[j]).mean().item(),
                                                      abs=1e-4)
    # with noise_level -> 0 the mean is the Euler step x + dt v
    st0 = flow_sde_step(sigma[1:], nxt[1:], 0.9, v[1:], x[1:], noise_level=1e-6, noise=noise[1:])
    assert torch.allclose(st0.mean, x[1:] + (nxt[1] - sigma[1]) * v[1:], atol=1e-5)


@pytest.mark.parametrize("flow", [False, True])
def test_grpo_ratio_is_one_on_the_samples_own_weights(flow, tiny_model_dir, tiny_pipe,
                                                      tiny_flow_model_dir):
    """Log-probs recomputed for a trajectory's steps in another batch composition equal the
    sampler's: the first update's ratio is 1."""
    from craft.methods.grpo import Policy, clipped_loss, sample_trajectories
    from craft.models.families import latent_shape
    from craft.methods.training import empty_conditioning, encode_text, training_size

    if flow:
        from craft.models.loading import load_pipeline

        pipe = load_pipeline(tiny_flow_model_dir, family="sd3", dtype="float32", device="cpu")
        cfg = tiny_config(tiny_flow_model_dir, **{"model.family": "sd3",
                                                  "generation.scheduler": "default",
                                                  "grpo.num_inference_steps": 4})
    else:
        pipe = tiny_pipe
        cfg = tiny_config(tiny_model_dir, **{"grpo.num_inference_steps": 4})
    size = training_size(cfg, pipe)
    cond = encode_text(pipe, ["a red circle", "a blue square"], "cpu", size)
    empty = empty_conditioning(pipe, "cpu", size)
    policy = Policy.for_pipe(pipe, cfg, size)
    model = pipe.transformer if flow else pipe.unet
    rows = np.array([0, 0, 1, 1])
    lat, lps, images = sample_trajectories(policy, model, pipe, cond, empty, rows, [5, 6, 7, 8],
                                    latent_shape(pipe, *size), torch.float32, "cpu", batch=4)
    assert lat.shape[:2] == (4, 5) and lps.shape == (4, 4) and len(images) == 4
    i, k = torch.tensor([3, 0, 2]), torch.tensor([1, 3, 0])  # any (sample, step) pairs
    c = {kk: v[torch.as_tensor(rows[i.numpy()])] for kk, v in cond.items()}
    with torch.no_grad():
        pred = policy.predict(model, lat[i, k], k, c, empty, torch.float32)
        st = policy.step(pred, k, lat[i, k], prev=lat[i, k + 1])
    _, ratio = clipped_loss(st.log_prob, lps[i, k], torch.ones(3), 0.2)
    assert torch.allclose(ratio, torch.ones(3), atol=1e-4), ratio


@pytest.fixture
def constant_reward():
    """A reward that gives every image 0.5, registered for one test only (the registry is the
    process's: tests/test_rewards_registry.py checks what it holds)."""
    from craft.rewards import base
    from craft.rewards.base import FunctionReward, register_reward

    @register_reward("test_constant", description="tests: the same score for every image")
    def _c(*, device="cpu", dtype=None, batch_size=32, path=None):
        return FunctionReward("test_constant", lambda images, prompts: [0.5] * len(images),
                              batch_size=batch_size)

    yield "test_constant"
    base._REGISTRY.pop("test_constant", None)


def _grpo_run(tmp_path, weights: str) -> list[dict]:
    """A tiny GRPO run on the shipped toy base (2 prompts, both sampled every round, groups of
    8, 4 sampler steps, 3 rounds of 2 updates); its per-step metrics."""
    from craft.run.config import load_config
    from craft.methods.grpo import train_grpo
    from craft.methods.training import TrainCallbacks

    cfg = load_config(None, [
        "train.method=grpo", "model.device=cpu",
        "rewards.names=[toy_fidelity, toy_selection, toy_aesthetic, test_constant]",
        f"filter.weights={weights}", "train.steps=6", "train.lr=1e-3",
        "train.checkpoint_every=0", "train.preview_every=0", "train.micro_batch=32",
        "train.effective_batch=32", "train.ema_decay=0", "train.weight_decay=0",
        "grpo.prompts_per_step=2", "grpo.group_size=8", "grpo.num_inference_steps=4",
        "grpo.updates=2", "grpo.clip_range=0.2",
        # both updates on the whole round of 16: with 8-image minibatches (grpo.reuse=split) a
        # 3-round run is too noisy to compare with its control
        "grpo.reuse=whole"])
    prompts = pd.DataFrame({"prompt_id": [1, 2], "prompt": [
        "a red circle on a blue background", "a yellow triangle on a black background"]})
    metrics = []
    res = train_grpo(cfg, prompts, tmp_path / weights.replace(" ", ""),
                     callbacks=TrainCallbacks(on_step=lambda s, n, m: metrics.append(m)))
    assert res.status == "done"
    return metrics


def test_a_tiny_grpo_run_raises_its_reward_and_a_constant_reward_does_nothing(tmp_path,
                                                                           constant_reward):
    """GRPO on the aesthetic reward against a control whose only reward is a constant (no
    advantage, so no gradient: the base itself). Rounds are functions of (seed, round), so
    round r of both runs starts from the same noise: the difference is the policy's alone."""
    rl = _grpo_run(tmp_path, "{toy_aesthetic: 1.0, test_constant: 0.0}")
    control = _grpo_run(tmp_path, "{toy_aesthetic: 0.0, test_constant: 1.0}")
    assert rl[0]["ratio"] == pytest.approx(1.0, abs=1e-4)  # first update: on-policy
    assert all(m["loss"] == 0.0 and m["ratio"] == 1.0 for m in control)  # never moved
    aes = [m["reward_toy_aesthetic"] for m in rl[::2]]
    base = [m["reward_toy_aesthetic"] for m in control[::2]]
    assert aes[0] == base[0]  # round 0: the same model, the same noise
    gains = [a - b for a, b in zip(aes[1:], base[1:])]
    assert min(gains) > 0 and np.mean(gains) > 0.03, (aes, base)


def test_export_pairs_is_a_pick_a_pic_parquet(scored_run, tiny_model_dir, tmp_path):
    """`craft export --pairs` writes what diffusers' train_diffusion_dpo.py reads: caption,
    jpg_0, jpg_1 (image bytes PIL opens), label_0 / label_1 with the winner's side marked."""
    import io
    import subprocess
    import sys

    from conftest import tiny_overrides
    from craft.run.store import RunStore

    sets = [x for o in tiny_overrides(tiny_model_dir, **{"dpo.pairs": "above_margin"})
            for x in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "craft.cli", "export", "--run-dir",
                           str(scored_run), "--pairs", "--name", "pp", *sets],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_parquet(scored_run / "exports" / "pp" / "data" / "train-00000-of-00001.parquet")
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} <= set(df.columns)
    assert len(df) > 0 and ((df["label_0"] + df["label_1"]) == 1).all()
    assert set(df["label_0"]) == {0.0, 1.0}  # the winner's side alternates
    with RunStore(scored_run) as store:
        cands = store.candidates_df().set_index("id")
    for row in df.head(4).itertuples():
        win = row.candidate_id_0 if row.label_0 == 1 else row.candidate_id_1
        assert (row.composite_0 if row.label_0 == 1 else row.composite_1) > (
            row.composite_1 if row.label_0 == 1 else row.composite_0)
        img = Image.open(io.BytesIO(row.jpg_0 if row.label_0 == 1 else row.jpg_1))
        assert img.size[0] > 0
        assert (row.jpg_0 if row.label_0 == 1 else row.jpg_1) == open(
            cands.loc[win, "image_path"], "rb").read()
        assert row.caption == cands.loc[win, "prompt"]


def test_dpo_and_grpo_train_a_flow_model(tmp_path, tiny_flow_model_dir, images):
    """The flow forms end to end on the SD3-architecture tiny model: DPO on velocity errors,
    GRPO with the SDE sampler; both finish with a loadable StableDiffusion3Pipeline."""
    from diffusers import DiffusionPipeline

    from craft.methods.grpo import train_grpo
    from craft.methods.training import TrainCallbacks, train

    flow = {"model.family": "sd3", "generation.scheduler": "default", "train.steps": 2,
            "train.checkpoint_every": 2, "grpo.prompts_per_step": 1, "grpo.group_size": 2,
            "grpo.num_inference_steps": 2, "grpo.updates": 2}
    cfg = tiny_config(tiny_flow_model_dir, **{**flow, "train.method": "dpo"})
    df = pd.DataFrame({"image_path": images[:3], "weight": 1.0,
                       "prompt": ["a red circle on a blue background"] * 3})
    seen = []
    res = train(cfg, df, tmp_path / "dpo", pairs=np.array([[0, 1], [2, 1]]),
                callbacks=TrainCallbacks(on_step=lambda s, n, m: seen.append(m)))
    assert res.status == "done" and all("dpo_accuracy" in m for m in seen)
    assert type(DiffusionPipeline.from_pretrained(res.final_dir)).__name__ == \
        "StableDiffusion3Pipeline"
    cfg = tiny_config(tiny_flow_model_dir, **{**flow, "train.method": "grpo"})
    seen = []
    res = train_grpo(cfg, pd.DataFrame({"prompt_id": [1], "prompt": ["a red circle"]}),
                     tmp_path / "grpo",
                     callbacks=TrainCallbacks(on_step=lambda s, n, m: seen.append(m)))
    assert res.status == "done" and seen[0]["ratio"] == pytest.approx(1.0, abs=1e-4)
    assert (res.final_dir / "model_index.json").is_file()
