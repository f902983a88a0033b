"""The sweep: each method's settings run on seed 0 of a toy base, each chosen by what the method
trains toward on its training prompts, never by the evaluation (held-out prompts, held-out
rewards).

- GRPO: its own training signal, the rise of its sampled composite (each round's mean rewards
  weighted as filter.weights) from the first third of its rounds to the last third. The rise,
  not the last third's level: settings with other prompts a round (group size, prompts a
  round) sample other prompts, whose level differs before any training. Every setting samples
  the same number of images (``--rounds`` x prompts_per_step x group_size: CRAFT's pool by
  default) and names the reference it comes from.
- CRAFT, SFT and DPO (trained on the pool, they sample nothing while training): the same
  composite of the final weights sampled on the training prompts (2 seeds each, the pool's
  sampler). DPO's own logged signal (implicit accuracy and margin, last third of its steps) is
  shown beside it.

Every run goes through the library's stage engine into RUN/train/NAME (resumable: a finished
setting is read back). Writes benchmarks/toy_sweep_BASE.json and toy_sweep.md (both bases).

    .venv/bin/python benchmarks/toy_sweep.py [--base toy|toy-flow] [--methods grpo,dpo,craft,sft]
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

ROUNDS = 10  # GRPO rounds per setting: 10 x 64 = 640 images, CRAFT's pool (32 prompts x 20)


def out_path(base: str) -> Path:
    return ROOT / "benchmarks" / f"toy_sweep_{base}.json"


def override_value(sets: list[str], key: str, default: str) -> str:
    """The value the last ``key=value`` of ``sets`` gives ``key`` (``default`` if none)."""
    found = [s.split("=", 1)[1] for s in sets if s.startswith(key + "=")]
    return found[-1] if found else default


def grpo_base(rounds: int, sets: list[str] = ()) -> list[str]:
    """The GRPO recipe before the sweep (configs/toy-grpo.yaml), run for ``rounds`` rounds of
    the setting's ``grpo.updates`` steps each (so every setting samples the same images)."""
    ups = int(override_value([*GRPO_BASE, *sets], "grpo.updates", "2"))
    return [*GRPO_BASE, f"train.steps={ups * rounds}", f"train.checkpoint_every={ups * rounds}"]


GRPO_BASE = ["train.method=grpo", "train.anchor_weight=0", "grpo.prompts_per_step=8",
             "grpo.group_size=8", "grpo.num_inference_steps=10", "grpo.updates=2",
             "grpo.reuse=split", "grpo.timestep_fraction=0.9", "grpo.step_selection=first",
             "grpo.clip_range=1e-4", "grpo.kl_weight=0", "train.lr=1e-4",
             "train.micro_batch=32", "train.effective_batch=32", "train.ema_decay=0.99",
             "train.preview_every=0"]  # grpo_base adds the steps
GRPO_SETTINGS = [  # (name, overrides, source)
    ("lr1e-4", [], "the recipe before the sweep: between ddpo's full and LoRA rates"),
    ("lr3e-5", ["train.lr=3e-5"], "ddpo-pytorch, full fine-tuning"),
    ("lr3e-4", ["train.lr=3e-4"], "ddpo-pytorch LoRA, flow_grpo LoRA r32"),
    ("lr1e-5", ["train.lr=1e-5"], "DanceGRPO, full fine-tuning"),
    ("kl0.01", ["grpo.kl_weight=0.01"], "flow_grpo beta (low end)"),
    ("kl0.04", ["grpo.kl_weight=0.04"], "flow_grpo beta (high end)"),
    ("clip1e-3", ["grpo.clip_range=1e-3"], "flow_grpo video configs"),
    ("clip0.2", ["grpo.clip_range=0.2"], "LLM PPO (the former toy default)"),
    ("group16", ["grpo.prompts_per_step=4", "grpo.group_size=16"],
     "flow_grpo groups of 16-24 (same images a round)"),
    ("prompts16-g4", ["grpo.prompts_per_step=16", "grpo.group_size=4"],
     "more prompts a round, smaller groups (ddpo-pytorch: 4-8 a prompt; same images a round)"),
    ("one-update", ["grpo.updates=1"], "one update on the whole round (DanceGRPO: 1 inner "
                                       "epoch; 64 trajectories an update)"),
    ("steps-all", ["grpo.timestep_fraction=1.0"], "every sampler step trained (ddpo-pytorch "
                                                  "timestep_fraction 1.0)"),
    ("steps-random", ["grpo.step_selection=random", "grpo.timestep_fraction=1.0"],
     "ddpo-pytorch: all steps in random order"),
    ("reuse-whole", ["grpo.reuse=whole"], "the former toy recipe: each update on the whole "
                                          "round"),
]
DPO_BASE = ["train.method=dpo", "train.anchor_weight=0", "train.steps=100",
            "train.ema_decay=0.99", "train.checkpoint_every=100", "train.preview_every=0"]
