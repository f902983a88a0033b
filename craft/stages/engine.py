"""The CRAFT stages over a run: the one engine that ``craft …`` and the studio both call.

    prompts -> generate -> score -> filter -> train -> publish -> evaluate   (and export)

Each stage is one function over (run, config, progress, should_stop) that owns

- its **preflight**: what it will read (model, reward weights, training options) is checked on
  this machine before any work, with an error that says how to provide it;
- its **process set-up**: under ``accelerate launch`` work that is the same for everyone
  (prompts, the selection, publishing, statistics) is done once by the main process while the
  others wait; work that splits (generation, scoring, evaluation) is sharded by rank, and no
  process moves on before the whole stage's output exists; training is data parallel;
- its part of the **run layout**::

      RUN/images/…              candidates                              (generate)
      RUN/train/NAME/           checkpoint-N/, previews/, final/        (train)
      RUN/final                 the published tuned pipeline            (publish)
      RUN/eval/NAME/            images, scores.csv, side_by_side.png    (evaluate)
      RUN/exports/NAME[.zip]    a kept set as an imagefolder            (export)

so a run started in one front end can be finished in the other. ``progress(done, total)`` is
called on the main process only; ``should_stop()`` may be asked on any process and stops all of
them at the next batch or optimizer step, leaving what was committed resumable.

This module holds the pool's stages (prompts, generate, score, filter, export), online rounds
and the whole loop; the train and publish stages live in craft/stages/train_stage.py, the
evaluate stage in craft/stages/evaluate_stage.py, what every stage shares in
craft/stages/common.py, and what a method trains on in craft/stages/selection.py. The front
ends import the stages from here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

from craft import CraftError, StageStopped
from craft.methods.registry import get_method
from craft.run.handle import Run, as_run
from craft.run.layout import train_dir  # noqa: F401 (API)
from craft.stages.common import (DEFAULT_RUN_NAME, ProgressFn, StopFn,  # noqa: F401 (API)
                                 check_run_name, open_run, require, stopped)
from craft.stages.evaluate_stage import (card_facts, record_evaluation,  # noqa: F401 (API)
                                         stage_evaluate, tuned_label, tuned_models)
from craft.stages.selection import localize, portable, select
from craft.stages.train_stage import (TrainPlan, kept_count, round_config,  # noqa: F401
                                      round_name, round_number, stage_publish, stage_train)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ prompts


def load_prompt_sources(cfg):
    """The training and held-out prompt sets (craft.stages.prompts.PromptSet) ``cfg.prompts``
    names, loaded and checked (no prompt in both); raises the error naming what is wrong.
    Stores nothing: a front end calls it to refuse a source before the run's config names it."""
    from craft.stages.prompts import load_prompts

    p = cfg.prompts
    train = load_prompts(p.source, p.format, p.column, p.max_prompts, seed=p.seed)
    held = load_prompts(p.eval_source, "auto", None, p.max_eval_prompts, seed=p.seed)
    overlap = set(train.prompts) & set(held.prompts)
    if overlap:
        raise CraftError(f"{len(overlap)} prompt(s) are in both prompts.source and "
                         f"prompts.eval_source, e.g. {sorted(overlap)[0]!r}; evaluation prompts "
                         "must be held out")
    return train, held


def prepare_prompts(store, cfg, progress: ProgressFn | None = None) -> dict:
    """Load the training and evaluation prompt sets into the store and expand the variants
    (one process: the main one)."""
    from craft.stages.expansion import expand_prompts, expander_from_config

    p = cfg.prompts
    train, held = load_prompt_sources(cfg)
    train_ids = store.add_prompts(train.prompts, "train", str(p.source))
    store.add_prompts(held.prompts, "eval", str(p.eval_source))
    have = store.variants_df("train").groupby("prompt_id")["idx"].max()
    todo = [(pid, text) for pid, text in zip(train_ids, train.prompts)
            if have.get(pid, 0) < p.num_variants]
    if todo and p.num_variants:
        exp = expand_prompts([t for _, t in todo], expander_from_config(p), p.num_variants,
                             p.seed, progress=progress)
        for k, (pid, _) in enumerate(todo):
            store.add_variants(pid, exp.rows(k))
    info = {"train_prompts": len(train.prompts), "eval_prompts": len(held.prompts),
            "skipped": len(train.skipped) + len(held.skipped), "expanded": len(todo),
            "train_summary": train.summary(), "eval_summary": held.summary()}
    log.info("prompts: %s", info)
    return info


