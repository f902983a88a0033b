"""Load a diffusion pipeline from a local diffusers folder, a hub id (offline cache), or one file.

The caller chooses device and dtype; this module only resolves *where* the weights are and
fails fast, before any work, when they are not on disk: the message names what was asked for,
where it looked, and how to provide it. Nothing here ever touches the network.

- A **diffusers folder** (``model_index.json`` + one folder per component) or a **hub id**
  found in the local Hugging Face cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``)
  is loaded with ``from_pretrained(local_files_only=True)``. Before that, :func:`check_model`
  verifies every component the pipeline will read is there (config, tokenizer, weights), so a
  half-copied model fails with a list of what is missing instead of midway through loading.
- A **single checkpoint** (``.safetensors``; ``.ckpt`` too) in the original LDM layout is
  loaded with ``from_single_file``. The file holds only weights; diffusers also needs the
  matching *diffusers config* (``model_index.json``, each component's ``config.json``, the
  tokenizer and scheduler files: a few hundred KB). It comes from ``model.single_file_config``
  (a local diffusers folder, configs alone are enough, or a hub id in the cache), else from the
  hub cache under the repo diffusers associates with the checkpoint's architecture (e.g.
  ``stable-diffusion-v1-5/stable-diffusion-v1-5``). It is always passed to diffusers explicitly:
  left to itself, ``from_single_file(local_files_only=True)`` silently retries *online* when that
  config is not cached.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from craft import CraftError, MissingWeightsError
from craft.run.devices import LOAD_LOCK, resolve_device, resolve_dtype  # noqa: F401 - re-exported
from craft.models.families import FAMILY_PIPELINES, FLOW_FAMILIES
from craft.run.choices import MODEL_FAMILIES

log = logging.getLogger(__name__)

FAMILIES = MODEL_FAMILIES  # model.family (craft.run.choices; tests check it against craft.models.families)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Hub repos whose configs describe a single-file checkpoint of each family when diffusers
# cannot tell (its own table is consulted first).
DEFAULT_CONFIG_REPOS = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                        "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
                        "sd3": "stabilityai/stable-diffusion-3.5-medium",
                        "flux": "black-forest-labs/FLUX.1-dev"}
# Pipeline components that are never loaded: StableDiffusionPipeline gets None for both.
_SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor")


# ------------------------------------------------------------------------ where the files are


def _cache_dir() -> Path:
    from craft.rewards.base import hf_cache_dir

    return hf_cache_dir()


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      cache_dir=str(_cache_dir())))
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        return None


# Repos that need their licence accepted on the Hub (and a token) before they download.
GATED_REPOS = ("black-forest-labs/FLUX.1-dev", "stabilityai/stable-diffusion-3.5-medium",
               "stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3-medium-diffusers")


def _download_command(repo_id: str, configs_only: bool = False) -> str:
    extra = ' --include "*.json" "*.txt"' if configs_only else ""
    gated = (f" (a gated repo: accept its licence at https://huggingface.co/{repo_id} and run "
             "`hf auth login` first)" if repo_id in GATED_REPOS else "")
    return f"`hf download {repo_id}{extra}`{gated} (older huggingface_hub: " \
           f"`huggingface-cli download {repo_id}{extra}`)"


def _looks_like_hub_id(value: str) -> bool:
    return (not value.startswith((".", "/", "~")) and value.count("/") == 1
            and not value.endswith(SINGLE_FILE_SUFFIXES))


def _path_candidates(value: str) -> list[Path]:
    from craft.run.config import PROJECT_ROOT

    path = Path(value).expanduser()
    return [path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]


def locate(pretrained: str, revision: str | None = None, *,
           key: str = "model.pretrained") -> Path:
    """The on-disk location of ``pretrained`` (a folder or a single checkpoint file).

    Raises MissingWeightsError, without loading anything, when it is not on this machine.
    """
    from craft.run.config import resolve_path

    path = resolve_path(pretrained)
    if path is not None and path.exists():
        return path
    places = " and ".join(str(p) for p in dict.fromkeys(_path_candidates(pretrained)))
    if _looks_like_hub_id(pretrained):
        snap = _hub_snapshot(pretrained, revision)
        if snap is not None:
            return snap
        cache = _cache_dir()
        rev = f" (revision {revision})" if revision else ""
        raise MissingWeightsError(
            f"{key}={pretrained!r}{rev} is not on this machine: looked for a local folder "
            f"({places}) and for the hub repo in the Hugging Face cache ({cache}); craft never "
            f"downloads. Download it where there is internet with "
            f"{_download_command(pretrained)} and copy the cache folder "
            f"models--{pretrained.replace('/', '--')} into {cache} (or set HF_HUB_CACHE), or "
            f"point the config at a local copy: --set {key}=/path/to/diffusers-folder (or a "
            f"single .safetensors checkpoint)")
    raise MissingWeightsError(
        f"{key}={pretrained!r}: no such file or folder (looked in {places}). Give an existing "
        "diffusers folder, a single .safetensors checkpoint, or a hub id (org/name) that is in "
        f"the Hugging Face cache ({_cache_dir()})")


def _component_problems(folder: Path, variant: str | None, need_weights: bool) -> list[str]:
    """What a diffusers pipeline folder lacks for ``from_pretrained`` (or, without weights,
    for ``from_single_file``'s ``config=``). Empty when complete."""
    index = folder / "model_index.json"
    if not index.is_file():
        return ["model_index.json (this is not a diffusers pipeline folder)"]
    try:
        spec = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"a readable model_index.json ({e})"]
    problems = []
    for name, value in spec.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, cls = value
        if library is None or cls is None or name in _SKIPPED_COMPONENTS:
            continue
        sub = folder / name
        if not sub.is_dir():
            problems.append(f"{name}/ ({cls})")
        elif "Tokenizer" in cls:
            if not ((sub / "tokenizer.json").is_file()
                    or (sub / "vocab.json").is_file() and (sub / "merges.txt").is_file()):
                problems.append(f"{name}/vocab.json + merges.txt")
        elif "Scheduler" in cls:
            if not (sub / "scheduler_config.json").is_file():
                problems.append(f"{name}/scheduler_config.json")
        elif not (sub / "config.json").is_file():
            problems.append(f"{name}/config.json")
        elif need_weights and not _has_weights(sub, variant):
            others = sorted({f.name.split(".")[-2] for f in sub.iterdir()
                             if f.name.endswith((".safetensors", ".bin"))
                             and f.name.count(".") == 2})
            found = (f"; found only {'/'.join(others)} files: --set model.variant={others[0]}"
                     if others and not variant else "")
            kind = f"{variant} " if variant else ""
            problems.append(f"{name}/ {kind}weights (*.safetensors or *.bin{found})")
    return problems


