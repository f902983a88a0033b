"""Does the shipped GRPO recipe learn? Its sampled rewards, round by round.

Runs (or reads back) ``craft train --config configs/toy-grpo.yaml --method grpo`` on a fresh
run and writes benchmarks/toy_grpo_recipe.md (configs/toy-flow-grpo.yaml:
toy_flow_grpo_recipe.md): each round's mean sampled rewards (the images GRPO
sampled from its live weights, scored by the rewards it trains on) and their composite
(filter.weights over the raw rewards), and whether the last third of the rounds is above the
first third. The training signal only: the evaluation of tuned models is toy_methods.md's.

    .venv/bin/python benchmarks/toy_grpo_recipe.py [--config configs/toy-grpo.yaml]
        [--run-dir /tmp/bench/grpo-recipe] [--read-only] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/toy-grpo.yaml")
    ap.add_argument("--run-dir", default="/tmp/bench/grpo-recipe")
    ap.add_argument("--read-only", action="store_true", help="report an existing run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the run")
    args = ap.parse_args()
    wall = None
    if not args.read_only:
        t0 = time.time()
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        subprocess.run([str(ROOT / ".venv/bin/craft"), "train", "--config", args.config,
                        "--method", "grpo", "--run-dir", args.run_dir, "--name", "grpo"],
                       check=True, env=env)
        wall = time.time() - t0
    from craft.run.config import load_config
    from craft.run.store import RunStore
    from toy_sweep import grpo_signal

    cfg = load_config(str(ROOT / args.config), [])
    with RunStore(args.run_dir) as store:
        run = store.train_run_by_name("grpo")
        m = store.metrics_df(int(run["id"]))
    per_round = m.groupby("round").first()
    names = list(cfg.rewards.names)
    w = dict(cfg.filter.weights)
    sig = grpo_signal(m, w)
    comp, first, last = sig["curve"], sig["first_third"], sig["signal"]
    g = cfg.grpo
    lines = [f"# The shipped GRPO recipe's training curve ({args.config})", "",
             f"Made by `.venv/bin/python benchmarks/toy_grpo_recipe.py --config {args.config}` "
             f"on this machine (2 cores). "
             f"Recipe: {g.prompts_per_step} prompts x {g.group_size} images a round, "
             f"{g.num_inference_steps} sampler steps ({g.timestep_fraction:g} of them trained, "
             f"{g.step_selection}), {g.updates} updates a round ({g.reuse}), clip "
             f"{g.clip_range:g}, KL {g.kl_weight:g}, lr {cfg.train.lr:g}, EMA "
             f"{cfg.train.ema_decay:g}, {cfg.train.steps} steps = {len(comp)} rounds = "
             f"{len(comp) * g.prompts_per_step * g.group_size} images sampled and scored.", "",
             f"Composite = {' + '.join(f'{w[n]:g} x {n}' for n in names)} of each round's mean "
             f"sampled rewards. First third of the rounds: **{first:.4f}**; last third: "
             f"**{last:.4f}** ({'above' if last > first else 'NOT above'} the first third, "
             f"{last - first:+.4f})." + (f" Wall time: {wall:.0f} s." if wall else ""), "",
             "| round | " + " | ".join(names) + " | composite | step s |",
             "|---|" + "---|" * (len(names) + 2)]
    for (r, row), c in zip(per_round.iterrows(), comp):
        lines.append(f"| {int(r)} | " + " | ".join(f"{row[f'reward_{n}']:.4f}" for n in names)
                     + f" | {c:.4f} | {row['step_time']:.1f} |")
    stem = Path(args.config).stem
    name = "toy_grpo_recipe.md" if stem == "toy-grpo" else stem.replace("-", "_") + "_recipe.md"
    (ROOT / "benchmarks" / name).write_text("\n".join(lines) + "\n")
    print(f"first third {first:.4f}, last third {last:.4f}")
    if not last > first:
        sys.exit(1)


if __name__ == "__main__":
    main()
