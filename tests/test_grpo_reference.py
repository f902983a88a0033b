"""GRPO and Diffusion-DPO as their authors run them: the step densities and the KL term checked
by hand, a DDIM scheduler with set_alpha_to_one, the first update's ratio under bf16 autocast,
the references' minibatches and trained steps, and the DPO micro-batch's winner/loser order."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from conftest import tiny_config
from test_training import images  # noqa: F401 (a fixture: six 16x16 training images)


@pytest.mark.parametrize("alpha_to_one", [True, None])
def test_a_ddim_scheduler_with_set_alpha_to_one_gives_finite_log_probs(alpha_to_one, tiny_pipe,
                                                                        tiny_model_dir):
    """diffusers' DDIMScheduler defaults to set_alpha_to_one=True (and a config without the key
    gets it): the last step must still have a positive std and a finite log-probability, as
    ddpo-pytorch's clamp of the previous timestep gives."""
    from diffusers import DDIMScheduler

    from craft.methods.grpo import Policy
    from craft.methods.training import training_size

    config = dict(tiny_pipe.scheduler.config)
    config.pop("set_alpha_to_one", None)
    if alpha_to_one is not None:
        config["set_alpha_to_one"] = alpha_to_one
    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = DDIMScheduler.from_config(config)
    try:
        cfg = tiny_config(tiny_model_dir, **{"grpo.num_inference_steps": 4})
        policy = Policy.for_pipe(tiny_pipe, cfg, training_size(cfg, tiny_pipe))
    finally:
        tiny_pipe.scheduler = original
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    eps = torch.randn(3, 4, 8, 8, generator=gen)
    last = torch.full((3,), policy.num_steps - 1)
    st = policy.step(eps, last, x, noise=torch.randn(3, 4, 8, 8, generator=gen))
    assert torch.isfinite(st.log_prob).all() and (st.std > 0).all()


