"""Advantage-weighted fine-tuning on the tiny model: what changes, what must not, cancel and
resume, metrics, the w(t) options. (Several processes: tests/test_scaleout.py.)"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from craft import CraftError
from craft.methods.training import TrainCallbacks, latest_checkpoint, timestep_weights, train

PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a black background", "a white square on a purple background"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Six 16x16 training images (random blocks; their content does not matter here)."""
    root = tmp_path_factory.mktemp("train-images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        arr = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
        paths.append(str(root / f"{i}.png"))
        Image.fromarray(arr).save(paths[-1])
    return paths


def frame(paths, weights, prompts=None) -> pd.DataFrame:
    prompts = prompts or [PROMPTS[i % len(PROMPTS)] for i in range(len(paths))]
    return pd.DataFrame({"image_path": paths, "prompt": prompts, "weight": weights})


def cfg_for(model_dir, **train):
    over = {"train.steps": 2, "train.lr": 1e-3, "train.weight_decay": 0.0,
            "train.checkpoint_every": 0, "train.preview_every": 0, "train.ema_decay": 0.0,
            "train.cond_dropout": 0.1}
    over.update({f"train.{k}": v for k, v in train.items()})
    return tiny_config(model_dir, **over)


def unet_state(path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path).state_dict()


def base_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


# ------------------------------------------------------------------------ what training changes


def test_full_finetune_changes_every_parameter_and_logs_metrics(tmp_path, tiny_model_dir,
                                                                tiny_pipe, images):
    cfg = cfg_for(tiny_model_dir)
    rows = []
    result = train(cfg, frame(images, [1.0, 2.0, 0.5, 1.0, 0.0, 1.5]), tmp_path / "out",
                   pipe=tiny_pipe, callbacks=TrainCallbacks(
                       on_step=lambda step, total, m: rows.append({"step": step, **m})))
    assert result.status == "done" and result.steps_done == 2
    metrics = pd.DataFrame(rows)
    assert metrics["step"].tolist() == [1, 2]
    for col in ("loss", "grad_norm", "step_time", "lr"):
        assert np.isfinite(metrics[col]).all() and (metrics[col] > 0).all(), col
    base = base_state(tiny_pipe)
    tuned = unet_state(result.final_dir / "unet")
    assert tuned.keys() == base.keys()
    unchanged = [k for k in base if torch.equal(base[k], tuned[k])]
    assert not unchanged, f"{len(unchanged)} parameters did not change, e.g. {unchanged[:3]}"


def test_lora_trains_adapters_on_the_pipeline_and_saves_loadable_adapter_files(
        tmp_path, tiny_model_dir, tiny_pipe, images):
    from diffusers import StableDiffusionPipeline

    from craft.stages.generation import SamplingParams, generate_images
    from craft.models.lora import LORA_WEIGHTS

    rank = 2
    before = base_state(tiny_pipe)
    # alpha != rank: the loaded adapters must carry their scale (the saved metadata)
    cfg = cfg_for(tiny_model_dir, lora=True, lora_rank=rank, lora_alpha=4.0, lr=1e-2,
                  save_merged=True, ema_decay=0.5)
    result = train(cfg, frame(images, [1.0] * 6), tmp_path / "out", pipe=tiny_pipe)
    state = torch.load(result.last_checkpoint / "state.pt", weights_only=True)
    # The optimizer saw only LoRA A/B matrices: r x in and out x r for every attention
    # projection the adapter targets, named.
    targets = [m for n, m in tiny_pipe.unet.named_modules()
               if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert targets
    assert len(state["trainable"]) == len(state["names"]) == 2 * len(targets)
    assert all("lora_" in n for n in state["names"])
    expected = sum(rank * (m.in_features + m.out_features) for m in targets)
    assert sum(t.numel() for t in state["trainable"]) == expected
    # The pipeline comes back as it was: no adapter layers, the same weights.
    assert not any("lora" in n for n, _ in tiny_pipe.unet.named_parameters())
    assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.unet.state_dict().items())
    # The checkpoint and final/ hold the adapters (small); final/ also the merged pipeline.
    assert (result.last_checkpoint / LORA_WEIGHTS).is_file()
    assert not (result.last_checkpoint / "unet").exists()
    adapters = result.final_dir / LORA_WEIGHTS
    assert adapters.stat().st_size < 0.2 * (result.final_dir / "unet" /
                                            "diffusion_pytorch_model.safetensors").stat().st_size
    merged = unet_state(result.final_dir / "unet")
    assert merged.keys() == before.keys() and not any("lora" in k for k in merged)
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    assert changed and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight",
                                       "to_out.0.weight")) for k in changed), sorted(changed)[:5]
    # diffusers' load_lora_weights on the base gives the merged model's images.
    params = SamplingParams(num_inference_steps=3, guidance_scale=3.0)
    prompts, seeds = [PROMPTS[0], PROMPTS[1]], [0, 1]

    def draw(pipe):
        return np.stack([np.asarray(im, dtype=np.int16) for _, b in
                         generate_images(pipe, prompts, seeds, params) for im in b])

    loaded = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    loaded.set_progress_bar_config(disable=True)
    plain = draw(loaded)
    loaded.load_lora_weights(str(result.final_dir), weight_name=LORA_WEIGHTS)
    via_adapters = draw(loaded)
    full = StableDiffusionPipeline.from_pretrained(result.final_dir)
    full.set_progress_bar_config(disable=True)
    # the published model carries the run's sampler (configs/toy.yaml: DPM-Solver++); the
    # comparison is of the weights, so both draw with the base's
    full.scheduler = type(loaded.scheduler).from_config(loaded.scheduler.config)
    via_merged = draw(full)
    assert np.abs(via_adapters - via_merged).max() <= 2
    assert np.abs(via_adapters - plain).max() > 2  # the adapters do change the images


