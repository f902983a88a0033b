"""Random weights at the real sizes for ``craft rehearse``: the config's diffusion model and every
reward it names, built from their architectures and written where the real loaders read them.

- **The model**: its exact architecture. When the config's model folder (or a configs-only
  copy, or a hub snapshot) is on this machine, its own ``config.json`` files; otherwise the
  published architecture of its family (craft/models/architectures.py: SD1.5, SDXL,
  SD3.5-Medium, FLUX.1). Each component is built with random weights in the run's dtype, one at
  a time, and saved in diffusers' layout (model_index.json, one folder per component,
  tokenizers, scheduler), so ``craft.models.loading`` loads it with the same
  ``from_pretrained`` call as the real model. Tokenizers come from the folder, else from what
  ships offline (CLIP's real vocabulary from open_clip; a small T5 vocabulary that T5-XXL's
  32,128 embeddings cover).
- **The rewards**, at their published architectures (craft/planning/specs.py), in float32, in
  the files each loader reads: HPSv2(.1) an open_clip ViT-H-14 ``{"state_dict": ...}``
  checkpoint; PickScore a transformers CLIP ViT-H-14 folder; AES a CLIP ViT-L/14 vision folder
  and the LAION head file; ImageReward the package's flat ``ImageReward.pt`` (BLIP ViT-L/16 under
  timm names, BERT-base), its med_config.json and a BERT-sized vocab.txt; the evaluation's
  DINOv2-base (eval.diversity_encoder). Rewards without weights (the toy world's pixel rewards)
  need nothing; served or VLM rewards are called as configured.

Nothing is downloaded. Everything is cached under one folder (``cache_dir``) by what it is
(architecture, dtype), so a second rehearsal of the same model reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DONE = ".complete"  # written last: a folder without it is rebuilt
_LAYOUT_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizers, scheduler


def default_cache_dir() -> Path:
    """``$CRAFT_REHEARSAL_CACHE``, else ~/.cache/craft/rehearsal."""
    import os

    env = os.environ.get("CRAFT_REHEARSAL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "craft" / "rehearsal"


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _building(folder: Path):
    """Build into ``folder`` from scratch unless a finished build is there (yields False then)."""
    if (folder / DONE).is_file():
        yield False
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    yield True
    (folder / DONE).write_text("")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Modules built inside get their random weights in ``dtype`` directly (an SDXL UNet in
    float32 first would be 10 GB before the cast)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _seeded(name: str) -> None:
    torch.manual_seed(int(hashlib.sha1(name.encode()).hexdigest()[:8], 16))


# ------------------------------------------------------------------------ the model


def _layout_from_tiny(family: str, folder: Path) -> None:
    """model_index.json, tokenizers and scheduler of the family's published layout: a tiny
    pipeline of the same structure (craft.models.architectures) saved, its files but the
    weights copied (each component's config is rewritten at the real size)."""
    import tempfile

    from craft.models.architectures import build_pipeline
    from craft.models.families import T5_DEFAULT_TOKENS
    from craft.rewards.clip_shipped import clip_tokenizer

    tok = clip_tokenizer()
    tok.model_max_length = 77
    with tempfile.TemporaryDirectory() as tmp:
        t5 = None
        if family in ("sd3", "flux", "flux-schnell"):
            from craft.toyworld.model import load_t5_tokenizer, write_t5_tokenizer

            fam = "flux" if family.startswith("flux") else family
            t5 = load_t5_tokenizer(write_t5_tokenizer(Path(tmp) / "t5", T5_DEFAULT_TOKENS[fam]))
        tok2 = None
        if family == "sdxl":  # the published tokenizer_2 pads with "!"
            import copy

            tok2 = copy.deepcopy(tok)
            tok2.pad_token = "!"
        pipe = build_pipeline(family, tok, tokenizer_2=tok2, t5_tokenizer=t5, tiny=True)
        pipe.save_pretrained(Path(tmp) / "pipe", safe_serialization=True)
        _copy_layout(Path(tmp) / "pipe", folder)


def _copy_layout(src: Path, dst: Path) -> None:
    for f in src.rglob("*"):
        if f.is_file() and f.suffix in _LAYOUT_SUFFIXES and f.name != DONE:
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)