RUN_PROMPTS_FILE = "prompts/train.jsonl"  # a run's training prompts from several sources


def record_prompt_sources(store, cfg, run_dir: Path):
    """``cfg`` naming every training prompt of the run: when the run holds prompts from more
    than ``prompts.source`` (a toy set and then an uploaded file, say), they are written to
    RUN/prompts/train.jsonl, in the order they were added, and the returned config reads that
    file (all of it: no max_prompts), so the run's saved YAML makes the same prompts under
    ``craft run``. Returns None when ``prompts.source`` alone gives them. The config's format
    and column stay "auto" (the file's extension and its "prompt" field say them): a format
    belongs to its source, and a source added later (a .txt) must not be read as jsonl."""
    from craft.run.fsutil import write_text_atomic
    from craft.stages.prompts import load_prompts

    p = cfg.prompts
    stored = store.prompts_df()
    stored = list(stored.loc[stored["split"] == "train", "text"])
    ours = set(load_prompts(p.source, p.format, p.column, p.max_prompts, seed=p.seed).prompts)
    if set(stored) <= ours:
        return None
    path = Path(run_dir) / RUN_PROMPTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps({"prompt": t}) + "\n" for t in stored))
    log.info("the run's %d training prompts come from several sources: recorded in %s",
             len(stored), path)
    return dataclasses.replace(cfg, prompts=dataclasses.replace(
        p, source=str(path), format="auto", column=None, max_prompts=None))


def stage_prompts(run: Run, cfg, progress: ProgressFn | None = None,
                  should_stop: StopFn | None = None) -> dict:
    """Prompts and variants, written once by the main process; the others wait. A run that
    now holds prompts from several sources gets them recorded in one file, and its config
    (RUN/config.yaml) names that file (``info["sources_file"]``)."""
    run = as_run(run)

    def once():
        info = prepare_prompts(run.store, cfg, progress)
        recorded = record_prompt_sources(run.store, cfg, run.run_dir)
        if recorded is not None:
            run.save_config(recorded)
            info["sources_file"] = recorded.prompts.source
        return info

    return run.dist.on_main(once)


# ------------------------------------------------------------------------ generate, score


def stage_generate(run: Run, cfg, progress: ProgressFn | None = None,
                   should_stop: StopFn | None = None, pipe=None) -> dict:
    """Every planned candidate of the base model (sharded; resumable)."""
    from craft.stages.generation import generate_candidates

    run = as_run(run)
    require(cfg, model=pipe is None)
    if run.dist.on_main(lambda: run.store.variants_df("train").empty):
        raise CraftError(f"run {run.run_dir} has no prompts yet; run the prompts stage first "
                         f"(`craft prompts --run-dir {run.run_dir}`)")
    written = generate_candidates(run, cfg, pipe=pipe, progress=progress,
                                  should_stop=should_stop)
    total = run.dist.on_main(lambda: len(run.store.candidates_df(model=cfg.model.pretrained,
                                                                 split="train")))
    stopped(run, should_stop, "generation", f"{total} candidates are stored")
    return {"written": written, "total": total, **generation_cost(run, cfg)}


def generation_cost(run: Run, cfg) -> dict:
    """The pool's denoiser evaluations (RunStore.generation_cost) and the sentence that says
    them (``cost``), as ``craft generate`` prints it."""
    from craft.stages.early_reject import cost_sentence

    run = as_run(run)
    cost = run.dist.on_main(lambda: run.store.generation_cost(cfg.model.pretrained, "train"))
    return {"evaluations": cost["evaluations"], "plain_evaluations": cost["plain_evaluations"],
            "stopped_early": cost["stopped"], "cost": cost_sentence(cost)}


