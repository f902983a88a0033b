"""The evaluate stage: base against tuned model(s) on the held-out prompts with shared seeds,
its record in the store and on the model card, and the labels models are shown under."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from craft import CraftError
from craft.run.handle import Run, as_run
from craft.run.layout import TRAIN_DIR, final_dir, train_dir
from craft.stages.common import ProgressFn, StopFn, require

log = logging.getLogger(__name__)


def record_evaluation(run: Run, cfg, paths: list[str], labels: list[str], evaluation) -> None:
    """Where an evaluation of trained models is kept besides the store: the model card of every
    evaluated model that has one, in each place that holds it (its training run's final
    folder, RUN/final when it holds the same run), and the training run's trackers."""
    from craft.models.lora import TRAIN_RECORD
    from craft.stages.model_card import write_card
    from craft.methods.trackers import log_evaluation

    final = final_dir(run.run_dir).resolve()
    published = tuned_label(final) if (final / TRAIN_RECORD).is_file() else None
    for path, label in zip(paths, labels):
        if not (Path(path) / TRAIN_RECORD).is_file():
            continue
        name = tuned_label(path)
        facts = card_facts(run.store, name)
        here, own = Path(path).resolve(), final_dir(train_dir(run.run_dir, name)).resolve()
        same = {here}
        if (own / TRAIN_RECORD).is_file() and here == final:
            same.add(own)
        if name == published and here == own:
            same.add(final)
        for folder in sorted(same):
            write_card(folder, label, evaluation, facts)
        if (own / TRAIN_RECORD).is_file():
            steps = int(json.loads((own / TRAIN_RECORD).read_text()).get("steps") or 0)
            log_evaluation(cfg, train_dir(run.run_dir, name), name, label, evaluation, steps)


def tuned_label(path: str | Path) -> str:
    """A tuned model's label in evaluations: the training run that made it (from its
    craft_train.json, or RUN/train/NAME/...), else "tuned"."""
    p = Path(path)
    meta = p / "craft_train.json"
    if meta.is_file():
        try:
            return str(json.loads(meta.read_text())["run_name"])
        except (ValueError, KeyError):
            pass
    if p.parent.parent.name == TRAIN_DIR:  # RUN/train/NAME/final or .../checkpoint-N
        return p.parent.name
    return "tuned"


def tuned_models(run_dir: str | Path) -> list[tuple[str, Path]]:
    """(label, folder) of every model a run's training made, newest first: finished ones
    (``NAME · final``: a complete pipeline, or a LoRA run's adapters) and loadable intermediate
    checkpoints (``NAME · checkpoint-N``: a denoiser or adapters, evaluated on the base)."""
    from craft.models.checkpoints import STATE_FILE, is_checkpoint
    from craft.models.lora import TRAIN_RECORD, is_lora_folder
    from craft.run.layout import checkpoint_dirs, training_dirs

    found = []
    for out in training_dirs(run_dir):
        final = final_dir(out)
        if (final / "model_index.json").exists() or is_lora_folder(final):
            stamp = final / TRAIN_RECORD if (final / TRAIN_RECORD).exists() else final
            found.append((stamp.stat().st_mtime, f"{out.name} · {final.name}", final))
        for p in checkpoint_dirs(out):
            if is_checkpoint(p):
                stamp = p / STATE_FILE if (p / STATE_FILE).exists() else p
                found.append((stamp.stat().st_mtime, f"{out.name} · {p.name}", p))
    found.sort(key=lambda t: (-t[0], t[1]))
    return [(label, path) for _, label, path in found]


def stage_evaluate(run: Run, cfg, tuned=None, base: str | None = None,
                   name: str = "eval", label: str | None = None,
                   progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                   pipes=None):
    """Base vs tuned on the held-out prompts with shared seeds (sharded; images reused on a
    rerun); the same evaluation record whichever front end asks. ``tuned`` defaults to
    RUN/final; it may also be a training checkpoint (RUN/train/NAME/checkpoint-N), or a list of
    models (several methods side by side: each is paired with the base on the same seeds)."""
    from craft.stages.evaluation import evaluate

    run = as_run(run)
    paths = [str(t) for t in (tuned if isinstance(tuned, (list, tuple)) and tuned
                              else [tuned or final_dir(run.run_dir)])]
    for t in paths:
        if not Path(t).exists():
            raise CraftError(f"no tuned model at {t}; train and publish first (`craft train "
                             f"--run-dir {run.run_dir}`), or pass --tuned PATH")
    require(cfg, rewards=cfg.rewards.eval_names)
    labels = [label] if label and len(paths) == 1 else unique_labels(paths)
    if "base" in labels:
        raise CraftError("the tuned model's label must not be 'base' (that is the reference)")
    models = {"base": base or cfg.model.pretrained, **dict(zip(labels, paths))}
    cov = run.dist.on_main(lambda: training_coverage(run.store, labels[0])) \
        if len(labels) == 1 else None
    ev = evaluate(run, cfg, models, name=name, pipes=pipes, progress=progress,
                  should_stop=should_stop, coverage=cov)
    run.dist.on_main(lambda: record_evaluation(run, cfg, paths, labels, ev))
    return ev


def unique_labels(paths: list[str]) -> list[str]:
    """Each model's :func:`tuned_label`, with the checkpoint step where two would share one."""
    from craft.run.layout import checkpoint_step

    labels = [tuned_label(p) for p in paths]
    return [f"{lab}@{checkpoint_step(p)}" if labels.count(lab) > 1 and checkpoint_step(p)
            is not None else lab for lab, p in zip(labels, paths)]


def training_coverage(store, name: str) -> dict | None:
    """The coverage of the kept set the training run ``name`` recorded (None if unknown)."""
    row = store.train_run_by_name(name)
    if not row or row.get("selection_id") is None:
        return None
    from craft.stages.filtering import coverage

    items = store.selection_items_df(int(row["selection_id"]))
    if items.empty:
        return None
    prompt_of = store.candidates_df().set_index("id")["prompt_id"]
    kept = pd.DataFrame({"prompt_id": prompt_of.reindex(items["candidate_id"]).to_numpy()})
    return {"training_run": name, **coverage(kept)}


def card_facts(store, name: str) -> dict:
    """What a model card says about training run ``name``'s data beyond its craft_train.json:
    the kept set's coverage, DPO's pair count."""
    row = store.train_run_by_name(name)
    if not row or row.get("selection_id") is None:
        return {}
    sel = store.selection_settings(int(row["selection_id"]))
    return {"n_pairs": sel.get("n_pairs"), "coverage": training_coverage(store, name)}


__all__ = ["card_facts", "record_evaluation", "stage_evaluate", "training_coverage", "tuned_label",
           "tuned_models", "unique_labels"]
