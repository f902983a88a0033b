"""The CLIP tokenizer and image processor, built from what the installed packages ship.

Why: PickScore_v1 ships no processor; its README borrows the one of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, an extra download for a handful of small files.
That processor is OpenAI CLIP's: the BPE vocabulary open_clip ships as
``bpe_simple_vocab_16e6.txt.gz`` (49408 tokens with the two specials) and the standard CLIP
image preprocessing (shortest side to 224, bicubic; centre crop 224; OpenAI mean and std),
which are ``CLIPImageProcessor``'s defaults. So a machine with the PickScore weights needs
nothing else; a cached or given processor is still preferred when present.
"""

from __future__ import annotations

import copy
import functools


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {specials.get(k, k): v for k, v in st.encoder.items()}
    merges = [tuple(pair) for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def clip_tokenizer():
    """A transformers ``CLIPTokenizer`` with CLIP's real vocabulary (a fresh copy per call)."""
    return copy.deepcopy(_clip_tokenizer())


def clip_processor(image_size: int = 224):
    """``CLIPProcessor`` = CLIP preprocessing at ``image_size`` + :func:`clip_tokenizer`."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())
