"""The price of alignment against its controls: composite gain over the base vs diversity kept.

On one candidate pool (configs/toy.yaml), trains today's CRAFT default and each control at two
or three strengths, evaluates them all together (held-out prompts, shared seeds), and writes
benchmarks/toy_pareto.md / .json: per arm the composite gain over the base (paired), the
diversity across seeds (mean pairwise pixel RMS, paired against the base), the held-out
rewards, the kept set's coverage, and which arms are on the Pareto front. Controls:

- filter.per_prompt_cap (at most N kept images of one prompt),
- filter.dedup_threshold (near-duplicates dropped by pixel-embedding cosine),
- train.anchor_weight (a KL-style penalty towards the frozen base's predictions),
- fewer passes (train.steps).

    .venv/bin/python benchmarks/toy_pareto.py [--run-dir /tmp/bench/pareto] [--threads 2]
    .venv/bin/python benchmarks/toy_pareto.py --config configs/toy-flow.yaml \
        --run-dir /tmp/bench/pareto-flow      # -> benchmarks/toy_pareto_flow.md / .json

On the flow base the arms are the controls that moved diversity there
(benchmarks/toy_craft_flow.md: the anchor and fewer steps; the cap changed nothing), alone and
together, from which configs/toy-flow.yaml's default is chosen.

Interrupted, it resumes from what is in --run-dir (finished arms are not trained again).
"""

from __future__ import annotations

import time
from pathlib import Path

import toy_arms as ta
from toy_arms import Arm

# Today's (paper-plain) settings, stated, so an arm means the same whatever configs/toy.yaml
# recommends later: no cap, no near-duplicate rule, no anchor, 300 steps.
PLAIN = ["filter.per_prompt_cap=null", "filter.dedup_threshold=null", "train.anchor_weight=0",
         "train.steps=300"]
ARMS = [
    Arm("craft", [], "today's default (I_hpa, K = 100, 300 steps, clamp)"),
    Arm("cap6", ["filter.per_prompt_cap=6"], "at most 6 kept images per prompt"),
    Arm("cap3", ["filter.per_prompt_cap=3"], "at most 3 kept images per prompt"),
    Arm("dedup98", ["filter.dedup_threshold=0.98"], "near-duplicates at cosine >= 0.98 dropped"),
    Arm("dedup95", ["filter.dedup_threshold=0.95"], "near-duplicates at cosine >= 0.95 dropped"),
    Arm("anchor0.5", ["train.anchor_weight=0.5"], "KL-style anchor to the base, weight 0.5"),
    Arm("anchor2", ["train.anchor_weight=2"], "anchor weight 2"),
    Arm("anchor8", ["train.anchor_weight=8"], "anchor weight 8"),
    Arm("steps100", ["train.steps=100"], "100 steps (~32 passes) instead of 300 (~96)"),
    Arm("steps30", ["train.steps=30"], "30 steps (~10 passes)"),
    Arm("cap3-anchor2", ["filter.per_prompt_cap=3", "train.anchor_weight=2"],
        "cap 3 and anchor 2 together"),
]

