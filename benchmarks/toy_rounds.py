"""Online CRAFT (train.rounds = 2) against one round at the same total number of steps.

On the candidate pool of benchmarks/toy_pareto.py (the same run directory, so the one-round
arm "craft" is reused when it is there): round 1 trains half the steps on the base model's
kept set; round 2 generates a new pool with the round-1 model (new seeds), filters it against
that model's own original-prompt images and trains the other half from it. Evaluated together
with the base, one round of all the steps, and round 1 alone (half the steps), on the held-out
prompts with shared seeds; writes benchmarks/toy_rounds.md / .json.

    .venv/bin/python benchmarks/toy_rounds.py [--run-dir /tmp/bench/pareto]
"""

from __future__ import annotations

import time
from pathlib import Path

import toy_arms as ta
from toy_arms import Arm


def main() -> None:
    args = ta.parse_args(__doc__, "/tmp/bench/pareto")
    from craft.stages.filtering import coverage
    from craft.stages.engine import stage_rounds
    from craft.stages.selection import select

    t_start = time.time()
    timings: dict = {}
    from toy_pareto import PLAIN

    base = [*PLAIN, *args.overrides]
    cfg = ta.arm_config(args.config, base, Arm("craft"))
    run = ta.build_pool(Path(args.run_dir), cfg, timings)
    one = ta.train_arm(run, cfg, Arm("craft"), timings)
    online = ta.arm_config(args.config, base, Arm("online", ["train.rounds=2"]))
    t0 = time.time()
    result = stage_rounds(run, online, "online")
    timings["online (2 rounds)"] = time.time() - t0
    r1 = str(run.run_dir / "train" / "online.r1" / "final")
    finals = {"craft": one["final"], "online.r1": r1, "online.r2": str(result.final_dir)}
    ev = ta.evaluate_arms(run, cfg, finals, "rounds", timings)

    from craft.stages.engine import round_config

    cfg2 = round_config(online, 2, r1)
    kept2 = select(run.store, cfg2).rows
    pool2 = len(run.store.candidates_df(model=r1, split="train"))
    heldout = [r for r in cfg.rewards.eval_names if r not in cfg.rewards.names]
    rows = {}
    for m in finals:
        g, gse, win = ta.paired(ev, m, "base")
        d = ta.row(ev, m, "diversity")
        rows[m] = {"gain": g, "gain_se": gse, "win_rate": win, "diversity": d["mean"],
                   "diversity_se": d["se"], "diversity_diff": d["diff"],
                   "diversity_diff_se": d["diff_se"],
                   "heldout": {r: (ta.row(ev, m, r)["diff"], ta.row(ev, m, r)["diff_se"])
                               for r in heldout}}
    c2 = ta.paired(ev, "online.r2", "craft")
    bd = ta.row(ev, "base", "diversity")
    ta.save_json(Path(args.out) / "toy_rounds.json", {
        "rows": rows, "online_minus_one_round": c2, "round2_pool": pool2,
        "round2_kept": coverage(kept2), "warnings": ev.warnings, "timings": timings,
        "base_diversity": [bd["mean"], bd["se"]]})
    what = {"craft": f"one round, {cfg.train.steps} steps",
            "online.r1": f"round 1 alone, {cfg.train.steps // 2} steps",
            "online.r2": f"two rounds, {cfg.train.steps // 2} + {cfg.train.steps // 2} steps"}
    lines = [
        "# Online CRAFT: two rounds against one (toy world)",
        "",
        f"Pool of round 1: the base model's {len(run.store.candidates_df(model=cfg.model.pretrained, split='train'))} "
        f"candidates (`{Path(args.config).name}`). Round 2: {pool2} new candidates from the "
        f"round-1 model (same prompts and variants, new seeds), filtered against that model's "
        f"own original-prompt images: {len(kept2)} kept from {coverage(kept2)['prompts']} "
        f"prompts. Same total steps ({cfg.train.steps}) for one round and two. Evaluation: "
        f"{cfg.eval.num_prompts} held-out prompts × {cfg.eval.seeds_per_prompt} seeds, shared "
        f"seeds, one evaluation (base diversity {bd['mean']:.1f} ± {bd['se']:.1f}, "
        f"{ev.diversity_metric}).",
        "",
        "| model | what | composite gain ± SE | win % | diversity ± SE | Δ diversity ± SE | "
        + " | ".join(f"{r} Δ ± SE" for r in heldout) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(heldout),
    ]
    for m, r in rows.items():
        lines.append(f"| {m} | {what[m]} | {r['gain']:+.3f} ± {r['gain_se']:.3f} | "
                     f"{100 * r['win_rate']:.0f} | {r['diversity']:.1f} ± "
                     f"{r['diversity_se']:.1f} | {r['diversity_diff']:+.1f} ± "
                     f"{r['diversity_diff_se']:.1f} | "
                     + " | ".join(f"{d:+.3f} ± {se:.3f}" for d, se in r["heldout"].values())
                     + " |")
    lines += [
        "",
        f"Two rounds − one round, composite, paired: **{c2[0]:+.3f} ± {c2[1]:.3f}** "
        f"(two rounds win {100 * c2[2]:.0f} % of pairs).",
        "",
        "Warnings the evaluation raised:", "", *([f"- {w}" for w in ev.warnings] or ["- none"]),
        "",
        ta.times_line(timings, args.threads, t_start, ""),
        "",
        "Reproduce: `.venv/bin/python benchmarks/toy_rounds.py --run-dir /tmp/bench/pareto` "
        "(after benchmarks/toy_pareto.py, or alone: it builds the pool).",
        "",
    ]
    ta.write_report(args.out, "toy_rounds.md", lines)


if __name__ == "__main__":
    main()
