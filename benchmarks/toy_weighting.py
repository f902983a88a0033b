"""When does advantage weighting pay? CRAFT against plain SFT on the same kept sets, as the set
grows (top-K 50, 150, the whole passing set) and loosens (levels I_hpa, I_h, none), and the
advantage modes on the loosest large set; 3 seeds, in the toy world.

For each seed (a new complete pool: generation.seed = training seed = s, early rejection off so
that looser settings find every candidate), every (level, K) trains two arms on the very same
kept set: CRAFT (advantage.mode clamp: weight max(A, 0) / mean) and SFT (train.method sft:
weight 1). All arms of a seed are evaluated in one evaluation (held-out prompts, shared seeds),
so CRAFT − SFT is paired per seed; the interval is a 95 % t interval over the seeds.

    .venv/bin/python benchmarks/toy_weighting.py [--seeds 0 1 2] [--threads 1]

Writes benchmarks/toy_weighting.json and benchmarks/toy_weighting.md. Resumes from --run-root.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import toy_arms as ta
from toy_arms import Arm

# 32 prompts x (1 + 4 variants) x 4 seeds = 640 candidates a pool; 100 steps of 32 images.
SCALE = ["prompts.max_prompts=32", "train.steps=100", "eval.num_prompts=32",
         "eval.seeds_per_prompt=4", "train.preview_every=0", "generation.early_reject=false"]
LEVELS = ("hpa", "h", "none")


def arms(pool: int) -> list[Arm]:
    # the top 50 by composite pass every level here (seed 0: the same 50 images at hpa, h and
    # none), so top-50 is trained once, at hpa; 150 and "all" differ by level
    out = []
    for level in LEVELS:
        for k in ((50, 150, pool) if level == "hpa" else (150, pool)):
            tag = f"{level}-{'all' if k == pool else k}"
            sets = [f"filter.level={level}", f"filter.top_k={k}"]
            what = f"level {level}, {'every passing candidate' if k == pool else f'top-{k}'}"
            out += [Arm(f"craft-{tag}", sets, f"CRAFT (clamp), {what}"),
                    Arm(f"sft-{tag}", [*sets, "train.method=sft"], f"SFT (weight 1), {what}")]
    for mode in ("raw", "softmax"):
        out.append(Arm(f"{mode}-none-all", ["filter.level=none", f"filter.top_k={pool}",
                                             f"advantage.mode={mode}"],
                       f"advantage {mode}, level none, the whole pool"))
    return out


def pairs(pool_arms: list[Arm]) -> list[tuple[str, str]]:
    names = {a.name for a in pool_arms}
    out = [(n, "sft-" + n.removeprefix("craft-")) for n in sorted(names) if n.startswith("craft-")]
    return out + [(n, "sft-none-all") for n in ("raw-none-all", "softmax-none-all")]


def run_seed(args, s: int, timings: dict) -> dict:
    base = [*SCALE, f"generation.seed={s}", f"train.seed={s}", *args.overrides]
    cfg = ta.arm_config(args.config, base, Arm("pool"))
    run = ta.build_pool(Path(args.run_dir) / f"seed-{s}", cfg, timings)
    pool = len(run.store.candidates_df(split="train"))
    arm_list = arms(pool)
    facts, finals = {}, {}
    for arm in arm_list:
        facts[arm.name] = ta.train_arm(run, ta.arm_config(args.config, base, arm), arm, timings)
        finals[arm.name] = facts[arm.name]["final"]
    ev = ta.evaluate_arms(run, cfg, finals, "weighting", timings)
    res = {"pool": pool, "arms": {}, "pairs": {}}
    for arm in arm_list:
        res["arms"][arm.name] = {
            "note": arm.note, "facts": facts[arm.name],
            **{r: {k: ta.row(ev, arm.name, r).get(k) for k in ("diff", "diff_se", "win_rate")}
               for r in ("composite", "toy_heldout", "toy_precision", "diversity")}}
    for a, b in pairs(arm_list):
        res["pairs"][f"{a} − {b}"] = ta.paired(ev, a, b)
    return res


def report(per_seed: dict, timings: dict, args, t_start: float) -> list[str]:
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    lines = ["# When advantage weighting pays: CRAFT against SFT on the same kept sets", "",
             f"Made by `.venv/bin/python benchmarks/toy_weighting.py --threads {args.threads}` "
             f"(seeds {seeds}; `configs/toy.yaml` with {' '.join(SCALE)}: a pool of "
             f"{first['pool']} candidates a seed). CRAFT and SFT train on the very same kept set "
             "(the one selection); every arm of a seed is evaluated in one evaluation on shared "
             "held-out prompts and seeds. Cells: mean over seeds [± half-width of a 95 % t "
             "interval over seeds].", "",
             "| kept set | kept | weights' std (CRAFT) | CRAFT composite Δ | SFT composite Δ | "
             "CRAFT − SFT (paired) | per seed (Δ ± SE) | diversity Δ CRAFT / SFT |",
             "|---|---|---|---|---|---|---|---|"]
    order = [f"craft-{t}" for t in ("hpa-50", "hpa-150", "h-150", "none-150", "hpa-all",
                                     "h-all", "none-all")] + ["raw-none-all", "softmax-none-all"]
    for key in sorted(first["pairs"], key=lambda k: order.index(k.split(" − ")[0])):
        a, b = key.split(" − ")
        A = [per_seed[s]["arms"][a] for s in seeds]
        B = [per_seed[s]["arms"][b] for s in seeds]
        kept = int(sum(x["facts"]["coverage"]["kept"] for x in A) / len(A))
        wstd = ta.t_interval([x["facts"]["weights"]["std"] for x in A])[0]
        ca, ha = ta.t_interval([x["composite"]["diff"] for x in A])
        cb, hb = ta.t_interval([x["composite"]["diff"] for x in B])
        d, hd = ta.t_interval([per_seed[s]["pairs"][key][0] for s in seeds])
        each = "; ".join(f"{per_seed[s]['pairs'][key][0]:+.3f} ± "
                         f"{per_seed[s]['pairs'][key][1]:.3f}" for s in seeds)
        da = ta.t_interval([x["diversity"]["diff"] for x in A])[0]
        db = ta.t_interval([x["diversity"]["diff"] for x in B])[0]
        lines.append(f"| {A[0]['note']} | {kept} | {wstd:.2f} | {ca:+.3f} [±{ha:.3f}] | "
                     f"{cb:+.3f} [±{hb:.3f}] | **{d:+.3f} [±{hd:.3f}]** | {each} | "
                     f"{da:+.1f} / {db:+.1f} |")
    lines += ["", "At levels hpa and h the top 150 by composite are the same images in "
              "these pools (the two rows are one training, repeated with the same seeds); "
              "level none's top 150 differs by a few images.", "",
              f"Times on {ta.machine()} ({args.threads} thread(s)), seconds summed over the "
              "seeds (a resumed seed counts only what it redid): "
              + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".", ""]
    return lines


def main() -> None:
    args = ta.parse_args(__doc__, "/tmp/bench/weighting", lambda ap: (
        ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2]),
        ap.add_argument("--report-only", action="store_true",
                        help="re-render toy_weighting.md from toy_weighting.json")))
    t_start = time.time()
    if args.report_only:
        data = json.loads((Path(args.out) / "toy_weighting.json").read_text())
        ta.write_report(args.out, "toy_weighting.md",
                        report(data["seeds"], data["timings"], args, t_start))
        return
    per_seed, timings = {}, {}
    for s in args.seeds:
        per_seed[s] = run_seed(args, s, timings)
        ta.save_json(Path(args.out) / "toy_weighting.json",
                     {"seeds": per_seed, "scale": SCALE, "timings": timings})
        ta.write_report(args.out, "toy_weighting.md", report(per_seed, timings, args, t_start))


if __name__ == "__main__":
    main()
