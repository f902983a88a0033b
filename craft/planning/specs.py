"""What a plan simulates: the config's model and rewards as architectures, without weights.

The model comes from its own ``config.json`` files when the folder (or hub snapshot) is on this
machine, weights or not (the toy bases, a copied diffusers folder, a configs-only download);
otherwise from the family's published architecture written out in craft/models/architectures.py
(SD1.5, SDXL, SD3.5-Medium, FLUX.1-dev / schnell), so a plan can be made before the weights
are fetched. Modules are built on the meta device: no memory, no initialisation.

Rewards: the built-in real rewards by their published architectures (HPSv2.1 / HPSv2:
open_clip ViT-H-14; PickScore: CLIP ViT-H-14; AES: CLIP ViT-L/14 + an MLP; ImageReward: BLIP
ViT-L/16 + BERT-base), scored in float32 as ``craft.rewards`` does. Rewards computed from pixels
(the toy world's) use no GPU memory; a plugin's reward is listed as not simulated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Callable

import torch

from craft import CraftError, MissingWeightsError

log = logging.getLogger(__name__)

# Hub ids whose architecture craft/models/architectures.py writes out (family key there)
KNOWN_REPOS = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "compvis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3.5-medium": "sd3",
    "black-forest-labs/flux.1-dev": "flux",
    "black-forest-labs/flux.1-schnell": "flux-schnell",
}
FAMILY_REFERENCE = {"sd15": "SD1.5", "sdxl": "SDXL base 1.0", "sd3": "SD3.5-Medium",
                    "flux": "FLUX.1-dev", "flux-schnell": "FLUX.1-schnell", "toy": "SD1.5"}

# Which classes the published architectures use per component (craft/models/architectures.py)
_CLASSES = {
    "sd15": {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
             "text_encoder": "CLIPTextModel"},
    "sdxl": {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
             "text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"},
    "sd3": {"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL",
            "text_encoder": "CLIPTextModelWithProjection",
            "text_encoder_2": "CLIPTextModelWithProjection", "text_encoder_3": "T5EncoderModel"},
    "flux": {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL",
             "text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"},
}
_CLASSES["flux-schnell"] = _CLASSES["flux"]
_DIFFUSERS = ("UNet2DConditionModel", "AutoencoderKL", "SD3Transformer2DModel",
              "FluxTransformer2DModel")


@dataclasses.dataclass
class Component:
    name: str  # unet, transformer, vae, text_encoder, ...
    library: str  # diffusers | transformers
    cls: str
    config: dict

    def build(self) -> torch.nn.Module:
        """The module on the meta device (no memory, no initialisation)."""
        import diffusers
        import transformers

        with torch.device("meta"):
            if self.library == "diffusers":
                return getattr(diffusers, self.cls).from_config(self.config)
            klass = getattr(transformers, self.cls)
            return klass(klass.config_class(**self.config))


@dataclasses.dataclass(eq=False)  # hashed by identity: simulations are cached per spec
class ModelSpec:
    """The model a config runs, as the plan needs it."""

    family: str  # sd15 | sdxl | sd3 | flux
    source: str  # where the architecture was read from
    components: dict[str, Component]
    dtype: torch.dtype  # the weights' dtype on a GPU
    height: int
    width: int
    vae_scale_factor: int
    t5_tokens: int | None
    clip_tokens: int = 77
    flux_guidance: bool = False

    @property
    def denoiser(self) -> str:
        return "transformer" if "transformer" in self.components else "unet"

    @property
    def text_encoders(self) -> list[str]:
        return [n for n in self.components if n.startswith("text_encoder")]


def model_spec(cfg, *, height: int | None = None, width: int | None = None) -> ModelSpec:
    """The config's model at the size it runs (``generation.height/width`` or native). The
    same model settings give the same spec object, so simulations cached per spec are shared
    by every plan of a process (the fix search, the benchmark's grid)."""
    m = cfg.model
    return _model_spec(m, _local_configs(m), height or cfg.generation.height,
                       width or cfg.generation.width)


@functools.lru_cache(maxsize=16)
def _model_spec(m, location: Path | None, height: int | None, width: int | None) -> ModelSpec:
    from craft.run.devices import resolve_dtype

    if location is not None:
        family, comps, source = _from_folder(location, m.family)
    else:
        family = _known_family(m)
        from craft.models.architectures import component_configs

        configs = component_configs(family)
        comps = {name: Component(name, "diffusers" if cls in _DIFFUSERS else "transformers",
                                 cls, configs[name])
                 for name, cls in _CLASSES[family].items()}
        source = (f"the published {FAMILY_REFERENCE[family]} architecture "
                  f"(craft/models/architectures.py; {m.pretrained} is not on this machine)")
    dtype = resolve_dtype(m.dtype, torch.device("cuda"))
    vae_cfg = comps["vae"].config
    vsf = 2 ** (len(vae_cfg.get("block_out_channels", (1, 1, 1, 1))) - 1)
    den = comps.get("transformer") or comps["unet"]
    sample = den.config.get("sample_size") or 128  # FLUX has none: 1024 px at 8x
    fam = "flux" if family.startswith("flux") else family
    native = sample * vsf
    t5 = None
    if fam in ("sd3", "flux") and any(c.cls == "T5EncoderModel" for c in comps.values()):
        from craft.models.families import T5_DEFAULT_TOKENS

        t5 = m.max_sequence_length or min(T5_DEFAULT_TOKENS[fam],
                                          _t5_limit(location, fam) or 10**6)
    clip = min([77, *(c.config.get("max_position_embeddings", 77) for c in comps.values()
                      if c.cls.startswith("CLIPText"))])
    return ModelSpec(
        family=fam, clip_tokens=clip, source=source, components=comps, dtype=dtype,
        height=height or native, width=width or native, vae_scale_factor=vsf, t5_tokens=t5,
        flux_guidance=fam == "flux" and bool(den.config.get("guidance_embeds", False)))


def _local_configs(m) -> Path | None:
    """A local diffusers folder holding the model's configs, or None."""
    from craft.models.loading import locate

    try:
        location = locate(m.pretrained, m.revision)
    except MissingWeightsError:
        return None
    if location.is_file():
        if m.single_file_config is None:
            return None
        try:
            location = locate(m.single_file_config, None, key="model.single_file_config")
        except MissingWeightsError:
            return None
    return location if (location / "model_index.json").is_file() else None


def _known_family(m) -> str:
    fam = KNOWN_REPOS.get(m.pretrained.lower())
    if fam is not None:
        return fam
    if m.family not in ("auto", "toy"):  # a toy model has no published architecture
        return m.family
    raise CraftError(
        f"cannot plan model.pretrained={m.pretrained!r}: it is not on this machine and its "
        f"architecture is not one craft knows ({', '.join(sorted(KNOWN_REPOS))}); set "
        "model.family (sd15, sdxl, sd3, flux) to plan with that family's published "
        "architecture, or copy the model's config files (model_index.json and each "
        "component's config.json; no weights needed) into a folder and point model.pretrained "
        "at it")


def _from_folder(folder: Path, family: str) -> tuple[str, dict[str, Component], str]:
    from craft.models.loading import detect_family

    fam = detect_family(folder, family)
    fam = "sd15" if fam == "toy" else fam
    index = json.loads((folder / "model_index.json").read_text())
    comps = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        library, cls = entry
        if library == "diffusers" and cls in _DIFFUSERS:
            comps[name] = Component(name, library, cls,
                                    json.loads((folder / name / "config.json").read_text()))
        elif library == "transformers" and cls.endswith(("Model", "WithProjection")):
            cfg = json.loads((folder / name / "config.json").read_text())
            comps[name] = Component(name, library, cls,
                                    {k: v for k, v in cfg.items() if not k.startswith("_")})
    return fam, comps, f"the config files in {folder}"


def _t5_limit(folder: Path | None, fam: str) -> int | None:
    if folder is None:
        return None
    tok = folder / ("tokenizer_3" if fam == "sd3" else "tokenizer_2") / "tokenizer_config.json"
    if tok.is_file():
        limit = json.loads(tok.read_text()).get("model_max_length")
        if isinstance(limit, int) and limit < 10**6:
            return limit
    return None


# ------------------------------------------------------------------------ rewards


@dataclasses.dataclass
class RewardArch:
    """A reward's architecture: ``build()`` -> a meta module, ``call(module, batch)`` runs
    one scoring forward on fake inputs."""

    name: str
    what: str
    build: Callable[[], torch.nn.Module]
    call: Callable[[torch.nn.Module, int], object]


def _open_clip_h() -> torch.nn.Module:
    import open_clip

    with torch.device("meta"):
        return open_clip.create_model("ViT-H-14", pretrained=None, device="meta")


def _clip_call(model, b: int):
    model.encode_image(torch.randn(b, 3, 224, 224))
    return model.encode_text(torch.zeros(b, 77, dtype=torch.long))


CLIP_H_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024)
CLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, max_position_embeddings=77, vocab_size=49408,
                   projection_dim=1024)
