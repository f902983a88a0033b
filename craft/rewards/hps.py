"""HPSv2 and HPSv2.1 (Human Preference Score), loaded once and scored in batches.

What it is: an open_clip ``ViT-H-14`` whose weights are replaced by the HPS checkpoint's
``state_dict`` (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` in the hub repo
``xswu/HPSv2``). The score is the cosine of the L2-normalised image and text features, i.e. the
diagonal of hpsv2's ``logits_per_image = image_features @ text_features.T``. We return the raw
cosine (about 0.2-0.35 on real images); papers and our reports quote it x100.

Why not call ``hpsv2.score``: it reloads the multi-GB checkpoint from disk on every call and
scores one image at a time (and first builds ViT-H-14 with LAION weights it then overwrites).
Here the checkpoint is read once (``torch.load(weights_only=True)``: tensors only), images are
scored ``batch_size`` at a time, and each distinct prompt of a batch is encoded once.

Parity: preprocessing mirrors hpsv2's evaluation transform exactly (``light_augmentation=True``
in ``hpsv2.img_score``): convert to RGB, to a float tensor in [0, 1], resize the *longer* side
to the model's image size (bicubic, antialiased, on the tensor), zero-pad to a square (split
as hpsv2 splits it), normalise with the OpenAI CLIP mean/std. This is not open_clip's default
shortest-side-resize-and-crop, which would cut off the edges of non-square images and give
different scores. Tokens come from open_clip's tokenizer for the model (the BPE vocabulary
ships inside open_clip, so it works offline). ``tests/test_rewards_hps.py`` checks equality
with the hpsv2 package's own model code within 1e-4.

Differences from hpsv2, on purpose: RGBA images are converted to RGB (hpsv2 passes 4 channels
to the model and fails); a non-square image whose longer side already equals the model size is
padded to a square (hpsv2 skips the pad then, and the model fails).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .base import (TorchReward, download_hint, find_hf_file, load_matching, load_tensor_state_dict,
                   missing_weights, register_reward, unique_prompts)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "ViT-H-14"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_CPU_CHUNK_BYTES = 8 << 20  # float pixels resized per call on a CPU (about a cache's worth)


@dataclasses.dataclass(frozen=True)
class HpsWeights:
    """Where a version's checkpoint lives on the hub (overridable per call: repo_id, filename)."""

    repo_id: str
    filename: str


HPS_VERSIONS: dict[str, HpsWeights] = {
    "hpsv2": HpsWeights("xswu/HPSv2", "HPS_v2_compressed.pt"),
    "hpsv21": HpsWeights("xswu/HPSv2", "HPS_v2.1_compressed.pt"),
}


def hps_root() -> Path:
    """hpsv2's own download folder (``$HPS_ROOT`` or ``~/.cache/hpsv2``), searched last."""
    return Path(os.environ.get("HPS_ROOT") or os.path.expanduser("~/.cache/hpsv2"))


def find_hps_checkpoint(name: str, path: str | os.PathLike | None = None, *,
                        repo_id: str | None = None, filename: str | None = None) -> Path:
    """Resolve the checkpoint file without reading it.

    Order: ``path`` (a file, or a folder holding ``filename``; when given, nothing else is
    searched, so a typo is reported rather than silently replaced), the Hugging Face cache,
    hpsv2's own cache folder. Raises :class:`MissingWeightsError` naming all three.
    """
    weights = HPS_VERSIONS[name]
    repo_id = repo_id or weights.repo_id
    filename = filename or weights.filename
    if path is not None:
        p = Path(path).expanduser()
        candidate = p / filename if p.is_dir() else p
        if candidate.is_file():
            return candidate
        raise missing_weights(name, f"checkpoint {filename} (hub: {repo_id})",
                              [f"path={candidate}"], download_hint(repo_id, filename))
    hit = find_hf_file(repo_id, filename)
    if hit is not None:
        return hit
    local = hps_root() / filename
    if local.is_file():
        return local
    from .base import hf_cache_dir

    raise missing_weights(name, f"checkpoint {filename} (hub: {repo_id})",
                          [f"HF cache {hf_cache_dir()}", f"hpsv2 cache {hps_root()}"],
                          download_hint(repo_id, filename))


