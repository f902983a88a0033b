"""Tiny same-architecture reward models built from config (random weights, nothing downloaded).

Helpers shared by tests/test_rewards_*.py and benchmarks/rewards.py. Every builder is seeded so
two calls give the same weights.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# Same classes as ViT-H-14 (open_clip VisionTransformer + TextTransformer), tiny sizes. The
# text side keeps the real vocabulary and context length so the real tokenizer is exercised.
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

PROMPTS = ["a red circle on a blue background", "a photo of an astronaut riding a horse",
           "a large sharp green triangle centred on a plain white background",
           "an oil painting of a lighthouse at dusk"]


def images(n: int, *, seed: int = 0, sizes=((64, 64), (96, 64), (50, 80), (128, 128))) -> list:
    """``n`` random RGB PIL images cycling through ``sizes`` (w, h), non-square ones included."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        # Smooth-ish content (a random low-res image upsampled) plus noise, like a real picture.
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255)
        out.append(Image.fromarray(arr.astype(np.uint8)))
    return out


def prompts_for(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


# --------------------------------------------------------------------------------------------
# HPS (open_clip)
# --------------------------------------------------------------------------------------------

def hps_state_dict(config: dict = TINY_OPEN_CLIP, seed: int = 0) -> dict:
    """The state dict of a randomly initialised open_clip model with ``config`` (seeded)."""
    import torch

    from craft.rewards.hps import build_open_clip

    torch.manual_seed(seed)
    model, _ = build_open_clip("ViT-H-14", config)
    with torch.no_grad():  # a non-trivial logit scale / projections, as a trained model has
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_hps_checkpoint(folder: Path, filename: str = "HPS_v2.1_compressed.pt",
                         config: dict = TINY_OPEN_CLIP, seed: int = 0) -> Path:
    """A checkpoint shaped like the published one: ``{"state_dict": {...}}``."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    torch.save({"state_dict": hps_state_dict(config, seed)}, path)
    return path


def import_hpsv2_open_clip():
    """hpsv2's vendored open_clip (``hpsv2.src.open_clip``), importable offline.

    hpsv2 1.2's wheel lacks the BPE vocabulary file its tokenizer module reads at import
    time (``bpe_simple_vocab_16e6.txt.gz``; so ``hpsv2.score`` fails out of the box). While
    importing, that one missing path is redirected to the identical file shipped by
    open_clip; nothing on disk is changed.
    """
    import importlib
    import sys

    if "hpsv2.src.open_clip" in sys.modules:
        return sys.modules["hpsv2.src.open_clip"]
    import open_clip

    bpe = open_clip.tokenizer.default_bpe()
    real_open = gzip.open

    def patched(filename, *args, **kwargs):
        if (isinstance(filename, (str, os.PathLike)) and not os.path.exists(filename)
                and str(filename).endswith("bpe_simple_vocab_16e6.txt.gz")):
            filename = bpe
        return real_open(filename, *args, **kwargs)

    gzip.open = patched
    try:
        with warnings.catch_warnings():  # its timm import path is deprecated; not ours to fix
            warnings.simplefilter("ignore", FutureWarning)
            return importlib.import_module("hpsv2.src.open_clip")
    finally:
        gzip.open = real_open


def register_hpsv2_config(hoc, folder: Path, name: str = "craft-tiny-hps",
                          config: dict = TINY_OPEN_CLIP) -> str:
    """Register ``config`` under ``name`` in hpsv2's vendored open_clip config registry."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    hoc.add_model_config(path)
    return name


# --------------------------------------------------------------------------------------------
# transformers CLIP (PickScore, AES)
# --------------------------------------------------------------------------------------------

def clip_tokenizer():
    """CLIP's real BPE vocabulary as a transformers tokenizer (the library's builder)."""
    from craft.rewards.clip_shipped import clip_tokenizer as build

    return build()


def tiny_clip_config(image_size: int = 32, projection_dim: int = 16):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2},
        projection_dim=projection_dim)


def write_tiny_clip(folder: Path, *, image_size: int = 32, projection_dim: int = 16,
                    seed: int = 0, with_processor: bool = True) -> Path:
    """A tiny ``CLIPModel`` (and, optionally, its processor) saved with ``save_pretrained``."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(image_size, projection_dim)).eval()
    model.save_pretrained(folder)
    if with_processor:
        write_clip_processor(folder, image_size=image_size)
    return folder


def write_clip_processor(folder: Path, *, image_size: int = 32) -> Path:
    from craft.rewards.clip_shipped import clip_processor

    clip_processor(image_size).save_pretrained(folder)
    return folder


def laion_aesthetic_head(input_size: int = 768, seed: int = 0):
    """The published LAION predictor's MLP class (improved-aesthetic-predictor), as written
    there: the reference for the state-dict layout our loader reads."""
    import torch
    import torch.nn as nn

    class MLP(nn.Module):
        def __init__(self, input_size):
            super().__init__()
            self.input_size = input_size
            self.layers = nn.Sequential(
                nn.Linear(self.input_size, 1024), nn.Dropout(0.2),
                nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(seed)
    return MLP(input_size).eval()


# --------------------------------------------------------------------------------------------
# A fake Hugging Face cache
# --------------------------------------------------------------------------------------------

def hf_cache_snapshot(cache: Path, repo_id: str, commit: str = "0" * 40) -> Path:
    """Create ``cache/models--org--name/snapshots/<commit>`` (+ refs/main) and return it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap
