"""SD3 / SD3.5 and FLUX.1 through the same loading, generation and training code as the UNets, on
tiny models of the real architectures (craft.models.architectures: same block structure, tiny widths),
random weights, saved and reloaded in diffusers format. Nothing is downloaded: the CLIP tokenizer
is the real BPE vocabulary built offline (tests/reward_fixtures.py), the T5 tokenizer is built
offline from a (piece, score) list (craft.toyworld.model.write_t5_tokenizer)."""

from __future__ import annotations

import json
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from craft import CraftError
from craft.models.loading import _family_from_keys, detect_family, load_pipeline
from sd_fixtures import (PROMPTS, batched_equals_alone, images, offline,  # noqa: F401
                         states_equal, tokenizers)

SIZE = 64  # pixels: tiny VAEs downsample 8x, so an 8x8 latent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny SD3 (three text encoders), SD3 without T5, FLUX.1-dev and FLUX.1-schnell pipelines,
    each saved with save_pretrained and kept in memory for comparison."""
    from craft.models.architectures import build_pipeline
    from craft.toyworld.model import load_t5_tokenizer, write_t5_tokenizer

    root = tmp_path_factory.mktemp("flow-models")
    tok, _ = tokenizers(root)
    t5 = load_t5_tokenizer(write_t5_tokenizer(root / "t5-tokenizer", max_length=16))
    w = types.SimpleNamespace(root=root)
    for name, family, extra in (("sd3", "sd3", {}), ("sd3_no_t5", "sd3", {"with_t5": False}),
                                ("flux", "flux", {}), ("schnell", "flux-schnell", {})):
        pipe = build_pipeline(family, tok, t5_tokenizer=t5, tiny=True, seed=1, **extra)
        folder = root / name
        pipe.save_pretrained(folder, safe_serialization=True)
        setattr(w, name, pipe)
        setattr(w, f"{name}_dir", folder)
    return w


def _params(steps=3, guidance=4.0):
    from craft.stages.generation import SamplingParams

    return SamplingParams(num_inference_steps=steps, guidance_scale=guidance, height=SIZE,
                          width=SIZE)


def _load(folder, **kw):
    return load_pipeline(folder, device="cpu", dtype="float32", **kw)


# ------------------------------------------------------------------------ loading, families


@pytest.mark.parametrize("name,family,cls", [
    ("sd3", "sd3", "StableDiffusion3Pipeline"), ("sd3_no_t5", "sd3", "StableDiffusion3Pipeline"),
    ("flux", "flux", "FluxPipeline"), ("schnell", "flux", "FluxPipeline")])
def test_flow_folders_load_with_their_family_and_every_weight(world, name, family, cls):
    folder = getattr(world, f"{name}_dir")
    assert detect_family(folder) == family
    pipe = _load(folder)
    assert type(pipe).__name__ == cls
    ref = getattr(world, name)
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(ref, comp, None) is not None:
            assert states_equal(getattr(pipe, comp), getattr(ref, comp)), comp
    if name == "sd3_no_t5":
        assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    # the T5 tokenizer came back from its tokenizer.json alone, EOS-terminated, no BOS
    t5 = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer_3
    if t5 is not None:
        ids = t5("a red circle").input_ids
        assert ids[-1] == t5.eos_token_id == 1 and len(ids) == 4


def test_explicit_family_must_match_and_unknown_pipelines_are_refused(world, tmp_path):
    assert detect_family(world.flux_dir, "flux") == "flux"
    with pytest.raises(CraftError, match="holds an sd3 model"):
        detect_family(world.sd3_dir, "flux")
    other = tmp_path / "pixart"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(CraftError) as e:
        detect_family(other)
    msg = str(e.value)
    assert "PixArtSigmaPipeline" in msg
    for known in ("sd15", "sdxl", "sd3 (StableDiffusion3Pipeline)", "flux (FluxPipeline)"):
        assert known in msg
    with pytest.raises(CraftError, match="not one of"):
        detect_family(world.sd3_dir, "pixart")


def test_family_from_single_file_keys_in_every_layout():
    """Original layouts (SD3's joint_blocks, Black Forest Labs' double/single blocks, with or
    without the LDM prefix) and diffusers-layout transformer files."""
    assert _family_from_keys(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]) \
        == "sd3"
    assert _family_from_keys(["double_blocks.0.img_attn.qkv.weight"]) == "flux"
    assert _family_from_keys(["model.diffusion_model.single_blocks.3.linear1.weight"]) == "flux"
    assert _family_from_keys(["pos_embed.proj.weight", "transformer_blocks.0.attn.to_q.weight"]) \
        == "sd3"
    assert _family_from_keys(["single_transformer_blocks.0.attn.to_q.weight"]) == "flux"
    assert _family_from_keys(["model.diffusion_model.input_blocks.0.0.weight"]) == "sd15"


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_single_transformer_file_loads_into_its_pipeline(world, tmp_path, name):
    """A fine-tuned transformer shared as one .safetensors file: the transformer from the file,
    everything else from model.single_file_config (a diffusers folder with weights)."""
    from safetensors.torch import save_file

    ref = getattr(world, name)
    tuned = type(ref.transformer).from_config(ref.transformer.config)  # other weights
    path = tmp_path / f"{name}-transformer.safetensors"
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(path))
    assert detect_family(path) == name
    pipe = _load(path, single_file_config=str(getattr(world, f"{name}_dir")))
    assert type(pipe).__name__ == type(ref).__name__
    assert states_equal(pipe.transformer, tuned)
    assert states_equal(pipe.vae, ref.vae)
    # without the folder it says what to give, and does not go online
    from craft import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="model.single_file_config"):
        _load(path)
    # a configs-only folder (no weights for the VAE / text encoders) is not enough
    bare = tmp_path / "configs-only"
    import shutil

    shutil.copytree(getattr(world, f"{name}_dir"), bare,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(MissingWeightsError, match="vae/ weights"):
        _load(path, single_file_config=str(bare))


# ------------------------------------------------------------------------ generation


@pytest.mark.parametrize("name", ["sd3", "sd3_no_t5", "flux", "schnell"])
def test_generation_is_seeded_per_candidate_alone_or_batched(world, name):
    pipe = _load(getattr(world, f"{name}_dir"))
    params = _params(guidance=0.0 if name == "schnell" else 4.0)
    out = batched_equals_alone(pipe, params)
    assert out.shape == (4, SIZE, SIZE, 3)


def test_generation_uses_the_models_t5_length_and_flow_scheduler(world):
    """The T5 length is the saved tokenizer's model_max_length (16 here) when it is below
    diffusers' default; a noise-prediction sampler is refused for a flow model."""
    from craft.stages.generation import apply_scheduler
    from craft.models.families import t5_tokens

    pipe = _load(world.sd3_dir)
    assert t5_tokens(pipe) == 16 and t5_tokens(_load(world.flux_dir)) == 16
    assert t5_tokens(_load(world.sd3_no_t5_dir)) == 256  # diffusers' zeros
    with pytest.raises(CraftError, match="scheduler=.ddim. is not a sampler for this flow"):
        apply_scheduler(pipe, "ddim")
    assert apply_scheduler(pipe, "default").scheduler.config.shift == 3.0


