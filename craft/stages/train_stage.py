"""The train stage: one training run of a run's selection into RUN/train/NAME, online rounds
(train.rounds), and publishing a finished run as RUN/final.

The main process plans the run (:func:`plan_training`: a new run selects its data through
craft.stages.selection.select, a resumed one reads back the very selection it recorded), every
process checks it holds the same data (a digest), and the method (craft/methods/) trains it.
Nothing here depends on which method it is beyond what the method says of itself.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import re
from pathlib import Path
from typing import Callable

import pandas as pd

from craft import CraftError
from craft.methods.base import Selection
from craft.methods.registry import get_method
from craft.run.handle import Run, as_run
from craft.run.layout import final_dir, train_dir
from craft.stages.common import (DEFAULT_RUN_NAME, ProgressFn, StopFn, check_run_name,
                                 require)
from craft.stages.evaluate_stage import card_facts, training_coverage, tuned_label
from craft.stages.selection import (candidate_frame, kept_digest, localize, portable, select,
                                    training_prompts)

log = logging.getLogger(__name__)

TRAIN_LOCK = "train.lock"
ROUND_SEED_STRIDE = 1_000  # round r's candidates use generation.seed + stride * (r - 1)
_ROUND_RE = re.compile(r".+\.r(\d+)")


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


def plan_training(run: Run, cfg, name: str, resume: bool | None, settings) -> TrainPlan:
    """What the main process decides for a training stage: train anew (select the data now),
    resume (the recorded data and config), or skip a finished run."""
    from craft.run.config import config_to_dict

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
        sel = select(store, cfg, settings)
        if sel.rows.empty:
            raise CraftError(f"nothing to train on: {get_method(cfg.train.method).name} selected "
                             f"no rows with these settings; loosen the filter (Curate in the "
                             f"studio, or filter.level / filter.top_k)")
        return TrainPlan("train", False, None, config_to_dict(cfg),
                         portable(sel.rows, run.run_dir), sel.record, sel.pair_ids)
    if rec["status"] == "done":
        return _finished(run, name, rec, resume)
    if resume is False:
        raise CraftError(f"a training run named {name!r} exists ({rec['status']}); resume it "
                         f"or pick another name")
    return _resumed(run, name, rec)


def _finished(run: Run, name: str, rec: dict, resume: bool | None) -> TrainPlan:
    from craft.models.lora import is_lora_folder

    out_dir = train_dir(run.run_dir, name)
    if resume is False:
        raise CraftError(f"a training run named {name!r} exists and is finished; pick "
                         f"another name")
    final = final_dir(out_dir)
    if not ((final / "model_index.json").exists() or is_lora_folder(final)):
        raise CraftError(f"training run {name!r} is recorded as finished but {final} is "
                         f"missing; pick another name, or delete {out_dir} and its record to "
                         f"train it again")
    log.info("training run %r is finished (%s); not training it again", name, out_dir)
    return TrainPlan("skip", False, rec["id"], {}, None, None)


def _resumed(run: Run, name: str, rec: dict) -> TrainPlan:
    """An unfinished run continues on the data it recorded when it started."""
    from craft.run.config import config_from_dict

    store = run.store
    config = json.loads(rec["config_json"])
    cfg_then = config_from_dict(config, f"training run {name}")
    if rec.get("selection_id") is None:  # recorded before selections were linked
        sel = select(store, cfg_then)
        return TrainPlan("train", True, rec["id"], config, portable(sel.rows, run.run_dir),
                         sel.record, sel.pair_ids)
    recorded = store.selection_settings(int(rec["selection_id"]))
    if get_method(cfg_then.train.method).online:
        rows = training_prompts(store)
        rows = rows[rows["prompt_id"].isin(recorded["prompt_ids"])]
        if len(rows) != len(recorded["prompt_ids"]):
            raise CraftError(f"training run {name!r} sampled from {len(recorded['prompt_ids'])}"
                             f" prompts, some of which are gone from the store; train under a "
                             f"new name")
        return TrainPlan("train", True, rec["id"], config, rows, recorded)
    items = store.selection_items_df(int(rec["selection_id"]))
    frame = candidate_frame(store, cfg_then).drop(
        columns=["composite", "advantage", "weight"], errors="ignore")
    kept = frame.merge(items, on="candidate_id", how="inner")
    if len(kept) != len(items):
        raise CraftError(f"training run {name!r} trained on {len(items)} candidates, of which "
                         f"{len(items) - len(kept)} are gone from the store; it cannot be "
                         f"resumed on the same data: train under a new name")
    kept = kept.sort_values(["composite", "candidate_id"], ascending=[False, True])
    return TrainPlan("train", True, rec["id"], config, portable(kept, run.run_dir), recorded,
                     recorded.get("pairs"))


def stage_train(run: Run, cfg, name: str = DEFAULT_RUN_NAME, *, settings=None,
                resume: bool | None = None, progress: ProgressFn | None = None,
                should_stop: StopFn | None = None, callbacks=None, pipe=None):
    """Train ``train.method`` on its selection into RUN/train/NAME.

    ``resume``: None (``craft run``) continues an unfinished run of this name from its last
    checkpoint, starts a new one otherwise, and does not train a finished one again; True
    requires an unfinished run; False requires a new name. A resumed run trains on the very
    selection it recorded when it started, with the config it started with. Every process
    returns the :class:`craft.methods.training.TrainResult` (``run_id`` set).
    """
    from craft.methods.training import TrainResult

    run = as_run(run)
    dist = run.dist
    name = check_run_name(name)
    out_dir = train_dir(run.run_dir, name)
    cfg = _checked(cfg, pipe, dist.world)
    plan: TrainPlan = dist.on_main(lambda: plan_training(run, cfg, name, resume, settings))
    if plan.action == "skip":
        steps = dist.on_main(lambda: _steps_done(run.store, plan.run_id))
        return TrainResult(plan.run_id, "done", steps, out_dir, final_dir(out_dir),
                           _latest(out_dir))
    cfg = _checked(cfg, pipe, dist.world, plan.config)
    method = get_method(cfg.train.method)
    rows = localize(plan.kept, run.run_dir)
    digest = kept_digest(rows, plan.pairs)
    run_id = dist.on_main(_recorder(run, plan, name, rows, digest, dist.gather(digest)))
    log.info("training %s (%s) on %d %s%s; output %s", name, method.name, len(rows),
             "prompts" if method.online else "images", " (resumed)" if plan.resume else "",
             out_dir)
    selection = Selection(method.name, rows, plan.settings or {}, pairs=None if plan.pairs is None
                          else pd.DataFrame(plan.pairs, columns=["win_id", "lose_id"]))
    hooks = {"on_round": _round_keeper(run, cfg, name, rows)} if method.online else None
    lock = _hold_lock(out_dir) if run.is_main else None
    try:
        result = method.train(cfg, selection, out_dir, resume=plan.resume, pipe=pipe,
                              meta={"run_name": name, "kept_digest": digest}, hooks=hooks,
                              callbacks=_stage_callbacks(run, run_id, callbacks, progress,
                                                         should_stop))
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


def _checked(cfg, pipe, processes: int, config: dict | None = None):
    """The preflight of a training run; with ``config`` (what the main process planned) the
    config it trains with, checked again when it differs (a resumed run's)."""
    from craft.run.config import config_from_dict, config_to_dict

    if config is not None:
        if config == config_to_dict(cfg):
            return cfg
        cfg = config_from_dict(config, "the training run's recorded config")
    require(cfg, model=pipe is None, train=True, processes=processes,
            rewards=get_method(cfg.train.method).online_rewards(cfg))
    return cfg


def _recorder(run: Run, plan: TrainPlan, name: str, rows: pd.DataFrame, digest: str,
              digests: list) -> Callable[[], int]:
    """The main process's record of the run and its selection (checked equal everywhere)."""
    out_dir = train_dir(run.run_dir, name)

    def record() -> int:
        if len(set(digests)) != 1:
            raise CraftError(f"the processes hold different kept sets ({digests}); this is a "
                             f"bug in the selection broadcast")
        settings_rec = {**(plan.settings or {}), "kept_digest": digest,
                        "digest_by_process": digests, "processes": run.dist.world}
        if plan.resume:
            run.store.update_train_run(plan.run_id, status="running")
            return plan.run_id
        sid = run.store.save_selection(f"train:{name}", settings_rec,
                                       [] if "candidate_id" not in rows else rows)
        return run.store.create_train_run(name, plan.config, checkpoint_dir=str(out_dir),
                                          selection_id=sid)

    return record


def _stage_callbacks(run: Run, run_id: int, callbacks, progress, should_stop):
    """The loop's callbacks: metrics into the store and the caller's progress, checkpoints
    recorded, a stop asked on any process honoured by all."""
    from craft.methods.training import TrainCallbacks

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
        return run.dist.any(asked)

    return TrainCallbacks(on_step=on_step, on_preview=user.on_preview,
                          on_checkpoint=on_checkpoint, should_stop=stop)


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


def sampled_model_key(name: str) -> str:
    """The store's model key of the images an online training run sampled (apart from the
    pool, which is keyed by the base model)."""
    from craft.run.store import SAMPLED_PREFIX

    return f"{SAMPLED_PREFIX}{name}"


def _round_keeper(run: Run, cfg, name: str, prompts: pd.DataFrame):
    """GRPO's on_round: every process writes its samples' images, the main process records
    them (skipping those a killed run already stored) with their rewards, so the studio shows
    what online RL looked at."""
    from craft.run.store import NewCandidate, write_candidate_images, writing_images

    every = cfg.grpo.store_every
    model = sampled_model_key(name)
    pid = prompts["prompt_id"].to_numpy()
    originals = run.dist.on_main(lambda: {
        int(r.prompt_id): int(r.id) for r in run.store.variants_df("train").itertuples()
        if r.idx == 0})

    def on_round(r, rows, seeds, images, scores):
        if not every or r % every:
            return
        items = [NewCandidate(int(pid[i]), originals[int(pid[i])], int(sd), model,
                              {"round": int(r), "sampler": cfg.train.method}, im)
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


def round_name(name: str, r: int, rounds: int) -> str:
    """Training-run name of round ``r``: NAME itself when there is one round, else NAME.rR."""
    return name if rounds == 1 else f"{name}.r{r}"


def round_number(run_name: str) -> int | None:
    """The online round a training run's name says (NAME.rR -> R), None for a one-round run:
    the inverse of :func:`round_name`."""
    m = _ROUND_RE.fullmatch(run_name)
    return int(m.group(1)) if m else None


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


def kept_count(store, run_id: int) -> int | None:
    sid = store.get_train_run(run_id).get("selection_id")
    return None if sid is None else len(store.selection_items_df(int(sid)))


__all__ = ["ROUND_SEED_STRIDE", "TRAIN_LOCK", "TrainPlan", "kept_count", "plan_training",
           "round_config", "round_name", "round_number", "sampled_model_key", "stage_publish",
           "stage_train"]
