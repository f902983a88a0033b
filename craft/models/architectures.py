"""The real SD1.5, SDXL, SD3.5-Medium and FLUX.1 component configs, to build random-weight
models of those architectures.

Nothing here downloads anything: the configs are written out from the published
``config.json`` files of ``stable-diffusion-v1-5/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-xl-base-1.0``, ``stabilityai/stable-diffusion-3.5-medium`` and
``black-forest-labs/FLUX.1-dev`` / ``FLUX.1-schnell`` (denoiser, VAE, text encoders, scheduler,
pipeline flags). ``build_pipeline(family, tokenizer)`` assembles a pipeline of the real size with random
weights (what ``benchmarks/gpu.py`` times), and ``build_pipeline(family, tokenizer, tiny=True)``
the *same structure* (block types, layers per block, transformer depth pattern, attention
layout, added conditioning, text-encoder activations and EOS convention) with tiny widths, for
tests and CPU smoke runs. Only widths, depths of the text encoders and sample sizes shrink.
"""

from __future__ import annotations

import copy

FAMILIES = ("sd15", "sdxl", "sd3", "flux", "flux-schnell")

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

# ---------------------------------------------------------------------------------- SD3.5 Medium

SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)

# SD3's 16-channel VAE (no quant convs; latents are shifted as well as scaled)
FLOW_VAE = dict(
    sample_size=1024, in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", use_quant_conv=False, use_post_quant_conv=False,
)
SD3_VAE = {**FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {**FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

CLIP_L_PROJ_TEXT = {**CLIP_L_TEXT, "eos_token_id": 49407, "pad_token_id": 1}
CLIP_G_PROJ_TEXT = {**CLIP_BIGG_TEXT, "eos_token_id": 49407, "pad_token_id": 1}

# google/t5-v1_1-xxl's encoder, as saved in SD3.5's and FLUX's text_encoder_3 / text_encoder_2
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
    relative_attention_max_distance=128, dense_act_fn="gelu_new", is_gated_act=True,
    layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    tie_word_embeddings=False,
)

SD3_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000,
                     shift=3.0)

# ---------------------------------------------------------------------------------- FLUX.1

FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)

FLUX_DEV_SCHEDULER = dict(
    _class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
    use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
    max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler",
                              num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

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
    # SD3: the CLIP-L + CLIP-G hidden states side by side (32 + 64) fill the T5 width (96)
    "sd3_transformer": dict(sample_size=8, num_layers=2, attention_head_dim=8,
                            num_attention_heads=2, joint_attention_dim=96,
                            caption_projection_dim=16, pooled_projection_dim=64,
                            pos_embed_max_size=16, dual_attention_layers=(0,)),
    "flow_vae": dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64),
    "t5_sd3": dict(d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16),
    "flux_transformer": dict(num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32,
                             pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
    "t5_flux": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16),
}


def component_configs(family: str, tiny: bool = False) -> dict[str, dict]:
    """``{"unet", "vae", "text_encoder"[, "text_encoder_2"], "scheduler"}`` config dicts."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {list(FAMILIES)}")
    t = TINY if tiny else {k: {} for k in TINY}
    if family == "sd3":
        return copy.deepcopy({
            "transformer": {**SD35M_TRANSFORMER, **t["sd3_transformer"]},
            "vae": {**SD3_VAE, **t["flow_vae"]},
            "text_encoder": {**CLIP_L_PROJ_TEXT, **t["clip_l"]},
            "text_encoder_2": {**CLIP_G_PROJ_TEXT, **t["clip_bigg"]},
            "text_encoder_3": {**T5_XXL, **t["t5_sd3"]}, "scheduler": SD3_SCHEDULER})
    if family.startswith("flux"):
        schnell = family == "flux-schnell"
        return copy.deepcopy({
            "transformer": {**FLUX_TRANSFORMER, **t["flux_transformer"],
                            "guidance_embeds": not schnell},
            "vae": {**FLUX_VAE, **t["flow_vae"]},
            "text_encoder": {**CLIP_L_TEXT, **t["clip_l"]},
            "text_encoder_2": {**T5_XXL, **t["t5_flux"]},
            "scheduler": FLUX_SCHNELL_SCHEDULER if schnell else FLUX_DEV_SCHEDULER})
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


def build_pipeline(family: str, tokenizer, *, tokenizer_2=None, t5_tokenizer=None,
                   tiny: bool = False, seed: int = 0, dtype=None, with_t5: bool = True):
    """A pipeline of the real architecture with random weights (``tiny=True``: tiny widths,
    same structure): StableDiffusionPipeline (``sd15``), StableDiffusionXLPipeline (``sdxl``),
    StableDiffusion3Pipeline (``sd3``: SD3.5-Medium; ``with_t5=False`` leaves T5 out, as
    diffusers allows) or FluxPipeline (``flux``: FLUX.1-dev; ``flux-schnell``: no guidance
    input, its scheduler).

    ``tokenizer`` is a CLIPTokenizer with the real CLIP vocabulary (49408 tokens, 77 positions);
    SDXL's ``tokenizer_2`` defaults to it (the published one differs only in padding with "!").
    ``t5_tokenizer``: a T5TokenizerFast (sd3, flux); any vocabulary within T5's 32128 ids.
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
    if family in ("sd3", "flux", "flux-schnell"):
        pipe = _build_flow_pipeline(family, cfgs, scheduler, tokenizer, t5_tokenizer, with_t5)
        if dtype is not None:
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe
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



def _build_flow_pipeline(family, cfgs, scheduler, tokenizer, t5_tokenizer, with_t5: bool):
    import diffusers
    from diffusers import AutoencoderKL
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              T5Config, T5EncoderModel)

    if t5_tokenizer is None and (family != "sd3" or with_t5):
        raise ValueError(f"family={family!r} needs t5_tokenizer (a T5TokenizerFast)")
    vae = AutoencoderKL(**cfgs["vae"])
    if family == "sd3":
        transformer = diffusers.SD3Transformer2DModel(**cfgs["transformer"])
        te3 = T5EncoderModel(T5Config(**cfgs["text_encoder_3"])) if with_t5 else None
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae,
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["text_encoder"])),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["text_encoder_2"])),
            tokenizer_2=tokenizer, text_encoder_3=te3,
            tokenizer_3=t5_tokenizer if with_t5 else None)
    transformer = diffusers.FluxTransformer2DModel(**cfgs["transformer"])
    return diffusers.FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"])), tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(T5Config(**cfgs["text_encoder_2"])),
        tokenizer_2=t5_tokenizer)
