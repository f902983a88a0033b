"""What differs between the model families, on a loaded pipeline, in one place.

Every stage works on "the denoiser" (SD1.5/SDXL: ``pipe.unet``; SD3/SD3.5 and FLUX.1:
``pipe.transformer``) and asks this module how the family is conditioned and sampled, so that
generation, training, evaluation and previews are one code path for all four families.

- ``sd15`` (and the toy base): one CLIP text encoder, epsilon or v prediction, CFG.
- ``sdxl``: two CLIP encoders, pooled embeds + size ids, CFG.
- ``sd3``: two CLIP + optional T5 (diffusers allows ``text_encoder_3=None``: zeros), pooled
  embeds, flow matching, CFG.
- ``flux``: CLIP (pooled only) + T5, flow matching on 2x2-packed latents, guidance-distilled
  (FLUX.1-dev's ``guidance_scale`` is an input of the transformer, not two passes; schnell has
  no guidance input).
"""

from __future__ import annotations

FAMILY_PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
FLOW_FAMILIES = ("sd3", "flux")


def family_of(pipe) -> str:
    name = type(pipe).__name__
    for fam, cls in FAMILY_PIPELINES.items():
        if name == cls:
            return fam
    if hasattr(pipe, "transformer"):
        return "flux" if "Flux" in name else "sd3"
    return "sdxl" if hasattr(pipe, "text_encoder_2") else "sd15"


def is_flow(pipe) -> bool:
    return family_of(pipe) in FLOW_FAMILIES


def denoiser_name(pipe) -> str:
    """The pipeline component that is fine-tuned (and its folder name in a saved pipeline)."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def denoiser(pipe):
    return getattr(pipe, denoiser_name(pipe))


def set_denoiser(pipe, module) -> None:
    setattr(pipe, denoiser_name(pipe), module)


def native_size(pipe) -> tuple[int, int]:
    """The model's native (height, width) in pixels: the denoiser's sample size (FLUX's config
    has none; its pipeline's default, 128 latent pixels x 8 = 1024, is used)."""
    size = getattr(denoiser(pipe).config, "sample_size", None) or pipe.default_sample_size
    size = size * pipe.vae_scale_factor
    return size, size


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int]:
    """(channels, h, w) of one image's initial noise, before any packing."""
    vsf = pipe.vae_scale_factor
    if family_of(pipe) == "flux":  # latents are packed 2x2, so h, w are even
        return (denoiser(pipe).config.in_channels // 4, 2 * (height // (vsf * 2)),
                2 * (width // (vsf * 2)))
    return denoiser(pipe).config.in_channels, height // vsf, width // vsf


def pack_latents(pipe, latents):
    """The layout the pipeline's ``latents=`` takes (FLUX: 2x2 patches as tokens)."""
    if family_of(pipe) != "flux":
        return latents
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


def flux_guidance(pipe) -> bool:
    """Whether the FLUX transformer takes the guidance scale as an input (dev: yes)."""
    return bool(getattr(denoiser(pipe).config, "guidance_embeds", False))


# diffusers' defaults for the T5 sequence length (StableDiffusion3Pipeline, FluxPipeline)
T5_DEFAULT_TOKENS = {"sd3": 256, "flux": 512}


def set_t5_tokens(pipe, n: int) -> None:
    """``model.max_sequence_length``: every pipeline craft loads from the config (base, tuned,
    evaluated) gets the same T5 length, so generation, training and evaluation agree."""
    pipe._craft_t5_tokens = int(n)


def t5_tokens(pipe) -> int | None:
    """How many T5 tokens a prompt is padded to: ``model.max_sequence_length`` when set
    (:func:`set_t5_tokens`), else diffusers' default for the family, or less when the model's
    own T5 tokenizer says so (``model_max_length`` in its tokenizer_config.json; the flow toy
    base saves 16). None for families without T5. Read from the saved model, so generation,
    training and a tuned copy agree."""
    fam = family_of(pipe)
    if fam not in T5_DEFAULT_TOKENS:
        return None
    if getattr(pipe, "_craft_t5_tokens", None):
        return pipe._craft_t5_tokens
    tok = getattr(pipe, "tokenizer_3" if fam == "sd3" else "tokenizer_2", None)
    limit = getattr(tok, "model_max_length", None) if tok is not None else None
    default = T5_DEFAULT_TOKENS[fam]
    return min(default, int(limit)) if limit and limit < 10**6 else default


def encode_prompts(pipe, prompts: list[str], *, cfg: bool, negative: list[str] | None = None,
                   device=None) -> dict:
    """The denoiser's text conditioning for ``prompts`` as the pipeline's ``__call__`` takes it
    (keyword -> tensor with one row per prompt), from the pipeline's own ``encode_prompt``."""
    fam = family_of(pipe)
    device = device or pipe.device
    if fam == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device,
                                               num_images_per_prompt=1,
                                               max_sequence_length=t5_tokens(pipe))
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if fam == "sd3":
        out = pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=cfg, negative_prompt=negative,
                                 max_sequence_length=t5_tokens(pipe))
    elif fam == "sdxl":
        out = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=cfg, negative_prompt=negative)
    else:
        out = pipe.encode_prompt(prompts, device, 1, cfg, negative_prompt=negative)
        return {k: v for k, v in zip(("prompt_embeds", "negative_prompt_embeds"), out)
                if v is not None}
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds")
    return {k: v for k, v in zip(names, out) if v is not None}