def _has_weights(folder: Path, variant: str | None) -> bool:
    """Whether ``folder`` holds weights ``from_pretrained(variant=...)`` will find (single
    files, shards or a shard index)."""
    for f in (p.name for p in folder.iterdir() if p.is_file()):  # a broken cache link: absent
        parts = f.split(".")
        if variant:
            if variant in parts[1:] and (f.endswith((".safetensors", ".bin"))
                                         or "index" in parts):
                return True
        elif f.endswith((".safetensors", ".bin")) and len(parts) == 2:
            return True
        elif f.endswith((".safetensors.index.json", ".bin.index.json")) and len(parts) == 4:
            return True
    return False


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a single-file checkpoint, reading the header only (safetensors)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    # Pickled checkpoints: tensors only (weights_only), memory-mapped so nothing is read yet.
    try:
        sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CraftError(f"model.pretrained={str(path)!r} could not be read as a checkpoint of "
                         f"tensors ({type(e).__name__}: {e}); convert it to .safetensors") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


class _ShapeOnly(dict):
    """A key -> fake-tensor mapping, enough for diffusers' architecture inference."""

    class _T:
        def __init__(self, shape):
            self.shape = torch.Size(shape)
            self.ndim = len(shape)

    def __getitem__(self, key):
        return self._T(super().__getitem__(key))


