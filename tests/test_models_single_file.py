"""Single-file checkpoints (original LDM / SGM layout) loaded offline through craft.models.loading.

Tiny models of the real SD1.5 and SDXL architectures (random weights, real CLIP vocabulary) are
written as one .safetensors under the original key names, as ``v1-5-pruned-emaonly.safetensors``
and ``sd_xl_base_1.0.safetensors`` are, and loaded with ``from_single_file`` with the network
switched off. The diffusers configs it also needs come from ``model.single_file_config`` (a
folder holding only configs, tokenizer and scheduler files) or from the Hugging Face cache; with
neither, the load fails before any work and says how to provide them.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import sd_fixtures as sf
from conftest import tiny_config
from sd_fixtures import PROMPTS, images, offline, states_equal  # noqa: F401 (offline: fixture)
from craft.models.loading import (MissingWeightsError, check_model, default_single_file_config,
                          detect_family, load_pipeline)

COMPONENTS = {"sd15": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
DEFAULT_REPO = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Per family: the in-memory model, its diffusers folder, a configs-only copy of that
    folder, and the same weights as one original-layout .safetensors file."""
    root = tmp_path_factory.mktemp("single-file")
    out = {}
    for family in ("sd15", "sdxl"):
        pipe = sf.build(family, root)
        folder = root / family
        if family == "sd15":
            sf.save_sd15_layout(pipe, folder)
        else:
            pipe.save_pretrained(folder, safe_serialization=True)
        out[family] = SimpleNamespace(
            pipe=pipe, folder=folder,
            configs=sf.copy_configs_only(folder, root / f"{family}-configs-only"),
            single=sf.write_single_file(pipe, root / f"{family}-tiny.safetensors"))
    return out


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_loads_offline_with_a_local_config_folder(files, family):
    """Bitwise the same weights, and the same images, as the model the file was written from;
    the config folder holds no weights at all."""
    f = files[family]
    assert detect_family(f.single) == family
    assert default_single_file_config(f.single) == DEFAULT_REPO[family]
    assert not list(f.configs.rglob("*.safetensors"))
    pipe = load_pipeline(f.single, single_file_config=str(f.configs))
    assert type(pipe) is type(f.pipe)
    for name in COMPONENTS[family]:
        assert states_equal(getattr(pipe, name), getattr(f.pipe, name)), name
    ours, theirs = images(pipe, PROMPTS, [3, 4], 2), images(f.pipe, PROMPTS, [3, 4], 2)
    # bitwise-equal weights; only float rounding may differ (a few pixels by 1/255)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_single_file_config_defaults_to_the_cached_repo_diffusers_names(files, tmp_path):
    """Without model.single_file_config, the configs of the repo diffusers associates with an
    SD1.x checkpoint are used when they are in the HF cache (configs only, no weights)."""
    f = files["sd15"]
    sf.fake_hf_cache(tmp_path / "hf-cache", DEFAULT_REPO["sd15"], f.folder, configs_only=True)
    pipe = load_pipeline(f.single)
    assert states_equal(pipe.unet, f.pipe.unet)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_without_its_config_fails_fast_and_says_how(files, tmp_path, family):
    f = files[family]
    cfg = tiny_config(str(f.single), **{"model.family": "auto"})
    with pytest.raises(MissingWeightsError) as err:
        check_model(cfg.model)
    text = str(err.value)
    for part in ("single-file checkpoint", DEFAULT_REPO[family], str(tmp_path / "hf-cache"),
                 "hf download", '--include "*.json" "*.txt"', "--set model.single_file_config="):
        assert part in text, part
    with pytest.raises(MissingWeightsError, match="single_file_config"):
        load_pipeline(f.single)
    empty = tmp_path / "not-a-pipeline"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="model_index.json"):
        load_pipeline(f.single, single_file_config=str(empty))
    with pytest.raises(MissingWeightsError, match="not a local folder.*not in the Hugging Face"):
        load_pipeline(f.single, single_file_config="someone/not-cached")


def test_the_published_sdxl_key_is_what_diffusers_reads(tmp_path):
    """A full-depth SDXL text encoder has resblocks.9, the key diffusers' own table uses."""
    from safetensors.torch import save_file

    path = tmp_path / "sd_xl_base_keys.safetensors"
    save_file({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias":
               torch.zeros(4), "conditioner.embedders.1.model.positional_embedding":
               torch.zeros(77, 4)}, str(path))
    assert detect_family(path) == "sdxl"
    assert default_single_file_config(path) == DEFAULT_REPO["sdxl"]


def test_compare_tab_evaluates_a_checkpoint_inside_a_single_file_base(files, tmp_path):
    """Evaluation (the studio's Compare tab, `craft evaluate --tuned`) runs an intermediate
    ``checkpoint-N`` (a UNet only) inside the base pipeline; a single-file base must load there as it does for training (its
    single_file_config), and the checkpoint's UNet must be the one generating."""
    from craft.run.store import RunStore
    from craft.stages.engine import prepare_prompts
    from craft.stages.engine import stage_evaluate

    f = files["sd15"]
    ckpt = tmp_path / "train" / "checkpoint-2"
    unet = sf.build("sd15", tmp_path / "other").unet
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    unet.save_pretrained(ckpt / "unet")
    cfg = tiny_config(str(f.single), **{"model.single_file_config": str(f.configs)})
    with RunStore(tmp_path / "run") as store:
        prepare_prompts(store, cfg)
        result = stage_evaluate(store, cfg, tuned=str(ckpt), base=str(f.single), name="cmp",
                                label="tuned")
    out = tmp_path / "run" / "eval" / "cmp"
    n = cfg.eval.num_prompts * cfg.eval.seeds_per_prompt
    base = [np.asarray(Image.open(out / "base" / f"{i:05d}.png")) for i in range(n)]
    tuned = [np.asarray(Image.open(out / "tuned" / f"{i:05d}.png")) for i in range(n)]
    assert all(np.abs(b.astype(int) - t.astype(int)).mean() > 1 for b, t in zip(base, tuned))
    assert set(result.summary["model"]) == {"base", "tuned"}
