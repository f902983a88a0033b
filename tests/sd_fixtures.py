"""Tiny SD1.5 / SDXL models of the real architectures, written in the real on-disk layouts.

- ``tokenizers(folder)``: CLIPTokenizers with the real CLIP BPE vocabulary (built offline from
  open_clip's ``bpe_simple_vocab_16e6.txt.gz`` by ``reward_fixtures.clip_tokenizer``), 77
  positions; SDXL's second one pads with "!" as the published tokenizer_2 does.
- ``build(family, folder)``: the real component structure at tiny widths
  (``craft.models.architectures``), random weights, seeded.
- ``save_sd15_layout``: ``save_pretrained`` plus what the published SD1.5 folder also lists
  (safety checker, feature extractor), without the safety checker's weights (loading must not
  need them), and the tokenizer as vocab.json + merges.txt.
- ``ldm_state_dict`` / ``write_single_file``: the same weights under the original key names
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``;
  for SDXL ``conditioner.embedders.0.transformer.*`` and OpenCLIP's
  ``conditioner.embedders.1.model.*``), the layouts of ``v1-5-pruned-emaonly.safetensors`` / ``sd_xl_base_1.0.safetensors``.
- ``fake_hf_cache``: a Hugging Face cache folder holding a snapshot of a repo.
- ``offline``: a fixture (import it into a test module; autouse) that refuses network access
  and points the Hugging Face cache at an empty folder.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

PROMPTS = ["a photo of an astronaut riding a horse", "an oil painting of a lighthouse at dusk"]


def _params():
    from craft.stages.generation import SamplingParams

    return SamplingParams(num_inference_steps=3, guidance_scale=5.0)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, and an empty Hugging Face cache: whatever loads, loads from disk."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def states_equal(a, b) -> bool:
    """Two modules hold bitwise the same parameters and buffers under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def images(pipe, prompts, seeds, batch_size, params=None):
    """craft.stages.generation.generate_images as one uint8 array."""
    from craft.stages.generation import generate_images, images_to_array

    return images_to_array([im for _, b in generate_images(pipe, prompts, seeds,
                                                           params or _params(), batch_size)
                            for im in b])


MAX_PIXEL_DIFF = 2  # of 255: the same candidate batched vs alone


def batched_equals_alone(pipe, params=None):
    """Each image is seeded per candidate: the same (prompt, seed) alone equals it in a batch
    (up to float rounding), and the seed matters. Returns the batch (uint8)."""
    import numpy as np

    prompts, seeds = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]], [11, 12, 11, 12]
    batched = images(pipe, prompts, seeds, 4, params)
    for i in (1, 2):
        alone = images(pipe, [prompts[i]], [seeds[i]], 1, params)[0]
        assert np.abs(alone.astype(int) - batched[i].astype(int)).max() <= MAX_PIXEL_DIFF
    assert np.abs(batched[0].astype(int) - batched[1].astype(int)).max() > 10  # seed matters
    return batched


def tokenizers(folder: Path):
    """(tokenizer, tokenizer_2), saved under ``folder`` once and loaded from there."""
    from transformers import CLIPTokenizer

    first, second = folder / "tokenizer", folder / "tokenizer_2"
    if not (second / "vocab.json").exists():
        from reward_fixtures import clip_tokenizer

        tok = copy.deepcopy(clip_tokenizer())
        tok.model_max_length = 77
        tok.save_pretrained(first)
        tok.pad_token = "!"
        tok.save_pretrained(second)
    return CLIPTokenizer.from_pretrained(first), CLIPTokenizer.from_pretrained(second)


def build(family: str, folder: Path, seed: int = 0):
    from craft.models.architectures import build_pipeline

    tok, tok2 = tokenizers(folder)
    return build_pipeline(family, tok, tokenizer_2=tok2, tiny=True, seed=seed)


def published_tokenizer_files(folder: Path) -> Path:
    """Rewrite a saved CLIPTokenizer as the published SD repos ship it: vocab.json, merges.txt,
    special_tokens_map.json and tokenizer_config.json, no tokenizer.json (transformers 5 saves
    only tokenizer.json, and builds it back from the two files when loading them)."""
    fast = folder / "tokenizer.json"
    model = json.loads(fast.read_text())["model"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"]))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}))
    config.pop("backend", None)
    config.update(model_max_length=77, do_lower_case=True, errors="replace")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    fast.unlink()
    return folder


def save_sd15_layout(pipe, out: Path) -> Path:
    """Save like the published SD1.5 repo: model_index.json also names the safety checker and
    feature extractor; the feature extractor's config is there, the checker's weights are not;
    the tokenizer is vocab.json + merges.txt."""
    pipe.save_pretrained(out, safe_serialization=True)
    published_tokenizer_files(out / "tokenizer")
    index = json.loads((out / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"],
                 requires_safety_checker=True)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / "feature_extractor").mkdir(exist_ok=True)
    (out / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 224,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return out


def copy_configs_only(src: Path, dst: Path) -> Path:
    """The configs, tokenizer and scheduler files of a diffusers folder, without weights."""
    for f in src.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".txt"):
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    return dst


# ------------------------------------------------------------------ diffusers -> LDM keys
# Written from the LDM module layout (openaimodel.UNetModel, autoencoder Encoder/Decoder), for
# any number of levels and layers per block; diffusers' from_single_file converts back.

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("conv_shortcut", "skip_connection"))


