"""HPSv2 / HPSv2.1 on a tiny open_clip model of the ViT-H-14 classes (random weights).

The parity tests are the point: with one shared state dict, our batched scorer must give what
the hpsv2 package's own code gives (its vendored open_clip model, its preprocessing, its
tokenizer, and its ``img_score.score`` function itself) within 1e-4.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import reward_fixtures as rf
from craft.rewards import MissingWeightsError, RewardError, check_available, load_reward
from craft.rewards.hps import HPS_VERSIONS, hps_preprocess

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return rf.write_hps_checkpoint(tmp_path_factory.mktemp("hps"))


@pytest.fixture(scope="module")
def reward(ckpt):
    return load_reward("hpsv21", path=ckpt, model_config=rf.TINY_OPEN_CLIP, batch_size=5)


@pytest.fixture(scope="module")
def hpsv2_model(ckpt, tmp_path_factory):
    """The same weights in hpsv2's vendored open_clip, built as hpsv2.img_score builds it."""
    hoc = rf.import_hpsv2_open_clip()
    name = rf.register_hpsv2_config(hoc, tmp_path_factory.mktemp("cfg"))
    model, _, preprocess_val = hoc.create_model_and_transforms(
        name, None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None,
        pretrained_image=False, image_mean=None, image_std=None, light_augmentation=True,
        aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    return model.eval(), preprocess_val, hoc.get_tokenizer(name)


def hpsv2_reference(model, preprocess_val, tokenizer, images, prompts):
    """hpsv2.img_score's scoring logic, one image at a time."""
    out = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            outputs = model(preprocess_val(image).unsqueeze(0), tokenizer([prompt]))
            logits_per_image = outputs["image_features"] @ outputs["text_features"].T
            out.append(float(torch.diagonal(logits_per_image)[0]))
    return np.array(out)


def test_parity_with_hpsv2_model_code(reward, hpsv2_model):
    images, prompts = rf.images(12, seed=1), rf.prompts_for(12)
    ours = reward(images, prompts)
    ref = hpsv2_reference(*hpsv2_model, images, prompts)
    assert ours.dtype == np.float64 and ours.shape == (12,)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.ptp(ref) > 1e-3  # the images really score differently: the check has teeth


def test_parity_with_hpsv2_score_function(reward, hpsv2_model, ckpt, tmp_path, monkeypatch):
    """``hpsv2.img_score.score`` itself (checkpoint reloaded per call, one prompt per call),
    with its model slot filled by the tiny vendored model instead of a ViT-H-14 download."""
    rf.import_hpsv2_open_clip()
    from hpsv2 import img_score

    model, preprocess_val, _ = hpsv2_model
    monkeypatch.setattr(img_score, "model_dict", {"model": model, "preprocess_val": preprocess_val})
    monkeypatch.setattr(img_score, "root_path", str(tmp_path))
    monkeypatch.setattr(img_score, "device", "cpu")
    images = rf.images(6, seed=2)
    prompt = rf.PROMPTS[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.autocast is deprecated (and idle) on CPU
        ref = np.array(img_score.score(images, prompt, cp=str(ckpt)), dtype=np.float64)
    np.testing.assert_allclose(reward(images, [prompt] * 6), ref, atol=1e-4, rtol=0)


def test_preprocessing_equals_hpsv2_preprocess_val(hpsv2_model):
    _, preprocess_val, _ = hpsv2_model
    sizes = ((64, 64), (96, 64), (50, 80), (128, 128), (65, 40), (33, 17))
    images = rf.images(len(sizes), sizes=sizes, seed=3)
    ours = hps_preprocess(images, 64)
    ref = torch.stack([preprocess_val(im) for im in images])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_non_square_image_already_at_size_is_padded(hpsv2_model):
    """The one deliberate difference: hpsv2 skips the pad when the longer side already equals
    the model size, and hands the model a non-square tensor it cannot take."""
    _, preprocess_val, _ = hpsv2_model
    image = rf.images(1, sizes=((64, 40),))[0]
    assert tuple(preprocess_val(image).shape) == (3, 40, 64)
    ours = hps_preprocess([image], 64)[0]
    assert tuple(ours.shape) == (3, 64, 64)
    torch.testing.assert_close(ours[:, 12:52], preprocess_val(image), atol=1e-6, rtol=0)


def test_tokens_equal_hpsv2_tokens(reward, hpsv2_model):
    _, _, tokenizer = hpsv2_model
    texts = rf.PROMPTS + ["", "x " * 100, "Ünïcödé &amp; HTML  spaces"]
    torch.testing.assert_close(reward.tokenizer(texts), tokenizer(texts))


def test_scores_do_not_depend_on_batching_or_prompt_sharing(ckpt, reward):
    images = rf.images(7, seed=4)
    prompts = [rf.PROMPTS[0]] * 4 + [rf.PROMPTS[2]] * 3  # two groups, as in a CRAFT batch
    batched = reward(images, prompts)
    one_by_one = load_reward("hpsv21", path=ckpt, model_config=rf.TINY_OPEN_CLIP,
                             batch_size=1)(images, prompts)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5, rtol=0)


def test_arrays_and_rgba_images_score_like_rgb_pil(reward):
    images = rf.images(3, seed=5)
    prompts = rf.prompts_for(3)
    ref = reward(images, prompts)
    np.testing.assert_allclose(reward([np.asarray(im) for im in images], prompts), ref, atol=1e-6)
    np.testing.assert_allclose(reward([im.convert("RGBA") for im in images], prompts), ref,
                               atol=1e-6)


def test_both_versions_load_their_own_file(tmp_path):
    for name, weights in HPS_VERSIONS.items():
        rf.write_hps_checkpoint(tmp_path, weights.filename, seed=1)
        found = check_available(name, path=tmp_path)  # a folder holding the file
        assert found["checkpoint"] == tmp_path / weights.filename
        r = load_reward(name, path=tmp_path, model_config=rf.TINY_OPEN_CLIP)
        assert r.name == name and r.checkpoint == str(tmp_path / weights.filename)


def test_found_in_the_hf_cache_and_in_hpsv2s_folder(tmp_path, monkeypatch, ckpt):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "hps"))
    with pytest.raises(MissingWeightsError):
        check_available("hpsv21")
    (tmp_path / "hps").mkdir()
    (tmp_path / "hps" / "HPS_v2.1_compressed.pt").write_bytes(ckpt.read_bytes())
    assert check_available("hpsv21")["checkpoint"] == tmp_path / "hps" / "HPS_v2.1_compressed.pt"
    snap = rf.hf_cache_snapshot(tmp_path / "hf", "xswu/HPSv2")
    (snap / "HPS_v2.1_compressed.pt").write_bytes(ckpt.read_bytes())
    found = check_available("hpsv21")["checkpoint"]
    assert found == snap / "HPS_v2.1_compressed.pt"  # the HF cache comes first
    r = load_reward("hpsv21", model_config=rf.TINY_OPEN_CLIP)
    assert r.checkpoint == str(found)