# ------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def frames(world) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("sd3", "flux"):
        pipe = getattr(world, name)
        arrays = images(pipe, PROMPTS * 2, [1, 2, 3, 4], 4, _params(2))
        paths = [str(world.root / f"{name}-{i}.png") for i in range(len(arrays))]
        for arr, path in zip(arrays, paths):
            Image.fromarray(arr).save(path)
        out[name] = pd.DataFrame({"image_path": paths, "prompt": PROMPTS * 2,
                                  "weight": [1.0, 0.5, 2.0, 1.0]})
    return out


def _cfg(model_dir, **extra):
    over = {"model.family": "auto", "train.lr": 1e-3, "train.weight_decay": 0.0,
            "train.checkpoint_every": 1, "train.cond_dropout": 0.25,
            "generation.scheduler": "default", "generation.height": SIZE,
            "generation.width": SIZE}
    over.update(extra)
    return tiny_config(str(model_dir), **over)


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora+grad-checkpointing"])
def test_flow_training_changes_every_trainable_parameter_and_saves(world, frames, tmp_path,
                                                                   name, lora):
    """Two steps of the flow-matching CRAFT loss: full fine-tuning changes every transformer
    parameter; LoRA changes exactly the attention projections it targets. final/ is a complete
    pipeline of the family (LoRA: the adapters, loaded into the base by evaluation);
    checkpoint-N holds a loadable transformer (LoRA: the adapters)."""
    from craft.stages.evaluation import load_for_eval
    from craft.models.lora import LORA_WEIGHTS
    from craft.methods.training import LORA_TARGETS, train

    ref = getattr(world, name)
    extra = {"train.lora": True, "train.lora_rank": 4,
             "model.gradient_checkpointing": True} if lora else {}
    cfg = _cfg(getattr(world, f"{name}_dir"), **extra)
    result = train(cfg, frames[name], tmp_path / "out", pipe=_load(getattr(world, f"{name}_dir")))
    assert result.status == "done" and result.steps_done == 2
    tuned = (load_for_eval(cfg, str(result.final_dir), device="cpu") if lora
             else _load(result.final_dir))
    assert type(tuned).__name__ == type(ref).__name__
    assert states_equal(tuned.vae, ref.vae) and states_equal(tuned.text_encoder, ref.text_encoder)
    base = ref.transformer.state_dict()
    changed = {k for k, v in tuned.transformer.state_dict().items()
               if not torch.equal(v, base[k])}
    params = {k for k, _ in ref.transformer.named_parameters()}
    # SD3's last joint block is "context_pre_only": its text-stream output is dropped, so its
    # text queries never reach the loss (a dead parameter of the architecture, not of the
    # training); every other parameter (LoRA: every targeted projection) moves
    dead = set()
    if name == "sd3":
        last = ref.transformer.config.num_layers - 1
        dead = {k for k in params if k.startswith(f"transformer_blocks.{last}.attn.")
                and ("add_q_proj" in k or "norm_added_q" in k)}
        assert len(dead) == 3
    if lora:
        targets = {k for k in base if any(k.endswith(f".{t}.weight")
                                          for t in LORA_TARGETS["transformer"])}
        assert targets and changed == targets - dead
    else:
        assert changed == params - dead, (params - dead - changed, changed - params)
    ckpt = result.last_checkpoint
    assert (ckpt / (LORA_WEIGHTS if lora else "transformer/config.json")).is_file()
    evaluated = load_for_eval(cfg, str(ckpt), device="cpu")
    assert states_equal(evaluated.transformer, tuned.transformer)


