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
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Callable

import pandas as pd

from craft import CraftError, StageStopped
from craft.run.distributed import Dist, setup_process
from craft.run.handle import Run, as_run
from craft.run.layout import TRAIN_DIR, final_dir, train_dir  # noqa: F401 (train_dir: API)

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]

# What each stage's progress counts (front ends label their bars with it).
STAGE_UNITS = {"prompts": "prompt", "generate": "img", "score": "score", "train": "step",
               "evaluate": "img"}
STAGES = ("prompts", "generate", "score", "filter", "train", "publish", "evaluate")
DEFAULT_RUN_NAME = "craft"  # the training run `craft run` / `craft train` make
TRAIN_LOCK = "train.lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def open_run(run_dir: str | Path, cfg, dist: Dist | None = None) -> Run:
    """The run for this process: the process group of a launch (or none), process-level
    settings, and the store on the main process."""
    setup_process()
    if dist is None:
        dist = Dist.for_config(cfg) if Dist.launched() else Dist.local()
    if not dist.is_main:  # one set of loading bars per launch, not one per process
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    return Run.open(run_dir, dist)


# ------------------------------------------------------------------------ preflight


def require(cfg, *, model: bool = False, rewards=(), train: bool = False,
            processes: int = 1) -> None:
    """Fail before any work when something the stage reads is not on this machine: the base
    model's files, each reward's weights, training options (e.g. 8-bit Adam without
    bitsandbytes, an effective batch that ``processes`` cannot split). Reads no weights."""
    if model:
        from craft.models.loading import check_model

        check_model(cfg.model)
    if train:
        from craft.methods.training import check_train_options, gradient_accumulation

        check_train_options(cfg)
        gradient_accumulation(cfg.train, processes)
    if rewards:
        from craft.rewards.configured import check_reward

        for name in dict.fromkeys(rewards):
            check_reward(cfg, name)


def check_run_name(name: str) -> str:
    name = (name or "").strip()
    if not _NAME_RE.match(name):
        raise CraftError(f"training run name {name!r}: use letters, digits, '-', '_' or '.' "
                         f"(up to 64, starting with a letter or digit), e.g. craft-1")
    return name


# ------------------------------------------------------------------------ prompts


