"""The paper's ablations in the toy world, over several seeds, with intervals.

For each seed (a new candidate pool: generation.seed = training seed = s), on the same
candidates: the filter levels I_hpa / I_ha / I_h at the paper's 1 : 3 : 10 ratio of K, no filter
(every candidate, weight 1: the paper's "SFT (No Filter)"), plain SFT on CRAFT's own top-K
(weight 1: the paper's Table 10 "Vanilla SFT") against the advantage weighting, the advantage
modes clamp / raw / softmax, and the weighting question again at fewer passes (30 steps).
Every arm is evaluated with the base in one evaluation per seed (held-out prompts, shared
seeds). Across seeds: the mean of the per-seed paired differences and a 95 % t interval over
the seeds (each seed repeats candidates *and* training, so the interval holds both).

    .venv/bin/python benchmarks/toy_ablation.py [--seeds 0 1 2] [--run-root /tmp/bench/ablation]

Writes benchmarks/toy_ablation.json and the tables of benchmarks/toy_ablation.md (the reading
against the paper is added by hand below the tables). Resumes from --run-root.
"""

from __future__ import annotations

import time
from pathlib import Path

import toy_arms as ta
from toy_arms import Arm

# The default scale: half the toy default's prompts (64 x 20 = 1280 candidates), K and steps
# halved with it, so passes over the I_hpa set stay ~96 as in configs/toy.yaml.
SCALE = ["prompts.max_prompts=64", "filter.top_k=50", "train.steps=150",
         "eval.seeds_per_prompt=4"]


def arms(k: int, pool: int) -> list[Arm]:
    return [
        Arm("hpa", [f"filter.top_k={k}"], f"CRAFT: I_hpa, top-{k}, advantage clamp"),
        Arm("ha", ["filter.level=ha", f"filter.top_k={3 * k}"], f"I_ha, top-{3 * k}"),
        Arm("h", ["filter.level=h", f"filter.top_k={10 * k}"], f"I_h, top-{10 * k}"),
        Arm("nofilter", ["filter.level=none", f"filter.top_k={pool}", "advantage.mode=uniform"],
            f"no filter: all {pool}, weight 1"),
        Arm("vanilla", [f"filter.top_k={k}", "advantage.mode=uniform"],
            f"the I_hpa top-{k}, every weight 1 (vanilla SFT)"),
        Arm("raw", [f"filter.top_k={k}", "advantage.mode=raw"], "I_hpa, raw advantages"),
        Arm("softmax", [f"filter.top_k={k}", "advantage.mode=softmax"],
            "I_hpa, softmax(A / 1) weights"),
        Arm("hpa-30", [f"filter.top_k={k}", "train.steps=30"], "CRAFT at 30 steps"),
        Arm("vanilla-30", [f"filter.top_k={k}", "advantage.mode=uniform", "train.steps=30"],
            "vanilla SFT at 30 steps"),
    ]


CONTRASTS = [("hpa", "ha"), ("ha", "h"), ("h", "nofilter"), ("hpa", "nofilter"),
             ("hpa", "vanilla"), ("hpa-30", "vanilla-30"), ("raw", "hpa"), ("softmax", "hpa")]


def fmt(m: float, half: float, digits: int = 3) -> str:
    return f"{m:+.{digits}f} [±{half:.{digits}f}]"