def _unet_prefixes(config) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for every block of an SD1.x UNet."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [("time_embedding.linear_1.", "time_embed.0."),
             ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."),
             ("conv_out.", "out.2."), ("mid_block.resnets.0.", "middle_block.0."),
             ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(n):
        for j in range(per):
            k = 1 + i * (per + 1) + j
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.")]
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.",
                          f"input_blocks.{(i + 1) * (per + 1)}.0.op."))
        has_attn = "CrossAttn" in config["up_block_types"][i]
        for j in range(per + 1):
            k = i * (per + 1) + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.")]
        if i < n - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.",
                          f"output_blocks.{i * (per + 1) + per}.{2 if has_attn else 1}."))
    return pairs


def _vae_prefixes(config) -> list[tuple[str, str]]:
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.")]
    for i in range(n):
        for j in range(per):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        for j in range(per + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.",
                          f"decoder.up.{n - 1 - i}.block.{j}."))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    return pairs


def _rename(state: dict, pairs, inner=()) -> dict:
    out = {}
    for key, value in state.items():
        new = key
        for hf, ldm in pairs:
            if key.startswith(hf):
                rest = key[len(hf):]
                for a, b in inner:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                new = ldm + rest
                break
        out[new] = value
    return out


_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
             ("to_out.0", "proj_out"))


def _open_clip_text(model) -> dict:
    """A transformers CLIPTextModelWithProjection under OpenCLIP's names (SDXL's second text
    encoder, ``conditioner.embedders.1.model.*``): fused q/k/v, a transposed projection."""
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    state = model.state_dict()
    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"],
           "text_projection": state["text_projection.weight"].T}
    for i in range(model.config.num_hidden_layers):
        pre = f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{pre}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for hf, ldm in names.items():
                out[f"transformer.resblocks.{i}.{ldm}.{kind}"] = state[f"{pre}{hf}.{kind}"]
    return out


def ldm_state_dict(pipe) -> dict:
    """The pipeline's UNet, VAE and text encoder(s) under the original LDM / SGM key names:
    SD1.x (``cond_stage_model.transformer.*``) or SDXL (``conditioner.embedders.{0,1}.*``,
    the UNet's ``label_emb``)."""
    xl = hasattr(pipe, "text_encoder_2")
    prefixes = _unet_prefixes(pipe.unet.config)
    if xl:
        prefixes += [("add_embedding.linear_1.", "label_emb.0.0."),
                     ("add_embedding.linear_2.", "label_emb.0.2.")]
    unet = _rename(pipe.unet.state_dict(), prefixes, _RESNET)
    vae = {}
    for key, value in _rename(pipe.vae.state_dict(), _vae_prefixes(pipe.vae.config),
                              (("conv_shortcut", "nin_shortcut"),)).items():
        if ".mid.attn_1." in key:
            head, rest = key.split(".mid.attn_1.")
            for a, b in _VAE_ATTN:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
            key = f"{head}.mid.attn_1.{rest}"
            if rest.split(".")[0] in ("q", "k", "v", "proj_out") and value.dim() == 2:
                value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        vae[key] = value
    text = {}
    first = "conditioner.embedders.0.transformer." if xl else "cond_stage_model.transformer."
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        text[f"{first}{key}"] = value
    if xl:
        text.update({f"conditioner.embedders.1.model.{k}": v
                     for k, v in _open_clip_text(pipe.text_encoder_2).items()})
    state = {**{f"model.diffusion_model.{k}": v for k, v in unet.items()},
             **{f"first_stage_model.{k}": v for k, v in vae.items()}, **text}
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def write_single_file(pipe, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(ldm_state_dict(pipe), str(path))
    return path


def fake_hf_cache(cache: Path, repo_id: str, source: Path, *, configs_only: bool = False) -> Path:
    """Put ``source`` (a diffusers folder) into ``cache`` as the snapshot of ``repo_id``."""
    from reward_fixtures import hf_cache_snapshot

    snap = hf_cache_snapshot(cache, repo_id)
    if configs_only:
        copy_configs_only(source, snap)
    else:
        shutil.copytree(source, snap, dirs_exist_ok=True)
    return snap


def tiny_bf16_run_config(family: str, folder: Path, lora: bool, *extra: str):
    """A tiny model of ``family``'s real architecture (sdxl, sd3, flux) saved in bfloat16 under
    ``folder``/model, and a craft config that trains it as the real configs do (bfloat16
    weights and autocast, EMA; ``extra`` are more ``--set`` overrides)."""
    from conftest import tiny_overrides
    from craft.models.architectures import build_pipeline
    from craft.run.config import load_config
    from craft.toyworld.model import load_t5_tokenizer, write_t5_tokenizer

    tok, tok2 = tokenizers(folder)
    t5 = load_t5_tokenizer(write_t5_tokenizer(folder / "t5", max_length=16))
    pipe = build_pipeline(family, tok, tokenizer_2=tok2 if family == "sdxl" else None,
                          t5_tokenizer=t5, tiny=True, seed=0, dtype=torch.bfloat16)
    pipe.save_pretrained(folder / "model", safe_serialization=True)
    over = [*tiny_overrides(str(folder / "model")), "model.family=auto", "model.dtype=bfloat16",
            "train.mixed_precision=bf16", f"train.lora={str(lora).lower()}",
            "train.ema_decay=0.9", "generation.height=64", "generation.width=64",
            "generation.scheduler=default", *extra]
    return load_config(None, over)
