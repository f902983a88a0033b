"""Where a run's training outputs live, in one place (the trainer writes them, the CLI and the
studio read them)::

    RUN/train/NAME/checkpoint-N/            resumable state (and the denoiser or adapters)
    RUN/train/NAME/previews/step-NNNNNN/    fixed-seed previews, 0.png, 1.png, ...
    RUN/train/NAME/final/                   the finished model
    RUN/final                               the published one

No craft imports: every module may use it.
"""

from __future__ import annotations

from pathlib import Path

TRAIN_DIR = "train"
FINAL_DIR = "final"
PREVIEWS_DIR = "previews"
# the LoRA adapters of a checkpoint or final/ (diffusers' default weight_name; craft.models.lora)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_CHECKPOINT = "checkpoint-"
_STEP = "step-"


def train_dir(run_dir: str | Path, name: str) -> Path:
    """The folder of the training run ``name``."""
    return Path(run_dir) / TRAIN_DIR / name


def training_dirs(run_dir: str | Path) -> list[Path]:
    """Every training run's folder (not the half-written ones, whose names start with '.')."""
    root = Path(run_dir) / TRAIN_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def final_dir(out_dir: str | Path) -> Path:
    """Where a training run (or a run, for the published model) keeps its finished model."""
    return Path(out_dir) / FINAL_DIR


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"{_CHECKPOINT}{int(step)}"


def checkpoint_step(path: str | Path) -> int | None:
    """N of a ``checkpoint-N`` folder; None for anything else."""
    name = Path(path).name
    if name.startswith(_CHECKPOINT) and name[len(_CHECKPOINT):].isdigit():
        return int(name[len(_CHECKPOINT):])
    return None


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """A training run's checkpoint folders, by step (complete or not: callers check)."""
    found = [(checkpoint_step(p), p) for p in Path(out_dir).glob(f"{_CHECKPOINT}*")]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def preview_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / PREVIEWS_DIR / f"{_STEP}{int(step):06d}"


def preview_dirs(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every preview set written so far, by step."""
    found = []
    for p in (Path(out_dir) / PREVIEWS_DIR).glob(f"{_STEP}*"):
        tail = p.name[len(_STEP):]
        if tail.isdigit():
            found.append((int(tail), p))
    return sorted(found)