def _build_component(comp, dtype: torch.dtype) -> torch.nn.Module:
    import diffusers
    import transformers

    _seeded(comp.name)
    with _default_dtype(dtype):
        if comp.library == "diffusers":
            module = getattr(diffusers, comp.cls).from_config(comp.config)
        else:
            klass = getattr(transformers, comp.cls)
            module = klass(klass.config_class(**comp.config))
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module.to(dtype)
    return module.eval()


def build_model(cfg, cache_dir: Path, dtype: torch.dtype, spec=None) -> Path:
    """The config's model at its real size with random weights in ``dtype``, as a diffusers
    folder under ``cache_dir`` (reused when already built). ``spec``: the plan's ModelSpec of
    ``cfg`` (craft.planning.specs.model_spec), which names the architecture and its source."""
    from craft.planning.specs import _local_configs, model_spec

    spec = spec or model_spec(cfg)
    local = _local_configs(cfg.model)
    configs = {n: [c.cls, c.config] for n, c in spec.components.items()}
    name = f"{spec.family}-{str(dtype).replace('torch.', '')}-{_key(configs, str(local))}"
    folder = Path(cache_dir) / "models" / name
    with _building(folder) as build:
        if build:
            log.info("rehearsal: building %s (%s) with random weights in %s", spec.family,
                     spec.source, folder)
            if local is not None:
                _copy_layout(local, folder)
            else:
                _layout_from_tiny(_published_family(cfg), folder)
            for comp in spec.components.values():
                module = _build_component(comp, dtype)
                module.save_pretrained(str(folder / comp.name), safe_serialization=True)
                del module
    return folder


def _published_family(cfg) -> str:
    """The key of craft.models.architectures for a config whose model is not on disk."""
    from craft.planning.specs import _known_family

    return _known_family(cfg.model)


# ------------------------------------------------------------------------ the rewards


def _hps(name: str, folder: Path) -> Path:
    from craft.rewards.hps import HPS_VERSIONS, build_open_clip

    path = folder / HPS_VERSIONS[name].filename
    _seeded(name)
    model, _ = build_open_clip("ViT-H-14")
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def _clip_h_folder(folder: Path) -> Path:
    """PickScore: a CLIPModel of the ViT-H-14 sizes with its processor in the folder."""
    from transformers import CLIPConfig, CLIPModel

    from craft.planning.specs import CLIP_H_TEXT, CLIP_H_VISION
    from craft.rewards.clip_shipped import clip_processor

    _seeded("pickscore")
    text = {**CLIP_H_TEXT, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=CLIP_H_VISION,
                                 projection_dim=1024))
    model.save_pretrained(str(folder), safe_serialization=True)
    clip_processor(224).save_pretrained(str(folder))
    return folder


def _aes(folder: Path) -> Path:
    """AES: CLIP ViT-L/14's vision tower (+ processor) and the LAION head in one folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from craft.planning.specs import CLIP_L_VISION
    from craft.rewards.aesthetic import HEAD_NAMES
    from craft.rewards.clip_shipped import clip_processor
    from craft.rewards.imagereward import _mlp

    _seeded("aes")
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L_VISION))
    clip.save_pretrained(str(folder), safe_serialization=True)
    clip_processor(224).image_processor.save_pretrained(str(folder))
    head = _mlp(CLIP_L_VISION["projection_dim"])
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, folder / HEAD_NAMES[0])
    return folder


# BLIP's ViT under our names -> the timm names of the package's checkpoint (craft.rewards.
# imagereward._VIT_RENAMES read backwards)
_VIT_NAMES_BACK = (
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
    (r"^post_layernorm\.", "norm."),
)
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1,
              "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
              "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
              "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
              "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}


def _timm_name(key: str) -> str:
    import re

    for pattern, repl in _VIT_NAMES_BACK:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise ValueError(f"no timm name for BLIP vision key {key!r}")


def _bert_vocab(path: Path, size: int = 30522) -> None:
    """A vocab.txt of bert-base-uncased's size: its special tokens, letters and word pieces,
    then filler (the real file is not shipped with any package here)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", *letters,
              *(f"##{c}" for c in letters)]
    tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
    path.write_text("\n".join(tokens) + "\n")