def _family_from_keys(keys) -> str:
    """The family of a single-file checkpoint from its key names: the original layouts (SD3's
    ``joint_blocks``, Black Forest Labs' ``double_blocks``, LDM's ``conditioner``) and
    diffusers-layout transformer files (FLUX's ``single_transformer_blocks``, SD3's
    ``pos_embed.proj``)."""
    keys = [k.removeprefix("model.diffusion_model.") for k in keys]
    if any(k.startswith(("double_blocks.", "single_blocks.", "single_transformer_blocks."))
           for k in keys):
        return "flux"
    if any(k.startswith("joint_blocks.") for k in keys) or (
            "pos_embed.proj.weight" in keys and any(k.startswith("transformer_blocks.")
                                                    for k in keys)):
        return "sd3"
    return "sdxl" if any(k.startswith("conditioner.embedders.1") for k in keys) else "sd15"


def default_single_file_config(location: Path, shapes: dict | None = None) -> str:
    """The hub repo whose configs describe the single-file checkpoint at ``location``
    (``shapes``: its key -> shape table, when the caller has read it already)."""
    shapes = _checkpoint_shapes(location) if shapes is None else shapes
    family = _family_from_keys(shapes)
    if family in FLOW_FAMILIES:  # diffusers' table names variants (dev/schnell, medium/large)
        return DEFAULT_CONFIG_REPOS[family]
    try:
        from diffusers.loaders.single_file_utils import (DIFFUSERS_DEFAULT_PIPELINE_PATHS,
                                                         infer_diffusers_model_type)

        kind = infer_diffusers_model_type(_ShapeOnly(shapes))
        repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"]
    except Exception:  # noqa: BLE001 - diffusers internals; fall back to the family default
        return DEFAULT_CONFIG_REPOS[family]
    # diffusers tells SDXL by a key of its 32-layer text encoder; trust it only where it agrees
    # with the family the keys show (an SDXL-architecture file of another depth is still SDXL)
    xl = kind.startswith(("xl", "playground"))
    return repo if xl == (family == "sdxl") else DEFAULT_CONFIG_REPOS[family]


def resolve_single_file_config(location: Path, single_file_config: str | None = None,
                               revision: str | None = None) -> Path:
    """The local diffusers folder whose configs build the pipeline for a single-file checkpoint.

    ``single_file_config``: a local diffusers folder (configs alone are enough), or a hub id
    that is in the HF cache; None = the repo diffusers associates with the checkpoint's
    architecture, if it is cached. Raises MissingWeightsError saying how to provide it.

    A flow-family file (SD3.5, FLUX.1) is the transformer alone, as these models are shared;
    its folder must then hold the *weights* of every other component (VAE, text encoders).
    """
    key = "model.single_file_config"
    shapes = _checkpoint_shapes(location)
    flow = _family_from_keys(shapes) in FLOW_FAMILIES
    what = (f"model.pretrained={str(location)!r} is a single-file checkpoint: it holds weights "
            "only, and diffusers builds the pipeline from a matching diffusers config "
            "(model_index.json, each component's config.json, the tokenizer and scheduler "
            "files; a few hundred KB, no weights needed)")
    if flow:
        what = (f"model.pretrained={str(location)!r} is a single-file flow transformer "
                "(SD3.5 / FLUX.1 files hold the transformer only): the rest of the pipeline "
                "(VAE, text encoders with their weights, tokenizers, scheduler) comes from a "
                "diffusers folder of the same model")

    def problems_of(folder: Path) -> list[str]:
        if not flow:
            return _component_problems(folder, None, need_weights=False)
        return [p for p in _component_problems(folder, None, need_weights=True)
                if not p.startswith("transformer/")]
    if single_file_config:
        from craft.run.config import resolve_path

        folder = resolve_path(single_file_config)
        if folder is None and _looks_like_hub_id(single_file_config):
            folder = _hub_snapshot(single_file_config, None)
            if folder is None:
                raise MissingWeightsError(
                    f"{what}. {key}={single_file_config!r} is not a local folder, and that hub "
                    f"repo is not in the Hugging Face cache ({_cache_dir()}). Fetch its configs "
                    f"where there is internet with "
                    f"{_download_command(single_file_config, True)}, or --set {key}=/path/to/"
                    "diffusers-folder")
        if folder is None:
            raise MissingWeightsError(
                f"{what}. {key}={single_file_config!r}: no such folder (looked in "
                f"{' and '.join(str(p) for p in _path_candidates(single_file_config))})")
        problems = problems_of(folder)
        if problems:
            raise MissingWeightsError(
                f"{what}. {key}={single_file_config!r} ({folder}) lacks "
                f"{', '.join(problems)}; give a diffusers folder of the same architecture")
        return folder
    repo = default_single_file_config(location, shapes)
    snap = _hub_snapshot(repo, revision)
    if snap is not None and not problems_of(snap):
        return snap
    raise MissingWeightsError(
        f"{what}. {key} is not set, and the config diffusers would use for this checkpoint "
        f"({repo}) is not in the Hugging Face cache ({_cache_dir()}); left to itself diffusers "
        f"would go online for it. Fetch the configs where there is internet with "
        f"{_download_command(repo, True)} and copy the cache here, or point to any local "
        f"diffusers folder of the same architecture: --set {key}=/path/to/diffusers-folder")