def test_lora_final_without_merge_is_adapters_that_evaluation_loads(tmp_path, tiny_model_dir,
                                                                    tiny_pipe, images):
    from craft.stages.evaluation import load_for_eval
    from craft.models.lora import LORA_WEIGHTS, is_lora_folder

    cfg = cfg_for(tiny_model_dir, lora=True, lora_rank=2, lora_alpha=2.0, lr=1e-2)
    result = train(cfg, frame(images, [1.0] * 6), tmp_path / "out", pipe=tiny_pipe)
    assert is_lora_folder(result.final_dir)
    assert sorted(p.name for p in result.final_dir.iterdir()) == ["craft_train.json",
                                                                  LORA_WEIGHTS]
    pipe = load_for_eval(cfg, str(result.final_dir), device="cpu")  # base + fused adapters
    tuned = pipe.unet.state_dict()
    base = base_state(tiny_pipe)
    assert not any("lora" in k for k in tuned) and tuned.keys() == base.keys()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    ckpt = load_for_eval(cfg, str(result.last_checkpoint), device="cpu")
    assert all(torch.equal(v, tuned[k]) for k, v in ckpt.unet.state_dict().items())


def test_resume_refuses_a_checkpoint_of_another_lora_rank(tmp_path, tiny_model_dir, tiny_pipe,
                                                          images):
    df = frame(images, [1.0] * 6)
    out = tmp_path / "out"
    cfg = cfg_for(tiny_model_dir, lora=True, lora_rank=2, lora_alpha=2.0, steps=2,
                  checkpoint_every=1)
    stop = TrainCallbacks(should_stop=lambda: True)
    train(cfg, df, out, pipe=tiny_pipe, callbacks=TrainCallbacks(
        on_step=lambda *a: None, should_stop=lambda: len(list(out.glob("checkpoint-*"))) > 0))
    assert (out / "checkpoint-1").is_dir()
    other = cfg_for(tiny_model_dir, lora=True, lora_rank=4, lora_alpha=4.0, steps=2,
                    checkpoint_every=1)
    with pytest.raises(CraftError, match=r"LoRA rank 2 then, 4 now.*lora_A.*\[2, .*\[4, "):
        train(other, df, out, pipe=tiny_pipe, resume=True, callbacks=stop)
    full = cfg_for(tiny_model_dir, steps=2, checkpoint_every=1)
    with pytest.raises(CraftError, match="LoRA True then, False now"):
        train(full, df, out, pipe=tiny_pipe, resume=True, callbacks=stop)
    # nothing was changed by the refused resumes: the pipeline is the base
    assert not any("lora" in n for n, _ in tiny_pipe.unet.named_parameters())


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_all_zero_weights_leave_the_unet_unchanged(tmp_path, tiny_model_dir, tiny_pipe, images,
                                                   max_grad_norm):
    cfg = cfg_for(tiny_model_dir, max_grad_norm=max_grad_norm)
    result = train(cfg, frame(images, [0.0] * 6), tmp_path / "out", pipe=tiny_pipe)
    base, tuned = base_state(tiny_pipe), unet_state(result.final_dir / "unet")
    assert all(torch.equal(base[k], tuned[k]) for k in base)


def test_a_weight_zero_sample_contributes_nothing(tmp_path, tiny_model_dir, tiny_pipe, images):
    """Two runs that differ only in the image and prompt of a weight-0 sample end identical."""
    cfg = cfg_for(tiny_model_dir, weight_decay=0.01)
    a = train(cfg, frame([images[0], images[1]], [1.0, 0.0], [PROMPTS[0], PROMPTS[1]]),
              tmp_path / "a", pipe=tiny_pipe)
    b = train(cfg, frame([images[0], images[5]], [1.0, 0.0], [PROMPTS[0], PROMPTS[3]]),
              tmp_path / "b", pipe=tiny_pipe)
    sa, sb = unet_state(a.final_dir / "unet"), unet_state(b.final_dir / "unet")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], v) for k, v in base_state(tiny_pipe).items())


