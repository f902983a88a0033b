"""ImageReward at its real size: our port against the package's own model code, random weights.

    .venv/bin/python benchmarks/imagereward_real_size.py [--images 4] [--threads 2]

The parity test (tests/test_rewards_imagereward.py) uses a 2-layer, 128-wide ViT. This script
builds the real architecture instead: the package's ImageReward with BLIP's ViT-L/16 (24 layers,
1024 wide, 16 heads) and the real med_config.json sizes (BERT-base, 12 layers, 30524 tokens),
random weights, saved as a real-size ImageReward.pt (about 1.8 GB), scored per image by the
package in its side environment (scripts/setup.sh builds it), then loaded and scored in one
batch by ``load_reward("imagereward")``. It reports the largest score difference, the parameter
counts, the checkpoint size and the load and scoring times on this machine.

The tokenizer is a bert-base-uncased-sized vocab.txt (30522 entries: specials, letters,
the prompt words, and filler), since the real file cannot be downloaded here; both sides read
the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

REFERENCE_ENV = ROOT / ".venv" / "reference" / "imagereward"
VIT_L = {"width": 1024, "depth": 24, "heads": 16, "patch": 16}
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1,
              "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
              "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
              "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
              "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}
PROMPTS = ["a photo of an astronaut riding a horse on the moon",
           "an oil painting of a lighthouse at dusk, dramatic sky",
           "a red circle on a blue background", "a cozy reading nook with warm light"]


def write_vocab(cache: Path, size: int = 30522) -> None:
    import reward_fixtures as rf

    snap = rf.hf_cache_snapshot(cache, "bert-base-uncased")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = sorted({w.strip(",.").lower() for p in PROMPTS for w in p.split()})
    tokens = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "."]
                                + letters + ["##" + c for c in letters] + words))
    tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
    (snap / "vocab.txt").write_text("\n".join(tokens) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not (REFERENCE_ENV / "ImageReward").is_dir():
        raise SystemExit(f"the image-reward side environment is missing ({REFERENCE_ENV}); "
                         "run `bash scripts/setup.sh`")
    import numpy as np
    import torch
    from PIL import Image

    import reward_fixtures as rf

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_vocab(work / "hf")
        (work / "med_config.json").write_text(json.dumps(MED_CONFIG))
        images = rf.images(args.images, seed=5, sizes=((512, 512), (768, 512)))
        names = []
        for i, im in enumerate(images):
            names.append(f"image{i}.png")
            im.save(work / names[-1])
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
        (work / "inputs.json").write_text(json.dumps(
            {"images": names, "prompts": prompts, "seed": 11, "vit": VIT_L}))
        env = {**os.environ, "PYTHONPATH": str(REFERENCE_ENV), "HF_HUB_CACHE": str(work / "hf"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "imagereward_reference.py"),
                               str(work)], env=env, capture_output=True, text=True)
        ref_s = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        ref = json.loads((work / "reference.json").read_text())
        ckpt_gb = (work / "ImageReward.pt").stat().st_size / 1e9

        os.environ["HF_HUB_CACHE"] = str(work / "hf")
        from craft.rewards import load_reward

        t0 = time.perf_counter()
        reward = load_reward("imagereward", path=work, batch_size=len(names))
        load_s = time.perf_counter() - t0
        n_vision = sum(p.numel() for p in reward.model.vision.parameters())
        n_text = sum(p.numel() for p in reward.model.text.parameters())
        n_mlp = sum(p.numel() for p in reward.model.mlp.parameters())
        opened = [Image.open(work / n) for n in names]
        reward(opened[:1], prompts[:1])  # warm-up
        t0 = time.perf_counter()
        ours = reward(opened, prompts)
        score_s = time.perf_counter() - t0
    diff = float(np.abs(ours - np.array(ref["scores"])).max())
    print(f"| parameters (vision / text / MLP) | {n_vision / 1e6:.1f} M / {n_text / 1e6:.1f} M / "
          f"{n_mlp / 1e6:.2f} M |")
    print(f"| checkpoint ImageReward.pt | {ckpt_gb:.2f} GB ({ref['keys']} tensors) |")
    print(f"| package side: build, randomise, save, score {len(names)} (one process) | "
          f"{ref_s:.1f} s |")
    print(f"| ours: load_reward (torch.load weights_only + build + load) | {load_s:.1f} s |")
    print(f"| ours: score {len(names)} images in one batch ({args.threads} threads) | "
          f"{score_s:.2f} s ({score_s / len(names):.2f} s per image) |")
    print(f"| scores (package) | {', '.join(f'{s:+.4f}' for s in ref['scores'])} |")
    print(f"| scores (ours) | {', '.join(f'{s:+.4f}' for s in ours)} |")
    print(f"| max abs difference | {diff:.1e} |")
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