def stage_finish_stopped(run: Run, cfg, which="keepable", progress: ProgressFn | None = None,
                         should_stop: StopFn | None = None, pipe=None) -> dict:
    """Finish stopped candidates (craft.stages.stopped: "keepable", the ones the config's
    filter could keep; "all"; or ids) from their seeds to the last step (sharded;
    resumable), then score them like any candidate."""
    from craft.stages.stopped import finish_stopped

    run = as_run(run)
    require(cfg, model=pipe is None)
    out = finish_stopped(run, cfg, which, pipe=pipe, progress=progress,
                         should_stop=should_stop)
    stopped(run, should_stop, "finishing stopped candidates",
            f"{out['finished']} were finished")
    if out["finished"]:
        stage_score(run, cfg, should_stop=should_stop)
    total = run.dist.on_main(lambda: len(run.store.candidates_df(model=cfg.model.pretrained,
                                                                 split="train")))
    return {"written": out["finished"], "finished": out["finished"], "asked": out["asked"],
            "total": total, **generation_cost(run, cfg)}


def stage_score(run: Run, cfg, names=None, force: bool = False,
                progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> dict:
    """Every candidate scored with ``names`` (default ``rewards.names``) against its original
    prompt (sharded; cached)."""
    from craft.stages.scoring import score_candidates

    run = as_run(run)
    names = list(names or cfg.rewards.names)
    require(cfg, rewards=names)
    if run.dist.on_main(lambda: run.store.counts()["candidates"] == 0):
        raise CraftError(f"run {run.run_dir} has no candidates yet; run the generate stage "
                         f"first (`craft generate --run-dir {run.run_dir}`)")
    written = score_candidates(run, cfg, names, force=force, split="train", progress=progress,
                               should_stop=should_stop)
    stopped(run, should_stop, "scoring", f"{written} scores were written")
    return {"written": written, "rewards": names}


# ------------------------------------------------------------------------ filter


def stage_filter(run: Run, cfg, settings=None, save_as: str | None = "craft"):
    """What ``train.method`` would train on (craft.stages.selection.select: the kept set with
    its weights, DPO's pairs, or an online method's prompts), computed once by the main process
    and recorded as ``save_as``; the same craft.methods.base.Selection on every process (its
    ``result``, the whole annotated pool, stays on the main process)."""
    run = as_run(run)

    def once():
        sel = select(run.store, cfg, settings, save_as=save_as)
        return dataclasses.replace(sel, rows=portable(sel.rows, run.run_dir), result=None)

    sel = run.dist.on_main(once)
    return dataclasses.replace(sel, rows=localize(sel.rows, run.run_dir))


# ------------------------------------------------------------------------ evaluate, export


def stage_export(run: Run, cfg, settings=None, name: str | None = None,
                 selection=None) -> tuple[Path, Path]:
    """The kept set as a Hugging Face imagefolder under RUN/exports/NAME (+ a zip); the
    selection is recorded as ``export:NAME``. The kept set is that of ``train.method``, or of
    craft where the method does not train on one (craft.stages.selection.kept_set_method), with
    its weights (1 each for sft); ``selection`` (one :func:`craft.stages.selection.select`
    already made, e.g. what the studio's Curate shows) is exported as made."""
    import time

    from craft.stages.export import export_imagefolder
    from craft.stages.selection import kept_set_method

    run = as_run(run)
    name = name or time.strftime("kept-%Y%m%d-%H%M%S")

    def export():
        sel = selection or select(run.store, cfg, settings, method=kept_set_method(cfg))
        if get_method(sel.method).data != "kept":
            raise CraftError(f"a {sel.method} selection has no kept set to export as an "
                             "imagefolder; export DPO pairs with `craft export --pairs`")
        rewards = list(sel.result.settings.rewards)
        out = export_imagefolder(sel.rows, run.run_dir, rewards, sel.record, name)
        run.store.save_selection(f"export:{name}", sel.record, sel.rows)
        return out

    return run.dist.on_main(export)


def stage_export_pairs(run: Run, cfg, settings=None, name: str | None = None,
                       selection=None) -> Path:
    """The DPO pairs ``train.method`` = dpo would train on (dpo.pairs, dpo.margin,
    dpo.max_pairs; craft.stages.selection.select with method dpo, or ``selection`` when one
    was made), in Pick-a-Pic's parquet layout under RUN/exports/NAME, so the pool can feed a
    peer's DPO trainer too (craft.stages.export.export_pairs)."""
    from craft.stages.export import export_pairs

    run = as_run(run)

    def export():
        sel = selection or select(run.store, cfg, settings, method="dpo")
        if sel.pairs is None:
            raise CraftError(f"a {sel.method} selection has no pairs; export its kept set "
                             "with `craft export` (without --pairs)")
        record = {k: sel.record[k] for k in ("dpo", "weights", "normalization", "n_pairs")}
        return export_pairs(sel.pairs, sel.result.frame, run.run_dir, record, name)

    return run.dist.on_main(export)


# ------------------------------------------------------------------------ all of it


def run_all(run: Run, cfg, name: str = DEFAULT_RUN_NAME,
            progress_for: Callable[[str], ProgressFn | None] | None = None,
            should_stop: StopFn | None = None, on_stage: Callable[[str], None] | None = None,
            on_round: Callable[[int, str], None] | None = None) -> dict:
    """Every stage in order; leaves the tuned pipeline at RUN/final and returns the stage times,
    the kept count, the training result and the evaluation. Rerunning it resumes: stored
    candidates and scores are skipped, an unfinished training run continues from its last
    checkpoint, a finished one is not trained again."""
    import time

    from craft.models.loading import load_from_config

    run = as_run(run)
    require(cfg, model=True, rewards=[*cfg.rewards.names, *cfg.rewards.eval_names], train=True,
            processes=run.dist.world)
    progress_for = progress_for or (lambda stage: None)
    timings: dict[str, float] = {}

    def timed(stage: str, fn):
        from craft.run.watch import section

        if on_stage:
            on_stage(stage)
        t = time.time()
        with section(stage):  # (a memory meter watching the run measures each stage apart)
            out = fn()
        timings[stage] = time.time() - t
        return out

    timed("prompts", lambda: stage_prompts(run, cfg, progress_for("prompts")))
    pipe = load_from_config(cfg.model, device=str(run.dist.model_device(cfg.model.device)))
    if not get_method(cfg.train.method).online:  # an online method samples its own images
        timed("generate", lambda: stage_generate(run, cfg, progress_for("generate"),
                                                 should_stop, pipe=pipe))
        from craft.run.watch import back_on_device, left_device

        device = pipe.device
        if device.type == "cuda":  # the reward models have the GPU to themselves to score
            import torch

            pipe.to("cpu")
            torch.cuda.empty_cache()
        left_device(pipe)
        timed("score", lambda: stage_score(run, cfg, progress=progress_for("score"),
                                           should_stop=should_stop))
        pipe.to(device)
        back_on_device(pipe)
    result, final = timed("train", lambda: stage_tune(
        run, cfg, name, progress_for=progress_for, should_stop=should_stop, pipe=pipe,
        on_stage=on_stage, on_round=on_round))
    if result.status != "done":
        raise StageStopped(f"training {name} stopped on request at step {result.steps_done} "
                           f"(checkpoint {result.last_checkpoint}); run the same command again "
                           f"to continue")
    ev = timed("evaluate", lambda: stage_evaluate(run, cfg, final, name="eval",
                                                  progress=progress_for("evaluate"),
                                                  should_stop=should_stop,
                                                  pipes={"base": pipe}))
    kept = run.dist.on_main(lambda: kept_count(run.store, result.run_id))
    return {"timings": timings, "kept": kept, "train": result, "final": final, "eval": ev}





def stage_tune(run: Run, cfg, name: str = DEFAULT_RUN_NAME, resume: bool | None = None,
               progress_for: Callable[[str], ProgressFn | None] | None = None,
               should_stop: StopFn | None = None, callbacks=None, pipe=None,
               on_stage: Callable[[str], None] | None = None,
               on_round: Callable[[int, str], None] | None = None):
    """Train (one run, or ``train.rounds`` online rounds) and publish a finished run as
    RUN/final: what ``craft train``, ``craft run`` and the studio's Train do, in one place.
    Returns (the last TrainResult, RUN/final or None when it did not finish). ``resume``
    (True: must exist, False: must be new, None: either) applies to a one-round run; rounds
    always continue the ones already there."""
    progress_for = progress_for or (lambda stage: None)
    run = as_run(run)
    if get_method(cfg.train.method).online and run.dist.on_main(
            lambda: run.store.prompts_df("train").empty):  # its data are the prompts alone
        stage_prompts(run, cfg, progress_for("prompts"))
    if cfg.train.rounds > 1:
        if resume is not None:
            raise CraftError("--resume / --new apply to one training run; with train.rounds > 1 "
                             "the rounds already there are always continued (finished rounds "
                             "are not trained again)")
        result = stage_rounds(run, cfg, name, progress_for, should_stop, pipe=pipe,
                              on_stage=on_stage, on_round=on_round, callbacks=callbacks)
    else:
        if on_round:
            on_round(1, name)
        result = stage_train(run, cfg, name, resume=resume, progress=progress_for("train"),
                             should_stop=should_stop, callbacks=callbacks, pipe=pipe)
    if result.status != "done":
        return result, None
    return result, stage_publish(run, result)


def stage_rounds(run: Run, cfg, name: str = DEFAULT_RUN_NAME,
                 progress_for: Callable[[str], ProgressFn | None] | None = None,
                 should_stop: StopFn | None = None, pipe=None,
                 on_stage: Callable[[str], None] | None = None,
                 on_round: Callable[[int, str], None] | None = None, callbacks=None):
    """Online CRAFT over ``train.rounds`` rounds; returns the last round's TrainResult.

    Round 1 is offline CRAFT on the base model's candidates (already generated and scored by
    the caller). Round r > 1 generates the same plan of prompts x variants x seeds with the
    model round r-1 tuned (new seeds), scores them, filters them against *that* model's own
    original-prompt images (the store keeps candidates per model, so every round's pool,
    selection ``train:NAME.rR`` and checkpoints RUN/train/NAME.rR stay apart) and trains on
    from it. Rerunning resumes: finished rounds are skipped, their candidates kept.
    """
    progress_for = progress_for or (lambda stage: None)
    rounds = cfg.train.rounds
    model_path, result = None, None
    for r in range(1, rounds + 1):
        cfg_r = round_config(cfg, r, model_path)
        if r > 1:
            if on_stage:
                on_stage(f"round {r}: generate")
            stage_generate(run, cfg_r, progress_for("generate"), should_stop)
            if on_stage:
                on_stage(f"round {r}: score")
            stage_score(run, cfg_r, progress=progress_for("score"), should_stop=should_stop)
        if on_stage and rounds > 1:
            on_stage(f"round {r}: train")
        if on_round:
            on_round(r, round_name(name, r, rounds))
        result = stage_train(run, cfg_r, round_name(name, r, rounds),
                             progress=progress_for("train"), should_stop=should_stop,
                             callbacks=callbacks, pipe=pipe if r == 1 else None)
        if result.status != "done":
            return result
        model_path = str(result.final_dir)
    return result

__all__ = ["DEFAULT_RUN_NAME", "StageStopped", "TrainPlan", "card_facts", "check_run_name",
           "load_prompt_sources", "open_run", "prepare_prompts", "record_evaluation", "require",
           "round_config", "round_name", "round_number", "run_all", "stage_evaluate", "stage_export",
           "stage_export_pairs", "stage_filter", "stage_finish_stopped", "stage_generate",
           "generation_cost", "stage_prompts",
           "stage_publish", "stage_rounds", "stage_score", "stage_train", "stage_tune",
           "train_dir", "tuned_label", "tuned_models"]