DPO_SETTINGS = [
    ("lr1e-4", ["train.lr=1e-4", "dpo.beta=2000"], "the former toy default (no warm-up)"),
    ("lr2e-5-wu25", ["train.lr=2.05e-5", "train.lr_warmup_steps=25", "dpo.beta=2000"],
     "Diffusion-DPO: 2.05e-5 effective, a quarter of the steps warm-up"),
    ("lr5e-5-wu25", ["train.lr=5e-5", "train.lr_warmup_steps=25", "dpo.beta=2000"],
     "between the two, with warm-up"),
    ("beta5000", ["train.lr=2.05e-5", "train.lr_warmup_steps=25", "dpo.beta=5000"],
     "Diffusion-DPO's beta for SD1.5 / SDXL"),
    ("beta500", ["train.lr=2.05e-5", "train.lr_warmup_steps=25", "dpo.beta=500"],
     "a weaker pull"),
    ("above-margin", ["train.lr=2.05e-5", "train.lr_warmup_steps=25", "dpo.beta=2000",
                      "dpo.pairs=above_margin", "dpo.margin=1.0", "dpo.max_pairs=2000"],
     "every pair of a group with a clear gap (Pick-a-Pic's many pairs a prompt)"),
]
POOL_BASE = ["train.anchor_weight=0", "train.ema_decay=0.99", "train.preview_every=0"]
CRAFT_SETTINGS = [  # the same grid for CRAFT (method craft) and SFT (method sft)
    ("lr3e-5-s100", ["train.lr=3e-5", "train.steps=100", "train.checkpoint_every=100"],
     "ddpo's full fine-tuning rate"),
    ("lr1e-4-s100", ["train.lr=1e-4", "train.steps=100", "train.checkpoint_every=100"],
     "the toy default (diffusers' text-to-image examples: 1e-4 to 1e-5)"),
    ("lr3e-4-s100", ["train.lr=3e-4", "train.steps=100", "train.checkpoint_every=100"],
     "a LoRA-like rate"),
    ("lr3e-5-s300", ["train.lr=3e-5", "train.steps=300", "train.checkpoint_every=300"],
     "the paper's ~150 passes at a low rate"),
    ("lr1e-4-s300", ["train.lr=1e-4", "train.steps=300", "train.checkpoint_every=300"],
     "the paper's ~150 passes (toy_pareto.md)"),
    ("lr1e-4-s50", ["train.lr=1e-4", "train.steps=50", "train.checkpoint_every=50"],
     "half the default"),
]


