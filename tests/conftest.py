"""Shared fixtures: a tiny Stable Diffusion pipeline built from config (random weights, no hub).

The tiny model has the real component classes (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel + the toy CLIPTokenizer, DDIM) at a size where a whole generate / train /
evaluate cycle takes well under a second on one CPU thread. It is saved once per test session
with ``save_pretrained`` and loaded with the same ``from_pretrained`` call that loads SD1.5.
"""

from __future__ import annotations

import os

import pytest

# Keep every test (and every subprocess a test starts) on one thread: the development machine
# has two cores and other jobs running.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_UNET = dict(sample_size=8, block_out_channels=(16, 32), norm_num_groups=8,
                 attention_head_dim=2, addition_embed_type_num_heads=2)
TINY_VAE = dict(sample_size=16, block_out_channels=(8, 16), norm_num_groups=8)
TINY_SCALING_FACTOR = 0.7


def build_tiny_pipeline(tokenizer_dir, seed: int = 0):
    """A StableDiffusionPipeline of toy classes at test size (16x16 RGB images, 8x8 latents)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from craft.toyworld.model import (UNET_CONFIG, VAE_CONFIG, assemble_pipeline,
                                      build_scheduler, build_text_encoder, load_tokenizer,
                                      write_tokenizer)

    write_tokenizer(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**VAE_CONFIG, **TINY_VAE})
    vae.register_to_config(scaling_factor=TINY_SCALING_FACTOR)
    unet = UNet2DConditionModel(**{**UNET_CONFIG, **TINY_UNET})
    text_encoder = build_text_encoder(tokenizer)
    return assemble_pipeline(vae, text_encoder, tokenizer, unet, build_scheduler())


def build_tiny_sdxl_pipeline(tokenizer_dir, seed: int = 0):
    """A StableDiffusionXLPipeline at test size: two text encoders (the second with a projection
    for the pooled embedding), a UNet with SDXL's text_time added conditioning."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from craft.toyworld.model import (UNET_CONFIG, VAE_CONFIG, build_scheduler,
                                      load_tokenizer, text_encoder_config, write_tokenizer)

    write_tokenizer(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    te_config = text_encoder_config(tokenizer)
    te2_config = text_encoder_config(tokenizer)
    te2_config.projection_dim = 32
    time_dim = 8
    unet = UNet2DConditionModel(**{
        **UNET_CONFIG, **TINY_UNET, "cross_attention_dim": 2 * te_config.hidden_size,
        "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": te2_config.projection_dim + 6 * time_dim})
    vae = AutoencoderKL(**{**VAE_CONFIG, **TINY_VAE})
    vae.register_to_config(scaling_factor=TINY_SCALING_FACTOR)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(te_config),
        text_encoder_2=CLIPTextModelWithProjection(te2_config), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=build_scheduler())


@pytest.fixture(scope="session")
def tiny_sdxl_pipe(tmp_path_factory):
    """A tiny SDXL pipeline (in memory, CPU, float32)."""
    pipe = build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "tokenizer")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path (str) of a tiny diffusers-format pipeline with random weights."""
    root = tmp_path_factory.mktemp("tiny-sd")
    pipe = build_tiny_pipeline(root / "tokenizer-src")
    out = root / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return str(out)


def build_tiny_flow_pipeline(tokenizer_dir: Path):
    """The flow toy base's architecture (SD3 classes: MMDiT, two CLIP + T5, flow scheduler;
    craft.toyworld.flow_model) with random weights."""
    import torch

    from craft.toyworld import flow_model as fm
    from craft.toyworld import model as tm

    torch.manual_seed(0)
    tok = tm.load_tokenizer(tm.write_tokenizer(tokenizer_dir / "clip"))
    tok3 = tm.load_t5_tokenizer(tm.write_t5_tokenizer(tokenizer_dir / "t5", fm.T5_TOKENS))
    vae = tm.build_vae()
    vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
    return fm.assemble_pipeline(vae, (fm.build_text_encoder(tok), fm.build_text_encoder(tok),
                                      fm.build_t5(tok3)), tok, tok3, fm.build_transformer())


@pytest.fixture(scope="session")
def tiny_flow_model_dir(tmp_path_factory):
    """Path (str) of a saved SD3-architecture toy pipeline with random weights."""
    root = tmp_path_factory.mktemp("tiny-flow")
    out = root / "model"
    build_tiny_flow_pipeline(root / "tokenizers").save_pretrained(out, safe_serialization=True)
    return str(out)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    """The tiny pipeline, loaded once through craft.models.loading (CPU, float32). Do not mutate."""
    from craft.models.loading import load_pipeline

    return load_pipeline(tiny_model_dir, family="sd15", dtype="float32", device="cpu")


@pytest.fixture
def tiny_pipe_copy(tiny_model_dir):
    """A fresh tiny pipeline for a test that modifies it."""
    from craft.models.loading import load_pipeline

    return load_pipeline(tiny_model_dir, family="sd15", dtype="float32", device="cpu")


def tiny_overrides(model_dir: str, **extra) -> list[str]:
    """``--set`` overrides for a run on the tiny model with tiny sizes everywhere."""
    base = {
        "model.pretrained": model_dir, "model.device": "cpu", "model.dtype": "float32",
        "prompts.max_prompts": 4, "prompts.max_eval_prompts": 2, "prompts.num_variants": 2,
        "generation.seeds_per_prompt": 2, "generation.num_inference_steps": 3,
        "generation.batch_size": 8,
        # every planned candidate finished, as the counts of most tests assume (configs/toy.yaml
        # turns early rejection on; tests/test_early_reject.py turns it back on)
        "generation.early_reject": "false",
        "rewards.batch_size": 64,
        "filter.level": "h", "filter.top_k": 20,
        "train.steps": 2, "train.effective_batch": 4, "train.micro_batch": 2,
        "train.checkpoint_every": 1, "train.preview_every": 0, "train.ema_decay": 0.0,
        "eval.num_prompts": 2, "eval.seeds_per_prompt": 2, "eval.num_inference_steps": 3,
        "eval.batch_size": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(model_dir: str, **extra):
    """A resolved CraftConfig (configs/toy.yaml + :func:`tiny_overrides`)."""
    from craft.run.config import load_config

    return load_config(None, tiny_overrides(model_dir, **extra))


@pytest.fixture(autouse=True)
def _restore_flush_denormal():
    """The CLI turns on torch's flush-to-zero for speed; keep it from leaking into later tests
    (hypothesis refuses to run float strategies when subnormals are flushed)."""
    yield
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_flush_denormal(False)
