"""ImageReward (optional, package-backed).

The ``image-reward`` package is not installed here (it pins timm==0.6.13), so these tests
(1) check the teaching error when it is missing, and (2) run our batched scorer against a
stand-in package with the same interface (``ImageReward.load`` -> a model with ``blip``,
``mlp``, ``preprocess``, ``mean``, ``std`` and a per-image ``score``): that proves our batching,
prompt mapping and normalisation reproduce the package's own ``score`` logic, not that the real
BLIP weights load.
"""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

import reward_fixtures as rf
from craft.rewards import MissingDependencyError, MissingWeightsError, check_available, load_reward
from craft.rewards import imagereward as ir

torch.set_num_threads(1)

# A stand-in for the `image-reward` package: the same public pieces, tiny modules. Its
# ``score`` is the package's per-image code path (ImageReward.score), line for line.
FAKE_PACKAGE = textwrap.dedent('''
    import os
    import numpy as np
    import torch
    import torch.nn as nn
    from transformers import BatchEncoding

    LOADS = []

    class Tokenizer:
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            assert padding == "max_length" and truncation and return_tensors == "pt"
            texts = [texts] if isinstance(texts, str) else texts
            ids = torch.zeros(len(texts), max_length, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, t in enumerate(texts):
                row = [101] + [ord(c) % 97 + 1 for c in t][: max_length - 2] + [102]
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            return BatchEncoding({"input_ids": ids, "attention_mask": mask})

    class Out:
        def __init__(self, h):
            self.last_hidden_state = h

    class TextEncoder(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.emb = nn.Embedding(128, d)
            self.attn = nn.MultiheadAttention(d, 2, batch_first=True)

        def forward(self, ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                    return_dict):
            x = self.emb(ids) * attention_mask[..., None]
            y, _ = self.attn(x, encoder_hidden_states, encoder_hidden_states)
            return Out(x + y)

    class Visual(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.proj = nn.Linear(3 * 4 * 4, d)

        def forward(self, image):  # (B, 3, 8, 8) -> (B, 4 patches, d)
            b = image.shape[0]
            patches = image.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5)
            return self.proj(patches.reshape(b, 4, -1))

    class Blip(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.visual_encoder = Visual(d)
            self.text_encoder = TextEncoder(d)
            self.tokenizer = Tokenizer()

    def preprocess(img):
        arr = np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)

    class ImageReward(nn.Module):
        def __init__(self, device="cpu"):
            super().__init__()
            self.device = device
            torch.manual_seed(0)
            self.blip = Blip(16)
            self.preprocess = preprocess
            self.mlp = nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 1))
            self.mean = 0.16717362830052426
            self.std = 1.0333394966054072

        def score(self, prompt, image):
            text_input = self.blip.tokenizer(prompt, padding='max_length', truncation=True,
                                             max_length=35, return_tensors="pt").to(self.device)
            image = self.preprocess(image).unsqueeze(0).to(self.device)
            image_embeds = self.blip.visual_encoder(image)
            image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long).to(self.device)
            text_output = self.blip.text_encoder(text_input.input_ids,
                                                 attention_mask=text_input.attention_mask,
                                                 encoder_hidden_states=image_embeds,
                                                 encoder_attention_mask=image_atts,
                                                 return_dict=True)
            txt_features = text_output.last_hidden_state[:, 0, :].float()
            rewards = self.mlp(txt_features)
            rewards = (rewards - self.mean) / self.std
            return rewards.detach().cpu().numpy().item()

    def load(name="ImageReward-v1.0", device="cpu", download_root=None, med_config=None):
        assert os.path.isfile(name) and os.path.isfile(med_config), (name, med_config)
        LOADS.append((name, med_config))
        return ImageReward(device=device).to(device).eval()
''')


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "ImageReward"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "ImageReward", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    vocab = rf.hf_cache_snapshot(tmp_path / "hf", "bert-base-uncased")
    (vocab / "vocab.txt").write_text("[PAD]\n")
    weights = tmp_path / "ir"
    weights.mkdir()
    (weights / "ImageReward.pt").write_bytes(b"stand-in")
    (weights / "med_config.json").write_text("{}")
    yield weights
    sys.modules.pop("ImageReward", None)


def test_missing_package_is_explained(monkeypatch):
    monkeypatch.setattr(ir, "import_available", lambda module: False)
    with pytest.raises(MissingDependencyError, match=r"pip install image-reward.*eval_names"):
        check_available("imagereward")


def test_batched_scores_equal_the_packages_per_image_score(fake_package):
    found = check_available("imagereward", path=fake_package)
    assert found == {"checkpoint": fake_package / "ImageReward.pt",
                     "med_config": fake_package / "med_config.json"}
    reward = load_reward("imagereward", path=fake_package / "ImageReward.pt", batch_size=3)
    import ImageReward

    assert ImageReward.LOADS == [(str(found["checkpoint"]), str(found["med_config"]))]
    images = rf.images(7, seed=1)
    prompts = [rf.PROMPTS[0]] * 3 + rf.PROMPTS[1:] + ["x" * 80]  # shared, distinct, truncated
    ours = reward(images, prompts)
    ref = [reward.model.score(p, im) for im, p in zip(images, prompts)]
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert reward.mean == pytest.approx(0.16717, abs=1e-5)
    assert reward.std == pytest.approx(1.03334, abs=1e-5)


def test_weights_in_the_hf_cache_or_the_package_folder(fake_package, tmp_path):
    with pytest.raises(MissingWeightsError, match="THUDM/ImageReward"):
        check_available("imagereward")
    home = tmp_path / "home" / ".cache" / "ImageReward"
    home.mkdir(parents=True)
    for f in ("ImageReward.pt", "med_config.json"):
        (home / f).write_bytes((fake_package / f).read_bytes())
    assert check_available("imagereward")["checkpoint"] == home / "ImageReward.pt"
    snap = rf.hf_cache_snapshot(tmp_path / "hf", "THUDM/ImageReward")
    (snap / "ImageReward.pt").write_bytes(b"x")
    assert check_available("imagereward")["checkpoint"] == snap / "ImageReward.pt"


def test_bert_tokenizer_must_be_cached(fake_package, tmp_path):
    import shutil

    shutil.rmtree(tmp_path / "hf" / "models--bert-base-uncased")
    with pytest.raises(MissingWeightsError, match="bert-base-uncased"):
        check_available("imagereward", path=fake_package)