def test_a_checkpoint_of_another_architecture_is_explained(ckpt):
    other = dict(rf.TINY_OPEN_CLIP, embed_dim=16)
    with pytest.raises(RewardError, match="wrong shape.*model_name/model_config"):
        load_reward("hpsv21", path=ckpt, model_config=other)


class NotATensor:
    """Stands for any foreign object a pickle could reconstruct (and run code for)."""


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": NotATensor()}, path)
    with pytest.raises(RewardError, match="weights_only=True"):
        load_reward("hpsv21", path=path, model_config=rf.TINY_OPEN_CLIP)


def test_accelerator_path_finishes_preprocessing_in_the_forward(reward):
    """On a GPU, _prepare hands over uint8 groups and the forward resizes on the device; the
    same code path run here must give the same scores as the CPU path."""
    from craft.rewards.hps import group_by_size

    images, prompts = rf.images(5, seed=6), rf.prompts_for(5)
    tokens = reward.tokenizer(prompts)
    with torch.inference_mode():
        img, txt = reward._features((group_by_size(images), 5, tokens, list(range(5))))
    np.testing.assert_allclose((img * txt).sum(-1).numpy(), reward(images, prompts), atol=1e-6)


def test_half_precision_is_close_to_float32(ckpt, reward):
    images, prompts = rf.images(4, seed=7), rf.prompts_for(4)
    bf16 = load_reward("hpsv21", path=ckpt, model_config=rf.TINY_OPEN_CLIP, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    np.testing.assert_allclose(bf16(images, prompts), reward(images, prompts), atol=0.03)
