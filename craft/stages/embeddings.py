"""Image embeddings of the candidate pool, its 2-D map, neighbours and near-duplicates.

Why: the price of alignment shows in what the kept set looks like as a whole, not image by image
(many near-copies of one composition; all of it from a few prompts). An embedding per candidate
lets the studio draw the pool as a map (coloured by any reward or by kept / not kept), find the
images most like a given one, and group near-duplicates.

Encoders, by ``embed.encoder``:

- ``pixels``: the image resized to 16x16 RGB, centred and L2-normalised (768-d). Needs no
  weights; in the toy world it separates colour, size and position, which is what the toy
  rewards see.
- ``clip``: a CLIP vision tower's projected image embedding, L2-normalised, from
  ``embed.encoder_model`` (a transformers CLIP folder, or a hub id in the local cache; the
  default is AES's ``openai/clip-vit-large-patch14``), found offline by the same rules as the
  rewards' weights.

Embeddings are computed once per candidate and kept in the run store (float16); the 2-D map is
a PCA of them (randomised, a few passes over the matrix), recomputed when candidates are added.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from craft import CraftError
from craft.run.choices import EMBED_ENCODERS

log = logging.getLogger(__name__)

ENCODERS = EMBED_ENCODERS  # embed.encoder (craft.run.choices)
PIXEL_SIDE = 16
CLIP_DEFAULT = "openai/clip-vit-large-patch14"


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True) if x.shape[1] else x
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def pixel_embedder():
    from PIL import Image

    def embed(images) -> np.ndarray:
        rows = [np.asarray(im.convert("RGB").resize((PIXEL_SIDE, PIXEL_SIDE), Image.BILINEAR),
                           dtype=np.float32).reshape(-1) / 255.0 for im in images]
        return _normalise(np.stack(rows)) if rows else np.zeros((0, 3 * PIXEL_SIDE ** 2))

    return embed


def encoder_folder(model: str | None, default: str, files, key: str, what: str):
    """The local folder of a vision encoder: ``model`` as a folder when it is a path, else a
    hub id (``default`` when None) looked up in the local cache; raises MissingWeightsError
    naming the setting ``key`` and the fix. Shared by every configured encoder."""
    from pathlib import Path

    from craft.rewards.pickscore import find_pretrained_dir

    name = model or default
    path = Path(name).expanduser()
    is_path = path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1
    return find_pretrained_dir(key, what, default if is_path else name, files,
                               path if is_path else None)


def clip_location(model: str | None, key: str = "embed.encoder_model"):
    """The local folder of the CLIP vision encoder (see :func:`encoder_folder`)."""
    from craft.rewards.aesthetic import CLIP_FILES

    return encoder_folder(model, CLIP_DEFAULT, CLIP_FILES, key, "CLIP vision encoder")


def clip_embedder(model: str | None, device: str = "cpu", batch_size: int = 32,
                  key: str = "embed.encoder_model"):
    from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    from craft.rewards.base import from_pretrained_strict

    folder = clip_location(model, key)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if getattr(config, "vision_config", None) is not None:  # a whole CLIPModel checkpoint
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        config = vision
    net = from_pretrained_strict(CLIPVisionModelWithProjection, folder, key,
                                 config=config).to(device).eval()
    from craft.run.watch import loaded

    loaded(net)
    processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)

    return batched_embedder(processor, lambda px: net(pixel_values=px).image_embeds, device,
                            batch_size, net.config.projection_dim)


def batched_embedder(processor, forward, device: str, batch_size: int, dim: int):
    """embed(images) -> L2-normalised float32 rows: ``processor`` makes pixel values,
    ``forward(pixel_values)`` returns one vector per image; batched, no gradients."""
    import torch
    import torch.nn.functional as F

    def embed(images) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                pixels = processor(images=[im.convert("RGB") for im in images[i:i + batch_size]],
                                   return_tensors="pt")["pixel_values"].to(device)
                out.append(F.normalize(forward(pixels).float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)

    return embed


def make_embedder(cfg, device: str = "cpu"):
    e = cfg.embed
    if e.encoder == "pixels":
        return pixel_embedder()
    if e.encoder == "clip":
        return clip_embedder(e.encoder_model, device, e.batch_size)
    raise CraftError(f"embed.encoder={e.encoder!r} is not one of {list(ENCODERS)}")


def space_name(cfg) -> str:
    """The store's name for the embedding space ``cfg`` asks for (encoder and model)."""
    e = cfg.embed
    return "pixels16" if e.encoder == "pixels" else f"clip:{e.encoder_model or CLIP_DEFAULT}"


def check_encoder(cfg) -> None:
    if cfg.embed.encoder == "clip":
        clip_location(cfg.embed.encoder_model)


def embed_candidates(store, cfg, progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> int:
    """Embed every training candidate not yet embedded in this space; returns how many."""
    from PIL import Image

    from craft.run.devices import resolve_device

    check_encoder(cfg)
    space = space_name(cfg)
    have = store.embedded_ids(space)
    cands = store.candidates_df(split="train")
    todo = cands[~cands["id"].isin(have)]
    if todo.empty:
        return 0
    embed = make_embedder(cfg, str(resolve_device(cfg.rewards.device, key="rewards.device")))
    bs, done = max(1, cfg.embed.batch_size), 0
    for i in range(0, len(todo), bs):
        if should_stop is not None and should_stop():
            break
        chunk = todo.iloc[i:i + bs]
        vectors = embed([Image.open(p) for p in chunk["image_path"]])
        store.add_embeddings(space, chunk["id"].tolist(), vectors)
        done += len(chunk)
        if progress:
            progress(done, len(todo))
    log.info("embedded %d candidates (%s)", done, space)
    return done


def project_pool(store, cfg) -> int:
    """The 2-D map of every embedded candidate, stored as the space ``pca2:<space>``."""
    space = space_name(cfg)
    ids, vectors = store.embeddings(space)
    if len(ids) == 0:
        return 0
    return store.add_embeddings(f"pca2:{space}", ids.tolist(), pca_2d(vectors))


def pca_2d(x: np.ndarray, seed: int = 0, power_iterations: int = 3) -> np.ndarray:
    """The first two principal components of the rows of ``x`` (randomised range finder: a
    few passes over the matrix instead of a full SVD, the same components to rounding)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) < 3:
        return np.zeros((len(x), 2), dtype=np.float32)
    centred = x - x.mean(axis=0)
    rng = np.random.default_rng(seed)
    k = min(x.shape[1], 10)
    q = centred @ rng.standard_normal((x.shape[1], k)).astype(np.float32)
    for _ in range(power_iterations):
        q, _ = np.linalg.qr(q)
        q = centred @ (centred.T @ q)
    q, _ = np.linalg.qr(q)
    _, _, vt = np.linalg.svd(q.T @ centred, full_matrices=False)
    xy = centred @ vt[:2].T
    # A component's sign is arbitrary: fix it so the same pool always draws the same way round.
    signs = np.where(np.abs(xy.min(axis=0)) > np.abs(xy.max(axis=0)), -1.0, 1.0)
    return (xy * signs).astype(np.float32)


def neighbours(ids: np.ndarray, vectors: np.ndarray, candidate_id: int, k: int = 60
               ) -> tuple[list[int], list[float]]:
    """The ``k`` candidates most like ``candidate_id`` (cosine similarity, itself first)."""
    where = np.flatnonzero(ids == candidate_id)
    if where.size == 0:
        raise CraftError(f"candidate #{candidate_id} has no embedding yet; compute the map "
                         f"first")
    sims = vectors @ vectors[where[0]]
    order = np.argsort(-sims, kind="stable")[:k]
    return [int(i) for i in ids[order]], [float(s) for s in sims[order]]


def near_duplicates(ids: Sequence[int], vectors: np.ndarray, threshold: float
                    ) -> list[list[int]]:
    """Groups (size >= 2) of candidates whose embeddings have cosine similarity >= threshold
    to another member (single linkage), largest first. Meant for a kept set (hundreds to a
    few thousand): the similarity matrix is computed in full."""
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        return []
    sims = vectors @ vectors.T
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(*np.nonzero(np.triu(sims >= threshold, k=1))):
        parent[root(int(a))] = root(int(b))
    groups: dict[int, list[int]] = {}
    for i, cid in enumerate(ids):
        groups.setdefault(root(i), []).append(cid)
    return sorted((g for g in groups.values() if len(g) > 1), key=len, reverse=True)


__all__ = ["ENCODERS", "check_encoder", "embed_candidates", "make_embedder", "near_duplicates",
           "neighbours", "pca_2d", "project_pool", "space_name"]