def prepare_prompts(store, cfg, progress: ProgressFn | None = None) -> dict:
    """Load the training and evaluation prompt sets into the store and expand the variants
    (one process: the main one)."""
    from craft.stages.expansion import expand_prompts, expander_from_config
    from craft.stages.prompts import load_prompts

    p = cfg.prompts
    train = load_prompts(p.source, p.format, p.column, p.max_prompts, seed=p.seed)
    held = load_prompts(p.eval_source, "auto", None, p.max_eval_prompts, seed=p.seed)
    overlap = set(train.prompts) & set(held.prompts)
    if overlap:
        raise CraftError(f"{len(overlap)} prompt(s) are in both prompts.source and "
                         f"prompts.eval_source, e.g. {sorted(overlap)[0]!r}; evaluation prompts "
                         "must be held out")
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
    ``craft run``. Returns None when ``prompts.source`` alone gives them."""
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
        p, source=str(path), format="jsonl", column="prompt", max_prompts=None))


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
    _stopped(run, should_stop, "generation", f"{total} candidates are stored")
    return {"written": written, "total": total}


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
    _stopped(run, should_stop, "scoring", f"{written} scores were written")
    return {"written": written, "rewards": names}


def _stopped(run: Run, should_stop: StopFn | None, what: str, kept: str) -> None:
    if run.dist.any(should_stop is not None and should_stop()):
        raise StageStopped(f"{what} stopped on request; {kept}, and running it again continues")


# ------------------------------------------------------------------------ filter


def candidate_frame(store, cfg, split: str = "train") -> pd.DataFrame:
    """Candidates of ``cfg.model`` joined with their scores: the frame the filter reads."""
    cands = store.candidates_df(model=cfg.model.pretrained, split=split)
    names = sorted(set(cfg.rewards.names) | set(cfg.rewards.eval_names))
    scores = store.scores_df(names)
    df = cands.rename(columns={"id": "candidate_id"}).join(scores, on="candidate_id")
    for n in names:
        if n not in df:
            df[n] = float("nan")
    return df


def filter_settings(cfg, **changes):
    """:class:`craft.stages.filtering.FilterSettings` from the config (studio overrides in ``changes``)."""
    from craft.stages.filtering import FilterSettings

    return FilterSettings.from_config(cfg, **changes)


def scored_frame(store, cfg) -> pd.DataFrame:
    """:func:`candidate_frame`, refused while there is nothing to select from."""
    df = candidate_frame(store, cfg)
    if df.empty:
        raise CraftError("no candidates in this run yet; run `craft generate` first")
    missing = [n for n in cfg.rewards.names if df[n].isna().all()]
    if missing:
        raise CraftError(f"rewards {missing} have no scores in this run; run `craft score` first")
    return df


def training_set(store, cfg, settings=None, save_as: str | None = "craft") -> pd.DataFrame:
    """The kept candidates with their advantage weights (the set CRAFT fine-tunes on; weight 1
    each for ``train.method`` = sft).

    Manual include/exclude overrides from the store are applied last. With ``save_as`` the
    selection is recorded in the store, so a training run can say exactly what it saw.
    """
    from craft.stages.advantages import select_for_training

    df = scored_frame(store, cfg)
    settings = settings or filter_settings(cfg)
    a = cfg.advantage
    mode = "uniform" if cfg.train.method == "sft" else a.mode
    kept = select_for_training(df, settings, mode, a.tau, a.eps, store.overrides(),
                               pool_embeddings(store, cfg) if settings.dedup_threshold is not None
                               else None)
    if save_as:
        from craft.stages.filtering import coverage

        store.save_selection(save_as, selection_record(settings, cfg, coverage=coverage(kept)),
                             kept)
    return kept


def dpo_pairs(store, cfg, settings=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the images of the pairs, the pairs) ``train.method`` = dpo trains on: winner and loser
    from each original prompt's whole group by the composite (craft.methods.dpo.build_pairs; the
    kept-set filter does not apply, manual excludes do)."""
    from craft.stages.advantages import filter_with_advantages
    from craft.methods.dpo import build_pairs, pair_images

    df = scored_frame(store, cfg)
    _, frame = filter_with_advantages(df, settings or filter_settings(cfg), cfg.advantage.eps,
                                      store.overrides())
    d = cfg.dpo
    pairs = build_pairs(frame, d.pairs, d.margin, d.max_pairs)
    images, _ = pair_images(pairs, frame)
    return images, pairs


def pool_embeddings(store, cfg) -> tuple:
    """(ids, vectors) of every training candidate in ``embed.encoder``'s space, embedding the
    ones not yet embedded first (the near-duplicate rule needs the whole pool)."""
    from craft.stages.embeddings import embed_candidates, space_name

    embed_candidates(store, cfg)
    return store.embeddings(space_name(cfg))


def selection_record(settings, cfg, **extra) -> dict:
    """What a saved selection records about how it was made."""
    return dataclasses.asdict(settings) | {"advantage": cfg.advantage.mode,
                                           "tau": cfg.advantage.tau} | extra


def random_subset(store, cfg, n: int, seed: int = 0) -> pd.DataFrame:
    """The control that tells alignment from drift: ``n`` of the model's own *plain-prompt*
    samples drawn at random, unfiltered, each with weight 1."""
    df = candidate_frame(store, cfg)
    plain = df[df["variant_idx"] == 0]
    if len(plain) < n:
        raise CraftError(f"the control needs {n} plain-prompt candidates but the run has "
                         f"{len(plain)}; generate more seeds (generation.seeds_per_prompt)")
    return plain.sample(n=n, random_state=seed).assign(weight=1.0)


def kept_digest(kept: pd.DataFrame, pairs=None) -> str:
    """A short fingerprint of a kept set (which candidates, with which weights; DPO: and which
    pairs), so processes and resumed runs can check they train on the same data."""
    key = "candidate_id" if "candidate_id" in kept else "prompt_id"  # GRPO: its prompts
    weights = kept["weight"].astype(float) if "weight" in kept else [1.0] * len(kept)
    rows = sorted(zip(kept[key].astype(int), weights))
    text = ";".join(f"{c}:{w:.8g}" for c, w in rows)
    if pairs is not None:
        text += "|" + ";".join(f"{int(w)}>{int(lo)}" for w, lo in pairs)
    return hashlib.sha1(text.encode()).hexdigest()