# --------------------------------------------------------------------------------------------
# Preprocessing (hpsv2's evaluation transform, batched)
# --------------------------------------------------------------------------------------------

def _uint8_rgb(image) -> np.ndarray:
    """PIL image (any mode) or uint8 (H, W, 3) array -> uint8 (H, W, 3) array."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected a PIL image or a uint8 (H, W, 3) array, got "
                         f"{type(image).__name__} {getattr(arr, 'shape', '')} "
                         f"{getattr(arr, 'dtype', '')}")
    return arr


def group_by_size(images: Sequence) -> list[tuple[list[int], Any]]:
    """Images as uint8 (n, H, W, 3) tensors, one per distinct size, with their positions.

    This is the cheap CPU part (a copy of the bytes); the float work happens in
    :func:`finish_preprocess`, on the scoring device.
    """
    import torch

    arrays = [_uint8_rgb(im) for im in images]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, arr in enumerate(arrays):
        groups.setdefault(arr.shape[:2], []).append(i)
    return [(idx, torch.from_numpy(np.stack([arrays[i] for i in idx])))
            for idx in groups.values()]


def finish_preprocess(groups, n: int, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD,
                      device=None):
    """hpsv2's ``preprocess_val`` on grouped uint8 images -> (n, 3, S, S) float32 on ``device``.

    Per group: to float in [0, 1] (ToTensor), resize the longer side to ``image_size``
    (bicubic, antialiased, on the float tensor), zero-pad to a square split as hpsv2 splits it,
    then normalise. The antialiased kernel works per image, so resizing a group in one call
    equals resizing its images one by one.
    """
    import torch
    import torch.nn.functional as F

    out = torch.empty(n, 3, image_size, image_size, device=device)
    for idx, u8 in groups:
        h, w = u8.shape[1:3]
        scale = image_size / float(max(h, w))
        nh, nw = round(h * scale), round(w * scale)
        pad_h, pad_w = image_size - nh, image_size - nw
        # On a CPU, work through a group in cache-sized chunks: a whole batch of 512 px float
        # images (100 MB) is slower to resize in one call than image by image. On a GPU the
        # whole group is one call.
        step = len(idx) if out.device.type != "cpu" else max(1, _CPU_CHUNK_BYTES // (12 * h * w))
        for start in range(0, len(idx), step):
            x = u8[start:start + step].to(out.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
            if scale != 1.0:
                x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                                  antialias=True)
            if pad_h or pad_w:
                x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
            rows = idx[start:start + step]
            if rows == list(range(rows[0], rows[0] + len(rows))):
                out[rows[0]:rows[0] + len(rows)] = x
            else:
                out[torch.as_tensor(rows, device=out.device)] = x
    m = torch.tensor(mean, device=out.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=out.device).view(1, 3, 1, 1)
    return out.sub_(m).div_(s)


def hps_preprocess(images: Sequence, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD,
                   device=None):
    """hpsv2's evaluation transform for a list of images -> a (B, 3, S, S) float32 tensor."""
    return finish_preprocess(group_by_size(images), len(images), image_size, mean, std, device)


# --------------------------------------------------------------------------------------------
# The reward
# --------------------------------------------------------------------------------------------

