"""PickScore v1, loaded once and scored in batches.

What it is: a transformers ``CLIPModel`` fine-tuned on Pick-a-Pic (hub
``yuvalkirstain/PickScore_v1``) used with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the model repo ships no processor).
Score = ``logit_scale.exp() * cosine(image_embeds, text_embeds)`` as in the PickScore README
(logit_scale.exp() is 100 for the real model, so scores sit around 20 on real images).

Where the files come from (offline only):

- the model: ``path`` (a folder saved with ``save_pretrained``: config.json + weights), else the
  Hugging Face cache of ``model_id``;
- the processor: ``processor_path`` if given, else ``path`` when that folder also holds a
  ``preprocessor_config.json``, else the Hugging Face cache of ``processor_id``, else built
  from what the packages ship (:mod:`.clip_shipped`: open_clip's CLIP vocabulary and the
  standard CLIP preprocessing, which is what that repo holds).

Each distinct prompt of a batch is encoded once (a CRAFT group shares its original prompt).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .base import (TorchReward, download_hint, find_hf_snapshot, from_pretrained_strict,
                   hf_cache_dir, missing_files, missing_weights, register_reward, unique_prompts)

logger = logging.getLogger(__name__)

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")
MODEL_FILES = ("config.json", _WEIGHTS)
# transformers >= 5 saves the image-processor settings inside processor_config.json.
PROCESSOR_FILES = (("preprocessor_config.json", "processor_config.json"),
                   ("tokenizer.json", "vocab.json"))


def find_pretrained_dir(reward: str, what: str, repo_id: str, required, path=None) -> Path:
    """A local folder with every file in ``required``: ``path`` if given, else the HF cache."""
    if path is not None:
        folder = Path(path).expanduser()
        if folder.is_dir():
            missing = missing_files(folder, required)
            if not missing:
                return folder
            what = f"{what} files {', '.join(missing)} ({repo_id})"
        else:
            what = f"{what} folder ({repo_id}, saved with save_pretrained)"
        raise missing_weights(reward, what, [f"path={folder}"], download_hint(repo_id))
    found = find_hf_snapshot(repo_id, required)
    if found is not None:
        return found
    raise missing_weights(reward, f"{what} {repo_id}", [f"HF cache {hf_cache_dir()}"],
                          download_hint(repo_id))


def find_pickscore_files(path=None, *, processor_path=None, model_id: str = MODEL_ID,
                         processor_id: str = PROCESSOR_ID) -> dict[str, Path]:
    """The model folder, and the processor folder (None: build it from the shipped CLIP files,
    see :mod:`.clip_shipped`). An explicit ``processor_path`` must hold a processor."""
    model_dir = find_pretrained_dir("pickscore", "model", model_id, MODEL_FILES, path)
    if processor_path is not None:
        processor_dir = find_pretrained_dir("pickscore", "processor", processor_id,
                                            PROCESSOR_FILES, processor_path)
    elif not missing_files(model_dir, PROCESSOR_FILES):
        processor_dir = model_dir
    else:
        processor_dir = find_hf_snapshot(processor_id, PROCESSOR_FILES)
    return {"model": model_dir, "processor": processor_dir}


class PickScoreReward(TorchReward):
    """PickScore as a batched callable: ``logit_scale.exp() * cosine`` per image."""

    name = "pickscore"

    def __init__(self, model, processor, *, device: str = "cpu", dtype=None,
                 batch_size: int = 32, prefetch: bool | None = None) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, prefetch=prefetch)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def _prepare(self, images, prompts):
        rgb = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        distinct, inverse = unique_prompts(prompts)
        text = self.tokenizer(distinct, padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")
        return pixels, text["input_ids"], text["attention_mask"], inverse

    def _embeds(self, prepared):
        import torch.nn.functional as F

        pixels, input_ids, attention_mask, inverse = prepared
        m = self.model
        pixels = pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)
        image_embeds = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
        text_out = m.text_model(input_ids=input_ids.to(self.device),
                                attention_mask=attention_mask.to(self.device))
        text_embeds = m.text_projection(text_out.pooler_output)
        return (F.normalize(image_embeds.float(), dim=-1),
                F.normalize(text_embeds.float(), dim=-1)[inverse])

    def _forward(self, prepared):
        image_embeds, text_embeds = self._embeds(prepared)
        scale = self.model.logit_scale.float().exp()
        return (scale * (image_embeds * text_embeds).sum(-1)).cpu().numpy()

    def encode(self, images, prompts):
        """L2-normalised image embeddings and the matching text embeddings, one row per image."""
        import torch

        with torch.inference_mode():
            return self._embeds(self._prepare(list(images), list(prompts)))


def _check(path=None, *, processor_path=None, model_id: str = MODEL_ID,
           processor_id: str = PROCESSOR_ID, **_ignored) -> dict[str, Any]:
    return find_pickscore_files(path, processor_path=processor_path, model_id=model_id,
                                processor_id=processor_id)


@register_reward("pickscore", check=_check)
def load_pickscore(*, device: str = "cpu", dtype=None, batch_size: int = 32, path=None,
                   processor_path=None, model_id: str = MODEL_ID,
                   processor_id: str = PROCESSOR_ID,
                   prefetch: bool | None = None) -> PickScoreReward:
    """PickScore v1: CLIPModel + CLIP-ViT-H-14 processor; logit_scale.exp() * cosine.

    Options: ``processor_path`` (a folder with the processor files), ``model_id`` /
    ``processor_id`` (other hub repos to look up in the cache).
    """
    files = find_pickscore_files(path, processor_path=processor_path, model_id=model_id,
                                 processor_id=processor_id)
    from transformers import CLIPModel, CLIPProcessor

    model = from_pretrained_strict(CLIPModel, files["model"], "pickscore")
    if files["processor"] is not None:
        processor = CLIPProcessor.from_pretrained(str(files["processor"]), local_files_only=True)
    else:
        from .clip_shipped import clip_processor

        processor = clip_processor(int(model.config.vision_config.image_size))
    logger.info("pickscore: model from %s, processor from %s", files["model"],
                files["processor"] or "open_clip's CLIP vocabulary + CLIP preprocessing")
    return PickScoreReward(model, processor, device=device, dtype=dtype, batch_size=batch_size,
                           prefetch=prefetch)
