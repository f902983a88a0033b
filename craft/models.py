"""Load a diffusion pipeline from a local diffusers folder, a hub id (offline cache), or one file.

The caller chooses device and dtype; this module only resolves *where* the weights are and
fails fast, before any work, when they are not on disk: the message names what was asked for,
where it looked, and how to provide it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from craft import CraftError

log = logging.getLogger(__name__)

FAMILIES = ("auto", "sd15", "sdxl", "toy")


class MissingWeightsError(CraftError, FileNotFoundError):
    """Weights named by the config are not on this machine."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CraftError(f"model.device={device!r} but no CUDA device is available here; use "
                         "--set model.device=cpu (or auto)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA and fp32 on CPU (fp16 on CPU is slow and lossy)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise CraftError(f"model.dtype={dtype!r} is not one of {['auto', *table]}")
    return table[dtype]


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        return None


def locate(pretrained: str, revision: str | None = None) -> Path:
    """The on-disk location of ``pretrained`` (a folder or a single checkpoint file).

    Raises MissingWeightsError, without loading anything, when it is not on this machine.
    """
    from craft.config import resolve_path

    path = resolve_path(pretrained)
    if path is not None and path.exists():
        return path
    looks_like_path = pretrained.startswith((".", "/", "~")) or pretrained.endswith(
        (".safetensors", ".ckpt")) or pretrained.count("/") != 1
    if not looks_like_path:
        snap = _hub_snapshot(pretrained, revision)
        if snap is not None:
            return snap
        from huggingface_hub.constants import HF_HUB_CACHE

        raise MissingWeightsError(
            f"model.pretrained={pretrained!r} is not on this machine: looked for a local folder "
            f"of that name and in the Hugging Face cache ({HF_HUB_CACHE}). Download it where "
            f"there is network (`huggingface-cli download {pretrained}`) and copy the cache, or "
            "point the config at a local diffusers folder or .safetensors file with "
            "--set model.pretrained=/path/to/model")
    raise MissingWeightsError(
        f"model.pretrained={pretrained!r}: no such file or folder (looked in the working "
        "directory and the project root). Give an existing diffusers folder, a single "
        ".safetensors checkpoint, or a hub id that is in the local cache")


def detect_family(location: Path, family: str = "auto") -> str:
    if family not in FAMILIES:
        raise CraftError(f"model.family={family!r} is not one of {list(FAMILIES)}")
    if family != "auto":
        return family
    index = location / "model_index.json"
    if location.is_dir() and index.exists():
        cls = json.loads(index.read_text()).get("_class_name", "")
        return "sdxl" if "XL" in cls else "sd15"
    if location.is_file():
        # A single-file checkpoint: SDXL has a second text encoder under "conditioner".
        from safetensors import safe_open

        with safe_open(str(location), "pt") as f:
            keys = f.keys()
            return "sdxl" if any(k.startswith("conditioner.embedders.1") for k in keys) else "sd15"
    return "sd15"


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def load_pipeline(pretrained: str | Path, *, family: str = "auto", dtype: str = "auto",
                  device: str = "auto", revision: str | None = None, variant: str | None = None,
                  attention: str = "sdpa", vae_tiling: bool = False, vae_slicing: bool = False):
    """Load a Stable Diffusion (1.x/2.x, toy) or SDXL pipeline, ready for inference."""
    location = locate(str(pretrained), revision)
    fam = detect_family(location, family)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    cls = pipeline_class(fam)
    kwargs = dict(dtype=torch_dtype)
    if location.is_file():
        pipe = cls.from_single_file(str(location), local_files_only=True, **kwargs)
    else:
        if fam != "sdxl":
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(str(location), local_files_only=True, variant=variant,
                                   **kwargs)
    if attention == "default":
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    log.info("loaded %s pipeline from %s on %s (%s)", fam, location, dev, torch_dtype)
    return pipe


def load_from_config(model_cfg):
    """``load_pipeline`` with the fields of a :class:`craft.config.ModelConfig`."""
    return load_pipeline(model_cfg.pretrained, family=model_cfg.family, dtype=model_cfg.dtype,
                         device=model_cfg.device, revision=model_cfg.revision,
                         variant=model_cfg.variant, attention=model_cfg.attention,
                         vae_tiling=model_cfg.vae_tiling, vae_slicing=model_cfg.vae_slicing)