def main() -> None:
    args = ta.parse_args(__doc__, "/tmp/bench/ablation", lambda ap: ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2]))
    t_start = time.time()
    per_seed, timings = {}, {}
    for s in args.seeds:
        base = [*SCALE, f"generation.seed={s}", f"train.seed={s}", *args.overrides]
        cfg = ta.arm_config(args.config, base, Arm("pool"))
        run = ta.build_pool(Path(args.run_dir) / f"seed-{s}", cfg, timings)
        pool = len(run.store.candidates_df(split="train"))
        arm_list = arms(cfg.filter.top_k, pool)
        facts, finals = {}, {}
        for arm in arm_list:
            facts[arm.name] = ta.train_arm(run, ta.arm_config(args.config, base, arm), arm,
                                           timings)
            finals[arm.name] = facts[arm.name]["final"]
        ev = ta.evaluate_arms(run, cfg, finals, "ablation", timings)
        rewards = ["composite", *cfg.rewards.eval_names, "diversity"]
        res = {"pool": pool, "arms": {}, "contrasts": {}, "warnings": ev.warnings,
               "base": {r: ta.row(ev, "base", r).get("mean") for r in rewards}}
        for arm in arm_list:
            res["arms"][arm.name] = {
                "note": arm.note, "facts": facts[arm.name],
                **{r: {k: ta.row(ev, arm.name, r).get(k) for k in ("mean", "diff", "diff_se",
                                                                   "win_rate")}
                   for r in rewards}}
        for a, b in CONTRASTS:
            res["contrasts"][f"{a} − {b}"] = ta.paired(ev, a, b)
        per_seed[s] = res
        ta.save_json(Path(args.out) / "toy_ablation.json",
                     {"seeds": per_seed, "scale": SCALE, "timings": timings})

    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    names = list(first["arms"])
    rewards = [r for r in next(iter(first["arms"].values())) if r not in ("note", "facts")]
    lines = [
        "# The paper's ablations in the toy world",
        "",
        f"Seeds {seeds}: each seed is a new candidate pool (generation.seed) and a new training "
        f"seed; pool {first['pool']} candidates (`{Path(args.config).name}` with "
        f"{' '.join(SCALE)}), the same held-out evaluation prompts and seeds for every arm. "
        "Cells: the mean over seeds of the paired difference from the base (or between two "
        "arms), and in brackets the half-width of a 95 % t interval over the seeds "
        f"(t with {len(seeds) - 1} degrees of freedom).",
        "",
        "## Each arm against the base",
        "",
        "| arm | what | kept | " + " | ".join(f"{r} Δ" for r in rewards)
        + " | composite win % |",
        "|---|---|---|" + "---|" * len(rewards) + "---|",
    ]
    for n in names:
        cells = []
        for r in rewards:
            m, h = ta.t_interval([per_seed[s]["arms"][n][r]["diff"] for s in seeds])
            cells.append(fmt(m, h, 1 if r == "diversity" else 3))
        w, wh = ta.t_interval([100 * per_seed[s]["arms"][n]["composite"]["win_rate"]
                               for s in seeds])
        kept = first["arms"][n]["facts"]["coverage"]["kept"]
        lines.append(f"| {n} | {first['arms'][n]['note']} | {kept} | " + " | ".join(cells)
                     + f" | {w:.1f} [±{wh:.1f}] |")
    lines += [
        "",
        "Base, mean over seeds: " + ", ".join(
            f"{r} {ta.t_interval([per_seed[s]['base'][r] for s in seeds])[0]:.3f}"
            for r in rewards if r != "composite") + ".",
        "",
        "## Arms against each other (composite, paired)",
        "",
        "| contrast | mean Δ [95 % over seeds] | per seed (Δ ± SE, win %) |",
        "|---|---|---|",
    ]
    for a, b in CONTRASTS:
        key = f"{a} − {b}"
        m, h = ta.t_interval([per_seed[s]["contrasts"][key][0] for s in seeds])
        each = "; ".join(f"{per_seed[s]['contrasts'][key][0]:+.3f} ± "
                         f"{per_seed[s]['contrasts'][key][1]:.3f}, "
                         f"{100 * per_seed[s]['contrasts'][key][2]:.0f} %" for s in seeds)
        lines.append(f"| {key} | {fmt(m, h)} | {each} |")
    lines += ["", "## Advantage weights of the I_hpa set", "",
              "| seed | weights min–max (std) | kept with A < 0 |", "|---|---|---|"]
    for s in seeds:
        f = per_seed[s]["arms"]["hpa"]["facts"]
        lines.append(f"| {s} | {f['weights']['min']:.2f}–{f['weights']['max']:.2f} "
                     f"({f['weights']['std']:.2f}) | {f['negative_advantages']} |")
    lines += ["", ta.times_line(timings, args.threads, t_start), "",
              "Reproduce: `.venv/bin/python benchmarks/toy_ablation.py --seeds 0 1 2`.", ""]
    ta.write_report(args.out, "toy_ablation.md", lines)


if __name__ == "__main__":
    main()
