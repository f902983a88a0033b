"""ImageReward v1.0 (optional): BLIP-based, through the ``image-reward`` package.

What it is: BLIP (ViT-L image encoder, BERT text encoder cross-attending to the image) and an
MLP on the text [CLS] feature; the raw reward ``r`` is normalised as
``(r - 0.16717) / 1.03334`` (the package's own mean and std), so about 0 on average and
positive for better-than-average images. In CRAFT it is an evaluation-only (held-out) reward.

Why package-backed: the checkpoint (``THUDM/ImageReward/ImageReward.pt``) is a state dict for the
BLIP modules defined in that package (timm-style ViT blocks, BLIP's own BERT variant). Porting
them to transformers' BLIP classes needs a key conversion we cannot check against the real
weights offline, and a silently wrong port would be worse than none. So we use the package's
model classes, but load once and score in batches, exactly as its ``score`` does per image:
preprocess (resize 224 bicubic, centre crop, CLIP mean/std), tokenise to 35 tokens, encode,
MLP, normalise.

Install: ``pip install image-reward``. It pins ``timm==0.6.13`` and ``fairscale``, which may
conflict with this environment; a separate environment for evaluation is the safe choice.
The package also needs the ``bert-base-uncased`` tokenizer in the Hugging Face cache.

Where the files come from (offline only): ``path`` (ImageReward.pt, or a folder holding it and
med_config.json), else the HF cache of ``THUDM/ImageReward``, else the package's own folder
``~/.cache/ImageReward``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .base import (MissingDependencyError, TorchReward, download_hint, find_hf_file,
                   hf_cache_dir, import_available, missing_weights, register_reward,
                   unique_prompts)

logger = logging.getLogger(__name__)

PACKAGE = "ImageReward"  # the import name of the `image-reward` distribution
REPO_ID = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
TOKENIZER_IDS = ("bert-base-uncased", "google-bert/bert-base-uncased")
MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_TOKENS = 35


def package_root() -> Path:
    return Path(os.path.expanduser("~/.cache/ImageReward"))


def require_package() -> None:
    if not import_available(PACKAGE):
        raise MissingDependencyError(
            "imagereward: the `image-reward` package is not installed (import ImageReward "
            "failed); install it with `pip install image-reward` (it pins timm==0.6.13 and "
            "fairscale: a separate evaluation environment avoids conflicts), or drop "
            "imagereward from rewards.eval_names")


def find_imagereward_files(path=None, *, repo_id: str = REPO_ID) -> dict[str, Path]:
    """ImageReward.pt and med_config.json, resolved without reading them."""
    found: dict[str, Path] = {}
    for key, filename in (("checkpoint", CHECKPOINT), ("med_config", MED_CONFIG)):
        if path is not None:
            p = Path(path).expanduser()
            candidate = p / filename if p.is_dir() else (p if key == "checkpoint"
                                                         else p.parent / filename)
            if candidate.is_file():
                found[key] = candidate
                continue
            raise missing_weights("imagereward", f"{filename} (hub: {repo_id})",
                                  [f"path={candidate}"], download_hint(repo_id, filename))
        hit = find_hf_file(repo_id, filename) or (
            package_root() / filename if (package_root() / filename).is_file() else None)
        if hit is None:
            raise missing_weights("imagereward", f"{filename} (hub: {repo_id})",
                                  [f"HF cache {hf_cache_dir()}", f"{package_root()}"],
                                  download_hint(repo_id, filename))
        found[key] = hit
    if not any(find_hf_file(t, "vocab.txt") for t in TOKENIZER_IDS):
        raise missing_weights("imagereward", "the bert-base-uncased tokenizer (vocab.txt) "
                              "that the image-reward package loads",
                              [f"HF cache {hf_cache_dir()}"],
                              download_hint("bert-base-uncased", "vocab.txt"))
    return found


class ImageRewardReward(TorchReward):
    """ImageReward as a batched callable; normalised scores ``(r - mean) / std``."""

    name = "imagereward"

    def __init__(self, model, *, device: str = "cpu", dtype=None, batch_size: int = 32,
                 prefetch: bool | None = None) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, prefetch=prefetch)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        # The package keeps its device in an attribute its own methods read.
        if hasattr(self.model, "device"):
            self.model.device = self.device
        self.mean = float(getattr(model, "mean", MEAN))
        self.std = float(getattr(model, "std", STD))

    def _prepare(self, images, prompts):
        import torch

        m = self.model
        pixels = torch.stack([m.preprocess(im.convert("RGB") if hasattr(im, "convert") else im)
                              for im in images])
        distinct, inverse = unique_prompts(prompts)
        text = m.blip.tokenizer(distinct, padding="max_length", truncation=True,
                                max_length=MAX_TOKENS, return_tensors="pt")
        return pixels, text.input_ids[inverse], text.attention_mask[inverse]

    def _forward(self, prepared):
        import torch

        pixels, input_ids, attention_mask = prepared
        m = self.model
        image_embeds = m.blip.visual_encoder(pixels.to(device=self.device, dtype=self.dtype))
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = m.blip.text_encoder(input_ids.to(self.device),
                                  attention_mask=attention_mask.to(self.device),
                                  encoder_hidden_states=image_embeds,
                                  encoder_attention_mask=image_atts, return_dict=True)
        raw = m.mlp(out.last_hidden_state[:, 0, :]).float().squeeze(-1)
        return ((raw - self.mean) / self.std).cpu().numpy()


def _check(path=None, *, repo_id: str = REPO_ID, **_ignored) -> dict[str, Any]:
    require_package()
    return find_imagereward_files(path, repo_id=repo_id)


@register_reward("imagereward", check=_check)
def load_imagereward(*, device: str = "cpu", dtype=None, batch_size: int = 32, path=None,
                     repo_id: str = REPO_ID, prefetch: bool | None = None) -> ImageRewardReward:
    """ImageReward v1.0 (needs `pip install image-reward`); (r - 0.16717) / 1.03334."""
    require_package()
    files = find_imagereward_files(path, repo_id=repo_id)
    import ImageReward as RM

    model = RM.load(str(files["checkpoint"]), device="cpu", med_config=str(files["med_config"]))
    logger.info("imagereward: loaded %s", files["checkpoint"])
    return ImageRewardReward(model, device=device, dtype=dtype, batch_size=batch_size,
                             prefetch=prefetch)
