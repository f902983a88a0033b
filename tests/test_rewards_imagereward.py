"""ImageReward: our port on transformers' BLIP classes against the package's own model code.

The `image-reward` package cannot be imported beside transformers 5, so scripts/setup.sh puts it
with its pins in a side environment (``.venv/reference/imagereward``) and
tests/imagereward_reference.py runs it there: it builds the package's ImageReward model (a small
ViT of the package's own class in place of ViT-L), randomises every weight, saves ImageReward.pt
in the real layout and scores each image with the package's per-image ``score``. Here we load
that file through the registry and must give the same scores within 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reward_fixtures as rf
from craft.rewards import MissingWeightsError, RewardError, check_available, load_reward
from craft.rewards import imagereward as ir

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_ENV = ROOT / ".venv" / "reference" / "imagereward"
PROMPTS = rf.PROMPTS + ["A Café at NIGHT, with neon signs!", "x" * 80, ""]
VIT = {"width": 128, "depth": 2, "heads": 2, "patch": 16}  # heads of 64 channels, as in BLIP
WORDS = sorted({w.strip("!,.").lower() for p in PROMPTS for w in p.split()} - {""})


def write_bert_vocab(cache: Path) -> Path:
    """A small bert-base-uncased vocab.txt in the HF cache layout: specials first (ids differ from
    the real 30522-token file, which is fine: both sides read the same file)."""
    snap = rf.hf_cache_snapshot(cache, "bert-base-uncased")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("!,.'") + letters
              + ["##" + c for c in letters] + [w for w in WORDS if w.isalpha() and len(w) > 1])
    (snap / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    return snap


def med_config(vocab_size: int) -> dict:
    # The real file's keys; hidden_size must stay 768 (the package's MLP(768) is fixed), the
    # depth and widths are small.
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
            "initializer_range": 0.02, "intermediate_size": 256, "layer_norm_eps": 1e-12,
            "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 12,
            "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
            "vocab_size": vocab_size, "encoder_width": 768, "add_cross_attention": True}


def sample_images():
    images = rf.images(6, seed=3, sizes=((64, 64), (300, 200), (50, 80), (224, 224)))
    images[4] = images[4].convert("L")  # the package converts to RGB after the crop
    images[5] = images[5].convert("RGBA")
    return images


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Run the package in its side environment; return the work folder and its results."""
    if not (REFERENCE_ENV / "ImageReward").is_dir():
        pytest.skip(f"the image-reward side environment is missing ({REFERENCE_ENV}); "
                    "run `bash scripts/setup.sh`")
    work = tmp_path_factory.mktemp("imagereward")
    cache = work / "hf"
    vocab = write_bert_vocab(cache)
    n_vocab = len((vocab / "vocab.txt").read_text().split())
    (work / "med_config.json").write_text(json.dumps(med_config(n_vocab + 2)))
    names = []
    for i, image in enumerate(sample_images()):
        names.append(f"image{i}.png")
        image.save(work / names[-1])
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    prompts[:3] = PROMPTS[-3:]  # the accent/case, the truncated and the empty prompt
    (work / "inputs.json").write_text(json.dumps(
        {"images": names, "prompts": prompts, "seed": 7, "vit": VIT}))
    env = {**os.environ, "PYTHONPATH": str(REFERENCE_ENV), "HF_HUB_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name(
        "imagereward_reference.py")), str(work)], env=env, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((work / "reference.json").read_text())
    assert result["transformers"].startswith("4."), result["transformers"]
    return work, prompts, result


@pytest.fixture
def hf_cache(reference, monkeypatch):
    work = reference[0]
    monkeypatch.setenv("HF_HUB_CACHE", str(work / "hf"))
    monkeypatch.setenv("HOME", str(work / "home"))
    return work


def test_scores_equal_the_packages_own_model_code(reference, hf_cache):
    work, prompts, result = reference
    reward = load_reward("imagereward", path=work, batch_size=4)
    images = [Image.open(work / f"image{i}.png") for i in range(len(prompts))]
    ours = reward(images, prompts)
    ref = np.array(result["scores"])
    assert ours.dtype == np.float64
    assert ref.std() > 0.1, ref  # random weights that really move the score
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # Same token ids as the package's tokenizer (transformers 4 slow BertTokenizer + BLIP's two
    # added tokens), the 35-token truncation included.
    ids = reward.tokenizer(prompts, padding="max_length", truncation=True,
                           max_length=ir.MAX_TOKENS)["input_ids"]
    assert ids == result["input_ids"]
    # One prompt repeated across the batch (a CRAFT group) gives each image's own score.
    same = reward(images, [prompts[3]] * len(images))
    singles = [reward([im], [prompts[3]])[0] for im in images]
    np.testing.assert_allclose(same, singles, atol=1e-5)


def test_checkpoint_is_read_without_unpickling_code(reference, hf_cache, tmp_path):
    """weights_only loading: a pickle that would run code is refused with a one-line error."""
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(hf_cache / "med_config.json", bad)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, bad / "ImageReward.pt")
    with pytest.raises(RewardError, match=r"cannot read .*ImageReward\.pt as a state dict"):
        load_reward("imagereward", path=bad)


