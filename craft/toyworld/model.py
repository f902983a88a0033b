"""The toy base model: the real Stable Diffusion component classes at a tiny size.

A 32x32 RGB image is encoded by an AutoencoderKL to a 16x16x4 latent; a UNet2DConditionModel
denoises it, conditioned on a 2-layer CLIPTextModel through cross-attention *and* a pooled
text embedding added to the time embedding (``addition_embed_type="text"``). The pooled path
gives every resnet block the caption's global words (colours, "large", "sharp"), which is what
makes the rich words bind strongly enough for CRAFT's variants to matter; a cross-attention-only
model of this size bound them weakly in planning probes.

Because the components are the real classes, ``StableDiffusionPipeline.from_pretrained`` loads
the saved model exactly as it loads SD1.5, and every later stage runs unchanged on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .grammar import COLOURS, POSITIONS, SHAPES, SHARPNESS, SIZES, TEXTURES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 24  # the richest caption is 16 tokens with BOS/EOS
TEXT_DIM = 64


def toy_words() -> list[str]:
    words = {"a", "on", "of", "background", *COLOURS, *SHAPES, *SIZES, *SHARPNESS, *TEXTURES}
    for phrase in POSITIONS:
        words.update(phrase.split())
    return sorted(words)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word (the same algorithm as transformers' CLIPTokenizer.bpe)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):
            if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def write_tokenizer(directory: str | Path) -> Path:
    """Write a CLIPTokenizer (vocab.json + merges.txt) in which every toy word is one token.

    Merges are added greedily, word by word, at the end of the rank list: a word that already
    reduces to one token adds nothing, and a new merge can never fire inside an earlier word
    (that word always had a lower-ranked merge available at every step). Single letters stay
    in the vocabulary, so an unknown word still tokenizes (letter by letter) instead of failing.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in toy_words():
        while len(parts := _bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab_tokens = list(letters) + [c + "</w>" for c in letters]
    vocab_tokens += [a + b for a, b in merges]
    vocab_tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS,
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "do_lower_case": True, "clean_up_tokenization_spaces": False}))
    return directory


def load_tokenizer(directory: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory))


def text_encoder_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT_DIM,
    )


VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
)

UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_DIM, attention_head_dim=4,  # the number of heads, despite the name
    norm_num_groups=16, addition_embed_type="text", addition_embed_type_num_heads=4,
)

# Stable Diffusion's noise schedule, so that schedulers and loss weights behave as on SD1.5.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(tokenizer):
    from transformers import CLIPTextModel

    return CLIPTextModel(text_encoder_config(tokenizer))


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler=None):
    """A StableDiffusionPipeline from toy parts (no safety checker: there is nothing to check)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler or build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"


def write_t5_tokenizer(directory: str | Path, max_length: int = 16) -> Path:
    """Write a T5TokenizerFast whose vocabulary is the toy words (one piece each, as
    SentencePiece's "▁word") plus single letters, built offline: transformers builds T5's
    Unigram model from a (piece, score) list, so no SentencePiece file is downloaded.

    It behaves as T5's does where the pipelines rely on it: ids 0/1/2 are pad/EOS/unknown, every
    encoding ends with EOS, there is no BOS, and an unknown word falls back to its letters.
    """
    from transformers import T5TokenizerFast

    directory = Path(directory)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in toy_words()]
    vocab += [(c, -5.0) for c in letters] + [(f"▁{c}", -5.0) for c in letters]
    fast = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)
    fast.save_pretrained(str(directory))
    return directory


def load_t5_tokenizer(directory: str | Path):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(directory))
