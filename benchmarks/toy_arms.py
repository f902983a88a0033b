"""Shared harness of the toy benchmarks that compare training *arms* on one candidate pool.

An arm is a name and a list of ``--set`` overrides of the benchmark's config (a filter level,
a K, an advantage mode, a control and its strength). Every arm goes through the library's own
stages (craft.stages.engine: the same filter, the same training loop, the same evaluation as
``craft run``), into RUN/train/ARM of one run directory, so:

- an interrupted benchmark resumes: a finished arm is not trained again, an unfinished one
  continues from its last checkpoint, evaluation images already made are reused;
- all arms are evaluated together, in one evaluation with shared seeds, so every difference is
  paired (same prompt, same starting noise) and the composite is on one z-scale.

Used by benchmarks/toy_ablation.py and benchmarks/toy_pareto.py.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("toy_arms")


@dataclass
class Arm:
    name: str
    overrides: list[str] = field(default_factory=list)
    note: str = ""


def setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _add(timings: dict, key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def arm_config(config: str | None, base: list[str], arm: Arm):
    from craft.run.config import load_config

    return load_config(config, [*base, *arm.overrides])


def build_pool(run_dir: Path, cfg, timings: dict):
    """The run with prompts, candidates and scores (resumed if partly there)."""
    from craft.stages.engine import open_run, stage_generate, stage_prompts, stage_score

    run = open_run(run_dir, cfg)
    run.save_config(cfg)
    t0 = time.time()
    stage_prompts(run, cfg)
    stage_generate(run, cfg)
    _add(timings, "generate", time.time() - t0)
    t0 = time.time()
    stage_score(run, cfg)
    _add(timings, "score", time.time() - t0)
    return run


def train_arm(run, cfg, arm: Arm, timings: dict) -> dict:
    """Train one arm (or find it finished); returns its selection facts and final path."""
    from craft.stages.filtering import coverage
    from craft.stages.engine import stage_train
    from craft.stages.selection import select

    kept = select(run.store, cfg).rows
    t0 = time.time()
    result = stage_train(run, cfg, arm.name, resume=None)
    _add(timings, f"train {arm.name}", time.time() - t0)
    if result.status != "done":
        raise RuntimeError(f"arm {arm.name}: training {result.status}")
    w = kept["weight"].to_numpy(float)
    return {"final": str(result.final_dir), "coverage": coverage(kept),
            "weights": {"min": float(w.min()), "max": float(w.max()), "std": float(w.std())},
            "negative_advantages": int((kept["advantage"] < 0).sum())}


def evaluate_arms(run, cfg, finals: dict[str, str], name: str, timings: dict):
    from craft.stages.evaluation import evaluate

    t0 = time.time()
    models = {"base": cfg.model.pretrained, **finals}
    ev = evaluate(run, cfg, models, name=name)
    _add(timings, f"evaluate {name}", time.time() - t0)
    return ev


def paired(ev, a: str, b: str, reward: str = "composite") -> tuple[float, float, float]:
    """Paired difference a - b over the shared (prompt, seed) pairs: mean, SE, win rate."""
    s = ev.scores
    x = s[s.model == a].sort_values(["prompt", "seed"])[reward].to_numpy(float)
    y = s[s.model == b].sort_values(["prompt", "seed"])[reward].to_numpy(float)
    d = x - y
    return (float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))),
            float(((d > 0) + 0.5 * (d == 0)).mean()))


def row(ev, model: str, reward: str) -> dict:
    s = ev.summary
    r = s[(s.model == model) & (s.reward == reward)]
    return r.iloc[0].to_dict() if len(r) else {}


def t_interval(values) -> tuple[float, float]:
    """Mean and the half-width of a 95 % t interval over independent repeats (seeds)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan"), float("nan"))
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)


def machine() -> str:
    import platform

    return platform.processor() or platform.machine()


def save_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")


def random_subset(store, cfg, n: int, seed: int = 0):
    """The control that tells alignment from drift: ``n`` of the model's own *plain-prompt*
    samples drawn at random, unfiltered, each with weight 1 (a DataFrame of candidates)."""
    from craft import CraftError
    from craft.stages.selection import candidate_frame

    df = candidate_frame(store, cfg)
    plain = df[df["variant_idx"] == 0]
    if len(plain) < n:
        raise CraftError(f"the control needs {n} plain-prompt candidates but the run has "
                         f"{len(plain)}; generate more seeds (generation.seeds_per_prompt)")
    return plain.sample(n=n, random_state=seed).assign(weight=1.0)


def train_control(run, cfg, n: int, timings: dict, name: str = "control") -> str:
    """The control that tells alignment from drift: the same fine-tune on ``n`` random
    plain-prompt samples of the model's own, unfiltered, weight 1 (RUN/train/control)."""
    from craft.run.layout import train_dir
    from craft.methods.training import train

    out = train_dir(run.run_dir, name)
    if (out / "final" / "model_index.json").exists():
        return str(out / "final")
    t0 = time.time()
    df = random_subset(run.store, cfg, n, seed=cfg.train.seed)
    result = train(cfg, df, out, resume=(out / "final").exists() or any(out.glob("checkpoint-*")))
    _add(timings, f"train {name}", time.time() - t0)
    return str(result.final_dir)


def parse_args(doc: str, run_dir: str, extra=None):
    """The benchmark scripts' common options (config, --set, run folder, output, threads), and
    the process set-up that follows them."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "toy.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--run-dir", "--run-root", dest="run_dir", default=run_dir)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    ap.add_argument("--threads", type=int, default=2)
    if extra:
        extra(ap)
    args = ap.parse_args()
    setup(args.threads)
    return args


def times_line(timings: dict, threads: int, t_start: float, note: str = "") -> str:
    return ("Times on " + machine() + f" ({threads} threads): "
            + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
            + f"; total {time.time() - t_start:.0f} s{note}.")


def write_report(out: str, name: str, lines: list[str]) -> None:
    (Path(out) / name).write_text("\n".join(lines))
    print("\n".join(lines))
