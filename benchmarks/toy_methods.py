"""The paper's headline comparison in the toy world: CRAFT against SFT, Diffusion-DPO and online
GRPO on the same pool, with what each costs.

For each base (the UNet toy, configs/toy.yaml; the flow toy, configs/toy-flow.yaml) and seed
(a new pool and training seed), through the library's own stages (craft.stages, as
``craft train --method M``):

- craft: the default (the kept set, advantage weights); sft: the same kept set, weight 1;
- dpo: Diffusion-DPO on pairs of the same pool; on the first seed a small sweep of beta and
  the pair rule (shown), then its best setting on every seed;
- grpo: online GRPO, run long with a checkpoint every round; every checkpoint is evaluated,
  which gives its gain against its own wall time. "grpo@craft-time" is the checkpoint at
  CRAFT's whole-pipeline time (generation + scoring + training), "grpo-long" the last one.

Every model of a seed is evaluated in one evaluation (held-out prompts, shared seeds), so all
differences are paired. Across seeds: means and 95 % t intervals over the seeds.

    .venv/bin/python benchmarks/toy_methods.py [--bases toy toy-flow] [--seeds 0 1 2]
        [--run-root /tmp/bench/methods]

Writes benchmarks/toy_methods.json and benchmarks/toy_methods.md. Resumes from --run-root (a
finished arm is not trained again, evaluation images are reused).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import toy_arms as ta
from toy_arms import Arm

# The benchmark scale (both bases): 32 prompts x 20 = 640 candidates, K = 50, 100 CRAFT steps.
SCALE = ["prompts.max_prompts=32", "filter.top_k=50", "train.steps=100",
         "eval.num_prompts=32", "eval.seeds_per_prompt=4", "train.preview_every=0"]
DPO_SWEEP = [  # (name, overrides)
    ("dpo-b500-bw", ["dpo.beta=500", "dpo.pairs=best_worst"]),
    ("dpo-b2000-bw", ["dpo.beta=2000", "dpo.pairs=best_worst"]),
    ("dpo-b5000-bw", ["dpo.beta=5000", "dpo.pairs=best_worst"]),
    ("dpo-b2000-m", ["dpo.beta=2000", "dpo.pairs=above_margin", "dpo.margin=1.0",
                     "dpo.max_pairs=2000"]),
]
GRPO = ["train.method=grpo", "grpo.prompts_per_step=4", "grpo.group_size=8",
        "grpo.num_inference_steps=10", "grpo.updates=2", "grpo.timestep_fraction=0.5",
        "train.lr=1e-4",
        "train.micro_batch=32", "train.effective_batch=32", "train.checkpoint_every=10",
        "train.ema_decay=0"]


def grpo_curve(run, name: str) -> list[tuple[int, float]]:
    """(step, cumulative wall seconds) of a GRPO run, from its recorded step times."""
    rec = run.store.train_run_by_name(name)
    m = run.store.metrics_df(int(rec["id"]))
    return list(zip(m["step"].astype(int), np.cumsum(m["step_time"].to_numpy(float))))


def main() -> None:
    args = ta.parse_args(__doc__, "/tmp/bench/methods", lambda ap: (
        ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2]),
        ap.add_argument("--bases", nargs="+", default=["toy", "toy-flow"]),
        ap.add_argument("--grpo-steps", type=int, default=80),
        ap.add_argument("--report-only", action="store_true",
                        help="re-render toy_methods.md from toy_methods.json, run nothing")))
    t_start = time.time()
    out = Path(args.out) / "toy_methods.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.report_only:
        ta.write_report(args.out, "toy_methods.md", report(results, args, t_start))
        return
    for base_name in args.bases:
        config = str(ta.ROOT / "configs" / f"{base_name}.yaml")
        res = results.setdefault(base_name, {"seeds": {}, "sweep": {}, "timings": {}})
        best_dpo = res.get("best_dpo")
        for s in args.seeds:
            timings: dict = {}
            common = [*SCALE, f"generation.seed={s}", f"train.seed={s}", *args.overrides]
            cfg = ta.arm_config(config, common, Arm("pool"))
            run = ta.build_pool(Path(args.run_dir) / base_name / f"seed-{s}", cfg, timings)
            pool = len(run.store.candidates_df(model=cfg.model.pretrained, split="train"))
            arms = [Arm("craft", [], "CRAFT (default)"),
                    Arm("sft", ["train.method=sft"], "SFT on the same kept set")]
            sweep = DPO_SWEEP if best_dpo is None else [d for d in DPO_SWEEP if d[0] == best_dpo]
            arms += [Arm(n, ["train.method=dpo", *o], "Diffusion-DPO " + " ".join(o))
                     for n, o in sweep]
            finals, facts = {}, {}
            for arm in arms:
                acfg = ta.arm_config(config, common, arm)
                t0 = time.time()
                from craft.stages import stage_train

                r = stage_train(run, acfg, arm.name, resume=None)
                ta._add(timings, f"train {arm.name}", time.time() - t0)
                finals[arm.name] = str(r.final_dir)
                rec = run.store.train_run_by_name(arm.name)
                sel = run.store.selection_settings(int(rec["selection_id"]))
                facts[arm.name] = {"note": arm.note, "n_pairs": sel.get("n_pairs"),
                                   "n_train": len(run.store.selection_items_df(
                                       int(rec["selection_id"])))}
            gcfg = ta.arm_config(config, [*common, *GRPO, f"train.steps={args.grpo_steps}"],
                                 Arm("grpo"))
            t0 = time.time()
            stage_train(run, gcfg, "grpo", resume=None)
            ta._add(timings, "train grpo", time.time() - t0)
            curve = grpo_curve(run, "grpo")
            from craft.run_layout import checkpoint_dirs, checkpoint_step, train_dir

            ckpts = {checkpoint_step(c): str(c) for c in checkpoint_dirs(
                train_dir(run.run_dir, "grpo"))}
            for k, v in timings.items():  # a resumed benchmark keeps the first measurement
                res["timings"].setdefault(f"{s}:{k}", v)
            craft_time = sum(res["timings"].get(f"{s}:{k}", 0.0)
                             for k in ("generate", "score", "train craft"))
            models = dict(finals)
            for step, path in sorted(ckpts.items()):
                models[f"grpo@{step}"] = path
            ev = ta.evaluate_arms(run, cfg, models, "methods", timings)
            rewards = ["composite", *cfg.rewards.eval_names, "diversity"]
            seed_res = {"pool": pool, "craft_time": craft_time, "curve": curve,
                        "warnings": ev.warnings, "facts": facts,
                        "base": {r: ta.row(ev, "base", r).get("mean") for r in rewards},
                        "models": {m: {r: {k: ta.row(ev, m, r).get(k) for k in
                                           ("mean", "diff", "diff_se", "win_rate")}
                                       for r in rewards} for m in models}}
            res["seeds"][str(s)] = seed_res
            for k, v in timings.items():
                res["timings"].setdefault(f"{s}:{k}", v)
            if best_dpo is None:
                best_dpo = max((n for n, _ in DPO_SWEEP), key=lambda n: seed_res["models"][n][
                    "composite"]["diff"])
                res["best_dpo"] = best_dpo
                res["sweep"] = {n: seed_res["models"][n]["composite"] for n, _ in DPO_SWEEP}
            ta.save_json(out, results)
    ta.write_report(args.out, "toy_methods.md", report(results, args, t_start))


def _grpo_points(seed_res: dict) -> list[tuple[int, float, float]]:
    """(step, wall seconds, composite gain) of each evaluated GRPO checkpoint."""
    wall = dict((int(a), float(b)) for a, b in seed_res["curve"])
    pts = []
    for m, v in seed_res["models"].items():
        if m.startswith("grpo@"):
            step = int(m.split("@")[1])
            pts.append((step, wall.get(step, float("nan")), v["composite"]["diff"]))
    return sorted(pts)


def report(results: dict, args, t_start: float) -> list[str]:
    lines = ["# CRAFT against SFT, Diffusion-DPO and online GRPO in the toy world", "",
             f"Scale: {' '.join(SCALE)}; GRPO: {' '.join(GRPO)}. Cells: the mean over seeds of "
             "the paired difference from the base, and in brackets the half-width of a 95 % t "
             "interval over the seeds.", ""]
    for base_name, res in results.items():
        seeds = list(res["seeds"])
        if not seeds:
            continue
        first = res["seeds"][seeds[0]]
        best = res.get("best_dpo")
        rewards = [r for r in first["base"]]
        lines += [f"## {base_name} ({len(seeds)} seeds: {', '.join(seeds)})", "",
                  "| model | trained on | " + " | ".join(f"{r} Δ" for r in rewards)
                  + " | composite win % | images generated + scored | wall s |",
                  "|---|---|" + "---|" * len(rewards) + "---|---|---|"]

        def cells(model_of: dict) -> list[str]:
            """Rewards, then the win rate, of the model ``model_of[seed]`` of each seed."""
            out = []
            for r in rewards:
                d = 1 if r == "diversity" else 3
                m, h = ta.t_interval([res["seeds"][s]["models"][model_of[s]][r]["diff"]
                                      for s in seeds])
                out.append(f"{m:+.{d}f} [±{h:.{d}f}]")
            w, wh = ta.t_interval([100 * res["seeds"][s]["models"][model_of[s]]["composite"][
                "win_rate"] for s in seeds])
            return out + [f"{w:.1f} [±{wh:.1f}]"]

        pool = first["pool"]
        t_craft = np.mean([res["seeds"][s]["craft_time"] for s in seeds])
        for name, what in (("craft", f"K={first['facts']['craft']['n_train']} kept"),
                           ("sft", f"K={first['facts']['sft']['n_train']} kept, weight 1"),
                           (best, f"{first['facts'][best]['n_pairs']} pairs")):
            lines.append(f"| {name} | {what} | " + " | ".join(cells({s: name for s in seeds}))
                         + f" | {pool} | {t_craft:.0f} (pipeline) |")
        per_round = 4 * 8  # GRPO: prompts_per_step x group_size images per round
        for label, choose in (("grpo@craft-time", lambda pts, tc: min(
                pts, key=lambda p: abs(p[1] - tc))), ("grpo-long", lambda pts, tc: pts[-1])):
            picks = {s: choose(_grpo_points(res["seeds"][s]), res["seeds"][s]["craft_time"])
                     for s in seeds}
            step, wall = picks[seeds[0]][0], np.mean([p[1] for p in picks.values()])
            lines.append(f"| {label} | step {step}: {step // 2} rounds | " + " | ".join(
                cells({s: f"grpo@{p[0]}" for s, p in picks.items()}))
                + f" | {step // 2 * per_round} | {wall:.0f} |")
        lines += ["", "### The cost ratio", "",
                  "| seed | CRAFT gain | CRAFT wall s | GRPO wall s to reach it | ratio |",
                  "|---|---|---|---|---|"]
        for s in seeds:
            sr = res["seeds"][s]
            gain = sr["models"]["craft"]["composite"]["diff"]
            pts = _grpo_points(sr)
            reach = next((p for p in pts if p[2] >= gain), None)
            lines.append(f"| {s} | {gain:+.3f} | {sr['craft_time']:.0f} | "
                         + (f"{reach[1]:.0f} (step {reach[0]}) | {reach[1] / sr['craft_time']:.2f}"
                            if reach else f"not reached in {pts[-1][1]:.0f} s | > "
                            f"{pts[-1][1] / sr['craft_time']:.2f}") + " |")
        if res.get("sweep"):
            lines += ["", f"### The DPO sweep (seed {seeds[0]}; composite Δ, win %)", "",
                      "| setting | composite Δ ± SE | win % |", "|---|---|---|"]
            for n, v in res["sweep"].items():
                lines.append(f"| {n}{' (best)' if n == best else ''} | {v['diff']:+.3f} ± "
                             f"{v['diff_se']:.3f} | {100 * v['win_rate']:.1f} |")
    lines += ["", f"Total {time.time() - t_start:.0f} s on {ta.machine()} ({args.threads} "
              "threads).", "", "Reproduce: `.venv/bin/python benchmarks/toy_methods.py`.", ""]
    return lines


if __name__ == "__main__":
    main()