def grpo_prompts(store) -> pd.DataFrame:
    """The original training prompts GRPO samples from (columns prompt_id, prompt)."""
    p = store.prompts_df("train")
    if p.empty:
        raise CraftError("no training prompts in this run yet; run `craft prompts` first")
    return pd.DataFrame({"prompt_id": p["id"].astype(int), "prompt": p["text"]})


def _portable(frame: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """Image paths relative to the run, for sending to processes that may mount it elsewhere."""
    if "image_path" not in frame:  # GRPO's prompts: no images
        return frame
    root = str(run_dir) + "/"
    return frame.assign(image_path=[str(p).removeprefix(root) for p in frame["image_path"]])


def _localize(frame: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    if "image_path" not in frame:
        return frame
    return frame.assign(image_path=[str(run_dir / p) for p in frame["image_path"]])


def stage_filter(run: Run, cfg, settings=None, save_as: str | None = "craft") -> pd.DataFrame:
    """The kept set, computed once by the main process and the same on every process."""
    run = as_run(run)
    kept = run.dist.on_main(lambda: _portable(training_set(run.store, cfg, settings, save_as),
                                              run.run_dir))
    return _localize(kept, run.run_dir)


# ------------------------------------------------------------------------ train


@dataclasses.dataclass
class TrainPlan:
    """What the main process decided for a training stage (sent to every process)."""

    action: str  # "train" or "skip" (finished already)
    resume: bool
    run_id: int | None
    config: dict  # the config the run trains with (a resumed run: the one it started with)
    kept: pd.DataFrame | None  # image paths relative to the run
    settings: dict | None  # how the kept set was selected (recorded with it)
    pairs: list | None = None  # DPO: [winner id, loser id] per pair


def _lock_is_free(out_dir: Path) -> bool:
    lock = out_dir / TRAIN_LOCK
    if not lock.exists():
        return True
    with open(lock, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def _plan_training(run: Run, cfg, name: str, resume: bool | None, settings) -> TrainPlan:
    from craft.run.config import config_from_dict, config_to_dict

    store, out_dir = run.store, train_dir(run.run_dir, name)
    if not _lock_is_free(out_dir):
        raise CraftError(f"training run {name!r} is being trained by another process right "
                         f"now ({out_dir / TRAIN_LOCK} is locked); wait for it, cancel it, or "
                         f"pick another name")
    rec = store.train_run_by_name(name)
    if rec is None:
        if resume:
            raise CraftError(f"there is no training run named {name!r} to resume in "
                             f"{run.run_dir}; start it instead")
        if out_dir.exists() and any(out_dir.iterdir()):
            raise CraftError(f"{out_dir} exists but no training run named {name!r} is recorded "
                             f"in this run's store; delete the folder or pick another name")
        settings = settings or filter_settings(cfg)
        if cfg.train.method == "grpo":  # online: trains on the prompts, samples its own images
            prompts = grpo_prompts(store)
            return TrainPlan("train", False, None, config_to_dict(cfg), prompts, {
                "method": "grpo", "grpo": dataclasses.asdict(cfg.grpo),
                "rewards": list(cfg.rewards.names), "weights": dict(cfg.filter.weights),
                "prompt_ids": prompts["prompt_id"].tolist()})
        if cfg.train.method == "dpo":
            images, pairs = dpo_pairs(store, cfg, settings)
            ids = pairs[["win_id", "lose_id"]].to_numpy().tolist()
            return TrainPlan("train", False, None, config_to_dict(cfg),
                             _portable(images, run.run_dir), selection_record(
                                 settings, cfg, method="dpo", dpo=dataclasses.asdict(cfg.dpo),
                                 n_pairs=len(ids), pairs=ids), ids)
        kept = training_set(store, cfg, settings, save_as=None)
        from craft.stages.filtering import coverage

        return TrainPlan("train", False, None, config_to_dict(cfg), _portable(kept, run.run_dir),
                         selection_record(settings, cfg, method=cfg.train.method,
                                          coverage=coverage(kept)))
    if rec["status"] == "done":
        if resume is False:
            raise CraftError(f"a training run named {name!r} exists and is finished; pick "
                             f"another name")
        from craft.models.lora import is_lora_folder

        final = final_dir(out_dir)
        if not ((final / "model_index.json").exists() or is_lora_folder(final)):
            raise CraftError(f"training run {name!r} is recorded as finished but "
                             f"{final_dir(out_dir)} is missing; pick another name, or delete "
                             f"{out_dir} and its record to train it again")
        log.info("training run %r is finished (%s); not training it again", name, out_dir)
        return TrainPlan("skip", False, rec["id"], {}, None, None)
    if resume is False:
        raise CraftError(f"a training run named {name!r} exists ({rec['status']}); resume it "
                         f"or pick another name")
    config = json.loads(rec["config_json"])
    cfg_then = config_from_dict(config, f"training run {name}")
    if cfg_then.train.method == "grpo":
        recorded = store.selection_settings(int(rec["selection_id"]))
        prompts = grpo_prompts(store)
        prompts = prompts[prompts["prompt_id"].isin(recorded["prompt_ids"])]
        if len(prompts) != len(recorded["prompt_ids"]):
            raise CraftError(f"training run {name!r} sampled from {len(recorded['prompt_ids'])}"
                             f" prompts, some of which are gone from the store; train under a "
                             f"new name")
        return TrainPlan("train", True, rec["id"], config, prompts, recorded)
    if rec.get("selection_id") is not None:
        items = store.selection_items_df(int(rec["selection_id"]))
        frame = candidate_frame(store, cfg_then).drop(
            columns=["composite", "advantage", "weight"], errors="ignore")
        kept = frame.merge(items, on="candidate_id", how="inner")
        if len(kept) != len(items):
            raise CraftError(f"training run {name!r} trained on {len(items)} candidates, of "
                             f"which {len(items) - len(kept)} are gone from the store; it "
                             f"cannot be resumed on the same data: train under a new name")
        kept = kept.sort_values(["composite", "candidate_id"], ascending=[False, True])
        recorded = store.selection_settings(int(rec["selection_id"]))
    else:  # a run recorded before selections were linked: select as its config says
        settings = filter_settings(cfg_then)
        kept = training_set(store, cfg_then, settings, save_as=None)
        recorded = selection_record(settings, cfg_then)
    return TrainPlan("train", True, rec["id"], config, _portable(kept, run.run_dir), recorded,
                     recorded.get("pairs"))


def stage_train(run: Run, cfg, name: str = DEFAULT_RUN_NAME, *, settings=None,
                resume: bool | None = None, progress: ProgressFn | None = None,
                should_stop: StopFn | None = None, callbacks=None, pipe=None):
    """Advantage-weighted fine-tuning of the kept set into RUN/train/NAME.

    ``resume``: None (``craft run``) continues an unfinished run of this name from its last
    checkpoint, starts a new one otherwise, and does not train a finished one again; True
    requires an unfinished run; False requires a new name. A resumed run trains on the very
    selection it recorded when it started, with the config it started with. Every process
    returns the :class:`craft.methods.training.TrainResult` (``run_id`` set).
    """
    from craft.run.config import config_from_dict, config_to_dict
    from craft.methods.training import TrainCallbacks, TrainResult, train, weighted_epochs

    run = as_run(run)
    dist = run.dist
    name = check_run_name(name)
    out_dir = train_dir(run.run_dir, name)
    require(cfg, model=pipe is None, train=True, processes=dist.world, rewards=_online(cfg))
    plan: TrainPlan = dist.on_main(lambda: _plan_training(run, cfg, name, resume, settings))
    if plan.action == "skip":
        steps = dist.on_main(lambda: _steps_done(run.store, plan.run_id))
        return TrainResult(plan.run_id, "done", steps, out_dir, final_dir(out_dir),
                           _latest(out_dir))
    if plan.config != config_to_dict(cfg):  # a resumed run: the config it started with
        cfg = config_from_dict(plan.config, f"training run {name}")
        require(cfg, model=pipe is None, train=True, processes=dist.world,
                rewards=_online(cfg))
    kept = _localize(plan.kept, run.run_dir)
    digest = kept_digest(kept, plan.pairs)
    digests = dist.gather(digest)

    def record() -> int:
        if len(set(digests)) != 1:
            raise CraftError(f"the processes hold different kept sets ({digests}); this is a "
                             f"bug in the selection broadcast")
        settings_rec = {**(plan.settings or {}), "kept_digest": digest,
                        "digest_by_process": digests, "processes": dist.world}
        if plan.resume:
            run.store.update_train_run(plan.run_id, status="running")
            return plan.run_id
        sid = run.store.save_selection(f"train:{name}", settings_rec,
                                       [] if "candidate_id" not in kept else kept)
        return run.store.create_train_run(name, plan.config, checkpoint_dir=str(out_dir),
                                          selection_id=sid)

    run_id = dist.on_main(record)
    pairs = None
    if plan.pairs is not None:
        from craft.methods.dpo import pair_index

        pairs = pair_index(kept, plan.pairs)
        log.info("training %s by DPO on %d pairs of %d images%s; output %s", name, len(pairs),
                 len(kept), " (resumed)" if plan.resume else "", out_dir)
    elif cfg.train.method == "grpo":
        log.info("training %s by online GRPO over %d prompts%s; output %s", name, len(kept),
                 " (resumed)" if plan.resume else "", out_dir)
    else:
        log.info("training %s (%s) on %d kept candidates (~%.0f passes)%s; output %s", name,
                 cfg.train.method, len(kept),
                 weighted_epochs(len(kept), cfg.train.steps, cfg.train.effective_batch),
                 " (resumed)" if plan.resume else "", out_dir)
    user = callbacks or TrainCallbacks()

    def on_step(step, total, metrics):
        if run.is_main:
            run.store.add_metrics(run_id, [{"step": step, **metrics}])
            if progress:
                progress(step, total)
            if user.on_step:
                user.on_step(step, total, metrics)

    def on_checkpoint(step, path):
        run.store.update_train_run(run_id, checkpoint_dir=str(path))
        if user.on_checkpoint:
            user.on_checkpoint(step, path)

    def stop() -> bool:
        asked = (should_stop is not None and should_stop()) or (
            user.should_stop is not None and user.should_stop())
        return dist.any(asked)

    lock = _hold_lock(out_dir) if run.is_main else None
    try:
        cbs = TrainCallbacks(on_step=on_step, on_preview=user.on_preview,
                             on_checkpoint=on_checkpoint, should_stop=stop)
        meta = {"run_name": name, "kept_digest": digest}
        if cfg.train.method == "grpo":
            from craft.methods.grpo import GRPOCallbacks, train_grpo

            result = train_grpo(cfg, kept, out_dir, resume=plan.resume, pipe=pipe, meta=meta,
                                callbacks=cbs, grpo_callbacks=GRPOCallbacks(
                                    on_round=_round_keeper(run, cfg, name, kept)))
        else:
            result = train(cfg, kept, out_dir, resume=plan.resume, pipe=pipe, pairs=pairs,
                           meta=meta, callbacks=cbs)
    except BaseException as e:
        if run.is_main:
            run.store.update_train_run(run_id, status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if lock is not None:
            lock.close()
    if run.is_main:
        run.store.update_train_run(run_id, status=result.status, checkpoint_dir=str(
            result.final_dir or result.last_checkpoint or out_dir))
    result.run_id = run_id
    return result


def _online(cfg) -> tuple:
    """The rewards a training method scores with while it trains (GRPO's online rewards)."""
    return tuple(cfg.rewards.names) if cfg.train.method == "grpo" else ()


def grpo_model_key(name: str) -> str:
    """The store's model key of the images a GRPO training run sampled (apart from the pool,
    which is keyed by the base model)."""
    from craft.run.store import SAMPLED_PREFIX

    return f"{SAMPLED_PREFIX}{name}"


def _round_keeper(run: Run, cfg, name: str, prompts: pd.DataFrame):
    """GRPO's on_round: every process writes its samples' images, the main process records
    them (skipping those a killed run already stored) with their rewards, so the studio shows
    what online RL looked at."""
    from craft.run.store import NewCandidate, write_candidate_images, writing_images

    every = cfg.grpo.store_every
    model = grpo_model_key(name)
    pid = prompts["prompt_id"].to_numpy()
    originals = run.dist.on_main(lambda: {
        int(r.prompt_id): int(r.id) for r in run.store.variants_df("train").itertuples()
        if r.idx == 0})

    def on_round(r, rows, seeds, images, scores):
        if not every or r % every:
            return
        items = [NewCandidate(int(pid[i]), originals[int(pid[i])], int(sd), model,
                              {"round": int(r), "sampler": "grpo"}, im)
                 for i, sd, im in zip(rows, seeds, images)]
        with writing_images(run.run_dir):
            written = write_candidate_images(run.run_dir, items)
        values = [{n: float(v[j]) for n, v in scores.items()} for j in range(len(items))]
        gathered = run.dist.gather((written, values))
        if run.is_main:
            have = run.store.existing_candidate_keys(model)
            new = [(w, v) for part in gathered for w, v in zip(*part)
                   if (w[0], w[1], w[2]) not in have]
            ids = run.store.record_candidates([w for w, _ in new])
            run.store.add_scores([(cid, n, x) for cid, (_, v) in zip(ids, new)
                                  for n, x in v.items()])

    return on_round


def _hold_lock(out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / TRAIN_LOCK, "a+b")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise CraftError(f"{out_dir} is being trained by another process; wait for it or "
                         f"cancel it") from None
    return f


def _steps_done(store, run_id: int) -> int:
    m = store.metrics_df(run_id)
    return int(m["step"].max()) if not m.empty else 0


def _latest(out_dir: Path):
    from craft.methods.training import latest_checkpoint

    return latest_checkpoint(out_dir)


def stage_publish(run: Run, result) -> Path:
    """Copy a finished training run's pipeline to RUN/final, where `craft evaluate`, the
    studio and users look for the tuned model (the main process; the others wait)."""
    from craft.run.fsutil import copy_dir_atomic

    run = as_run(run)
    final = final_dir(run.run_dir)
    if result.status != "done" or result.final_dir is None:
        raise CraftError(f"training run ended {result.status} at step {result.steps_done}; "
                         f"only a finished run is published")
    from craft.run.fsutil import fingerprint

    def publish():
        from craft.stages.model_card import write_card

        name = tuned_label(result.final_dir)
        write_card(result.final_dir, name, extra=card_facts(run.store, name))
        if final.exists() and fingerprint(final) == fingerprint(result.final_dir):
            log.info("%s already holds %s", final, result.final_dir)
        else:
            copy_dir_atomic(result.final_dir, final)

    run.dist.on_main(publish)
    return final


def card_facts(store, name: str) -> dict:
    """What a model card says about training run ``name``'s data beyond its craft_train.json:
    the kept set's coverage, DPO's pair count."""
    row = store.train_run_by_name(name)
    if not row or row.get("selection_id") is None:
        return {}
    sel = store.selection_settings(int(row["selection_id"]))
    return {"n_pairs": sel.get("n_pairs"), "coverage": training_coverage(store, name)}


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


# ------------------------------------------------------------------------ evaluate, export


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
    from craft.run.checkpoints import STATE_FILE, is_checkpoint
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


def stage_export(run: Run, cfg, settings=None, name: str | None = None,
                 kept: pd.DataFrame | None = None) -> tuple[Path, Path]:
    """The kept set as a Hugging Face imagefolder under RUN/exports/NAME (+ a zip); the
    selection is recorded as ``export:NAME``. ``kept`` (rows with composite, advantage and
    weight, e.g. what the studio's Curate tab shows) is exported as given; by default it is
    :func:`training_set` with ``settings``."""
    import time

    from craft.stages.export import export_imagefolder

    run = as_run(run)
    name = name or time.strftime("kept-%Y%m%d-%H%M%S")
    settings = settings or filter_settings(cfg)
    record = selection_record(settings, cfg)

    def export():
        rows = kept
        if rows is None:
            rows = training_set(run.store, cfg, settings, save_as=None)
        out = export_imagefolder(rows, run.run_dir, list(settings.rewards), record, name)
        run.store.save_selection(f"export:{name}", record, rows)
        return out

    return run.dist.on_main(export)


def stage_export_pairs(run: Run, cfg, settings=None, name: str | None = None) -> Path:
    """The DPO pairs ``train.method`` = dpo would train on (dpo.pairs, dpo.margin,
    dpo.max_pairs), in Pick-a-Pic's parquet layout under RUN/exports/NAME, so the pool can feed
    a peer's DPO trainer too (craft.stages.export.export_pairs)."""
    from craft.stages.advantages import filter_with_advantages
    from craft.methods.dpo import build_pairs
    from craft.stages.export import export_pairs

    run = as_run(run)
    settings = settings or filter_settings(cfg)

    def export():
        _, frame = filter_with_advantages(scored_frame(run.store, cfg), settings,
                                          cfg.advantage.eps, run.store.overrides())
        d = cfg.dpo
        pairs = build_pairs(frame, d.pairs, d.margin, d.max_pairs)
        return export_pairs(pairs, frame, run.run_dir, {
            "dpo": dataclasses.asdict(d), "weights": dict(settings.weights),
            "normalization": settings.normalization, "n_pairs": len(pairs)}, name)

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
        if on_stage:
            on_stage(stage)
        t = time.time()
        out = fn()
        timings[stage] = time.time() - t
        return out

    timed("prompts", lambda: stage_prompts(run, cfg, progress_for("prompts")))
    pipe = load_from_config(cfg.model, device=str(run.dist.model_device(cfg.model.device)))
    if cfg.train.method != "grpo":  # online GRPO samples and scores its own images
        timed("generate", lambda: stage_generate(run, cfg, progress_for("generate"),
                                                 should_stop, pipe=pipe))
        device = pipe.device
        if device.type == "cuda":  # the reward models have the GPU to themselves to score
            import torch

            pipe.to("cpu")
            torch.cuda.empty_cache()
        timed("score", lambda: stage_score(run, cfg, progress=progress_for("score"),
                                           should_stop=should_stop))
        pipe.to(device)
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
    kept = run.dist.on_main(lambda: _kept_count(run.store, result.run_id))
    return {"timings": timings, "kept": kept, "train": result, "final": final, "eval": ev}


ROUND_SEED_STRIDE = 1_000  # round r's candidates use generation.seed + stride * (r - 1)


def round_name(name: str, r: int, rounds: int) -> str:
    """Training-run name of round ``r``: NAME itself when there is one round, else NAME.rR."""
    return name if rounds == 1 else f"{name}.r{r}"


def round_number(run_name: str) -> int | None:
    """The online round a training run's name says (NAME.rR -> R), None for a one-round run:
    the inverse of :func:`round_name`."""
    m = _ROUND_RE.fullmatch(run_name)
    return int(m.group(1)) if m else None


_ROUND_RE = re.compile(r".+\.r(\d+)")


def round_config(cfg, r: int, model_path: str | None):
    """The config round ``r`` runs with: the model the previous round tuned (round 1: the base),
    new starting noise for its candidates, and its share of the training steps."""
    t = cfg.train
    steps = t.steps // t.rounds
    c = dataclasses.replace(
        cfg, train=dataclasses.replace(t, steps=steps, rounds=1,
                                       lr_warmup_steps=min(t.lr_warmup_steps, steps)),
        generation=dataclasses.replace(cfg.generation,
                                       seed=cfg.generation.seed + ROUND_SEED_STRIDE * (r - 1)))
    if r > 1:  # a tuned pipeline is a complete diffusers folder
        c = dataclasses.replace(c, model=dataclasses.replace(
            cfg.model, pretrained=str(model_path), revision=None, variant=None,
            single_file_config=None))
    return c


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


def _kept_count(store, run_id: int) -> int | None:
    sid = store.get_train_run(run_id).get("selection_id")
    return None if sid is None else len(store.selection_items_df(int(sid)))


__all__ = ["DEFAULT_RUN_NAME", "STAGES", "STAGE_UNITS", "StageStopped", "TrainPlan",
           "candidate_frame", "card_facts", "check_run_name", "filter_settings", "kept_digest",
           "open_run",
           "prepare_prompts", "random_subset", "require", "run_all", "stage_evaluate",
           "stage_export", "stage_filter", "stage_generate", "stage_prompts", "stage_publish",
           "stage_rounds", "stage_score", "stage_train", "stage_tune", "train_dir",
           "training_set", "round_number", "record_evaluation",
           "tuned_label", "round_config", "round_name"]
