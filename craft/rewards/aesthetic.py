"""AES: the LAION "improved aesthetic predictor", loaded once and scored in batches.

What it is: the CLIP ViT-L/14 image embedding (OpenAI weights; here the transformers port
``openai/clip-vit-large-patch14`` through ``CLIPVisionModelWithProjection``, whose
``image_embeds`` is OpenAI CLIP's ``encode_image``), L2-normalised, into a linear MLP
768 -> 1024 -> 128 -> 64 -> 16 -> 1. Scores are about 1-10 (most photos 4-7). Prompt-free:
``prompts`` may be None.

The head's state-dict layout is the published one (``sac+logos+ava1-l14-linearMSE.pth`` in
christophschuhmann/improved-aesthetic-predictor; mirrored on the hub as
``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``)::

    layers.0  Linear(768, 1024)     layers.1  Dropout(0.2)
    layers.2  Linear(1024, 128)     layers.3  Dropout(0.2)
    layers.4  Linear(128, 64)       layers.5  Dropout(0.1)
    layers.6  Linear(64, 16)
    layers.7  Linear(16, 1)

(no activations: the published model is linear). The head is rebuilt from the shapes in the
file and read with ``torch.load(weights_only=True)``, so a head for another CLIP width works
and no pickled code runs. Preprocessing is the CLIP processor's (shortest side to 224 bicubic,
centre crop, CLIP mean/std): OpenAI's ``clip.load`` preprocessing, as the predictor expects.

Where the files come from (offline only): the head from ``path`` (the .pth file, or a folder
holding it), else the HF cache of ``head_id``/``head_filename``; the CLIP from ``clip_path``,
else the ``path`` folder if it also holds a transformers CLIP (config.json + weights), else the
HF cache of ``clip_id``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from .base import (RewardError, TorchReward, download_hint, find_hf_file, from_pretrained_strict,
                   hf_cache_dir, load_tensor_state_dict, missing_files, missing_weights,
                   register_reward)
from .pickscore import find_pretrained_dir

logger = logging.getLogger(__name__)

HEAD_ID = "trl-lib/ddpo-aesthetic-predictor"
HEAD_FILENAME = "aesthetic-model.pth"
HEAD_NAMES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth")
CLIP_ID = "openai/clip-vit-large-patch14"
CLIP_FILES = ("config.json", ("model.safetensors", "model.safetensors.index.json",
                              "pytorch_model.bin", "pytorch_model.bin.index.json"),
              ("preprocessor_config.json", "processor_config.json"))

# (state-dict index of each Linear, dropout probability after it or None), as published.
HEAD_LAYOUT = ((0, 0.2), (2, 0.2), (4, 0.1), (6, None), (7, None))


def find_head(path=None, *, head_id: str = HEAD_ID, head_filename: str = HEAD_FILENAME) -> Path:
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            for name in (head_filename, *HEAD_NAMES):
                if (p / name).is_file():
                    return p / name
        raise missing_weights("aes", f"aesthetic head {' or '.join(HEAD_NAMES)} "
                              f"(hub: {head_id})", [f"path={p}"],
                              download_hint(head_id, head_filename))
    hit = find_hf_file(head_id, head_filename)
    if hit is not None:
        return hit
    raise missing_weights("aes", f"aesthetic head {head_filename} (hub: {head_id})",
                          [f"HF cache {hf_cache_dir()}"], download_hint(head_id, head_filename))


def find_aes_files(path=None, *, clip_path=None, head_id: str = HEAD_ID,
                   head_filename: str = HEAD_FILENAME, clip_id: str = CLIP_ID) -> dict[str, Path]:
    head = find_head(path, head_id=head_id, head_filename=head_filename)
    if clip_path is None and path is not None and Path(path).is_dir() \
            and not missing_files(Path(path), CLIP_FILES):
        clip_path = path
    clip = find_pretrained_dir("aes", "CLIP ViT-L/14", clip_id, CLIP_FILES, clip_path)
    return {"head": head, "clip": clip}


def aesthetic_head(state_dict: Mapping, source: str = "state dict"):
    """The LAION MLP rebuilt from a state dict in the published layout (see module doc)."""
    import torch.nn as nn

    expected = {f"layers.{i}.{p}" for i, _ in HEAD_LAYOUT for p in ("weight", "bias")}
    if set(state_dict) != expected:
        raise RewardError(
            f"aes: {source} is not a LAION aesthetic head: expected the keys "
            f"{sorted(expected)}, got {sorted(state_dict)[:6]}"
            f"{'...' if len(state_dict) > 6 else ''}"
            "; pass sac+logos+ava1-l14-linearMSE.pth (or its hub mirror aesthetic-model.pth)")
    modules: list = []
    previous_out = None
    for index, dropout in HEAD_LAYOUT:
        out_dim, in_dim = state_dict[f"layers.{index}.weight"].shape
        if previous_out is not None and in_dim != previous_out:
            raise RewardError(f"aes: {source}: layers.{index} takes {in_dim} inputs but the layer "
                              f"before gives {previous_out}; the file is damaged or not a head")
        modules.append(nn.Linear(in_dim, out_dim))
        if dropout is not None:
            modules.append(nn.Dropout(dropout))
        previous_out = out_dim
    if previous_out != 1:
        raise RewardError(f"aes: {source}: the last layer has {previous_out} outputs, expected 1")
    head = nn.Module()
    head.layers = nn.Sequential(*modules)
    head.load_state_dict(dict(state_dict), strict=True)
    return head.eval()


class AestheticReward(TorchReward):
    """AES as a batched callable: MLP(normalise(CLIP image embedding)) per image."""

    name = "aes"
    needs_prompt = False

    def __init__(self, clip_vision, image_processor, head, *, device: str = "cpu", dtype=None,
                 batch_size: int = 32, prefetch: bool | None = None) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, prefetch=prefetch)
        width = clip_vision.config.projection_dim
        head_in = head.layers[0].in_features
        if width != head_in:
            raise RewardError(f"aes: the head takes {head_in}-d embeddings but the CLIP gives "
                              f"{width}-d; use CLIP ViT-L/14 (768-d) with the published head")
        self.clip = clip_vision.to(device=self.device, dtype=self.dtype).eval()
        self.head = head.to(device=self.device, dtype=self.dtype).eval()
        self.image_processor = image_processor

    def _prepare(self, images, prompts):
        rgb = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def _embeds(self, pixels):
        import torch.nn.functional as F

        pixels = pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return F.normalize(self.clip(pixel_values=pixels).image_embeds, dim=-1)

    def _forward(self, pixels):
        return self.head.layers(self._embeds(pixels)).float().squeeze(-1).cpu().numpy()

    def embed(self, images):
        """L2-normalised CLIP image embeddings, one row per image."""
        import torch

        with torch.inference_mode():
            return self._embeds(self._prepare(list(images), None))


def _check(path=None, *, clip_path=None, head_id: str = HEAD_ID,
           head_filename: str = HEAD_FILENAME, clip_id: str = CLIP_ID,
           **_ignored) -> dict[str, Any]:
    return find_aes_files(path, clip_path=clip_path, head_id=head_id,
                          head_filename=head_filename, clip_id=clip_id)


@register_reward("aes", check=_check)
def load_aes(*, device: str = "cpu", dtype=None, batch_size: int = 32, path=None, clip_path=None,
             head_id: str = HEAD_ID, head_filename: str = HEAD_FILENAME,
             clip_id: str = CLIP_ID, prefetch: bool | None = None) -> AestheticReward:
    """LAION aesthetic predictor on CLIP ViT-L/14 (about 1-10; prompt-free).

    Options: ``clip_path`` (a transformers CLIP folder), ``head_id`` / ``head_filename`` /
    ``clip_id`` (other hub repos to look up in the cache).
    """
    files = find_aes_files(path, clip_path=clip_path, head_id=head_id,
                           head_filename=head_filename, clip_id=clip_id)
    head = aesthetic_head(load_tensor_state_dict(files["head"], "aes"), str(files["head"]))
    from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(str(files["clip"]), local_files_only=True)
    if getattr(config, "vision_config", None) is not None:  # a whole CLIPModel checkpoint
        # The projection width is a top-level CLIPConfig field; the vision sub-config may
        # carry the class default (512) instead, which would re-initialise the projection.
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
    else:
        vision_config = config
    clip = from_pretrained_strict(CLIPVisionModelWithProjection, files["clip"], "aes",
                                  config=vision_config)
    processor = CLIPImageProcessor.from_pretrained(str(files["clip"]), local_files_only=True)
    logger.info("aes: head from %s, CLIP from %s", files["head"], files["clip"])
    return AestheticReward(clip, processor, head, device=device, dtype=dtype,
                           batch_size=batch_size, prefetch=prefetch)
