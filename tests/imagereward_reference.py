"""Score images with the `image-reward` package's own model code, for the parity test.

Run by tests/test_rewards_imagereward.py in the side environment that scripts/setup.sh builds
(``.venv/reference/imagereward``: image-reward 1.5 with its pins timm 0.6.13, fairscale 0.4.13
and a transformers 4.x, put first on PYTHONPATH so they shadow this project's versions). The
package cannot be imported next to transformers 5, which is why CRAFT ports it.

What it does: builds the package's ``ImageReward`` model (its BLIP ViT, its med BERT, its MLP)
from a med_config.json, with a small ViT in place of ViT-L (the package's own VisionTransformer
class, only narrower and shallower), gives every parameter a random value (so that a swapped or
skipped tensor changes the scores), saves the state dict as ImageReward.pt in the layout the
real checkpoint has, and writes the package's per-image ``score(prompt, image)`` and its
tokenizer ids for each input to reference.json.

Usage: python imagereward_reference.py WORK_DIR  (WORK_DIR holds med_config.json, inputs.json
and the images; bert-base-uncased must be in the HF cache that HF_HUB_CACHE names).
"""

import json
import math
import pathlib
import sys
import types


def import_package():
    """Import the package's model modules without its __init__ (which pulls in `clip`,
    diffusers and datasets for features we do not use)."""
    import importlib.util

    spec = importlib.util.find_spec("ImageReward")
    root = pathlib.Path(spec.submodule_search_locations[0])
    for name, folder in (("ImageReward", root), ("ImageReward.models", root / "models")):
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module
    import ImageReward.ImageReward as ir_module
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    return ir_module, blip_pretrain, VisionTransformer


def randomise(model, torch, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(noise / math.sqrt(fan_in))
            else:
                p.copy_(0.1 * noise)


def main(work: pathlib.Path) -> None:
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    ir_module, blip_pretrain, VisionTransformer = import_package()
    inputs = json.loads((work / "inputs.json").read_text())
    vit = inputs["vit"]

    def small_vit(_name, image_size, *_args, **_kw):
        encoder = VisionTransformer(img_size=image_size, patch_size=vit["patch"],
                                    embed_dim=vit["width"], depth=vit["depth"],
                                    num_heads=vit["heads"])
        return encoder, vit["width"]

    blip_pretrain.create_vit = small_vit
    torch.manual_seed(inputs["seed"])
    model = ir_module.ImageReward(med_config=str(work / "med_config.json"), device="cpu")
    randomise(model, torch, inputs["seed"])
    model.eval()
    torch.save(model.state_dict(), work / "ImageReward.pt")

    scores, ids = [], []
    with torch.no_grad():
        for image_file, prompt in zip(inputs["images"], inputs["prompts"]):
            scores.append(model.score(prompt, Image.open(work / image_file)))
            ids.append(model.blip.tokenizer(prompt, padding="max_length", truncation=True,
                                            max_length=35).input_ids)
    import transformers

    (work / "reference.json").write_text(json.dumps({
        "scores": scores, "input_ids": ids, "transformers": transformers.__version__,
        "keys": len(model.state_dict())}))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
