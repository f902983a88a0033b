"""Diversity across seeds: how different a model's images of one prompt are from each other.

Why: the first price of preference alignment is collapse. A tuned model that draws the same
picture for every seed can still win every reward, so rewards alone cannot show it
(../shared/DESIGN.md §7 and benchmarks/toy_craft.md). The metric here does not come from any
reward model.

Definition, per model and prompt: the **mean pairwise distance** between the images of the
evaluation seeds of that prompt (all S·(S−1)/2 pairs), then mean ± standard error over prompts.
Because base and tuned model are evaluated on the same prompts and seeds, the per-prompt
difference tuned − base is paired; its mean ± SE is the test against the base. Higher means more
diverse; identical images give exactly 0.

Distances, by ``eval.diversity_encoder``:

- ``pixels`` (the toy world): root-mean-square difference of the RGB pixels, in 0–255 units,
  at the images' own size (downscaled to at most 128 px a side). It needs no weights and sees
  everything the toy rewards see and more (object size, place, colour, texture).
- ``dinov2`` (real models): 1 − cosine similarity of the CLS embeddings of a self-supervised
  DINOv2 (``eval.diversity_model``, a transformers folder or a hub id in the local cache,
  default facebook/dinov2-base), found offline by the rewards' rules. DINOv2 was trained with
  no text and no preference labels, so it measures visual variety, not reward.
- ``clip``: 1 − cosine similarity of a CLIP vision tower's image embeddings (embed.encoder_model
  rules); closer to what the reward models see, so a weaker witness.
- ``none``: not measured.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from craft import CraftError
from craft.run.choices import DIVERSITY_ENCODERS

log = logging.getLogger(__name__)

ENCODERS = DIVERSITY_ENCODERS  # eval.diversity_encoder (craft.run.choices)
DINOV2_DEFAULT = "facebook/dinov2-base"
DINOV2_FILES = ("config.json", ("model.safetensors", "pytorch_model.bin"),
                "preprocessor_config.json")
PIXEL_MAX_SIDE = 128
METRIC_NAME = "diversity"


def mean_pairwise_distance(vectors: np.ndarray, metric: str) -> float:
    """Mean over all pairs i < j of the distance between rows of ``vectors``.

    ``rms``: ||a − b|| / sqrt(d) (rows are raw pixel values); ``cosine``: 1 − a·b for
    L2-normalised rows. Fewer than two rows have no pair: NaN (not applicable, not 0)."""
    x = np.asarray(vectors, dtype=np.float64)
    n = len(x)
    if n < 2:
        return float("nan")
    iu = np.triu_indices(n, k=1)
    if metric == "rms":
        sq = (x * x).sum(axis=1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
        return float(np.sqrt(d2[iu] / x.shape[1]).mean())
    if metric == "cosine":
        return float((1.0 - (x @ x.T)[iu]).mean())
    raise CraftError(f"metric={metric!r}: must be 'rms' or 'cosine'")


def per_prompt(frame: pd.DataFrame, vectors: np.ndarray, metric: str) -> pd.DataFrame:
    """One row per (model, prompt): its seeds' mean pairwise distance. ``frame`` has columns
    model and prompt, one row per image, aligned with ``vectors``."""
    rows = []
    codes = frame[["model", "prompt"]].reset_index(drop=True)
    for (model, prompt), idx in codes.groupby(["model", "prompt"], sort=False).groups.items():
        rows.append({"model": model, "prompt": prompt,
                     METRIC_NAME: mean_pairwise_distance(vectors[np.asarray(idx)], metric)})
    return pd.DataFrame(rows, columns=["model", "prompt", METRIC_NAME])


def dinov2_location(model: str | None) -> Path:
    """The local DINOv2 folder: ``model`` as a folder, else a hub id in the local cache."""
    from craft.stages.embeddings import encoder_folder

    return encoder_folder(model, DINOV2_DEFAULT, DINOV2_FILES, "eval.diversity_model",
                          "DINOv2 vision model")


def check_encoder(cfg) -> None:
    """Fail before any work when the diversity encoder's weights are not on this machine."""
    e = cfg.eval
    if e.diversity_encoder == "dinov2":
        dinov2_location(e.diversity_model)
    elif e.diversity_encoder == "clip":
        from craft.stages.embeddings import clip_location

        clip_location(e.diversity_model, "eval.diversity_model")