def test_flow_loss_is_the_advantage_weighted_velocity_error(world, frames):
    """micro_batch_loss on SD3 equals weight_i * w(sigma_i) * ||v_theta(x_t) - (eps - x_0)||^2
    recomputed by hand from the same draws, with x_t = (1 - sigma) x_0 + sigma eps and sigma
    from the shifted training grid, as diffusers' SD3 script draws it."""
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from craft.methods.training import encode_dataset, micro_batch_loss

    pipe = _load(world.sd3_dir)
    cfg = _cfg(world.sd3_dir, **{"train.cond_dropout": 0.0,
                                 "train.timestep_weighting": "cosmap"})
    data = encode_dataset(cfg, pipe, frames["sd3"], torch.device("cpu"))
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    acc = Accelerator(cpu=True)
    model = pipe.transformer
    loss = micro_batch_loss(model, sched, None, data, cfg.train, 3, 0, 0, acc)

    tc = cfg.train
    gen = torch.Generator().manual_seed(((tc.seed * 1_000_003 + 3) * 1009 + 0) * 97 + 0)
    idx = torch.randint(0, len(data), (tc.micro_batch,), generator=gen)
    x0 = data.lat_mean[idx] + data.lat_std[idx] * torch.randn(data.lat_mean[idx].shape,
                                                              generator=gen)
    x0 = (x0 - data.shift) * data.scaling
    eps = torch.randn(x0.shape, generator=gen)
    u = compute_density_for_timestep_sampling("logit_normal", len(idx), logit_mean=0.0,
                                              logit_std=1.0, generator=gen)
    ind = (u * 1000).long()
    t, sigma = sched.timesteps[ind], sched.sigmas[ind]
    shift = 3.0  # the model's scheduler: sigma = shift s / (1 + (shift - 1) s), s = t / 1000
    s = 1 - ind.float() / 1000
    assert torch.allclose(sigma, shift * s / (1 + (shift - 1) * s), atol=1e-5)
    xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        pred = model(hidden_states=xt, timestep=t, encoder_hidden_states=data.cond["hidden"][idx],
                     pooled_projections=data.cond["pooled"][idx]).sample
    w = 2 / (np.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    expected = (data.weights[idx] * w * ((pred - (eps - x0)) ** 2).mean(dim=(1, 2, 3))).mean()
    assert torch.allclose(loss.detach(), expected, rtol=1e-4)


def test_noise_prediction_weightings_are_refused_for_flow_models(world, frames, tmp_path):
    from craft.methods.training import train

    cfg = _cfg(world.sd3_dir, **{"train.timestep_weighting": "min_snr"})
    with pytest.raises(CraftError, match="flow matching: use one of"):
        train(cfg, frames["sd3"], tmp_path / "out", pipe=_load(world.sd3_dir))


def test_model_max_sequence_length_sets_the_t5_length_everywhere(world, frames):
    """model.max_sequence_length (FLUX.1-schnell: 256) reaches every pipeline loaded from the
    config, so generation and training encode prompts to the same length."""
    from craft.models.loading import load_from_config
    from craft.models.families import t5_tokens
    from craft.methods.training import encode_text

    cfg = _cfg(world.flux_dir, **{"model.max_sequence_length": 8})
    pipe = load_from_config(cfg.model)
    assert t5_tokens(pipe) == 8
    assert encode_text(pipe, PROMPTS, torch.device("cpu"))["hidden"].shape[1] == 8
    assert t5_tokens(load_from_config(_cfg(world.flux_dir).model)) == 16  # the tokenizer's
    from craft.run.config import ConfigError

    with pytest.raises(ConfigError, match="model.max_sequence_length"):
        _cfg(world.flux_dir, **{"model.max_sequence_length": 0})
