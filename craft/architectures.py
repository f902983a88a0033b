"""The real SD1.5 and SDXL component configs, to build random-weight models of those architectures.

Nothing here downloads anything: the configs are written out from the published
``config.json`` files of ``stable-diffusion-v1-5/stable-diffusion-v1-5`` and
``stabilityai/stable-diffusion-xl-base-1.0`` (UNet, VAE, text encoders, scheduler, pipeline
flags). ``build_pipeline(family, tokenizer)`` assembles a pipeline of the real size with random
weights (what ``benchmarks/gpu.py`` times), and ``build_pipeline(family, tokenizer, tiny=True)``
the *same structure* (block types, layers per block, transformer depth pattern, attention
layout, added conditioning, text-encoder activations and EOS convention) with tiny widths, for
tests and CPU smoke runs. Only widths, depths of the text encoders and sample sizes shrink.
"""

from __future__ import annotations

import copy

FAMILIES = ("sd15", "sdxl")

# ---------------------------------------------------------------------------------- SD1.5

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, mid_block_scale_factor=1,
)

SD_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)

# openai/clip-vit-large-patch14's text tower, as saved in SD1.5's text_encoder/config.json
# (including its legacy token ids: eos_token_id=2 makes transformers pool at argmax(input_ids),
# which is where the real EOS token 49407 sits).
CLIP_L_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)

SD15_SCHEDULER = dict(
    _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", num_train_timesteps=1000, set_alpha_to_one=False,
    skip_prk_steps=True, steps_offset=1, clip_sample=False,
)

# ---------------------------------------------------------------------------------- SDXL

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    # pooled text embedding of text_encoder_2 (1280) + 6 time ids x 256
    projection_class_embeddings_input_dim=2816,
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)

SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

CLIP_BIGG_TEXT = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
    projection_dim=1280, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)

SDXL_SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", num_train_timesteps=1000, interpolation_type="linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    use_karras_sigmas=False,
)

# ---------------------------------------------------------------------------------- tiny

# Same structure, tiny widths: every change is a width, a text-encoder depth or a sample size.
TINY = {
    "sd15_unet": dict(block_out_channels=(32, 32, 64, 64), attention_head_dim=2,
                      norm_num_groups=8, cross_attention_dim=32, sample_size=8),
    "sd_vae": dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64),
    "clip_l": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, projection_dim=32),
    "sdxl_unet": dict(block_out_channels=(32, 64, 64), attention_head_dim=(2, 2, 4),
                      transformer_layers_per_block=(1, 1, 2), norm_num_groups=8,
                      cross_attention_dim=32 + 64, addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=8),
    "clip_bigg": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, projection_dim=32),
}


def component_configs(family: str, tiny: bool = False) -> dict[str, dict]:
    """``{"unet", "vae", "text_encoder"[, "text_encoder_2"], "scheduler"}`` config dicts."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {list(FAMILIES)}")
    t = TINY if tiny else {k: {} for k in TINY}
    if family == "sd15":
        out = {"unet": {**SD15_UNET, **t["sd15_unet"]}, "vae": {**SD_VAE, **t["sd_vae"]},
               "text_encoder": {**CLIP_L_TEXT, **t["clip_l"]}, "scheduler": SD15_SCHEDULER}
    else:
        out = {"unet": {**SDXL_UNET, **t["sdxl_unet"]},
               "vae": {**SDXL_VAE, **t["sd_vae"], "sample_size": 8 * t["sdxl_unet"].get(
                   "sample_size", SDXL_UNET["sample_size"])},
               "text_encoder": {**CLIP_L_TEXT, **t["clip_l"]},
               "text_encoder_2": {**CLIP_BIGG_TEXT, **t["clip_bigg"]},
               "scheduler": SDXL_SCHEDULER}
    return copy.deepcopy(out)


def build_pipeline(family: str, tokenizer, *, tokenizer_2=None, tiny: bool = False,
                   seed: int = 0, dtype=None):
    """A StableDiffusionPipeline (``sd15``) or StableDiffusionXLPipeline (``sdxl``) of the
    real architecture with random weights (``tiny=True``: tiny widths, same structure).

    ``tokenizer`` is a CLIPTokenizer with the real CLIP vocabulary (49408 tokens, 77 positions);
    SDXL's ``tokenizer_2`` defaults to it (the published one differs only in padding with "!").
    Built under ``torch.manual_seed(seed)``; ``dtype`` casts every component.
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfgs = component_configs(family, tiny)
    torch.manual_seed(seed)
    sched_cfg = dict(cfgs["scheduler"])
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    unet = UNet2DConditionModel(**cfgs["unet"])
    vae = AutoencoderKL(**cfgs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))
    if family == "sd15":
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    else:
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["text_encoder_2"]))
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer_2 or tokenizer, unet=unet,
            scheduler=scheduler, force_zeros_for_empty_prompt=True)
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe

