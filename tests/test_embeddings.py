"""Image embeddings of the pool (craft/stages/embeddings.py): the pixel and CLIP encoders, the stored
vectors, the 2-D map, neighbours and near-duplicate groups."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import reward_fixtures as rf
from conftest import tiny_config
from craft import MissingWeightsError
from craft.stages.embeddings import (embed_candidates, make_embedder, near_duplicates, neighbours,
                              pca_2d, project_pool, space_name)
from craft.run.store import NewCandidate, RunStore


def _pool(store, n: int = 12):
    pids = store.add_prompts([f"prompt {i}" for i in range(3)])
    vids = store.variants_df()["id"].tolist()
    rng = np.random.default_rng(0)
    items = []
    for k in range(n):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        im = Image.new("RGB", (32, 32), colour)
        items.append(NewCandidate(pids[k % 3], vids[k % 3], k, "m", {}, im))
    return store.add_candidates(items)


def test_pixels_are_embedded_once_stored_and_mapped(tmp_path, tiny_model_dir):
    cfg = tiny_config(tiny_model_dir)
    with RunStore(tmp_path / "run") as store:
        ids = _pool(store)
        progress = []
        assert embed_candidates(store, cfg, lambda d, t: progress.append((d, t))) == 12
        assert progress[-1] == (12, 12)
        assert embed_candidates(store, cfg) == 0  # cached
        got, vectors = store.embeddings(space_name(cfg))
        assert got.tolist() == ids and vectors.shape == (12, 768)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-2)  # float16 stored
        assert project_pool(store, cfg) == 12
        mids, xy = store.embeddings(f"pca2:{space_name(cfg)}")
        assert mids.tolist() == ids and xy.shape == (12, 2)


def test_pca_matches_a_full_svd():
    x = np.random.default_rng(0).normal(size=(400, 30)).astype(np.float32)
    x[:, 0] *= 8
    x[:, 3] *= 4
    xy = pca_2d(x)
    c = x - x.mean(axis=0)
    ref = c @ np.linalg.svd(c, full_matrices=False)[2][:2].T
    assert np.allclose(np.abs(xy), np.abs(ref), atol=1e-3)


def test_neighbours_and_near_duplicates():
    v = np.eye(4, dtype=np.float32)
    v = np.vstack([v, v[0] * 0.999 + v[1] * 0.04])  # #14 is almost #10
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.array([10, 11, 12, 13, 14])
    near, sims = neighbours(ids, v, 10, k=3)
    assert near[:2] == [10, 14] and sims[0] == pytest.approx(1.0)
    assert near_duplicates(ids, v, 0.99) == [[10, 14]]
    assert near_duplicates(ids, v, 0.9999) == []
    with pytest.raises(Exception, match="no embedding"):
        neighbours(ids, v, 99)


def test_a_clip_encoder_from_a_local_folder(tmp_path, tiny_model_dir):
    folder = rf.write_tiny_clip(tmp_path / "clip", projection_dim=16)
    cfg = tiny_config(tiny_model_dir, **{"embed.encoder": "clip",
                                         "embed.encoder_model": str(folder)})
    embed = make_embedder(cfg)
    out = embed([Image.new("RGB", (40, 40), (200, 10, 10)), Image.new("RGB", (40, 40))])
    assert out.shape == (2, 16) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert space_name(cfg) == f"clip:{folder}"
    missing = tiny_config(tiny_model_dir, **{"embed.encoder": "clip",
                                             "embed.encoder_model": str(tmp_path / "nope")})
    with pytest.raises(MissingWeightsError, match="embed.encoder_model"):
        make_embedder(missing)