def test_rejects_an_empty_or_broken_training_set(tmp_path, tiny_model_dir, images):
    cfg = cfg_for(tiny_model_dir)
    with pytest.raises(CraftError, match="empty"):
        train(cfg, frame([], []), tmp_path / "o")
    with pytest.raises(CraftError, match="missing columns"):
        train(cfg, frame(images[:1], [1.0]).drop(columns="weight"), tmp_path / "o")
    with pytest.raises(CraftError, match="NaN"):
        train(cfg, frame(images[:2], [1.0, float("nan")]), tmp_path / "o")


def test_sdxl_full_finetune_and_its_dropout_conditioning(tmp_path, tiny_model_dir,
                                                        tiny_sdxl_pipe, images):
    """The SDXL path (two text encoders, pooled embeds, time ids) trains and saves a complete
    SDXL pipeline; prompt dropout uses SDXL's zero unconditional embedding."""
    from diffusers import StableDiffusionXLPipeline

    from craft.methods.training import empty_conditioning, encode_text

    empty = empty_conditioning(tiny_sdxl_pipe, "cpu")
    assert set(empty) == {"hidden", "text_embeds", "time_ids"}
    assert not empty["hidden"].any() and not empty["text_embeds"].any()
    cond = encode_text(tiny_sdxl_pipe, PROMPTS[:2], "cpu")
    assert cond["hidden"].shape[-1] == tiny_sdxl_pipe.unet.config.cross_attention_dim
    cfg = cfg_for(tiny_model_dir, cond_dropout=0.5)
    result = train(cfg, frame(images, [1.0] * 6), tmp_path / "out", pipe=tiny_sdxl_pipe)
    tuned = StableDiffusionXLPipeline.from_pretrained(result.final_dir)
    base = tiny_sdxl_pipe.unet.state_dict()
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, base[k])]
    assert len(changed) == len(base)


def test_sd15_dropout_conditioning_is_the_empty_prompt(tiny_pipe):
    from craft.methods.training import empty_conditioning, encode_text

    empty = empty_conditioning(tiny_pipe, "cpu")
    assert torch.equal(empty["hidden"], encode_text(tiny_pipe, [""], "cpu")["hidden"])
    assert empty["hidden"].abs().sum() > 0


# ------------------------------------------------------------------------ cancel and resume


def test_cancel_leaves_a_loadable_checkpoint_and_resume_finishes_identically(
        tmp_path, tiny_model_dir, tiny_pipe, images):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from craft.stages.generation import SamplingParams, generate_images

    # EMA on and two micro-batches per step, so resume must restore weights, EMA and AdamW.
    cfg = cfg_for(tiny_model_dir, steps=4, ema_decay=0.9, effective_batch=4, micro_batch=2)
    df = frame(images, [1.0, 2.0, 0.5, 1.0, 0.3, 1.5])
    out = tmp_path / "out"
    steps_seen: list[int] = []
    checks_after_stop = []
    stop_at = 2

    def should_stop() -> bool:
        if len(steps_seen) >= stop_at:
            checks_after_stop.append(1)
            return True
        return False

    cb = TrainCallbacks(on_step=lambda s, n, m: steps_seen.append(s), should_stop=should_stop)
    result = train(cfg, df, out, callbacks=cb, pipe=tiny_pipe)
    assert result.status == "cancelled"
    assert result.steps_done == stop_at and steps_seen == [1, 2]
    assert len(checks_after_stop) == 1  # stopped at the first check after the request
    assert result.final_dir is None and not (out / "final").exists()
    assert result.last_checkpoint == out / f"checkpoint-{stop_at}" == latest_checkpoint(out)
    UNet2DConditionModel.from_pretrained(result.last_checkpoint / "unet")  # loadable
    # The resumable state is tensors and numbers only.
    torch.load(result.last_checkpoint / "state.pt", weights_only=True)

    steps_seen.clear()
    resumed = train(cfg, df, out, resume=True, pipe=tiny_pipe,
                    callbacks=TrainCallbacks(on_step=lambda s, n, m: steps_seen.append(s)))
    assert resumed.status == "done" and resumed.steps_done == 4 and steps_seen == [3, 4]

    # The resumed run ends where an uninterrupted run ends.
    straight = train(cfg, df, tmp_path / "straight", pipe=tiny_pipe)
    sr, ss = unet_state(resumed.final_dir / "unet"), unet_state(straight.final_dir / "unet")
    worst = max((sr[k] - ss[k]).abs().max().item() for k in sr)
    assert worst < 1e-6

    pipe = StableDiffusionPipeline.from_pretrained(resumed.final_dir)
    [(_, ims)] = list(generate_images(pipe, [PROMPTS[0]], [0], SamplingParams(2)))
    assert ims[0].size == (16, 16)
    meta = json.loads((resumed.final_dir / "craft_train.json").read_text())
    assert meta["steps"] == 4 and meta["n_train"] == 6


