"""The flow toy base: the real SD3 component classes at a tiny size.

A StableDiffusion3Pipeline with a 4-layer SD3Transformer2DModel (MMDiT: image and text tokens in
one joint attention, adaLN-zero time and pooled-text conditioning, patch size 2 on the toy VAE's
16x16x4 latent = 64 image tokens) and SD3's three text encoders at a tiny size: two
CLIPTextModelWithProjection on the toy vocabulary (their penultimate hidden states, side by
side, padded to the T5 width, are the first text tokens; their pooled projections the pooled
input) and a 2-layer T5EncoderModel (T5 v1.1's gated-GELU) with a T5 tokenizer built offline
(craft.toyworld.model.write_t5_tokenizer); the toy VAE of the UNet base (assets/toy-base/vae)
with its latent mean and scale measured for this model; a FlowMatchEulerDiscreteScheduler.

Because every part is the real class, ``DiffusionPipeline.from_pretrained`` loads it as it loads
SD3.5, and every stage of craft runs on it through the same code as on the real models.

T5 reads ``T5_TOKENS`` tokens (the richest caption is 15 words + EOS; diffusers' default, 256,
would be 85 % padding); craft passes it as ``model.max_sequence_length`` (configs/toy-flow.yaml).
A direct ``pipe(prompt)`` call should pass ``max_sequence_length=16`` likewise.
"""

from __future__ import annotations

from . import model as toymodel

T5_TOKENS = 16  # T5's sequence length, in training and at sampling
SHIFT = 1.0  # 64 image tokens: no resolution shift (SD3.5 uses 3.0 at 4096 tokens)

TRANSFORMER_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
    attention_head_dim=32, num_attention_heads=4,
    joint_attention_dim=2 * toymodel.TEXT_DIM,  # the two CLIP encoders' hidden states, side by side
    caption_projection_dim=128, pooled_projection_dim=2 * toymodel.TEXT_DIM,
    pos_embed_max_size=8,
)

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=SHIFT)


def build_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def build_text_encoder(tokenizer):
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(toymodel.text_encoder_config(tokenizer))


def build_t5(tokenizer_3):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=TRANSFORMER_CONFIG["joint_attention_dim"], d_kv=32,
        d_ff=256, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=T5_TOKENS,
        pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id,
        decoder_start_token_id=tokenizer_3.pad_token_id))


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(vae, text_encoders: tuple, tokenizer, tokenizer_3, transformer,
                      scheduler=None):
    from diffusers import StableDiffusion3Pipeline

    te1, te2, te3 = text_encoders
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler or build_scheduler(), vae=vae,
        text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2, tokenizer_2=tokenizer,
        text_encoder_3=te3, tokenizer_3=tokenizer_3)


def encode_captions(pipe, captions: list[str], device=None):
    """(prompt_embeds, pooled) exactly as the pipeline builds them, with gradients (the toy base
    trains its text encoders): the pipeline's own ``encode_prompt``, which keeps autograd."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        captions, None, None, device=device or pipe.text_encoder.device,
        do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
    return embeds, pooled
