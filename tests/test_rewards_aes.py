"""AES (LAION improved aesthetic predictor) on a tiny transformers CLIP and a head with the
published state-dict layout, saved as a plain state dict and read with weights_only=True."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import reward_fixtures as rf
from craft.rewards import MissingWeightsError, RewardError, check_available, load_reward
from craft.rewards.aesthetic import CLIP_ID, HEAD_FILENAME, HEAD_ID, aesthetic_head

torch.set_num_threads(1)
PROJ = 16  # the tiny CLIP's embedding width (768 for ViT-L/14)


def tiny_head_state_dict(width: int = PROJ, seed: int = 0) -> dict:
    """The published layout (Linear at 0, 2, 4, 6, 7; Dropout at 1, 3, 5) at tiny widths."""
    torch.manual_seed(seed)
    seq = nn.Sequential(nn.Linear(width, 32), nn.Dropout(0.2), nn.Linear(32, 16), nn.Dropout(0.2),
                        nn.Linear(16, 8), nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1))
    with torch.no_grad():
        seq[-1].bias.fill_(5.0)  # centre the random head near the real predictor's range
    return {f"layers.{k}": v for k, v in seq.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("aes")
    clip = rf.write_tiny_clip(root / "clip", projection_dim=PROJ, seed=1)
    head = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(tiny_head_state_dict(), head)
    return {"head": head, "clip": clip}


@pytest.fixture(scope="module")
def reward(files):
    return load_reward("aes", path=files["head"], clip_path=files["clip"], batch_size=3)


def test_published_layout_loads_and_computes_the_same(tmp_path):
    """A head saved from the LAION code's own MLP class (768-d) is read back exactly."""
    laion = rf.laion_aesthetic_head(768)
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(laion.state_dict(), path)
    from craft.rewards.base import load_tensor_state_dict

    ours = aesthetic_head(load_tensor_state_dict(path, "aes"))
    assert [type(m).__name__ for m in ours.layers] == [type(m).__name__ for m in laion.layers]
    x = torch.nn.functional.normalize(torch.randn(5, 768), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(ours.layers(x), laion(x))


def test_equals_clip_embedding_normalised_into_the_mlp(reward, files):
    from transformers import CLIPImageProcessor, CLIPModel

    images = rf.images(7, seed=1)
    clip = CLIPModel.from_pretrained(files["clip"]).eval()  # the whole CLIP, as saved
    processor = CLIPImageProcessor.from_pretrained(files["clip"])
    seq = nn.Sequential(nn.Linear(PROJ, 32), nn.Dropout(0.2), nn.Linear(32, 16), nn.Dropout(0.2),
                        nn.Linear(16, 8), nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1)).eval()
    seq.load_state_dict({k[len("layers."):]: v for k, v in tiny_head_state_dict().items()})
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        emb = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        ref = seq(emb).squeeze(-1).numpy()
    ours = reward(images, None)  # prompt-free
    assert ours.dtype == np.float64 and ours.shape == (7,)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(reward(images, rf.prompts_for(7)), ours)  # prompts ignored
    assert np.ptp(ours) > 0


def test_one_folder_holding_head_and_clip(tmp_path, files):
    import shutil

    shutil.copytree(files["clip"], tmp_path / "aes")
    shutil.copy(files["head"], tmp_path / "aes" / HEAD_FILENAME)
    assert check_available("aes", path=tmp_path / "aes") == {
        "head": tmp_path / "aes" / HEAD_FILENAME, "clip": tmp_path / "aes"}
    images = rf.images(2)
    separate = load_reward("aes", path=files["head"], clip_path=files["clip"])
    np.testing.assert_allclose(load_reward("aes", path=tmp_path / "aes")(images), separate(images))


def test_found_in_the_hf_cache(tmp_path, monkeypatch, files):
    import shutil

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    snap = rf.hf_cache_snapshot(tmp_path / "hf", HEAD_ID)
    shutil.copy(files["head"], snap / HEAD_FILENAME)
    with pytest.raises(MissingWeightsError, match=CLIP_ID):
        check_available("aes")
    clip_snap = rf.hf_cache_snapshot(tmp_path / "hf", CLIP_ID)
    for f in files["clip"].iterdir():
        shutil.copy(f, clip_snap / f.name)
    assert check_available("aes") == {"head": snap / HEAD_FILENAME, "clip": clip_snap}


@pytest.mark.parametrize("state, match", [
    ({"layers.0.weight": torch.zeros(4, PROJ), "layers.0.bias": torch.zeros(4)},
     "expected the keys"),
    ({**tiny_head_state_dict(), "layers.4.weight": torch.zeros(8, 5)}, "takes 5 inputs"),
])
def test_a_file_that_is_not_a_head_is_explained(tmp_path, files, state, match):
    path = tmp_path / "head.pth"
    torch.save(state, path)
    with pytest.raises(RewardError, match=match):
        load_reward("aes", path=path, clip_path=files["clip"])


def test_head_width_must_match_the_clip(tmp_path, files):
    path = tmp_path / "head.pth"
    torch.save(tiny_head_state_dict(width=24), path)
    with pytest.raises(RewardError, match="24-d embeddings but the CLIP gives 16-d"):
        load_reward("aes", path=path, clip_path=files["clip"])
