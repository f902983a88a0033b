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

from craft import CraftError

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 7_777  # evaluation seeds never coincide with candidate-generation seeds


@dataclasses.dataclass
class EvalResult:
    name: str
    models: list[str]  # first is the reference ("base")
    scores: pd.DataFrame  # one row per (model, prompt, seed): rewards, composite, image_path
    summary: pd.DataFrame  # one row per (model, reward): mean, se, diff vs base, se, win rate
    grid_path: Path | None
    evaluation_id: int | None = None

    def table(self) -> str:
        return format_table(self.summary)


def eval_plan(store, cfg) -> list[tuple[str, int]]:
    from craft.generation import candidate_seed

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
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def evaluate(cfg, store, models: Mapping[str, str], name: str = "eval",
             out_dir: str | Path | None = None, pipes: Mapping[str, object] | None = None,
             progress: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> EvalResult:
    """Evaluate ``models`` (label -> pipeline path; the first is the reference) on the run's
    held-out prompts with shared seeds, store the result and return it.

    Images are written under ``out_dir`` (default RUN/eval/NAME/LABEL/) so they can be shown
    side by side; a rerun reuses images already there.
    """
    from craft.generation import SamplingParams, apply_scheduler, generate_images
    from craft.models import MissingWeightsError, check_model, load_from_config
    from craft.rewards import load_reward

    if len(models) < 2:
        raise CraftError(f"evaluate needs a reference and at least one model to compare, got "
                         f"{list(models)}")
    plan = eval_plan(store, cfg)
    out = Path(out_dir) if out_dir else Path(store.run_dir) / "eval" / name
    e = cfg.eval
    params = SamplingParams(num_inference_steps=e.num_inference_steps,
                            guidance_scale=e.guidance_scale)
    labels = list(models)
    # Fail before any work when a model that still has images to make is not on disk.
    for label in labels:
        if (pipes or {}).get(label) is None and not all(
                (out / label / f"{i:05d}.png").exists() for i in range(len(plan))):
            try:
                check_model(cfg.model, pretrained=str(models[label]))
            except MissingWeightsError as e:
                raise MissingWeightsError(f"evaluate: model {label!r} ({models[label]}) is not "
                                          f"on this machine: {e}") from None
    total = len(plan) * len(labels)
    frames = []
    done = 0
    for label in labels:
        mdir = out / label
        mdir.mkdir(parents=True, exist_ok=True)
        paths = [mdir / f"{i:05d}.png" for i in range(len(plan))]
        missing = [i for i, p in enumerate(paths) if not p.exists()]
        if missing:
            pipe = (pipes or {}).get(label)
            if pipe is None:
                pipe = load_from_config(cfg.model, pretrained=str(models[label]))
            apply_scheduler(pipe, cfg.generation.scheduler)  # every model: the same sampler
            for sl, images in generate_images(pipe, [plan[i][0] for i in missing],
                                              [plan[i][1] for i in missing], params,
                                              e.batch_size, should_stop=should_stop):
                for i, im in zip(missing[sl], images):
                    tmp = paths[i].with_suffix(".tmp.png")
                    im.save(tmp)
                    tmp.replace(paths[i])
                done += len(images)
                if progress:
                    progress(done, total)
            if should_stop is not None and should_stop():
                raise CraftError("evaluation cancelled")
        else:
            done += len(plan)
        frames.append(pd.DataFrame({"model": label, "prompt": [p for p, _ in plan],
                                    "seed": [s for _, s in plan],
                                    "image_path": [str(p) for p in paths]}))
    scores = pd.concat(frames, ignore_index=True)
    rewards = list(cfg.rewards.eval_names)
    images = [Image.open(p).convert("RGB") for p in scores["image_path"]]
    for r in rewards:
        fn = load_reward(r, device=cfg.rewards.device, batch_size=cfg.rewards.batch_size,
                         path=cfg.rewards.paths.get(r))
        scores[r] = fn(images, scores["prompt"].tolist())
    from craft.filtering import normalize

    weights = {k: v for k, v in cfg.filter.weights.items() if k in scores}
    total_w = sum(weights.values()) or 1.0
    z = normalize(scores, list(weights), "zscore")  # one scale over all models' images
    scores["composite"] = sum((w / total_w) * z[r].to_numpy() for r, w in weights.items()) \
        if weights else 0.0
    summary = summarize(scores, labels, ["composite", *rewards])
    grid = side_by_side(scores, labels, out / "side_by_side.png")
    result = EvalResult(name, labels, scores, summary, grid)
    result.evaluation_id = store.add_evaluation(
        name, models[labels[0]], json.dumps({k: models[k] for k in labels[1:]}),
        {"prompts": len(set(scores.prompt)), "seeds_per_prompt": e.seeds_per_prompt,
         "steps": e.num_inference_steps, "guidance": e.guidance_scale, "models": dict(models)},
        {"summary": summary.to_dict(orient="records"),
         "scores_csv": str(out / "scores.csv"), "grid": str(grid)})
    scores.to_csv(out / "scores.csv", index=False)
    return result
