"""``craft prompts | expand | generate | score | filter | train | evaluate | run``.

Each command acts on a run directory (``--run-dir``) with a config (``--config`` + ``--set``).
The run's first command stores its resolved config in the run; later commands use the stored
config unless ``--config`` / ``--set`` are given again, so a stage resumed after a crash runs with
the settings it started with. Heavy modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from craft import CraftError

log = logging.getLogger(__name__)


def _tqdm_progress(desc: str):
    from tqdm import tqdm

    state: dict = {}

    def progress(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True,
                                      file=sys.stderr)
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def _open(args):
    """The run store and the config for this command (see the module docstring)."""
    import torch

    from craft.cli import config_from_args
    from craft.config import config_from_dict, config_to_yaml
    from craft.store import RunStore

    torch.set_flush_denormal(True)
    store = RunStore(args.run_dir)
    stored = store.get_config()
    if stored is not None and args.config is None and not args.overrides:
        import yaml

        cfg = config_from_dict(yaml.safe_load(stored), source=f"{args.run_dir}/store.sqlite")
    else:
        cfg = config_from_args(args)
        store.set_config(config_to_yaml(cfg))
    return store, cfg


def _check_weights(cfg, rewards=None, train: bool = False) -> None:
    """Fail before any work when a model or reward named by the config is not on disk (or,
    with ``train``, when a training option cannot run here, e.g. 8-bit Adam without
    bitsandbytes)."""
    from craft.models import check_model

    check_model(cfg.model)
    if train:
        from craft.training import check_train_options

        check_train_options(cfg)
    try:
        from craft.rewards import check_available
    except ImportError:
        return
    for name in rewards or (*cfg.rewards.names, *cfg.rewards.eval_names):
        check_available(name, cfg.rewards.paths.get(name))


def cmd_prompts(args) -> int:
    from craft.stages import prepare_prompts

    store, cfg = _open(args)
    info = prepare_prompts(store, cfg, _tqdm_progress("expand"))
    print(f"training prompts: {info['train_summary']}\nevaluation prompts: {info['eval_summary']}"
          f"\nvariants written for {info['expanded']} prompts (V={cfg.prompts.num_variants})")
    return 0


def cmd_generate(args) -> int:
    from craft.generation import generate_candidates

    store, cfg = _open(args)
    _check_weights(cfg, rewards=[])
    if store.variants_df("train").empty:
        raise CraftError(f"run {args.run_dir} has no prompts yet; run `craft prompts --run-dir "
                         f"{args.run_dir}` first")
    n = generate_candidates(store, cfg, progress=_tqdm_progress("generate"))
    total = len(store.candidates_df(model=cfg.model.pretrained, split="train"))
    print(f"generated {n} new candidates; {total} in the run")
    return 0


def cmd_score(args) -> int:
    from craft.scoring import score_candidates

    store, cfg = _open(args)
    names = args.rewards.split(",") if args.rewards else None
    _check_weights(cfg, rewards=names or cfg.rewards.names)
    n = score_candidates(store, cfg, names, force=args.force, split="train",
                         progress=_tqdm_progress("score"))
    print(f"wrote {n} scores")
    return 0


def cmd_filter(args) -> int:
    from craft.stages import training_set

    store, cfg = _open(args)
    kept = training_set(store, cfg)
    cols = ["candidate_id", "prompt", "variant", *cfg.rewards.names, "composite", "advantage",
            "weight"]
    import pandas as pd

    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(kept[cols].head(args.show).to_string(index=False))
    print(f"kept {len(kept)} candidates (level {cfg.filter.level}, top_k {cfg.filter.top_k}); "
          "saved as selection 'craft'")
    return 0


def _train(store, cfg, args, kept, name: str, out: Path):
    from tqdm import tqdm

    from craft.training import TrainCallbacks, train

    bar = tqdm(total=cfg.train.steps, desc=f"train {name}", unit="step", dynamic_ncols=True,
               file=sys.stderr)

    def on_step(step, total, metrics):
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)

    result = train(cfg, kept, out, store=store, run_name=name,
                   callbacks=TrainCallbacks(on_step=on_step), resume=args.resume)
    bar.close()
    return result


def _publish_final(result, run_dir: Path) -> Path:
    """Copy the tuned pipeline to RUN/final, where `craft evaluate` and users look for it."""
    import shutil

    final = run_dir / "final"
    tmp = run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(result.final_dir, tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def cmd_train(args) -> int:
    from craft.stages import training_set

    store, cfg = _open(args)
    _check_weights(cfg, rewards=[], train=True)
    kept = training_set(store, cfg)
    out = Path(args.out) if args.out else Path(args.run_dir) / "train"
    result = _train(store, cfg, args, kept, "craft", out)
    if result.final_dir is None:
        print(f"training {result.status} after {result.steps_done} steps; checkpoint "
              f"{result.last_checkpoint}; rerun with --resume to continue")
        return 0
    final = result.final_dir if args.out else _publish_final(result, Path(args.run_dir))
    print(f"training {result.status} after {result.steps_done} steps; tuned pipeline at {final}")
    return 0


def cmd_evaluate(args) -> int:
    from craft.evaluation import evaluate

    store, cfg = _open(args)
    tuned = args.tuned or str(Path(args.run_dir) / "final")
    if args.tuned is None and not Path(tuned).exists():
        raise CraftError(f"no tuned pipeline at {tuned}; run `craft train --run-dir "
                         f"{args.run_dir}` first, or pass --tuned PATH")
    models = {"base": args.base or cfg.model.pretrained, "craft": tuned}
    result = evaluate(cfg, store, models, name=args.name, progress=_tqdm_progress("evaluate"))
    print(result.table())
    print(f"side-by-side grid: {result.grid_path}")
    return 0


def cmd_run(args) -> int:
    """All stages in order; leaves the tuned pipeline at RUN/final and prints the evaluation."""
    from craft.evaluation import evaluate
    from craft.generation import generate_candidates
    from craft.scoring import score_candidates
    from craft.stages import prepare_prompts, training_set

    t0 = time.time()
    store, cfg = _open(args)
    _check_weights(cfg, train=True)
    run_dir = Path(args.run_dir)
    timings = {}

    def stage(name, fn):
        t = time.time()
        out = fn()
        timings[name] = time.time() - t
        return out

    stage("prompts", lambda: prepare_prompts(store, cfg))
    from craft.models import load_from_config

    pipe = load_from_config(cfg.model)
    stage("generate", lambda: generate_candidates(store, cfg, pipe=pipe,
                                                  progress=_tqdm_progress("generate")))
    stage("score", lambda: score_candidates(store, cfg, split="train",
                                            progress=_tqdm_progress("score")))
    kept = stage("filter", lambda: training_set(store, cfg))
    print(f"kept {len(kept)} candidates for training", file=sys.stderr)
    result = stage("train", lambda: _train(store, cfg, args, kept, "craft", run_dir / "train"))
    if result.final_dir is None:
        print(f"training {result.status}; rerun with --resume to continue", file=sys.stderr)
        return 1
    final = _publish_final(result, run_dir)
    ev = stage("evaluate", lambda: evaluate(cfg, store, {"base": cfg.model.pretrained,
                                                         "craft": str(final)},
                                            pipes={"base": pipe},
                                            progress=_tqdm_progress("evaluate")))
    print(ev.table())
    print(f"\ntuned pipeline: {final}\nside-by-side grid: {ev.grid_path}\n"
          + "stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
          + f"; total {time.time() - t0:.0f}s")
    return 0


def _common(p: argparse.ArgumentParser, config_positional: bool = False) -> None:
    from craft.cli import add_config_arguments

    p.add_argument("--run-dir", required=True, help="the run directory (created if missing)")
    add_config_arguments(p, positional=config_positional)


def add_stage_commands(subparsers: argparse._SubParsersAction) -> None:
    specs = [
        ("prompts", cmd_prompts, "load the training and evaluation prompts and write variants"),
        ("expand", cmd_prompts, "same as prompts: (re)write missing variants"),
        ("generate", cmd_generate, "generate candidates (resumable; skips stored ones)"),
        ("score", cmd_score, "score candidates against their original prompt (cached)"),
        ("filter", cmd_filter, "Composite Reward Filtering: show and save the kept set"),
        ("train", cmd_train, "advantage-weighted fine-tuning on the kept set"),
        ("evaluate", cmd_evaluate, "base vs tuned on held-out prompts, same seeds"),
    ]
    for name, fn, help_text in specs:
        p = subparsers.add_parser(name, help=help_text)
        _common(p)
        p.set_defaults(handler=fn)
        if name == "score":
            p.add_argument("--rewards", default=None, help="comma-separated subset of rewards")
            p.add_argument("--force", action="store_true", help="re-score stored scores")
        if name == "filter":
            p.add_argument("--show", type=int, default=10, help="rows to print")
        if name == "train":
            p.add_argument("--out", default=None, help="output dir (default RUN/train)")
            p.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
        if name == "evaluate":
            p.add_argument("--base", default=None, help="reference model (default model.pretrained)")
            p.add_argument("--tuned", default=None, help="tuned pipeline (default RUN/final)")
            p.add_argument("--name", default="eval")
    run = subparsers.add_parser("run", help="every stage in order; leaves RUN/final")
    _common(run, config_positional=True)
    run.add_argument("--resume", action="store_true", help="resume training from a checkpoint")
    run.set_defaults(handler=cmd_run)