def test_foreign_or_mismatched_checkpoints_are_refused(reference, hf_cache, tmp_path):
    sd = torch.load(hf_cache / "ImageReward.pt", weights_only=True)
    folder = tmp_path / "other"
    folder.mkdir()
    shutil.copy(hf_cache / "med_config.json", folder)
    torch.save({**sd, "blip.itm_head.weight": torch.zeros(2, 768)}, folder / "ImageReward.pt")
    with pytest.raises(RewardError, match=r"keys that ImageReward v1\.0 does not have.*itm_head"):
        load_reward("imagereward", path=folder)
    torch.save({k: v for k, v in sd.items() if not k.startswith("mlp.layers.7")},
               folder / "ImageReward.pt")
    with pytest.raises(RewardError, match=r"missing 2: mlp\.7\.bias, mlp\.7\.weight"):
        load_reward("imagereward", path=folder)
    med = json.loads((hf_cache / "med_config.json").read_text())
    (folder / "med_config.json").write_text(json.dumps({**med, "intermediate_size": 128}))
    torch.save(sd, folder / "ImageReward.pt")
    with pytest.raises(RewardError, match="does not fit the model built from med_config.json"):
        load_reward("imagereward", path=folder)
    (folder / "med_config.json").write_text(json.dumps(med))
    other_vocab = tmp_path / "vocab"
    other_vocab.mkdir()
    words = (hf_cache / "hf").glob("models--bert-base-uncased/snapshots/*/vocab.txt")
    (other_vocab / "vocab.txt").write_text(next(words).read_text() + "extra\n")
    with pytest.raises(RewardError, match=r"has 93 tokens .* med_config.json says vocab_size=92"):
        load_reward("imagereward", path=folder, tokenizer_path=other_vocab)


def test_real_sizes_give_vit_large_and_bert_base():
    """The config read off real-shaped tensors is BLIP's ViT-L/16 at 224 px (24 layers, 16
    heads) and the real med_config.json gives BERT-base with cross-attention to 1024 wide."""
    from accelerate import init_empty_weights

    shapes = {"embeddings.class_embedding": (1, 1, 1024),
              "embeddings.patch_embedding.weight": (1024, 3, 16, 16),
              "embeddings.position_embedding": (1, 197, 1024),
              "encoder.layers.0.mlp.fc1.weight": (4096, 1024),
              "encoder.layers.23.mlp.fc1.weight": (4096, 1024)}
    vcfg = ir.vision_config_from({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    assert (vcfg.hidden_size, vcfg.num_hidden_layers, vcfg.num_attention_heads,
            vcfg.image_size, vcfg.patch_size) == (1024, 24, 16, 224, 16)
    real = {**med_config(30524), "intermediate_size": 3072, "num_hidden_layers": 12,
            "max_position_embeddings": 512}
    tcfg = ir.text_config_from(real, vcfg.hidden_size)
    with init_empty_weights():
        model = ir._module_class()(vcfg, tcfg)
    n_vision = sum(p.numel() for p in model.vision.parameters())
    n_text = sum(p.numel() for p in model.text.parameters())
    assert 303e6 < n_vision < 304.5e6  # ViT-L/16
    # BERT-base (embeddings 23.8 M + 12 x 7.1 M) plus 12 cross-attention blocks reading 1024-wide
    # image tokens (12 x 2.76 M), no pooler: 142.0 M by hand.
    assert 141.5e6 < n_text < 142.5e6


def test_weights_in_the_hf_cache_or_the_package_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(MissingWeightsError, match=r"ImageReward\.pt \(hub: THUDM/ImageReward\)"):
        check_available("imagereward")
    home = tmp_path / "home" / ".cache" / "ImageReward"
    home.mkdir(parents=True)
    for f in ("ImageReward.pt", "med_config.json"):
        (home / f).write_bytes(b"x")
    with pytest.raises(MissingWeightsError, match=r"bert-base-uncased tokenizer \(vocab\.txt\)"):
        check_available("imagereward")
    write_bert_vocab(tmp_path / "hf")
    assert check_available("imagereward")["checkpoint"] == home / "ImageReward.pt"
    snap = rf.hf_cache_snapshot(tmp_path / "hf", "THUDM/ImageReward")
    (snap / "ImageReward.pt").write_bytes(b"x")
    (snap / "med_config.json").write_bytes(b"x")
    found = check_available("imagereward")
    assert found["checkpoint"] == snap / "ImageReward.pt"
    assert found["tokenizer"].name == "0" * 40


def test_explicit_tokenizer_path_must_hold_vocab(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "ir").mkdir()
    for f in ("ImageReward.pt", "med_config.json"):
        (tmp_path / "ir" / f).write_bytes(b"x")
    with pytest.raises(MissingWeightsError, match=r"vocab\.txt.*tokenizer_path="):
        check_available("imagereward", path=tmp_path / "ir", tokenizer_path=tmp_path / "nope")
    (tmp_path / "ir" / "vocab.txt").write_text("[PAD]\n")
    assert check_available("imagereward", path=tmp_path / "ir")["tokenizer"] == tmp_path / "ir"