# ------------------------------------------------------------------------ family


# model_index.json's _class_name -> family
PIPELINE_FAMILIES = {cls: fam for fam, cls in FAMILY_PIPELINES.items()}


def detect_family(location: Path, family: str = "auto") -> str:
    """``sd15``, ``sdxl``, ``sd3`` or ``flux`` from the folder's model_index.json or the
    checkpoint's keys; an explicit ``family`` wins (``toy`` loads as SD1.5) but must not
    contradict the files. A pipeline of another kind is refused with the known ones."""
    if family not in FAMILIES:
        raise CraftError(f"model.family={family!r} is not one of {list(FAMILIES)}")
    found = None
    index = location / "model_index.json"
    if location.is_dir() and index.exists():
        cls = json.loads(index.read_text()).get("_class_name", "")
        found = PIPELINE_FAMILIES.get(cls)
        if found is None:
            known = ", ".join(f"{f} ({c})" for c, f in PIPELINE_FAMILIES.items())
            raise CraftError(f"model.pretrained: {location} holds a {cls or 'unnamed'} pipeline, "
                             f"which craft does not know how to align; the known families are "
                             f"{known}. Point model.pretrained at a model of one of them")
    elif location.is_file():
        found = _family_from_keys(_checkpoint_shapes(location))
    if family == "auto":
        return found or "sd15"
    if found is not None and found != ("sd15" if family == "toy" else family):
        raise CraftError(f"model.family={family!r} but {location} holds an {found} model; "
                         "set model.family to auto (or to the right family)")
    return family


def pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, FAMILY_PIPELINES.get(family, FAMILY_PIPELINES["sd15"]))


def check_model(model_cfg, pretrained: str | None = None) -> Path:
    """Everything :func:`load_from_config` will read is on disk (no weights are read).

    Returns the model's location; raises MissingWeightsError (or CraftError for a bad family,
    device or dtype) before any work. ``pretrained`` overrides ``model_cfg.pretrained``; a
    folder of LoRA adapters (craft.models.lora) is checked with the base it was trained on.
    """
    adapters = _lora_location(model_cfg, pretrained)
    if adapters is not None:
        check_model(lora_base_config(model_cfg, adapters))
        return adapters
    name, revision, variant, single_file_config = _source(model_cfg, pretrained)
    location = locate(name, revision)
    detect_family(location, model_cfg.family)
    resolve_dtype(model_cfg.dtype, resolve_device(model_cfg.device))
    if location.is_file():
        resolve_single_file_config(location, single_file_config, revision)
    else:
        _check_folder(location, name, variant)
    return location