CLIP_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, patch_size=14, image_size=224, projection_dim=768)


def _pickscore() -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        return CLIPModel(CLIPConfig(text_config=CLIP_H_TEXT, vision_config=CLIP_H_VISION,
                                    projection_dim=1024))


def _pickscore_call(model, b: int):
    model.get_image_features(pixel_values=torch.randn(b, 3, 224, 224))
    return model.get_text_features(input_ids=torch.zeros(b, 77, dtype=torch.long))


def _aes() -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from craft.rewards.imagereward import _mlp

    with torch.device("meta"):
        return torch.nn.ModuleDict({"clip": CLIPVisionModelWithProjection(
            CLIPVisionConfig(**CLIP_L_VISION)), "head": _mlp(768)})


def _aes_call(model, b: int):
    emb = model["clip"](pixel_values=torch.randn(b, 3, 224, 224)).image_embeds
    return model["head"](emb)


def _imagereward() -> torch.nn.Module:
    from transformers import BlipVisionConfig

    from craft.rewards.imagereward import _module_class, text_config_from

    med = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "vocab_size": 30524, "max_position_embeddings": 512}
    vision = BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=224, patch_size=16)
    with torch.device("meta"):
        return _module_class()(vision, text_config_from(med, 1024))


def _imagereward_call(model, b: int):
    ids = torch.zeros(b, 35, dtype=torch.long)
    return model(torch.randn(b, 3, 224, 224), ids, torch.ones_like(ids))


REWARD_ARCHS = {
    "hpsv21": RewardArch("hpsv21", "open_clip ViT-H-14", _open_clip_h, _clip_call),
    "hpsv2": RewardArch("hpsv2", "open_clip ViT-H-14", _open_clip_h, _clip_call),
    "pickscore": RewardArch("pickscore", "CLIP ViT-H-14", _pickscore, _pickscore_call),
    "aes": RewardArch("aes", "CLIP ViT-L/14 + MLP", _aes, _aes_call),
    "imagereward": RewardArch("imagereward", "BLIP ViT-L/16 + BERT-base", _imagereward,
                              _imagereward_call),
}


def reward_arch(name: str) -> RewardArch | None:
    """The architecture of a reward, or None for rewards without a GPU model (the toy world's
    pixel rewards) or that the plan does not know (a plugin's)."""
    return REWARD_ARCHS.get(name)


def pixel_reward(name: str) -> bool:
    return name.startswith("toy_")


__all__ = ["Component", "ModelSpec", "REWARD_ARCHS", "RewardArch", "model_spec", "pixel_reward",
           "reward_arch"]