# ------------------------------------------------------------------------ timestep weights


@pytest.mark.parametrize("mode", ["uniform", "elbo", "min_snr"])
def test_timestep_weights_have_mean_one(mode):
    from craft.toyworld.model import build_scheduler

    w = timestep_weights(build_scheduler(), mode)
    assert w.shape == (1000,) and torch.isfinite(w).all() and (w > 0).all()
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    if mode == "uniform":
        assert torch.equal(w, torch.ones_like(w))
    if mode == "elbo":  # (1 - abar_t) / (2 beta_t abar_t): grows with the noise level
        assert (w[1:] > w[:-1]).all()
    if mode == "min_snr":  # min(SNR, gamma) / SNR: at most 1 before normalising, flat when noisy
        assert (w[1:] >= w[:-1]).all() and w[-1] == w[-2]


def test_timestep_weights_unknown_mode():
    from craft.toyworld.model import build_scheduler

    with pytest.raises(CraftError, match="uniform, elbo, min_snr"):
        timestep_weights(build_scheduler(), "snr")


def _scheduler(**changes):
    from diffusers import DDPMScheduler

    from craft.toyworld.model import SCHEDULER_CONFIG

    return DDPMScheduler.from_config({**SCHEDULER_CONFIG, **changes})


def test_the_target_follows_the_models_prediction_type():
    from craft.methods.training import training_target

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    eps = _scheduler()
    assert torch.equal(training_target(eps, x0, noise, t), noise)
    v = _scheduler(prediction_type="v_prediction")
    abar = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    np.testing.assert_allclose(training_target(v, x0, noise, t),
                               abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6)
    assert torch.equal(training_target(_scheduler(prediction_type="sample"), x0, noise, t), x0)
    with pytest.raises(CraftError, match="prediction_type='flow'.*epsilon, v_prediction, sample"):
        training_target(_scheduler(prediction_type="flow"), x0, noise, t)


@pytest.mark.parametrize("mode", ["elbo", "min_snr"])
def test_weights_carry_the_epsilon_objective_to_other_targets(mode):
    """||eps_hat - eps||^2 = abar ||v_hat - v||^2 = SNR ||x0_hat - x0||^2, so a weight defined on
    the epsilon error becomes w * abar for v-prediction and w * SNR for x0-prediction (up to the
    mean-one normalisation); a zero-terminal-SNR schedule stays finite."""
    w_eps = timestep_weights(_scheduler(), mode).double()
    abar = _scheduler().alphas_cumprod.double()
    for kind, factor in (("v_prediction", abar), ("sample", abar / (1 - abar))):
        w = timestep_weights(_scheduler(prediction_type=kind), mode).double()
        ratio = w / (w_eps * factor)
        np.testing.assert_allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-6)
    zero = timestep_weights(_scheduler(prediction_type="v_prediction",
                                       rescale_betas_zero_snr=True), mode)
    assert torch.isfinite(zero).all() and zero.mean().item() == pytest.approx(1.0, abs=1e-5)


def test_a_v_prediction_model_trains(tmp_path, tiny_model_dir, images):
    from diffusers import DDIMScheduler

    from craft.models.loading import load_pipeline

    pipe = load_pipeline(tiny_model_dir, family="sd15", dtype="float32", device="cpu")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config,
                                               prediction_type="v_prediction")
    result = train(cfg_for(tiny_model_dir), frame(images, [1.0] * 6), tmp_path / "out", pipe=pipe)
    assert result.status == "done"
    saved = json.loads((result.final_dir / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"


def test_a_run_shorter_than_preview_every_shows_its_first_and_last_previews(tmp_path,
                                                                            tiny_model_dir,
                                                                            tiny_pipe, images):
    """Previews at step 0 and at the last step, whatever preview_every says (a 3-step run with
    preview_every 25 used to show step 0 alone)."""
    cfg = cfg_for(tiny_model_dir, steps=3, preview_every=25,
                  preview_prompts=["a red circle on a blue background"])
    seen = []
    result = train(cfg, frame(images, [1.0] * 6), tmp_path / "out", pipe=tiny_pipe,
                   callbacks=TrainCallbacks(on_preview=lambda step, imgs, p: seen.append(step)))
    assert result.status == "done" and seen == [0, 3]