class HPSReward(TorchReward):
    """HPS as a batched callable: ``score(images, prompts)`` -> raw cosine per image."""

    def __init__(self, name: str, model, tokenizer, *, image_size: int, mean=OPENAI_MEAN,
                 std=OPENAI_STD, device: str = "cpu", dtype=None, batch_size: int = 32,
                 prefetch: bool | None = None, checkpoint: str | None = None) -> None:
        self.name = name
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, prefetch=prefetch)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.checkpoint = checkpoint

    def _prepare(self, images, prompts):
        # On a CPU the whole preprocessing runs here; on a GPU only the byte copy does (in the
        # prefetch thread) and the float work runs on the GPU in _forward.
        pixels = group_by_size(images)  # uint8 groups; a float tensor once finished
        if self.device.type == "cpu":
            pixels = finish_preprocess(pixels, len(images), self.image_size, self.mean, self.std)
        distinct, inverse = unique_prompts(prompts)
        return pixels, len(images), self.tokenizer(distinct), inverse

    def _features(self, prepared):
        pixels, n, tokens, inverse = prepared
        if isinstance(pixels, list):
            pixels = finish_preprocess(pixels, n, self.image_size, self.mean, self.std,
                                       self.device)
        pixels = pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)
        image_features = self.model.encode_image(pixels, normalize=True).float()
        text_features = self.model.encode_text(tokens.to(self.device), normalize=True).float()
        return image_features, text_features[inverse]

    def _forward(self, prepared):
        image_features, text_features = self._features(prepared)
        return (image_features * text_features).sum(-1).cpu().numpy()

    def encode(self, images: Sequence, prompts: Sequence[str]):
        """L2-normalised image features and the matching text features, one row per image."""
        import torch

        with torch.inference_mode():
            return self._features(self._prepare(list(images), list(prompts)))


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip warns 'Model initialized randomly' on the root logger before we load the HPS
    weights into it; that warning is false here, so it is dropped while the model is built."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def build_open_clip(model_name: str = DEFAULT_MODEL_NAME,
                    model_config: Mapping[str, Any] | None = None):
    """An open_clip model with random weights plus its tokenizer, nothing downloaded.

    ``model_config`` (``embed_dim`` / ``vision_cfg`` / ``text_cfg`` ...) overrides the named
    config: this is how tests build a tiny model of the same classes.
    """
    import open_clip

    with _quiet_random_init_warning():
        model, _, _ = open_clip.create_model_and_transforms(
            model_name, pretrained=None, precision="fp32", device="cpu", output_dict=True,
            **dict(model_config or {}))
    tokenizer = open_clip.get_tokenizer(model_name, context_length=model.context_length)
    return model, tokenizer


def _check_factory(name: str):
    def check(path=None, *, repo_id: str | None = None, filename: str | None = None,
              **_ignored) -> dict[str, Any]:
        return {"checkpoint": find_hps_checkpoint(name, path, repo_id=repo_id,
                                                  filename=filename)}

    return check


def _make_factory(name: str):
    def factory(*, device: str = "cpu", dtype=None, batch_size: int = 32, path=None,
                model_name: str = DEFAULT_MODEL_NAME, model_config: Mapping | None = None,
                repo_id: str | None = None, filename: str | None = None,
                prefetch: bool | None = None) -> HPSReward:
        checkpoint = find_hps_checkpoint(name, path, repo_id=repo_id, filename=filename)
        model, tokenizer = build_open_clip(model_name, model_config)
        load_matching(model, load_tensor_state_dict(checkpoint, name), name, str(checkpoint))
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        logger.info("%s: loaded %s weights from %s", name, model_name, checkpoint)
        return HPSReward(name, model, tokenizer, image_size=size, device=device, dtype=dtype,
                         batch_size=batch_size, prefetch=prefetch, checkpoint=str(checkpoint))

    factory.__name__ = f"load_{name}"
    version = "2.1" if name == "hpsv21" else "2"
    factory.__doc__ = (
        f"HPSv{version}: open_clip ViT-H-14 with {HPS_VERSIONS[name].filename}; raw cosine "
        "(x100 in reports).\n\n"
        "Options: ``model_name`` / ``model_config`` choose another (e.g. tiny) open_clip "
        "architecture; ``repo_id`` / ``filename`` another checkpoint on the hub cache; "
        "``prefetch`` overlaps preprocessing with the forward (default: on for GPUs).")
    return factory


for _name in HPS_VERSIONS:
    register_reward(_name, check=_check_factory(_name))(_make_factory(_name))
