"""Base vs tuned on held-out prompts: same prompts, same seeds, every evaluation reward.

Shared seeds make each (prompt, seed) a *pair*: the tuned model's image is compared with the
base model's image from the same starting noise, so the paired difference and the paired win
rate measure the fine-tune, not the luck of the draw. The composite is computed on one z-score
scale over the pooled images of all evaluated models (so the models are comparable) with the
filter's weights. Rewards not used for training (e.g. ``toy_heldout``, ImageReward) are the
honest signal that the model is not just hacking its training rewards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from craft import CraftError, StageStopped

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 7_777
SUMMARY_COLUMNS = ("model", "reward", "n", "mean", "se", "diff", "diff_se", "win_rate")  # evaluation seeds never coincide with candidate-generation seeds


@dataclasses.dataclass
class EvalResult:
    name: str
    models: list[str]  # first is the reference ("base")
    scores: pd.DataFrame  # one row per (model, prompt, seed): rewards, composite, image_path
    summary: pd.DataFrame  # one row per (model, reward): mean, se, diff vs base, se, win rate
    grid_path: Path | None
    evaluation_id: int | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)  # drift (reward hacking)
    coverage: dict | None = None  # of the tuned model's kept set, when known
    diversity_metric: str = ""  # what the "diversity" rows measure, in words

    def table(self) -> str:
        text = format_table(self.summary)
        if self.diversity_metric and (self.summary["reward"] == "diversity").any():
            text += (f"\ndiversity = {self.diversity_metric} across the seeds of each prompt, "
                     f"mean over prompts; its win% = share of prompts more diverse than "
                     f"{self.models[0]}")
        if self.coverage:
            c = self.coverage
            text += (f"\nkept set of {c.get('training_run', 'the tuned model')}: {c['kept']} "
                     f"images from {c['prompts']} prompts, at most {c['largest']} from one "
                     f"({100 * c['largest_share']:.0f} %)")
        return text + "".join(f"\nWARNING: {w}" for w in self.warnings)


def eval_plan(store, cfg) -> list[tuple[str, int]]:
    from craft.stages.generation import candidate_seed

    prompts = store.prompts_df("eval")["text"].tolist()
    if cfg.eval.num_prompts:
        prompts = prompts[: cfg.eval.num_prompts]
    if not prompts:
        raise CraftError("this run has no evaluation prompts; run `craft prompts` (it loads "
                         "prompts.eval_source) first")
    return [(p, candidate_seed(cfg.generation.seed + EVAL_SEED_OFFSET, p, s))
            for p in prompts for s in range(cfg.eval.seeds_per_prompt)]


def _paired(diff: np.ndarray) -> tuple[float, float]:
    diff = diff[np.isfinite(diff)]
    if len(diff) < 2:
        return float("nan"), float("nan")
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def summarize(scores: pd.DataFrame, models: list[str], rewards: list[str]) -> pd.DataFrame:
    """Mean ± SE per model and reward, and for every model after the first: the paired
    difference from the first model and the paired win rate (ties count one half)."""
    rows = []
    base = scores[scores["model"] == models[0]].sort_values(["prompt", "seed"])
    for m in models:
        sub = scores[scores["model"] == m].sort_values(["prompt", "seed"])
        for r in rewards:
            x = sub[r].to_numpy(float)
            fin = x[np.isfinite(x)]
            row = {"model": m, "reward": r, "n": len(fin), "mean": fin.mean() if len(fin) else
                   np.nan, "se": fin.std(ddof=1) / np.sqrt(len(fin)) if len(fin) > 1 else np.nan}
            if m != models[0]:
                b = base[r].to_numpy(float)
                d = x - b
                row["diff"], row["diff_se"] = _paired(d)
                ok = np.isfinite(d)
                row["win_rate"] = float(((d[ok] > 0) + 0.5 * (d[ok] == 0)).mean()) if ok.any() \
                    else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def drift_warnings(summary: pd.DataFrame, models: list[str], train_rewards: list[str],
                   watched: list[str], n_se: float = 2.0) -> list[str]:
    """The signs of reward hacking, per tuned model: a watched measure (a held-out reward, the
    diversity) falls by more than ``n_se`` paired standard errors while at least one training
    reward rises by more than ``n_se``. Rising rewards alone are the goal; a falling held-out
    signal alone is plain harm; both together are what hacking looks like."""
    out = []
    for m in models[1:]:
        rows = summary[summary["model"] == m].set_index("reward")

        def z(r):
            if r not in rows.index:
                return np.nan
            d, se = rows.at[r, "diff"], rows.at[r, "diff_se"]
            return d / se if np.isfinite(d) and np.isfinite(se) and se > 0 else np.nan

        rising = [r for r in train_rewards if z(r) > n_se]
        if not rising:
            continue
        for r in watched:
            if z(r) < -n_se:
                d, se = rows.at[r, "diff"], rows.at[r, "diff_se"]
                up = ", ".join(f"{t} {rows.at[t, 'diff']:+.3g}" for t in rising)
                out.append(f"{m}: {r} fell by {-d:.3g} ± {se:.2g} ({-d / se:.1f} SE) against "
                           f"{models[0]} while the training rewards rose ({up}); a sign of "
                           f"reward hacking: look at the images, consider filter.per_prompt_cap, "
                           f"filter.dedup_threshold, train.anchor_weight or fewer train.steps")
    return out


def format_table(summary: pd.DataFrame) -> str:
    """A plain-text table: rewards as rows, each model's mean ± SE, and for each non-reference
    model its paired difference ± SE and win rate."""
    models = list(dict.fromkeys(summary["model"]))
    rewards = list(dict.fromkeys(summary["reward"]))
    head = ["reward"] + [f"{m} mean±se" for m in models] + [
        h for m in models[1:] for h in (f"{m}−{models[0]} (±se)", f"{m} win%")]
    lines = [head]
    for r in rewards:
        row = [r]
        for m in models:
            s = summary[(summary.model == m) & (summary.reward == r)].iloc[0]
            row.append(f"{s['mean']:.4f}±{s['se']:.4f}")
        for m in models[1:]:
            s = summary[(summary.model == m) & (summary.reward == r)].iloc[0]
            row += [f"{s['diff']:+.4f}±{s['diff_se']:.4f}", f"{100 * s['win_rate']:.1f}"]
        lines.append(row)
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines[1:]])


def side_by_side(scores: pd.DataFrame, models: list[str], path: Path, rows: int = 8,
                 cols: int = 4, cell: int = 96) -> Path:
    """A PNG: each row one prompt, each model a block of ``cols`` seeds (same seeds per block)."""
    prompts = list(dict.fromkeys(scores["prompt"]))[:rows]
    label_w, gap, top = 300, 12, 20
    W = label_w + len(models) * (cols * cell + gap)
    H = top + len(prompts) * (cell + 4)
    sheet = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(sheet)
    for j, m in enumerate(models):
        d.text((label_w + j * (cols * cell + gap), 4), m, fill="black")
    for i, p in enumerate(prompts):
        y = top + i * (cell + 4)
        d.text((4, y + cell // 2 - 6), p, fill="black")
        for j, m in enumerate(models):
            sub = scores[(scores.model == m) & (scores.prompt == p)].sort_values("seed")
            for k, ip in enumerate(sub["image_path"].tolist()[:cols]):
                im = Image.open(ip).convert("RGB").resize((cell, cell), Image.NEAREST)
                sheet.paste(im, (label_w + j * (cols * cell + gap) + k * cell, y))
    from craft.run.fsutil import save_image_atomic

    return save_image_atomic(sheet, path)


def _off_gpu(pipe, given: bool, moved: list) -> None:
    """After a model's images: a pipeline the caller passed in (run_all's base) leaves the GPU,
    so one pipeline is there at a time (the plan counts one); it comes back at the end. (On a
    CPU it stays where it is; a memory meter watching the run is told it left.)"""
    from craft.run.watch import left_device

    if given and pipe.device.type == "cuda":
        import torch

        moved.append((pipe, pipe.device))
        pipe.to("cpu")
        torch.cuda.empty_cache()
    elif given:
        moved.append((pipe, pipe.device))
    if given:
        left_device(pipe)


def load_for_eval(cfg, path: str, device: str | None = None):
    """A model to evaluate: a complete diffusers pipeline, a single-file checkpoint, a LoRA
    run's adapters (final/: loaded into their base and fused), or an intermediate training
    checkpoint (``checkpoint-N`` holds the denoiser, a UNet or a transformer, or the adapters),
    which is evaluated inside the base pipeline exactly as training saw it (revision, variant,
    single-file config, memory options)."""
    from craft.models.checkpoints import checkpoint_denoiser, is_checkpoint
    from craft.models.lora import LORA_WEIGHTS, apply_lora, is_lora_folder
    from craft.models.loading import load_from_config
    from craft.models.families import denoiser, set_denoiser

    p = Path(path)
    if p.is_dir() and not (p / "model_index.json").exists() and not is_lora_folder(p) \
            or p.is_dir() and (p / "state.pt").exists():
        if not is_checkpoint(p):
            raise CraftError(f"{path} is neither a diffusers pipeline nor a training checkpoint "
                             f"with a unet/ or transformer/ folder or {LORA_WEIGHTS}; pass a "
                             f"pipeline folder, RUN/final, or RUN/train/NAME/checkpoint-N")
        pipe = load_from_config(cfg.model, device=device)
        folder = checkpoint_denoiser(p)
        if folder is None:
            return apply_lora(pipe, p)
        base = denoiser(pipe)
        tuned = type(base).from_pretrained(str(folder))
        set_denoiser(pipe, tuned.to(pipe.device, base.dtype))
        return pipe
    return load_from_config(cfg.model, pretrained=str(path), device=device)


def _check_loadable(cfg, label: str, path: str) -> None:
    from craft import MissingWeightsError
    from craft.models.loading import check_model

    from craft.models.checkpoints import checkpoint_denoiser

    p = Path(path)
    if p.is_dir() and not (p / "model_index.json").exists() and checkpoint_denoiser(p):
        path = cfg.model.pretrained  # a denoiser checkpoint: the base pipeline must be there
    # (adapters, a LoRA run's final/ or checkpoint: check_model checks the base they name)
    try:
        check_model(cfg.model, pretrained=str(path))
    except MissingWeightsError as e:
        raise MissingWeightsError(f"evaluate: model {label!r} ({path}) is not on this machine: "
                                  f"{e}") from None


def evaluation_key(cfg, models: Mapping[str, str]) -> str:
    """Equal keys mean an evaluation would repeat itself exactly: same models (and weights),
    prompts, seeds, sampler, rewards and composite weights."""
    import hashlib

    from craft.run.fsutil import fingerprint

    e = cfg.eval
    text = json.dumps([{k: [v, fingerprint(v)] for k, v in models.items()},
                       e.num_prompts, e.seeds_per_prompt, e.num_inference_steps,
                       e.guidance_scale, cfg.generation.seed, cfg.generation.scheduler,
                       list(cfg.rewards.eval_names), dict(cfg.filter.weights),
                       e.diversity_encoder, e.diversity_model], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def stored_evaluation(store, evaluation_id: int) -> EvalResult:
    """An evaluation record (and its scores.csv) as an :class:`EvalResult`."""
    ev = store.evaluations_df()
    row = ev[ev["id"] == evaluation_id]
    if row.empty:
        raise CraftError(f"no evaluation #{evaluation_id} in {store.run_dir}")
    row = row.iloc[0]
    settings, results = json.loads(row["settings_json"]), json.loads(row["results_json"])
    summary = pd.DataFrame(results["summary"])  # stored with sorted keys: the usual order
    summary = summary[[c for c in SUMMARY_COLUMNS if c in summary]]
    scores_csv = Path(results["scores_csv"])
    scores = pd.read_csv(scores_csv) if scores_csv.exists() else pd.DataFrame()
    labels = list(settings.get("models", {})) or list(dict.fromkeys(summary["model"]))
    return EvalResult(row["name"], labels, scores, summary, Path(results["grid"]),
                      int(row["id"]), warnings=list(results.get("warnings", [])),
                      diversity_metric=results.get("diversity_metric", ""),
                      coverage=results.get("coverage") or None)


def _find_evaluation(store, name: str, key: str) -> int | None:
    ev = store.evaluations_df()
    for r in list(ev[ev["name"] == name].itertuples())[::-1]:
        if json.loads(r.settings_json).get("key") == key:
            return int(r.id)
    return None


MODEL_STAMP = ".model.json"


def _own_images(folder: Path, model: str) -> None:
    """Images in RUN/eval/NAME/LABEL are reused only if the same model made them: a label whose
    model changed (retrained under the same name, another path) has its images deleted first,
    and the folder is stamped with the model and its fingerprint."""
    from craft.run.fsutil import fingerprint, write_text_atomic

    want = {"model": str(model), "fingerprint": fingerprint(model)}
    stamp = folder / MODEL_STAMP
    try:
        have = json.loads(stamp.read_text())
    except (OSError, ValueError):
        have = None
    if have == want:
        return
    if folder.is_dir():
        stale = sorted(folder.glob("*.png"))
        if stale:
            log.info("evaluation images in %s were made by another model (%s); making them "
                     "again", folder, (have or {}).get("model", "unknown"))
        for p in stale:
            p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stamp, json.dumps(want))


def evaluate(run, cfg, models: Mapping[str, str], name: str = "eval",
             out_dir: str | Path | None = None, pipes: Mapping[str, object] | None = None,
             progress: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None, reuse: bool = True,
             coverage: Mapping | None = None) -> EvalResult:
    """Evaluate ``models`` (label -> pipeline path; the first is the reference) on the run's
    held-out prompts with shared seeds, store the result and return it (on every process).

    ``run`` is a :class:`craft.run.handle.Run` (or, in a single process, a RunStore). Images are
    written under ``out_dir`` (default RUN/eval/NAME/LABEL/) so they can be shown side by side;
    a rerun reuses images already there. Under several processes each generates and scores its
    share of the images; the main process merges the scores before any statistic. With
    ``reuse``, an earlier evaluation of the same name and :func:`evaluation_key` is returned
    instead of being repeated (a rerun of ``craft run`` adds no second record). ``coverage``
    (the tuned model's kept set: prompts, largest share) is stored with the record.
    """
    from craft.stages.generation import SamplingParams
    from craft.run.handle import as_run

    run = as_run(run)
    dist = run.dist
    if len(models) < 2:
        raise CraftError(f"evaluate needs a reference and at least one model to compare, got "
                         f"{list(models)}")
    key = evaluation_key(cfg, models)
    if reuse:
        found = dist.on_main(lambda: _find_evaluation(run.store, name, key))
        if found is not None:
            log.info("evaluation %r: reusing record #%d (same models, prompts and settings)",
                     name, found)
            return dist.on_main(lambda: stored_evaluation(run.store, found))
    plan = dist.broadcast(eval_plan(run.store, cfg) if run.is_main else None)
    out = Path(out_dir) if out_dir else run.run_dir / "eval" / name
    e = cfg.eval
    params = SamplingParams(num_inference_steps=e.num_inference_steps,
                            guidance_scale=e.guidance_scale)
    labels = list(models)
    paths = {label: [out / label / f"{i:05d}.png" for i in range(len(plan))] for label in labels}
    todo = _images_todo(run, models, out, paths)
    # Fail before any work when a model that still has images to make is not on disk.
    from craft.stages.diversity import check_encoder

    check_encoder(cfg)
    for label in labels:
        if todo[label] and (pipes or {}).get(label) is None:
            _check_loadable(cfg, label, str(models[label]))
    moved = _make_images(run, cfg, models, plan, paths, todo, params, pipes, progress,
                         should_stop)
    dist.barrier()  # every image exists before anyone scores
    mine, rewards, values = _score_images(run, cfg, plan, paths)
    from craft.run.watch import back_on_device

    for p, dev in moved:  # the caller's pipelines back where they were
        p.to(dev)
        back_on_device(p)
    gathered = dist.gather((mine, values))
    result = None
    if run.is_main:
        result = _summarize_and_store(run.store, cfg, name, models, labels, plan, paths, out,
                                      rewards, gathered, key, coverage)
    return dist.broadcast(result)


def _images_todo(run, models: Mapping[str, str], out: Path,
                 paths: dict[str, list[Path]]) -> dict[str, list[int]]:
    """Which images each model still has to make (label -> plan indices), on every process:
    the images already there are reused (a rerun, or a cancelled run)."""
    todo = None
    if run.is_main:
        for label in models:
            _own_images(out / label, models[label])
        todo = {label: [i for i, p in enumerate(paths[label]) if not p.exists()]
                for label in models}
    return run.dist.broadcast(todo)


def _make_images(run, cfg, models: Mapping[str, str], plan, paths: dict[str, list[Path]],
                 todo: dict[str, list[int]], params, pipes: Mapping[str, object] | None,
                 progress: Callable[[int, int], None] | None,
                 should_stop: Callable[[], bool] | None) -> list:
    """Each model's missing images (``todo``), model after model, the processes sharing them in
    rounds; returns the pipelines passed in that were moved off the GPU after their images, as
    (pipeline, device) to move back."""
    from craft.run.fsutil import save_image_atomic
    from craft.stages.generation import apply_scheduler, generate_images

    dist, e = run.dist, cfg.eval
    device = str(dist.model_device(cfg.model.device))
    total, done = len(plan) * len(models), 0
    moved: list = []  # pipelines passed in, moved off the GPU after their images
    for label in models:
        missing = todo[label]
        done += len(plan) - len(missing)
        if not missing:
            continue
        pipe = (pipes or {}).get(label) or load_for_eval(cfg, str(models[label]), device)
        apply_scheduler(pipe, cfg.generation.scheduler)  # every model: the same sampler
        if run.is_main and progress:
            progress(done, total)

        def work(chunk, pipe=pipe, label=label):
            images = [im for _, b in generate_images(pipe, [plan[i][0] for i in chunk],
                                                     [plan[i][1] for i in chunk], params,
                                                     e.batch_size) for im in b]
            for i, im in zip(chunk, images):
                save_image_atomic(im, paths[label][i], fsync=False)
            return [len(images)]

        def commit(counts):
            nonlocal done
            done += sum(counts)
            if progress:
                progress(done, total)

        if dist.in_rounds(missing, e.batch_size, work, commit, should_stop):
            raise StageStopped("evaluation stopped on request; the images made so far are "
                               "kept and running it again continues from them")
        _off_gpu(pipe, given=(pipes or {}).get(label) is pipe, moved=moved)
        del pipe
    return moved


def _score_images(run, cfg, plan, paths: dict[str, list[Path]]) -> tuple[list, list, dict]:
    """This process's share of the images scored by every evaluation reward, one reward model
    on the device at a time: (its (label, index) rows, the reward names, name -> values)."""
    from craft.rewards.configured import build_reward

    dist = run.dist
    rows = [(label, i) for label in paths for i in range(len(plan))]
    mine = rows[dist.rank::dist.world]
    rewards = list(cfg.rewards.eval_names)
    images = [Image.open(paths[label][i]).convert("RGB") for label, i in mine]
    prompts = [plan[i][0] for _, i in mine]
    values = {}
    rdevice = str(dist.model_device(cfg.rewards.device, key="rewards.device"))
    for r in rewards:
        fn = build_reward(cfg, r, device=rdevice)
        values[r] = [float(v) for v in fn(images, prompts)] if images else []
        del fn  # one reward model on the device at a time
    return mine, rewards, values


def _summarize_and_store(store, cfg, name, models, labels, plan, paths, out, rewards,
                         gathered, key: str, coverage=None) -> EvalResult:
    """The main process: merge every process's scores, then composite, statistics, grid, and
    the evaluation record."""
    from craft.stages import diversity
    from craft.run.devices import resolve_device
    from craft.stages.filtering import normalize

    by_key: dict[tuple[str, int], dict[str, float]] = {}
    for rows, values in gathered:
        for k, row in enumerate(rows):
            by_key[tuple(row)] = {r: values[r][k] for r in rewards}
    frame = [{"model": label, "prompt": plan[i][0], "seed": plan[i][1],
              "image_path": str(paths[label][i]), **by_key[(label, i)]}
             for label in labels for i in range(len(plan))]
    scores = pd.DataFrame(frame)
    e = cfg.eval
    weights = {k: v for k, v in cfg.filter.weights.items() if k in scores}
    total_w = sum(weights.values()) or 1.0
    z = normalize(scores, list(weights), "zscore")  # one scale over all models' images
    scores["composite"] = sum((w / total_w) * z[r].to_numpy() for r, w in weights.items()) \
        if weights else 0.0
    summary = summarize(scores, labels, ["composite", *rewards])
    metric = ""
    made = diversity.make_embedder(cfg, str(resolve_device(cfg.rewards.device,
                                                              key="rewards.device")))
    if made is not None:
        embed, kind = made
        vectors = embed([Image.open(p) for p in scores["image_path"]])
        div = diversity.per_prompt(scores, vectors, kind)
        summary = pd.concat([summary, pd.DataFrame(diversity.summarize(div, labels))],
                            ignore_index=True)
        metric = diversity.describe(cfg)
    heldout = [r for r in rewards if r not in cfg.rewards.names]
    warnings = drift_warnings(summary, labels, list(cfg.rewards.names),
                              heldout + ([diversity.METRIC_NAME] if metric else []),
                              e.drift_se)
    for w in warnings:
        log.warning("evaluation %r: %s", name, w)
    grid = side_by_side(scores, labels, out / "side_by_side.png")
    result = EvalResult(name, labels, scores, summary, grid, warnings=warnings,
                        diversity_metric=metric, coverage=dict(coverage) if coverage else None)
    result.evaluation_id = store.add_evaluation(
        name, models[labels[0]], json.dumps({k: models[k] for k in labels[1:]}),
        {"prompts": len(set(scores.prompt)), "seeds_per_prompt": e.seeds_per_prompt,
         "steps": e.num_inference_steps, "guidance": e.guidance_scale, "models": dict(models),
         "key": key},
        {"summary": summary.to_dict(orient="records"),
         "scores_csv": str(out / "scores.csv"), "grid": str(grid), "warnings": warnings,
         "diversity_metric": metric, "coverage": coverage or {}})
    scores.to_csv(out / "scores.csv", index=False)
    return result