def _imagereward(folder: Path) -> Path:
    from transformers import BlipVisionConfig

    from craft.rewards.imagereward import (CHECKPOINT, MED_CONFIG as MED_NAME, _module_class,
                                           text_config_from)

    _seeded("imagereward")
    vision = BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=224, patch_size=16)
    model = _module_class()(vision, text_config_from(MED_CONFIG, vision.hidden_size))
    state = {f"blip.visual_encoder.{_timm_name(k)}": v
             for k, v in model.vision.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in model.text.state_dict().items()})
    state.update({f"mlp.layers.{k}": v for k, v in model.mlp.state_dict().items()})
    torch.save(state, folder / CHECKPOINT)
    (folder / MED_NAME).write_text(json.dumps(MED_CONFIG))
    _bert_vocab(folder / "vocab.txt")
    return folder


def _dinov2(folder: Path) -> Path:
    """facebook/dinov2-base's sizes (Dinov2Config's defaults at 518 px) and its processor."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    _seeded("dinov2")
    Dinov2Model(Dinov2Config(image_size=518)).save_pretrained(str(folder),
                                                              safe_serialization=True)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                      do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(str(folder))
    return folder


_REWARDS = {"hpsv21": lambda f: _hps("hpsv21", f), "hpsv2": lambda f: _hps("hpsv2", f),
            "pickscore": _clip_h_folder, "aes": _aes, "imagereward": _imagereward}


def build_rewards(cfg, cache_dir: Path) -> dict[str, str]:
    """Every reward of ``cfg`` (rewards.names + eval_names) that has weights and is scored in
    this process, at its real size with random weights: name -> the path to give as
    ``rewards.paths.NAME``."""
    from craft.rewards.configured import is_remote

    paths = {}
    for name in dict.fromkeys([*cfg.rewards.names, *cfg.rewards.eval_names]):
        if name not in _REWARDS or is_remote(cfg, name):
            continue
        folder = Path(cache_dir) / "rewards" / name
        with _building(folder) as build:
            if build:
                log.info("rehearsal: building reward %s with random weights in %s", name,
                         folder)
                _REWARDS[name](folder)
        path = _REWARDS_PATH.get(name, lambda f: f)(folder)
        paths[name] = str(path)
    return paths


def _hps_file(name: str):
    def find(folder: Path) -> Path:
        from craft.rewards.hps import HPS_VERSIONS

        return folder / HPS_VERSIONS[name].filename

    return find


_REWARDS_PATH = {"hpsv21": _hps_file("hpsv21"), "hpsv2": _hps_file("hpsv2")}


def build_diversity_encoder(cfg, cache_dir: Path) -> str | None:
    """The evaluation's DINOv2 (eval.diversity_encoder = dinov2) with random weights; None for
    the other encoders (pixels need none; a CLIP one is left as configured)."""
    if cfg.eval.diversity_encoder != "dinov2":
        return None
    folder = Path(cache_dir) / "encoders" / "dinov2-base"
    with _building(folder) as build:
        if build:
            _dinov2(folder)
    return str(folder)


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*")
               if f.is_file() and f.suffix in (".safetensors", ".pt", ".pth", ".bin"))


__all__ = ["build_diversity_encoder", "build_model", "build_rewards", "default_cache_dir",
           "weight_bytes"]
