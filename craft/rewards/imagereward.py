"""ImageReward v1.0, rebuilt on transformers' BLIP classes: no `image-reward` package needed.

What it is: BLIP (a ViT-L/16 image encoder, and a BERT text encoder that cross-attends to the
image) and an MLP on the text [CLS] feature. The raw reward ``r`` is normalised as
``(r - 0.16717) / 1.03334`` (the package's own mean and std), so it is about 0 on average and
positive for better-than-average images. In CRAFT it is an evaluation-only (held-out) reward.

Why a port and not the package: `image-reward` pins ``timm==0.6.13`` and ``fairscale``, which
cannot live beside this project's timm 1.x and transformers 5, and it reads its checkpoint with a
full unpickle. The checkpoint itself (``THUDM/ImageReward/ImageReward.pt``) is a plain state
dict, so we read it with ``torch.load(weights_only=True)``, rename the ViT keys to
``BlipVisionModel``'s names (BLIP's text encoder, its "med" BERT, is what transformers'
``BlipTextModel`` was ported from, key for key) and load strictly: a key we would leave unused,
or one we miss, is an error, never a silently random layer.
``tests/test_rewards_imagereward.py`` checks our scores against the package's own model code
(run in a side environment with its pins, built by scripts/setup.sh) on the same random weights,
within 1e-4.

Scoring is the package's ``ImageReward.score`` per image, batched: resize 224 (bicubic, shorter
side), centre crop, RGB, CLIP mean/std; tokenise to 35 tokens with bert-base-uncased plus the
two tokens BLIP adds ([DEC], [ENC]); ViT; text encoder with cross-attention; MLP; normalise.
Each distinct prompt of a batch is tokenised once.

Where the files come from (offline only): ``path`` (ImageReward.pt, or a folder holding it and
med_config.json), else the HF cache of ``THUDM/ImageReward``, else the package's own download
folder ``~/.cache/ImageReward``. The tokenizer: ``tokenizer_path`` (a folder with vocab.txt),
else a vocab.txt beside the checkpoint, else the HF cache of ``bert-base-uncased``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from .base import (RewardError, TorchReward, download_hint, find_hf_file, hf_cache_dir,
                   missing_weights, register_reward, unique_prompts)

logger = logging.getLogger(__name__)

REPO_ID = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
TOKENIZER_IDS = ("bert-base-uncased", "google-bert/bert-base-uncased")
MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_TOKENS = 35
IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ADDED_TOKENS = ("[DEC]", "[ENC]")  # BLIP's init_tokenizer adds these, in this order
HEAD_DIM = 64  # both BLIP ViTs (base 768/12, large 1024/16) use 64-wide heads

# Keys of the checkpoint that the reward does not use: BLIP's contrastive projections and the
# text embeddings' position-id buffer.
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|\.position_ids$")
_VIT_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "post_layernorm."),
)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def package_root() -> Path:
    return Path(os.path.expanduser("~/.cache/ImageReward"))


def _find_tokenizer_dir(checkpoint: Path, tokenizer_path=None) -> Path:
    if tokenizer_path is not None:
        folder = Path(tokenizer_path).expanduser()
        if (folder / "vocab.txt").is_file():
            return folder
        raise missing_weights("imagereward", "the bert-base-uncased vocab.txt",
                              [f"tokenizer_path={folder}"], download_hint("bert-base-uncased",
                                                                          "vocab.txt"))
    if (checkpoint.parent / "vocab.txt").is_file():
        return checkpoint.parent
    for repo in TOKENIZER_IDS:
        hit = find_hf_file(repo, "vocab.txt")
        if hit is not None:
            return hit.parent
    raise missing_weights("imagereward", "the bert-base-uncased tokenizer (vocab.txt)",
                          [f"{checkpoint.parent}", f"HF cache {hf_cache_dir()}"],
                          download_hint("bert-base-uncased", "vocab.txt"))


def find_imagereward_files(path=None, *, repo_id: str = REPO_ID,
                           tokenizer_path=None) -> dict[str, Path]:
    """ImageReward.pt, med_config.json and the tokenizer folder, resolved without reading them."""
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
    found["tokenizer"] = _find_tokenizer_dir(found["checkpoint"], tokenizer_path)
    return found


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def _mlp(width: int):
    """The package's MLP head: 5 linears (width -> 1024 -> 128 -> 64 -> 16 -> 1), no
    activations, dropout between the first four (identity at inference)."""
    from torch import nn

    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                         nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1),
                         nn.Linear(64, 16), nn.Linear(16, 1))


def split_checkpoint(state_dict: dict, where: str = CHECKPOINT) -> dict[str, dict]:
    """The package's flat state dict -> {"vision", "text", "mlp"} state dicts in our names.

    Every key is either mapped or known to be unused; anything else is an error naming it, so a
    different checkpoint (BLIP-base, a fine-tune with extra heads) is refused, not half-loaded.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    parts: dict[str, dict] = {"vision": {}, "text": {}, "mlp": {}}
    unknown = []
    for key, value in state_dict.items():
        if _UNUSED.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            sub = key[len("blip.visual_encoder."):]
            for pattern, repl in _VIT_RENAMES:
                new, n = re.subn(pattern, repl, sub)
                if n:
                    parts["vision"][new] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            parts["text"][key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            parts["mlp"][key[len("mlp.layers."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise RewardError(
            f"imagereward: {where} has {len(unknown)} keys that ImageReward v1.0 does not have "
            f"(first: {', '.join(unknown[:5])}); this is not an ImageReward checkpoint. Use "
            f"{REPO_ID}/{CHECKPOINT}, or drop imagereward from rewards.eval_names")
    if "embeddings.class_embedding" not in parts["vision"] or not parts["text"]:
        raise RewardError(f"imagereward: {where} holds no BLIP image or text encoder "
                          f"(keys seen: {', '.join(list(state_dict)[:5])}); use "
                          f"{REPO_ID}/{CHECKPOINT}")
    return parts


def vision_config_from(vision: dict):
    """BlipVisionConfig read off the tensor shapes (ViT-L/16 at 224 px for the real weights)."""
    from transformers import BlipVisionConfig

    width = int(vision["embeddings.class_embedding"].shape[-1])
    patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
    grid = round((int(vision["embeddings.position_embedding"].shape[1]) - 1) ** 0.5)
    depth = 1 + max(int(m.group(1)) for k in vision
                    if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=depth, num_attention_heads=max(1, width // HEAD_DIM),
        image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")


def text_config_from(med: dict, encoder_width: int):
    """BlipTextConfig from BLIP's med_config.json (a BERT config plus ``encoder_width``)."""
    from transformers import BlipTextConfig

    vocab = int(med["vocab_size"])
    return BlipTextConfig(
        vocab_size=vocab, hidden_size=int(med["hidden_size"]), encoder_hidden_size=encoder_width,
        intermediate_size=int(med["intermediate_size"]),
        num_hidden_layers=int(med["num_hidden_layers"]),
        num_attention_heads=int(med["num_attention_heads"]),
        max_position_embeddings=int(med.get("max_position_embeddings", 512)),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_act=med.get("hidden_act", "gelu"), pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=min(30522, vocab - 1), sep_token_id=min(102, vocab - 1))


def _module_class():
    import torch
    from torch import nn
    from transformers import BlipTextModel, BlipVisionModel

    class ImageRewardModel(nn.Module):
        """BLIP image encoder + cross-attending text encoder + MLP -> raw reward r."""

        def __init__(self, vision_config, text_config) -> None:
            super().__init__()
            self.vision = BlipVisionModel(vision_config)
            self.text = BlipTextModel(text_config, add_pooling_layer=False)
            self.mlp = _mlp(text_config.hidden_size)

        def forward(self, pixel_values, input_ids, attention_mask):
            image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                    device=image_embeds.device)
            out = self.text(input_ids=input_ids, attention_mask=attention_mask,
                            encoder_hidden_states=image_embeds,
                            encoder_attention_mask=image_atts, return_dict=True)
            return self.mlp(out.last_hidden_state[:, 0, :]).float().squeeze(-1)

    return ImageRewardModel


def build_imagereward_model(state_dict: dict, med_config: dict, *, where: str = CHECKPOINT):
    """The model with the checkpoint's weights, built without a throw-away random init."""
    import torch
    from accelerate import init_empty_weights

    parts = split_checkpoint(state_dict, where)
    vcfg = vision_config_from(parts["vision"])
    tcfg = text_config_from(med_config, vcfg.hidden_size)
    with init_empty_weights(include_buffers=False):
        model = _module_class()(vcfg, tcfg)
    flat = {**{f"vision.{k}": v for k, v in parts["vision"].items()},
            **{f"text.{k}": v for k, v in parts["text"].items()},
            **{f"mlp.{k}": v for k, v in parts["mlp"].items()}}
    expected = set(model.state_dict())
    missing = sorted(expected - set(flat))
    extra = sorted(set(flat) - expected)
    if missing or extra:
        raise RewardError(
            f"imagereward: {where} does not match the model built from {MED_CONFIG} "
            f"(missing {len(missing)}: {', '.join(missing[:4])}; unexpected {len(extra)}: "
            f"{', '.join(extra[:4])}); are the checkpoint and med_config.json from the same "
            f"release ({REPO_ID})?")
    try:
        model.load_state_dict({k: v.to(torch.float32) for k, v in flat.items()}, strict=True,
                              assign=True)
    except RuntimeError as exc:  # shape mismatch: config and weights disagree
        raise RewardError(f"imagereward: {where} does not fit the model built from "
                          f"{MED_CONFIG}: {str(exc).splitlines()[-1].strip()}") from None
    return model.eval()


def load_tokenizer(folder: Path, vocab_size: int | None = None):
    """bert-base-uncased plus BLIP's [DEC] and [ENC] (ids 30522 and 30523 for the real vocab)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder))
    tok.add_tokens([t for t in ADDED_TOKENS if t not in tok.get_vocab()], special_tokens=True)
    if vocab_size is not None and len(tok) != vocab_size:
        raise RewardError(
            f"imagereward: the tokenizer in {folder} has {len(tok)} tokens with BLIP's two added "
            f"tokens, but {MED_CONFIG} says vocab_size={vocab_size}; use the bert-base-uncased "
            "vocab.txt (30522 tokens)")
    return tok


def preprocess_transform():
    """The package's ``_transform(224)``: the same torchvision ops, in the same order."""
    from torchvision.transforms import (CenterCrop, Compose, InterpolationMode, Normalize,
                                        Resize, ToTensor)

    return Compose([Resize(IMAGE_SIZE, interpolation=InterpolationMode.BICUBIC),
                    CenterCrop(IMAGE_SIZE), lambda im: im.convert("RGB"), ToTensor(),
                    Normalize(CLIP_MEAN, CLIP_STD)])


# --------------------------------------------------------------------------------------------
# Reward
# --------------------------------------------------------------------------------------------

class ImageRewardReward(TorchReward):
    """ImageReward as a batched callable; normalised scores ``(r - mean) / std``."""

    name = "imagereward"

    def __init__(self, model, tokenizer, *, device: str = "cpu", dtype=None, batch_size: int = 32,
                 prefetch: bool | None = None, mean: float = MEAN, std: float = STD) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, prefetch=prefetch)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.transform = preprocess_transform()
        self.mean, self.std = float(mean), float(std)

    def _prepare(self, images, prompts):
        import numpy as np
        import torch
        from PIL import Image

        pixels = torch.stack([self.transform(im if isinstance(im, Image.Image)
                                             else Image.fromarray(np.asarray(im)))
                              for im in images])
        distinct, inverse = unique_prompts(prompts)
        text = self.tokenizer(distinct, padding="max_length", truncation=True,
                              max_length=MAX_TOKENS, return_tensors="pt")
        return pixels, text["input_ids"][inverse], text["attention_mask"][inverse]

    def _forward(self, prepared):
        pixels, input_ids, attention_mask = prepared
        raw = self.model(pixels.to(device=self.device, dtype=self.dtype),
                         input_ids.to(self.device), attention_mask.to(self.device))
        return ((raw - self.mean) / self.std).cpu().numpy()


def _check(path=None, *, repo_id: str = REPO_ID, tokenizer_path=None,
           **_ignored) -> dict[str, Any]:
    return find_imagereward_files(path, repo_id=repo_id, tokenizer_path=tokenizer_path)


@register_reward("imagereward", check=_check)
def load_imagereward(*, device: str = "cpu", dtype=None, batch_size: int = 32, path=None,
                     repo_id: str = REPO_ID, tokenizer_path=None,
                     prefetch: bool | None = None) -> ImageRewardReward:
    """ImageReward v1.0 from ImageReward.pt + med_config.json; (r - 0.16717) / 1.03334."""
    import torch

    files = find_imagereward_files(path, repo_id=repo_id, tokenizer_path=tokenizer_path)
    try:
        med = json.loads(files["med_config"].read_text())
    except (OSError, ValueError) as exc:
        raise RewardError(f"imagereward: cannot read {files['med_config']} as JSON ({exc}); "
                          f"use the med_config.json of {REPO_ID}") from None
    try:
        state_dict = torch.load(files["checkpoint"], map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise RewardError(f"imagereward: cannot read {files['checkpoint']} as a state dict "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); use "
                          f"{REPO_ID}/{CHECKPOINT}") from None
    if not isinstance(state_dict, dict):
        raise RewardError(f"imagereward: {files['checkpoint']} holds a "
                          f"{type(state_dict).__name__}, not a state dict; use "
                          f"{REPO_ID}/{CHECKPOINT}")
    model = build_imagereward_model(state_dict, med, where=str(files["checkpoint"]))
    tokenizer = load_tokenizer(files["tokenizer"], int(med["vocab_size"]))
    logger.info("imagereward: loaded %s", files["checkpoint"])
    return ImageRewardReward(model, tokenizer, device=device, dtype=dtype, batch_size=batch_size,
                             prefetch=prefetch)