def _source(model_cfg, pretrained: str | None):
    """(pretrained, revision, variant, single_file_config) to load. The hub revision, weight
    variant and single-file config describe ``model_cfg.pretrained`` only: another model (a
    tuned pipeline saved by training, with plain weight files) is loaded without them."""
    if pretrained is None or str(pretrained) == model_cfg.pretrained:
        return (model_cfg.pretrained, model_cfg.revision, model_cfg.variant,
                model_cfg.single_file_config)
    return str(pretrained), None, None, None


def _check_folder(location: Path, name: str, variant: str | None) -> None:
    problems = _component_problems(location, variant, need_weights=True)
    if problems:
        hint = (f"re-download it ({_download_command(name)}) or copy the missing parts"
                if _looks_like_hub_id(name) else "copy the missing parts")
        if variant and any("weights" in p for p in problems):
            hint += ", or --set model.variant=null for the full-precision files"
        raise MissingWeightsError(f"model.pretrained={name!r} ({location}) is incomplete: "
                                  f"missing {', '.join(problems)}; {hint}")


# ------------------------------------------------------------------------ loading


def apply_memory_options(pipe, attention: str = "sdpa", vae_tiling: bool = False,
                         vae_slicing: bool = False):
    """Attention implementation and VAE memory savers, on an already loaded pipeline.

    ``sdpa``: PyTorch's fused scaled-dot-product attention (``AttnProcessor2_0``) in the UNet
    and VAE; ``default``: the plain matmul-softmax processor (for debugging/comparison).
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from craft.models.families import denoiser

    if attention not in ("sdpa", "default"):
        raise CraftError(f"model.attention={attention!r} is not one of sdpa, default")
    processor = AttnProcessor2_0 if attention == "sdpa" else AttnProcessor
    # (the MMDiT transformers' joint-attention processors are already SDPA: left as they are)
    for module in (denoiser(pipe), pipe.vae):
        procs = module.attn_processors
        # Only plain self/cross-attention processors are swapped; anything else (added-KV,
        # IP-adapter, LoRA-specific) is left as the model set it.
        if procs and all(type(p) in (AttnProcessor, AttnProcessor2_0) for p in procs.values()):
            module.set_attn_processor(processor())
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    return pipe


def load_pipeline(pretrained: str | Path, *, family: str = "auto", dtype: str = "auto",
                  device: str = "auto", revision: str | None = None, variant: str | None = None,
                  attention: str = "sdpa", vae_tiling: bool = False, vae_slicing: bool = False,
                  single_file_config: str | None = None):
    """Load a Stable Diffusion (1.x/2.x, toy), SDXL, SD3 / SD3.5 or FLUX.1 pipeline, ready for
    inference.

    ``pretrained``: a diffusers folder, a hub id in the local HF cache, or a single checkpoint
    file (then ``single_file_config`` names its diffusers config; see the module docstring).
    """
    location = locate(str(pretrained), revision)
    fam = detect_family(location, family)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    from craft.run.watch import host, loaded

    with LOAD_LOCK, host():  # read into host memory, then moved to its device (below)
        pipe = _load(location, fam, str(pretrained), torch_dtype, revision, variant,
                     single_file_config)
    apply_memory_options(pipe, attention, vae_tiling, vae_slicing)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    log.info("loaded %s pipeline from %s on %s (%s)", fam, location, dev, torch_dtype)
    return loaded(pipe)  # (a memory meter watching the run counts it from here)


def _load(location: Path, fam: str, pretrained: str, torch_dtype, revision, variant,
          single_file_config):
    cls = pipeline_class(fam)
    kwargs = dict(dtype=torch_dtype)
    if fam in ("sd15", "toy"):
        kwargs.update(safety_checker=None, feature_extractor=None,
                      requires_safety_checker=False)
    if location.is_file() and fam in FLOW_FAMILIES:
        config = resolve_single_file_config(location, single_file_config, revision)
        transformer = _transformer_class(fam).from_single_file(
            str(location), config=str(config), subfolder="transformer", local_files_only=True,
            torch_dtype=torch_dtype)
        pipe = cls.from_pretrained(str(config), transformer=transformer, local_files_only=True,
                                   **kwargs)
    elif location.is_file():
        config = resolve_single_file_config(location, single_file_config, revision)
        pipe = cls.from_single_file(str(location), config=str(config), local_files_only=True,
                                    **kwargs)
    else:
        _check_folder(location, str(pretrained), variant)
        pipe = cls.from_pretrained(str(location), local_files_only=True, variant=variant,
                                   **{**_absent_components(location), **kwargs})
    return pipe


def _absent_components(folder: Path) -> dict:
    """Components saved as ``[null, null]`` (e.g. SD3 without T5), which diffusers only
    accepts when passed as None explicitly."""
    spec = json.loads((folder / "model_index.json").read_text())
    return {k: None for k, v in spec.items()
            if not k.startswith("_") and isinstance(v, list) and v == [None, None]}


def _transformer_class(family: str):
    import diffusers

    return getattr(diffusers, {"sd3": "SD3Transformer2DModel",
                               "flux": "FluxTransformer2DModel"}[family])


def _lora_location(model_cfg, pretrained: str | None) -> Path | None:
    """The folder of LoRA adapters ``pretrained`` (or model.pretrained) names, or None."""
    from craft.run.config import resolve_path
    from craft.models.lora import is_lora_folder

    path = resolve_path(str(pretrained or model_cfg.pretrained))
    return path if path is not None and is_lora_folder(path) else None


def lora_base_config(model_cfg, adapters: Path):
    """``model_cfg`` pointing at the base the adapters in ``adapters`` were trained on (their
    craft_train.json; without one, ``model_cfg``'s own model, which must not be the adapters
    themselves)."""
    import dataclasses

    from craft.models.lora import lora_base

    base = lora_base(adapters)
    if base is None:
        if _lora_location(model_cfg, None) == adapters:
            raise CraftError(f"{adapters} holds LoRA adapters without a craft_train.json naming "
                             "their base model; set model.pretrained to the base and load the "
                             "adapters with pipe.load_lora_weights")
        return model_cfg
    keep = ("pretrained", "revision", "variant", "single_file_config", "family")
    return dataclasses.replace(model_cfg, **{k: base.get(k, getattr(model_cfg, k)) for k in keep})


def load_from_config(model_cfg, pretrained: str | None = None, device: str | None = None):
    """``load_pipeline`` with the fields of a :class:`craft.run.config.ModelConfig`;
    ``pretrained`` loads another model (e.g. a tuned one) with the same family, dtype, device
    and memory options; ``device`` overrides ``model.device`` (each process of a multi-GPU
    launch loads onto its own GPU). A folder of LoRA adapters (a LoRA run's final/) loads as
    its base with the adapters fused in (craft.models.lora.apply_lora)."""
    from craft.models.families import set_t5_tokens

    adapters = _lora_location(model_cfg, pretrained)
    if adapters is not None:
        from craft.models.lora import apply_lora

        pipe = load_from_config(lora_base_config(model_cfg, adapters), device=device)
        return apply_lora(pipe, adapters)

    name, revision, variant, single_file_config = _source(model_cfg, pretrained)
    pipe = load_pipeline(name, family=model_cfg.family, dtype=model_cfg.dtype,
                         device=device or model_cfg.device, revision=revision, variant=variant,
                         attention=model_cfg.attention, vae_tiling=model_cfg.vae_tiling,
                         vae_slicing=model_cfg.vae_slicing,
                         single_file_config=single_file_config)
    if model_cfg.max_sequence_length is not None:
        set_t5_tokens(pipe, model_cfg.max_sequence_length)
    return pipe