def _thirds(values: list[float]) -> tuple[float, float]:
    k = max(1, len(values) // 3)
    return float(np.mean(values[:k])), float(np.mean(values[-k:]))


def last_third_se(curve) -> float:
    """The standard error of a curve's last third (its points' spread / sqrt(their number))."""
    c = np.asarray(curve, dtype=float)
    k = max(1, len(c) // 3)
    return float(c[-k:].std(ddof=1) / math.sqrt(k)) if k > 1 else float("nan")


def grpo_signal(metrics, weights: dict) -> dict:
    """The sampled composite per round (rewards weighted as filter.weights), its last third
    and its rise from the first third."""
    per_round = metrics.groupby("round").first() if "round" in metrics else metrics
    comp = sum(float(w) * per_round[f"reward_{n}"].to_numpy() for n, w in weights.items())
    first, last = _thirds(list(comp))
    return {"curve": [float(c) for c in comp], "first_third": first, "signal": last,
            "signal_se": last_third_se(comp), "rise": last - first}


def dpo_logged(metrics) -> dict:
    acc, margin = list(metrics["dpo_accuracy"]), list(metrics["dpo_margin"])
    return {"accuracy_last_third": _thirds(acc)[1], "margin_last_third": _thirds(margin)[1]}


def sampled_on_train_prompts(run, cfg, model: str, seeds: int = 2) -> dict:
    """The filter's rewards of ``model`` sampled on the run's training prompts (``seeds`` each,
    the pool's sampler and seeds): what a pool-trained method is trained toward, measured
    where it was trained, with none of the evaluation's held-out prompts or rewards."""
    from craft.rewards.configured import build_reward
    from craft.stages.evaluation import load_for_eval
    from craft.stages.generation import apply_scheduler, generate_images, sampling_params

    prompts = list(run.store.prompts_df(split="train")["text"])
    texts = [p for p in prompts for _ in range(seeds)]
    seed_list = [10_000 + i for i in range(len(texts))]
    pipe = load_for_eval(cfg, model, device="cpu")
    apply_scheduler(pipe, cfg.generation.scheduler)
    images: list = []
    for _, ims in generate_images(pipe, texts, seed_list, sampling_params(cfg.generation),
                                  batch_size=cfg.generation.batch_size):
        images += ims
    scores = {n: np.asarray(build_reward(cfg, n)(images, texts), float)
              for n in cfg.rewards.names}
    # the filter's weighted sum per image: the scale GRPO's rounds are read on
    per_image = sum(float(w) * scores[n] for n, w in cfg.filter.weights.items())
    return {"signal": float(per_image.mean()),
            "signal_se": float(per_image.std(ddof=1) / math.sqrt(len(per_image))),
            "rewards": {n: float(v.mean()) for n, v in scores.items()}}


def run_setting(run, cfg, name: str) -> dict:
    from craft.stages.engine import stage_train

    t0 = time.time()
    res = stage_train(run, cfg, name, resume=None)
    if res.status != "done":
        raise RuntimeError(f"{name} stopped")
    metrics = run.store.metrics_df(int(res.run_id))
    return {"seconds": time.time() - t0, "metrics": metrics, "final": str(res.final_dir)}


def ta_common() -> list[str]:
    """The benchmark scale (benchmarks/toy_methods.py's): 32 prompts x 20 = 640 candidates,
    K = 50; the pool without early rejection (DPO's losers are the images it stops)."""
    return ["prompts.max_prompts=32", "filter.top_k=50", "model.device=cpu",
            "generation.early_reject=false"]


def settings_of(method: str, rounds: int):
    if method == "grpo":  # steps: grpo_base, per setting
        return GRPO_SETTINGS, GRPO_BASE
    if method == "dpo":
        return DPO_SETTINGS, DPO_BASE
    return CRAFT_SETTINGS, [*POOL_BASE, f"train.method={method}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="toy", choices=["toy", "toy-flow"])
    ap.add_argument("--methods", default="grpo,dpo,craft,sft")
    ap.add_argument("--only", nargs="*", default=None, help="setting names to run (default all)")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="GRPO rounds per setting")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.report_only:
        write_report()
        return
    ta.setup(args.threads)
    config = str(ROOT / "configs" / f"{args.base}.yaml")
    run_dir = Path(args.run_dir or f"/tmp/bench/sweep-{args.base}")
    out = out_path(args.base)
    results = json.loads(out.read_text()) if out.exists() else {}
    cfg0 = ta.arm_config(config, [*ta_common(), "train.seed=0"], ta.Arm("pool"))
    timings: dict = {}
    run = ta.build_pool(run_dir, cfg0, timings)
    weights = dict(cfg0.filter.weights)
    for method in args.methods.split(","):
        settings, base = settings_of(method, args.rounds)
        table = results.setdefault(method, {})
        for name, sets, source in settings:
            key = f"{method}-{name}"
            if key in table or args.only is not None and name not in args.only:
                continue
            recipe = grpo_base(args.rounds, sets) if method == "grpo" else base
            cfg = ta.arm_config(config, [*ta_common(), *recipe], ta.Arm(key, sets))
            res = run_setting(run, cfg, key)
            if method == "grpo":
                sig = grpo_signal(res["metrics"], weights)
            else:
                sig = sampled_on_train_prompts(run, cfg, res["final"])
                if method == "dpo":
                    sig.update(dpo_logged(res["metrics"]))
            table[key] = {"overrides": sets, "source": source, "seconds": res["seconds"],
                          **sig}
            save(out, method, key, table[key])
            ta.log.info("%s: %s", key, {k: v for k, v in sig.items() if k != "curve"})
    if "base" not in results:
        save(out, "base", None, sampled_on_train_prompts(run, cfg0, cfg0.model.pretrained))
    write_report()


def save(out: Path, method: str, key: str | None, entry: dict) -> None:
    """Write one setting into the base's file, keeping what another process (a setting rerun
    beside the sweep) wrote meanwhile."""
    now = json.loads(out.read_text()) if out.exists() else {}
    if key is None:
        now[method] = entry
    else:
        now.setdefault(method, {})[key] = entry
    out.write_text(json.dumps(now, indent=1))


def current(table: dict) -> dict:
    """The settings of a method's table that this file still defines (a renamed or corrected
    setting's old record is left out)."""
    names = {f"{m}-{n}" for m in ("grpo", "dpo", "craft", "sft")
             for n, _, _ in settings_of(m, ROUNDS)[0]}
    return {k: v for k, v in table.items() if k in names}


def chosen(table: dict) -> str:
    """The setting with the best signal: GRPO's rise, the others' composite."""
    table = current(table)
    key = "rise" if next(iter(table)).startswith("grpo") else "signal"
    return max(table, key=lambda k: table[k][key] if math.isfinite(table[k][key]) else -1e9)


def _paired(curve: list, ref: list | None) -> str:
    """The last third's rounds minus the base recipe's same rounds (the same prompts and seeds
    a round in every setting), mean ± SE: the round-to-round spread of the prompts cancels."""
    if not ref or len(ref) != len(curve) or curve == ref:
        return "–"
    k = max(2, len(curve) // 3)
    d = np.asarray(curve[-k:]) - np.asarray(ref[-k:])
    return f"{d.mean():+.4f} ± {d.std(ddof=1) / math.sqrt(k):.4f}"


def _se(r: dict) -> str:
    se = r.get("signal_se")
    if se is None and "curve" in r:  # recorded before the SE was
        se = last_third_se(r["curve"])
    return f" ± {se:.4f}" if se is not None and math.isfinite(se) else ""


def load_results() -> dict:
    return {b: json.loads(out_path(b).read_text()) for b in ("toy", "toy-flow")
            if out_path(b).exists()}


def write_report() -> None:
    lines = ["# The sweep (every method, seed 0 of each toy base)", "",
             "Made by `.venv/bin/python benchmarks/toy_sweep.py --base toy|toy-flow` "
             "(resumable; `--report-only` re-renders). Each setting is chosen by what its "
             "method trains toward, on its training prompts, never by the evaluation "
             "(held-out prompts and the two held-out rewards): the composite of the filter's "
             "rewards (filter.weights over the mean rewards). For GRPO that is its own logged "
             "signal, the rise of the images it sampled from the first third of its rounds to the "
             "last third (not the level: group size and prompts a round change which prompts a "
             "round samples, and the prompts' level differs before any training); for "
             "the pool-trained methods (CRAFT, SFT, DPO: they sample nothing while training) "
             "the same composite of the final weights sampled on the 32 training prompts x 2 "
             "seeds with the pool's sampler. The two scales differ (GRPO samples with its "
             "stochastic 10-step sampler): compare settings within a table, not across. "
             "± is a standard error: GRPO's over the rounds of its last third (round-to-round "
             "spread / sqrt(rounds)), the others' over the 64 sampled images. Every GRPO setting "
             "samples the same prompts and seeds in a round, so its difference from the base "
             "recipe is also shown paired by round (the prompts' spread cancels). Settings "
             "closer than about two SEs are not told apart by the signal; the sweep varies one "
             "value at a time from the base recipe (no combinations).", "",
             f"GRPO base recipe (configs/toy-grpo.yaml before the sweep): "
             f"`{' '.join(grpo_base(ROUNDS))}`, {ROUNDS} rounds = {ROUNDS * 64} sampled images, "
             "CRAFT's pool; each setting changes what its row says.", "",
             f"DPO base: `{' '.join(DPO_BASE)}`. CRAFT and SFT: `{' '.join(POOL_BASE)}` on the "
             "pool's K=50 kept set. The pool: 32 prompts x 20 candidates, without early "
             "rejection.", ""]
    for base, methods in load_results().items():
        if "base" in methods:
            lines += [f"**{base}**: the base model's composite on the training prompts "
                      f"(the pool-trained methods' scale): {methods['base']['signal']:.4f}.", ""]
        for method, table in methods.items():
            if method == "base" or not table:
                continue
            table = current(table)
            pick = chosen(table)
            lines += [f"## {base}: {method} ({len(table)} settings; chosen: **{pick}**)", ""]
            if method == "grpo":
                lines += ["| setting | overrides | source | sampled composite, first third | "
                          "last third | rise (the signal) | last third − the base recipe's, "
                          "paired by round | s |", "|---|---|---|---|---|---|---|---|"]
                ref = table.get("grpo-lr1e-4", {}).get("curve")
                for k, r in table.items():
                    lines.append(f"| {k} | {' '.join(r['overrides']) or '(base)'} | "
                                 f"{r['source']} | {r['first_third']:.4f} | "
                                 f"{r['signal']:.4f}{_se(r)} | **{r['rise']:+.4f}** | "
                                 + ("– (other prompts a round)" if any(
                                     o.startswith("grpo.prompts_per_step") for o in r["overrides"])
                                    else _paired(r["curve"], ref))
                                 + f" | {r['seconds']:.0f} |")
            else:
                extra = method == "dpo"
                lines += ["| setting | overrides | source | composite on the training prompts"
                          + (" | implicit accuracy (last third) | margin (last third)" if extra
                             else "") + " | s |",
                          "|---|---|---|---|" + ("---|---|" if extra else "") + "---|"]
                for k, r in table.items():
                    lines.append(f"| {k} | {' '.join(r['overrides'])} | {r['source']} | "
                                 f"**{r['signal']:.4f}**{_se(r)} | "
                                 + (f"{r['accuracy_last_third']:.3f} | "
                                    f"{r['margin_last_third']:+.4f} | " if extra else "")
                                 + f"{r['seconds']:.0f} |")
            lines.append("")
    (ROOT / "benchmarks" / "toy_sweep.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