FLOW_ARMS = [
    Arm("craft", [], "the plain setting (I_hpa, K = 100, 300 steps, clamp)"),
    Arm("steps100", ["train.steps=100"], "100 steps (~32 passes): configs/toy.yaml's default"),
    Arm("steps50", ["train.steps=50"], "50 steps (~16 passes)"),
    Arm("steps100-anchor0.5", ["train.steps=100", "train.anchor_weight=0.5"],
        "100 steps and anchor 0.5"),
    Arm("steps100-anchor1", ["train.steps=100", "train.anchor_weight=1"],
        "100 steps and anchor 1"),
    Arm("steps100-anchor0.75", ["train.steps=100", "train.anchor_weight=0.75"],
        "100 steps and anchor 0.75"),
    Arm("steps50-anchor0.5", ["train.steps=50", "train.anchor_weight=0.5"],
        "50 steps and anchor 0.5"),
]


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Arms no other arm beats on both gain and diversity."""
    front = set()
    for a, (g, d) in points.items():
        if not any(g2 >= g and d2 >= d and (g2, d2) != (g, d) for b, (g2, d2) in points.items()
                   if b != a):
            front.add(a)
    return front


def main() -> None:
    args = ta.parse_args(__doc__, "/tmp/bench/pareto", lambda ap: ap.add_argument(
        "--arms", nargs="*", default=None, help="only these arms (names)"))

    base = [*PLAIN, *args.overrides]
    cfg = ta.arm_config(args.config, base, ARMS[0])
    timings: dict = {}
    t_start = time.time()
    run = ta.build_pool(Path(args.run_dir), cfg, timings)
    flow = "flow" in Path(args.config).stem
    report = "toy_pareto_flow" if flow else "toy_pareto"
    arms = [a for a in (FLOW_ARMS if flow else ARMS) if args.arms is None or a.name in args.arms]
    facts, finals = {}, {}
    for arm in arms:
        acfg = ta.arm_config(args.config, base, arm)
        facts[arm.name] = ta.train_arm(run, acfg, arm, timings)
        finals[arm.name] = facts[arm.name]["final"]
    ev = ta.evaluate_arms(run, cfg, finals, "pareto", timings)

    heldout = [r for r in cfg.rewards.eval_names if r not in cfg.rewards.names]
    rows = {}
    base_div = ta.row(ev, "base", "diversity")
    for arm in arms:
        g, gse, win = ta.paired(ev, arm.name, "base")
        d = ta.row(ev, arm.name, "diversity")
        rows[arm.name] = {
            "note": arm.note, "overrides": arm.overrides, "gain": g, "gain_se": gse,
            "win_rate": win, "diversity": d["mean"], "diversity_se": d["se"],
            "diversity_diff": d["diff"], "diversity_diff_se": d["diff_se"],
            "heldout": {r: (ta.row(ev, arm.name, r)["diff"], ta.row(ev, arm.name, r)["diff_se"])
                        for r in heldout},
            "coverage": facts[arm.name]["coverage"]}
    ref = rows["craft"]
    for r in rows.values():
        r["gain_share"] = r["gain"] / ref["gain"] if ref["gain"] else float("nan")
        r["diversity_kept"] = ((r["diversity"] - ref["diversity"])
                               / (base_div["mean"] - ref["diversity"])
                               if base_div["mean"] != ref["diversity"] else float("nan"))
    front = pareto_front({k: (v["gain"], v["diversity"]) for k, v in rows.items()})
    eligible = {k: v for k, v in rows.items() if v["gain_share"] >= 0.8}
    pick = max(eligible, key=lambda k: (eligible[k]["diversity"], eligible[k]["gain"]))
    ta.save_json(Path(args.out) / f"{report}.json", {
        "config": Path(args.config).name, "overrides": base, "rows": rows,
        "base_diversity": [base_div["mean"], base_div["se"]], "front": sorted(front),
        "recommended": pick, "summary": ev.summary.to_dict(orient="records"),
        "warnings": ev.warnings, "timings": timings})

    c = cfg
    lines = [
        "# The price of alignment and its controls (toy world)",
        "",
        f"One pool: `{Path(args.config).name}`"
        + (f" with {' '.join(base)}" if base else "")
        + f", {len(run.store.candidates_df(split='train'))} candidates. Every arm changes only "
        f"what its overrides say (default: level {c.filter.level}, K {c.filter.top_k}, "
        f"{c.train.steps} steps × {c.train.effective_batch}, advantage `{c.advantage.mode}`, "
        f"training seed {c.train.seed}). All arms and the base are evaluated together: "
        f"{c.eval.num_prompts} held-out prompts × {c.eval.seeds_per_prompt} seeds, the same "
        "seeds for every model, so each gain is a paired difference over "
        f"{c.eval.num_prompts * c.eval.seeds_per_prompt} pairs and the composite is on one "
        "z-scale.",
        "",
        f"**Diversity** = {ev.diversity_metric} across the {c.eval.seeds_per_prompt} seeds of a "
        f"prompt, mean ± SE over prompts (base: **{base_div['mean']:.1f} ± "
        f"{base_div['se']:.1f}**). *Diversity kept* = how much of the diversity CRAFT loses "
        "(base − craft) an arm wins back: 0 % = as collapsed as the plain setting (craft), 100 % "
        "= as diverse as the base. *Gain share* = the arm's composite gain / craft's.",
        "",
        "| arm | what | kept (prompts, max/prompt) | composite gain ± SE | win % | gain share "
        "| diversity ± SE | Δ vs base ± SE | diversity kept | "
        + " | ".join(f"{r} Δ ± SE" for r in heldout) + " | front |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(heldout) + "---|",
    ]
    for name, r in rows.items():
        cov = r["coverage"]
        lines.append(
            f"| {name} | {r['note']} | {cov['kept']} ({cov['prompts']}, {cov['largest']}) | "
            f"{r['gain']:+.3f} ± {r['gain_se']:.3f} | {100 * r['win_rate']:.0f} | "
            f"{100 * r['gain_share']:.0f} % | {r['diversity']:.1f} ± {r['diversity_se']:.1f} | "
            f"{r['diversity_diff']:+.1f} ± {r['diversity_diff_se']:.1f} | "
            f"{100 * r['diversity_kept']:.0f} % | "
            + " | ".join(f"{d:+.3f} ± {se:.3f}" for d, se in r["heldout"].values())
            + f" | {'●' if name in front else ''} |")
    p = rows[pick]
    lines += [
        "",
        f"**Recommended** (the most diverse arm that keeps ≥ 80 % of the plain setting's composite gain): "
        f"**{pick}** — {p['note']}: gain {p['gain']:+.3f} ± {p['gain_se']:.3f} "
        f"({100 * p['gain_share']:.0f} % of craft's), diversity {p['diversity']:.1f} against "
        f"craft's {ref['diversity']:.1f} (base {base_div['mean']:.1f}), i.e. "
        f"{100 * p['diversity_kept']:.0f} % of the lost diversity kept.",
        "",
        "Warnings the evaluation raised (held-out reward or diversity down > 2 SE while a "
        "training reward rose):",
        "",
        *([f"- {w}" for w in ev.warnings] or ["- none"]),
        "",
        ta.times_line(timings, args.threads, t_start,
                      " (a resumed run counts only what it redid)"),
        "",
        "Reproduce: `.venv/bin/python benchmarks/toy_pareto.py "
        + (f"--config configs/{Path(args.config).name} " if flow else "")
        + f"--run-dir /tmp/bench/{report.replace('toy_', '').replace('_', '-')}`.",
        "",
    ]
    ta.write_report(args.out, f"{report}.md", lines)


if __name__ == "__main__":
    main()