def test_the_kl_weight_is_flow_grpos_beta_by_hand():
    """grpo.kl_weight multiplies flow_grpo's term: mean ||mu - mu_ref||^2 / (2 s_t^2) with
    s_t = a sqrt(sigma / (1 - sigma)) (no sqrt(|dt|)); on DDIM, the step's own std."""
    from craft.methods.grpo import ddim_step, flow_sde_step, kl_to_base

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, generator=gen)
    v, v_ref = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    sigma, nxt, a = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3]), 0.7
    st = flow_sde_step(sigma, nxt, 0.9, v, x, a, prev=x)
    ref = flow_sde_step(sigma, nxt, 0.9, v_ref, x, a, prev=x)
    for j in range(2):
        s_t = a * math.sqrt(sigma[j].item() / (1 - sigma[j].item()))
        dt = nxt[j].item() - sigma[j].item()
        # the mean's difference is (v - v_ref) (1 + s_t^2 (1 - sigma) / (2 sigma)) dt
        coef = (1 + s_t ** 2 * (1 - sigma[j].item()) / (2 * sigma[j].item())) * dt
        hand = ((coef * (v[j] - v_ref[j])) ** 2).mean().item() / (2 * s_t ** 2)
        assert kl_to_base(st, ref)[j].item() == pytest.approx(hand, rel=1e-5)
        # = |dt| times the exact Gaussian KL of the two steps (std s_t sqrt(|dt|))
        exact = ((st.mean[j] - ref.mean[j]) ** 2).mean().item() / (2 * s_t ** 2 * abs(dt))
        assert hand == pytest.approx(abs(dt) * exact, rel=1e-5)
    abar = torch.linspace(0.99, 0.05, 1000)
    t, prev_t = torch.tensor([600, 300]), torch.tensor([400, 100])
    st = ddim_step(abar, 0.99, v, t, prev_t, x, 1.0, prev=x)
    ref = ddim_step(abar, 0.99, v_ref, t, prev_t, x, 1.0, prev=x)
    hand = ((st.mean - ref.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * st.std.reshape(2, -1)[:, 0] ** 2)
    assert torch.allclose(kl_to_base(st, ref), hand)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_the_ddim_step_variance_at_eta(eta):
    """Drawn steps have the DDIM paper's variance eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t /
    a_prev) (ddpo-pytorch's ddim_step_with_logprob at any eta)."""
    from craft.methods.grpo import ddim_step

    abar = torch.linspace(0.99, 0.05, 1000, dtype=torch.float64)
    n = 40_000
    t, prev_t = torch.full((n,), 700), torch.full((n,), 500)
    x = torch.zeros(n, 1, 1, 1, dtype=torch.float64)
    eps = torch.zeros_like(x)
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    st = ddim_step(abar, 0.99, eps, t, prev_t, x, eta, noise=noise)
    a_t, a_p = abar[700].item(), abar[500].item()
    var = eta ** 2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    assert st.std[0].item() ** 2 == pytest.approx(var, rel=1e-9)
    assert (st.prev - st.mean).var().item() == pytest.approx(var, rel=0.03)


@pytest.mark.parametrize("noise_level", [0.3, 0.7])
def test_the_flow_sde_step_variance_at_a_noise_level(noise_level):
    """Drawn flow SDE steps have variance a^2 sigma / (1 - sigma) |dt| (flow_grpo)."""
    from craft.methods.grpo import flow_sde_step

    n = 40_000
    sigma, nxt = torch.full((n,), 0.6, dtype=torch.float64), torch.full((n,), 0.45,
                                                                       dtype=torch.float64)
    x = torch.zeros(n, 1, 1, 1, dtype=torch.float64)
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
    st = flow_sde_step(sigma, nxt, 0.9, torch.zeros_like(x), x, noise_level, noise=noise)
    var = noise_level ** 2 * 0.6 / 0.4 * 0.15
    assert st.std[0].item() ** 2 == pytest.approx(var, rel=1e-9)
    assert (st.prev - st.mean).var().item() == pytest.approx(var, rel=0.03)


def test_the_dpo_micro_batch_puts_winners_first(monkeypatch):
    """idx = [winners, losers]: the first half's errors are the winners' in the loss, so a
    tuned model that fits the winners better than the reference does scores accuracy 1."""
    import types

    from craft.methods import dpo

    seen = {}

    def noised(noise_sched, w_t, data, tc, idx, gen, device, share=1):
        seen["idx"] = idx.clone()
        n = len(idx)
        return types.SimpleNamespace(xt=torch.zeros(n, 1), t=torch.zeros(n), cond={},
                                     target=torch.zeros(n, 1), w=torch.ones(n))

    def tuned(model, data, nb, acc):  # fits the first half (winners) exactly
        n = len(nb.xt) // 2
        return torch.cat([torch.zeros(n, 1), torch.ones(n, 1)])

    monkeypatch.setattr(dpo, "noised_batch", noised)
    monkeypatch.setattr(dpo, "predict", tuned)
    monkeypatch.setattr(dpo, "base_prediction", lambda *a: torch.full((4, 1), 0.5))
    data = types.SimpleNamespace(pairs=torch.tensor([[3, 7]]))
    tc = types.SimpleNamespace(seed=0, micro_batch=2)
    _, facts = dpo.dpo_micro_batch_loss(None, None, None, data, tc, 10.0, 0, 0, 0,
                                        types.SimpleNamespace(device="cpu"), None)
    assert seen["idx"].tolist() == [3, 3, 7, 7]  # winners, then their losers
    assert facts["dpo_accuracy"] == 1.0 and facts["dpo_margin"] > 0


def _grpo(tmp_path, **sets) -> list[dict]:
    """A tiny GRPO run on the shipped toy base; its per-step metrics."""
    from craft.methods.grpo import train_grpo
    from craft.methods.training import TrainCallbacks
    from craft.run.config import load_config

    base = {"train.method": "grpo", "model.device": "cpu", "train.steps": 2, "train.lr": 1e-3,
            "train.checkpoint_every": 0, "train.preview_every": 0, "train.micro_batch": 16,
            "train.effective_batch": 16, "train.ema_decay": 0, "grpo.prompts_per_step": 2,
            "grpo.group_size": 4, "grpo.num_inference_steps": 4, "grpo.updates": 2,
            "grpo.clip_range": 1e-4}
    cfg = load_config(None, [f"{k}={v}" for k, v in {**base, **sets}.items()])
    prompts = pd.DataFrame({"prompt_id": [1, 2], "prompt": [
        "a red circle on a blue background", "a yellow triangle on a black background"]})
    metrics = []
    res = train_grpo(cfg, prompts, tmp_path / "grpo",
                     callbacks=TrainCallbacks(on_step=lambda s, n, m: metrics.append(m)))
    assert res.status == "done"
    return metrics


@pytest.mark.slow
def test_the_first_update_clips_nothing_under_bf16_autocast(tmp_path):
    """Sampling and recomputation share accelerate's autocast, so under bf16 mixed precision
    the first update's ratio is exactly 1 and nothing is clipped even at clip range 1e-4."""
    m = _grpo(tmp_path, **{"train.mixed_precision": "bf16"})
    assert m[0]["ratio"] == 1.0 and m[0]["clip_fraction"] == 0.0
    assert all(math.isfinite(x["loss"]) for x in m)


def test_a_split_round_uses_each_trajectory_once_and_leaves_out_the_last_steps():
    """grpo.reuse=split: the round's samples are shuffled into grpo.updates disjoint
    minibatches; step_selection=first trains the first round(T x fraction) sampler steps."""
    import types

    from craft.methods.grpo import update_items

    cfg = tiny_config(".", **{"grpo.updates": 3, "grpo.num_inference_steps": 10,
                              "grpo.timestep_fraction": 0.9})
    run = types.SimpleNamespace(cfg=cfg, n_local=12, t_train=9,
                                acc=types.SimpleNamespace(process_index=0),
                                policy=types.SimpleNamespace(num_steps=10))
    parts = [update_items(run, step) for step in range(3)]
    samples = [set(p[:, 0].tolist()) for p in parts]
    assert sorted(x for s in samples for x in s) == list(range(12))  # each once in the round
    assert all(len(s) == 4 for s in samples)
    assert all(set(p[:, 1].tolist()) == set(range(9)) for p in parts)  # not the last step
    again = update_items(run, 1)
    assert torch.equal(again, parts[1])  # a function of (seed, step): resumes exactly
    nxt = [set(update_items(run, step)[:, 0].tolist()) for step in range(3, 6)]
    assert nxt != samples  # the next round: another shuffle


@pytest.mark.slow
def test_lora_grpo_trains_and_keeps_the_base_for_the_kl(tmp_path):
    """GRPO on LoRA adapters (flow_grpo's setting): finite losses, the KL to the base (the same
    module with its adapters off) computed, zero at the first update."""
    m = _grpo(tmp_path, **{"train.lora": True, "train.lora_rank": 4, "grpo.kl_weight": 0.04})
    assert m[0]["ratio"] == 1.0 and m[0]["kl"] == pytest.approx(0.0, abs=1e-12)
    assert all(math.isfinite(x["loss"]) and "kl" in x for x in m)


def test_best_worst_pairs_equal_the_per_group_rule():
    """The vectorised best_worst rule gives what the plain per-group loop gives: each group's
    best (ties: the lower id) against its worst, unscorable and excluded candidates left out."""
    import numpy as np

    from craft.methods.dpo import build_pairs

    def by_loop(df, margin):
        rows = []
        df = df[np.isfinite(df["composite"]) & (df["override"].astype(object) != "exclude")]
        for pid, g in df.groupby("prompt_id"):
            g = g.sort_values(["composite", "candidate_id"], ascending=[False, True])
            if len(g) >= 2 and g["composite"].iloc[0] - g["composite"].iloc[-1] > margin:
                rows.append((pid, g["candidate_id"].iloc[0], g["candidate_id"].iloc[-1]))
        return sorted(rows)

    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(0, 50))
        df = pd.DataFrame({"prompt_id": rng.integers(0, 6, n),
                           "candidate_id": rng.permutation(500)[:n],
                           "composite": np.round(rng.normal(size=n), 1)})
        df.loc[rng.random(n) < 0.1, "composite"] = np.nan
        df["override"] = np.where(rng.random(n) < 0.1, "exclude", None)
        for margin in (0.0, 0.3):
            got = build_pairs(df, "best_worst", margin)
            assert sorted(zip(got["prompt_id"], got["win_id"], got["lose_id"])) == \
                by_loop(df, margin)
            assert (np.diff(got["gap"].to_numpy()) <= 0).all()  # widest gap first
