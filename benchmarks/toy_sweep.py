"""The baselines' sweep: each setting of GRPO and Diffusion-DPO run on seed 0 of a toy base and
chosen by the method's own training signal, never by the evaluation.

- GRPO: the mean sampled composite of its rounds (the rewards it is trained on, weighted as
  filter.weights, each reward standardised over all rounds of all settings so the weights act
  as in the filter); its signal is the rise from the first third of the rounds to the last
  third. The settings come from the references (each row names its source).
- DPO: the run's own implicit accuracy and margin on its pairs over its last third of steps
  (what Diffusion-DPO's train.py logs); pairs from the same pool CRAFT filters.

Every run goes through the library's stage engine into RUN/train/NAME (resumable: a finished
setting is read back). Writes benchmarks/toy_sweep.json and .md.

    .venv/bin/python benchmarks/toy_sweep.py [--base toy|toy-flow] [--methods grpo,dpo]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import toy_arms as ta  # noqa: E402

OUT = ROOT / "benchmarks" / "toy_sweep.json"
ROUNDS = 24  # GRPO rounds per setting (2 updates each); --rounds changes it


def grpo_base(rounds: int) -> list[str]:
    """The GRPO recipe of configs/toy-grpo.yaml before the sweep, run for ``rounds`` rounds."""
    return [s for s in GRPO_BASE if not s.startswith(("train.steps", "train.checkpoint_every"))
            ] + [f"train.steps={2 * rounds}", f"train.checkpoint_every={2 * rounds}"]


GRPO_BASE = ["train.method=grpo", "train.anchor_weight=0", "grpo.prompts_per_step=8",
             "grpo.group_size=8", "grpo.num_inference_steps=10", "grpo.updates=2",
             "grpo.reuse=split", "grpo.timestep_fraction=0.9", "grpo.step_selection=first",
             "grpo.clip_range=1e-4", "grpo.kl_weight=0", "train.lr=1e-4",
             "train.micro_batch=32", "train.effective_batch=32", "train.ema_decay=0.99",
             f"train.steps={2 * ROUNDS}", f"train.checkpoint_every={2 * ROUNDS}",
             "train.preview_every=0"]
GRPO_SETTINGS = [  # (name, overrides, source)
    ("lr3e-5", ["train.lr=3e-5"], "ddpo-pytorch, full fine-tuning"),
    ("lr1e-4", [], "between ddpo's full and LoRA rates (the former toy default)"),
    ("lr3e-4", ["train.lr=3e-4"], "ddpo-pytorch LoRA, flow_grpo LoRA r32"),
    ("lr1e-5", ["train.lr=1e-5"], "DanceGRPO, full fine-tuning"),
    ("kl0.01", ["grpo.kl_weight=0.01"], "flow_grpo beta (low end)"),
    ("kl0.04", ["grpo.kl_weight=0.04"], "flow_grpo beta (high end)"),
    ("clip1e-3", ["grpo.clip_range=1e-3"], "flow_grpo video configs"),
    ("clip0.2", ["grpo.clip_range=0.2"], "LLM PPO (the former toy default)"),
    ("group16", ["grpo.prompts_per_step=4", "grpo.group_size=16"],
     "flow_grpo groups of 16-24 (same images a round)"),
    ("prompts16", ["grpo.prompts_per_step=16"], "more trajectories an update (flow_grpo: "
                                                "hundreds)"),
    ("steps-all", ["grpo.timestep_fraction=1.0"], "every sampler step trained"),
    ("steps-random", ["grpo.step_selection=random", "grpo.timestep_fraction=1.0"],
     "ddpo-pytorch: random order, all steps"),
    ("reuse-whole", ["grpo.reuse=whole"], "the former toy recipe: each update on the whole round"),
]
DPO_BASE = ["train.method=dpo", "train.anchor_weight=0", "train.steps=100",
            "train.ema_decay=0.99", "train.checkpoint_every=100", "train.preview_every=0"]
DPO_SETTINGS = [
    ("lr1e-4", ["train.lr=1e-4", "dpo.beta=2000"], "the former toy default"),
    ("lr2e-5-wu25", ["train.lr=2.05e-5", "train.lr_warmup_steps=25", "dpo.beta=2000"],
     "Diffusion-DPO: 2.05e-5 effective, a quarter of the steps warm-up"),
    ("lr5e-5-wu25", ["train.lr=5e-5", "train.lr_warmup_steps=25", "dpo.beta=2000"],
     "between the two"),
    ("beta5000", ["train.lr=2.05e-5", "train.lr_warmup_steps=25", "dpo.beta=5000"],
     "Diffusion-DPO's beta for SD1.5 / SDXL"),
    ("beta500", ["train.lr=2.05e-5", "train.lr_warmup_steps=25", "dpo.beta=500"],
     "a weaker pull"),
    ("above-margin", ["train.lr=2.05e-5", "train.lr_warmup_steps=25", "dpo.beta=2000",
                      "dpo.pairs=above_margin", "dpo.margin=0.5"],
     "every pair of a group with a clear gap (Pick-a-Pic's many pairs a prompt)"),
]


def _thirds(values: list[float]) -> tuple[float, float]:
    k = max(1, len(values) // 3)
    return float(np.mean(values[:k])), float(np.mean(values[-k:]))


def grpo_signal(metrics, weights: dict) -> dict:
    """The sampled composite per round (rewards weighted as filter.weights) and its rise."""
    per_round = metrics.groupby("round").first() if "round" in metrics else metrics
    comp = sum(float(w) * per_round[f"reward_{n}"].to_numpy() for n, w in weights.items())
    first, last = _thirds(list(comp))
    return {"curve": [float(c) for c in comp], "first_third": first, "last_third": last,
            "rise": last - first}


def dpo_signal(metrics) -> dict:
    acc, margin = list(metrics["dpo_accuracy"]), list(metrics["dpo_margin"])
    return {"accuracy_last_third": _thirds(acc)[1], "margin_last_third": _thirds(margin)[1]}


def run_setting(run, config: str, base: list[str], name: str, sets: list[str]) -> dict:
    from craft.stages.engine import stage_train

    cfg = ta.arm_config(config, [*ta_common(), *base], ta.Arm(name, sets))
    t0 = time.time()
    res = stage_train(run, cfg, name, resume=None)
    if res.status != "done":
        raise RuntimeError(f"{name} stopped")
    metrics = run.store.metrics_df(int(res.run_id))
    return {"seconds": time.time() - t0, "metrics": metrics, "cfg": cfg}


def ta_common() -> list[str]:
    return ["prompts.max_prompts=32", "filter.top_k=50", "model.device=cpu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="toy", choices=["toy", "toy-flow"])
    ap.add_argument("--methods", default="grpo,dpo")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="GRPO rounds per setting")
    args = ap.parse_args()
    ta.setup(args.threads)
    config = str(ROOT / "configs" / f"{args.base}.yaml")
    run_dir = Path(args.run_dir or f"/tmp/bench/sweep-{args.base}")
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    mine = results.setdefault(args.base, {})
    cfg0 = ta.arm_config(config, [*ta_common(), "train.seed=0"], ta.Arm("pool"))
    timings: dict = {}
    run = ta.build_pool(run_dir, cfg0, timings)
    weights = dict(cfg0.filter.weights)
    for method in args.methods.split(","):
        settings, base = ((GRPO_SETTINGS, grpo_base(args.rounds)) if method == "grpo"
                          else (DPO_SETTINGS, DPO_BASE))
        table = mine.setdefault(method, {})
        for name, sets, source in settings:
            key = f"{method}-{name}"
            if key in table:
                continue
            out = run_setting(run, config, base, key, sets)
            sig = (grpo_signal(out["metrics"], weights) if method == "grpo"
                   else dpo_signal(out["metrics"]))
            table[key] = {"overrides": sets, "source": source, "seconds": out["seconds"],
                          **sig}
            OUT.write_text(json.dumps(results, indent=1))
            ta.log.info("%s: %s", key, {k: v for k, v in sig.items() if k != "curve"})
    OUT.write_text(json.dumps(results, indent=1))
    write_report(results)


def _chosen(table: dict, method: str) -> str:
    key = "rise" if method == "grpo" else "margin_last_third"
    return max(table, key=lambda k: table[k][key] if math.isfinite(table[k][key]) else -1e9)


def write_report(results: dict) -> None:
    lines = ["# The baselines' sweep (GRPO and Diffusion-DPO, seed 0 of each toy base)", "",
             "Made by `.venv/bin/python benchmarks/toy_sweep.py --base toy|toy-flow` "
             "(resumable). Each setting is chosen by the method's own training signal, never by "
             "the evaluation: GRPO by the rise of its sampled composite (filter.weights over "
             "the round's mean rewards) from the first third of its rounds to the last third; "
             "DPO by its implicit-reward margin over the last third of its steps (Diffusion-"
             "DPO's logged signal).", "",
             f"GRPO base recipe: `{' '.join(GRPO_BASE)}`; each setting changes what its row "
             "says.", "", f"DPO base recipe: `{' '.join(DPO_BASE)}`.", ""]
    for base, methods in results.items():
        for method, table in methods.items():
            if not table:
                continue
            chosen = _chosen(table, method)
            lines += [f"## {base}: {method} ({len(table)} settings; chosen: **{chosen}**)", ""]
            if method == "grpo":
                lines += ["| setting | overrides | source | sampled composite, first third | "
                          "last third | rise | s |", "|---|---|---|---|---|---|---|"]
                for k, r in table.items():
                    lines.append(f"| {k} | {' '.join(r['overrides']) or '(base)'} | "
                                 f"{r['source']} | {r['first_third']:+.4f} | "
                                 f"{r['last_third']:+.4f} | {r['rise']:+.4f} | "
                                 f"{r['seconds']:.0f} |")
            else:
                lines += ["| setting | overrides | source | accuracy (last third) | margin "
                          "(last third) | s |", "|---|---|---|---|---|---|"]
                for k, r in table.items():
                    lines.append(f"| {k} | {' '.join(r['overrides'])} | {r['source']} | "
                                 f"{r['accuracy_last_third']:.3f} | "
                                 f"{r['margin_last_third']:+.4f} | {r['seconds']:.0f} |")
            lines.append("")
    (ROOT / "benchmarks" / "toy_sweep.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