def _pixels(images: Sequence) -> np.ndarray:
    from PIL import Image

    rows = []
    for im in images:
        im = im.convert("RGB")
        if max(im.size) > PIXEL_MAX_SIDE:
            scale = PIXEL_MAX_SIDE / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.BILINEAR)
        rows.append(np.asarray(im, dtype=np.float32).reshape(-1))
    if len({len(r) for r in rows}) > 1:
        raise CraftError("diversity (pixels): the images of one evaluation differ in size; "
                         "evaluate at one resolution or use eval.diversity_encoder: dinov2")
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def dinov2_embedder(model: str | None, device: str = "cpu", batch_size: int = 32):
    """embed(images) -> the L2-normalised CLS embeddings of the DINOv2 at ``model``."""
    from transformers import AutoImageProcessor, Dinov2Model

    from craft.stages.embeddings import batched_embedder
    from craft.rewards.base import from_pretrained_strict

    folder = dinov2_location(model)
    net = from_pretrained_strict(Dinov2Model, folder, "eval.diversity_model").to(device).eval()
    from craft.run.watch import loaded

    loaded(net)
    processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    return batched_embedder(processor, lambda px: net(pixel_values=px).last_hidden_state[:, 0],
                            device, batch_size, net.config.hidden_size)


def make_embedder(cfg, device: str = "cpu"):
    """(embed(images) -> vectors, metric) for ``eval.diversity_encoder``; None when off."""
    e = cfg.eval
    if e.diversity_encoder == "none":
        return None
    if e.diversity_encoder == "pixels":
        return _pixels, "rms"
    if e.diversity_encoder == "dinov2":
        return dinov2_embedder(e.diversity_model, device), "cosine"
    if e.diversity_encoder == "clip":
        from craft.stages.embeddings import clip_embedder

        return clip_embedder(e.diversity_model, device, key="eval.diversity_model"), "cosine"
    raise CraftError(f"eval.diversity_encoder={e.diversity_encoder!r} is not one of "
                     f"{list(ENCODERS)}")


def describe(cfg) -> str:
    """A short name of the metric for tables: what it measures and in which units."""
    e = cfg.eval
    return {"pixels": "mean pairwise pixel RMS (0-255)",
            "dinov2": f"mean pairwise 1-cos, DINOv2 ({e.diversity_model or DINOV2_DEFAULT})",
            "clip": f"mean pairwise 1-cos, CLIP ({e.diversity_model or 'default'})",
            "none": "not measured"}[e.diversity_encoder]


def summarize(div: pd.DataFrame, models: list[str]) -> list[dict]:
    """Summary rows (the evaluation table's columns) for the diversity of each model: mean ± SE
    over prompts, and for every model after the first the paired per-prompt difference and the
    share of prompts on which it is more diverse than the first (ties count one half)."""
    rows = []
    base = div[div["model"] == models[0]].set_index("prompt")[METRIC_NAME]
    for m in models:
        x = div[div["model"] == m].set_index("prompt")[METRIC_NAME]
        fin = x[np.isfinite(x)]
        row = {"model": m, "reward": METRIC_NAME, "n": int(len(fin)),
               "mean": float(fin.mean()) if len(fin) else np.nan,
               "se": float(fin.std(ddof=1) / np.sqrt(len(fin))) if len(fin) > 1 else np.nan}
        if m != models[0]:
            d = (x - base.reindex(x.index)).to_numpy(float)
            d = d[np.isfinite(d)]
            row["diff"] = float(d.mean()) if len(d) > 1 else np.nan
            row["diff_se"] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else np.nan
            row["win_rate"] = float(((d > 0) + 0.5 * (d == 0)).mean()) if len(d) else np.nan
        rows.append(row)
    return rows


__all__ = ["DINOV2_DEFAULT", "ENCODERS", "METRIC_NAME", "check_encoder", "describe",
           "dinov2_location", "make_embedder", "mean_pairwise_distance", "per_prompt",
           "summarize"]
