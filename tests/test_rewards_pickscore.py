"""PickScore on a tiny transformers CLIPModel with a real-vocabulary CLIP tokenizer, saved with
save_pretrained and loaded back through the same offline loader the real weights use."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import reward_fixtures as rf
from craft.rewards import MissingWeightsError, check_available, load_reward
from craft.rewards.pickscore import MODEL_ID, PROCESSOR_ID

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return rf.write_tiny_clip(tmp_path_factory.mktemp("pickscore"), seed=0)


@pytest.fixture(scope="module")
def reward(model_dir):
    return load_reward("pickscore", path=model_dir, batch_size=4)


def readme_reference(model_dir, images, prompts):
    """PickScore's README recipe, one image at a time, with the model's own feature methods."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            image_inputs = processor(images=[image], return_tensors="pt")
            text_inputs = processor(text=[prompt], padding=True, truncation=True, max_length=77,
                                    return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs)
            text_embs = model.get_text_features(**text_inputs)
            # transformers >= 5 returns an output object whose pooler_output is the projection
            image_embs = getattr(image_embs, "pooler_output", image_embs)
            text_embs = getattr(text_embs, "pooler_output", text_embs)
            image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
            text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
            out.append(float((model.logit_scale.exp() * (text_embs @ image_embs.T))[0, 0]))
    return np.array(out)


def test_equals_the_pickscore_recipe(reward, model_dir):
    images, prompts = rf.images(9, seed=1), rf.prompts_for(9)
    ours = reward(images, prompts)
    assert ours.dtype == np.float64 and ours.shape == (9,)
    np.testing.assert_allclose(ours, readme_reference(model_dir, images, prompts),
                               atol=1e-4, rtol=1e-5)
    assert np.ptp(ours) > 1e-2


def test_tokenizer_is_the_real_clip_vocabulary(reward):
    import open_clip

    ids = reward.tokenizer(["a red circle on a blue background"])["input_ids"][0]
    ref = open_clip.get_tokenizer("ViT-H-14")(["a red circle on a blue background"])[0]
    assert ids == ref[: len(ids)].tolist() and ids[0] == 49406 and ids[-1] == 49407


def test_batching_and_shared_prompts_do_not_change_scores(reward, model_dir):
    images = rf.images(6, seed=2)
    prompts = [rf.PROMPTS[0]] * 3 + [rf.PROMPTS[3]] * 3
    one = load_reward("pickscore", path=model_dir, batch_size=1)
    np.testing.assert_allclose(reward(images, prompts), one(images, prompts), atol=1e-4)


def test_processor_from_the_hf_cache_or_processor_path(tmp_path, monkeypatch, model_dir):
    """The real layout: PickScore_v1 ships no processor; it comes from the LAION repo, or is
    built from the shipped CLIP files."""
    bare = tmp_path / "model"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    # Neither given nor cached: built from what the packages ship (open_clip's CLIP vocabulary,
    # CLIP preprocessing at the model's image size), the same scores as the saved processor.
    assert check_available("pickscore", path=bare) == {"model": bare, "processor": None}
    images, prompts = rf.images(3), rf.prompts_for(3)
    np.testing.assert_allclose(load_reward("pickscore", path=bare)(images, prompts),
                               load_reward("pickscore", path=model_dir)(images, prompts),
                               atol=1e-6)
    with pytest.raises(MissingWeightsError, match=PROCESSOR_ID):
        check_available("pickscore", path=bare, processor_path=tmp_path / "no-processor")

    proc = rf.write_clip_processor(tmp_path / "proc")
    assert check_available("pickscore", path=bare, processor_path=proc) == {
        "model": bare, "processor": proc}

    snap = rf.hf_cache_snapshot(tmp_path / "hf", PROCESSOR_ID)
    for f in proc.iterdir():
        shutil.copy(f, snap / f.name)
    assert check_available("pickscore", path=bare)["processor"] == snap
    model_snap = rf.hf_cache_snapshot(tmp_path / "hf", MODEL_ID)
    for f in bare.iterdir():
        shutil.copy(f, model_snap / f.name)
    assert check_available("pickscore") == {"model": model_snap, "processor": snap}
    np.testing.assert_allclose(load_reward("pickscore")(images, prompts),
                               load_reward("pickscore", path=model_dir)(images, prompts),
                               atol=1e-5)


def test_model_folder_without_weights_is_reported(tmp_path, model_dir):
    (tmp_path / "m").mkdir()
    shutil.copy(model_dir / "config.json", tmp_path / "m" / "config.json")
    with pytest.raises(MissingWeightsError, match="model.safetensors or"):
        load_reward("pickscore", path=tmp_path / "m")


def test_weights_that_do_not_fit_are_refused_not_reinitialised(tmp_path, model_dir):
    """transformers would only warn and leave the projections random; we refuse to load."""
    import json

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["projection_dim"] = 24
    for sub in ("text_config", "vision_config"):
        config[sub]["projection_dim"] = 24
    (bad / "config.json").write_text(json.dumps(config))
    from craft.rewards import RewardError

    with pytest.raises(RewardError, match="missing or of the wrong shape"):
        load_reward("pickscore", path=bad)
