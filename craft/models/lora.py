"""LoRA adapters on a pipeline's own denoiser, saved and loaded the way diffusers' LoRA training
scripts and ``DiffusionPipeline.load_lora_weights`` do.

Why on the pipeline's own denoiser: a copy of a 12 B-parameter transformer costs 24 GB in
bfloat16 (48 GB in float32) before a single activation. The adapters are added to the module the
pipeline already holds, only they are float32 (diffusers' ``cast_training_params``), and the
frozen weights stay in the model dtype. The anchor's base prediction is the same module with the
adapters disabled, and :func:`remove_lora` gives the pipeline back unchanged after training.

On disk a LoRA run is ``pytorch_lora_weights.safetensors`` (written by the pipeline class's
``save_lora_weights``, with the adapter's rank, alpha and targets as metadata) plus
``craft_train.json`` naming the base model: what a FLUX / SDXL LoRA user loads with
``pipe.load_lora_weights(folder)``. :func:`apply_lora` does that and fuses the adapters, so
evaluation, previews, Compare and the next online round see an ordinary pipeline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from craft import CraftError
from craft.run.layout import LORA_WEIGHTS  # diffusers' default weight_name

log = logging.getLogger(__name__)

TRAIN_RECORD = "craft_train.json"

# LoRA targets: the attention projections, as diffusers' LoRA scripts choose them (for the MMDiT
# families also the text stream's projections, train_dreambooth_lora_sd3.py / _flux.py).
LORA_TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0"],
                "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                "add_v_proj", "to_add_out"]}


def add_lora(model, kind: str, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Add trainable adapters to ``model`` (``kind``: unet or transformer) in place; freeze the
    rest; the adapters become float32. Returns the trainable parameters."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                 target_modules=LORA_TARGETS[kind]))
    cast_training_params(model, dtype=torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def remove_lora(model) -> None:
    """Take the adapters out again (the base layers come back as they were)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    model._hf_peft_config_loaded = False


def lora_state(model, kind: str) -> dict[str, torch.Tensor]:
    """The adapters' weights on the CPU, named as the family's training script saves them."""
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().to("cpu") for k, v in get_peft_model_state_dict(model).items()}
    if kind == "unet":  # train_text_to_image_lora(_sdxl).py convert to the diffusers names
        from diffusers.utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(state)
    return state


def merged_state(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The denoiser's weights with the adapters merged, on the CPU in ``dtype``, computed one
    layer at a time (peft's ``get_delta_weight``) without merging in place: the pipeline's
    model-dtype weights are not touched (a merge and unmerge in bfloat16 would not give them
    back exactly)."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            deltas[f"{name}.base_layer.weight"] = m
    out = {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if "lora_" in key:
                continue
            if key in deltas:
                value = value.float() + deltas[key].get_delta_weight("default").float()
            out[key.replace(".base_layer.", ".")] = value.detach().to("cpu", dtype)
    return out


def save_lora(pipe, model, folder: Path, extra: dict[str, str] | None = None) -> Path:
    """Write ``model``'s adapters to ``folder``/pytorch_lora_weights.safetensors with the
    pipeline class's own ``save_lora_weights`` (+ ``extra`` files: name -> text)."""
    from craft.models.families import denoiser_name

    kind = denoiser_name(pipe)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = model.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata.get("target_modules") or [])
    type(pipe).save_lora_weights(
        str(folder), **{f"{kind}_lora_layers": lora_state(model, kind),
                        f"{kind}_lora_adapter_metadata": metadata},
        safe_serialization=True)
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
    return folder / LORA_WEIGHTS


def is_lora_folder(path: str | Path) -> bool:
    """A folder of adapters (no complete pipeline in it)."""
    p = Path(path)
    return p.is_dir() and (p / LORA_WEIGHTS).is_file() and not (p / "model_index.json").exists()


def lora_base(path: str | Path) -> dict | None:
    """The ``model`` section the adapters in ``path`` were trained on (craft_train.json), or
    None when the folder does not say."""
    record = Path(path) / TRAIN_RECORD
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text())["config"]["model"]
    except (ValueError, KeyError, TypeError):
        return None


def apply_lora(pipe, folder: str | Path, fuse: bool = True):
    """Load the adapters in ``folder`` into ``pipe`` (``load_lora_weights``); with ``fuse``
    merge them into the weights and drop the adapter layers, so the pipeline is a plain one."""
    from craft.run.devices import LOAD_LOCK

    try:
        with LOAD_LOCK:
            pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS, adapter_name="craft")
    except (ValueError, KeyError, RuntimeError) as e:
        raise CraftError(f"{folder}/{LORA_WEIGHTS} does not load into this "
                         f"{type(pipe).__name__}: {str(e).splitlines()[0]}; were the adapters "
                         "trained on this base model (craft_train.json says which)?") from None
    if fuse:
        pipe.fuse_lora(adapter_names=["craft"])
        pipe.unload_lora_weights()
    log.info("applied LoRA adapters from %s%s", folder, " (fused)" if fuse else "")
    return pipe


__all__ = ["LORA_TARGETS", "LORA_WEIGHTS", "TRAIN_RECORD", "add_lora", "apply_lora",
           "is_lora_folder", "lora_base", "lora_state", "merged_state", "remove_lora", "save_lora"]
