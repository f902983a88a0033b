"""The candidate pool at a fraction of the denoiser evaluations, in the toy world: a faster solver
at fewer steps, and early rejection, each judged on the kept set and on the tuned model.

For each base (the UNet toy, configs/toy.yaml, sampled today with DDIM at 20 steps; the flow
toy, configs/toy-flow.yaml, with its FlowMatchEuler at 20 steps) and seed (a new pool and
training seed), every arm builds its own pool through the library's own stages
(craft.stages.engine: prompts, generate, score; the same filter and CRAFT training as
``craft run``):

- ``plain20``: today's sampler at 20 steps (the reference pool);
- ``SOLVER N``: diffusers' DPM-Solver++ / UniPC (flow-sigma forms on the flow base) at N steps;
- ``SOLVER N + er(at, margin)``: the same with early rejection (generation.early_reject) at a
  check point and a safety margin.

Measured per arm: denoiser evaluations (RunStore.generation_cost) and wall time of generation
and scoring; the pool's rewards against plain20's on the same keys (same prompt, variant and
starting noise: paired); the kept set's overlap with plain20's kept set, its recall against the
same solver without early rejection (the "full run"), its mean composite on plain20's scale
(each reward z-scored with plain20's pool statistics, the filter's weights); and the tuned
model's composite gain and diversity change against the base, every arm's model of a seed in
one evaluation (held-out prompts x 4 seeds, plain20's sampler and steps, shared starting noise:
paired). Across seeds: means and 95 % t intervals.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/toy_candidates_cost.py --threads 1 \\
        [--bases toy toy-flow] [--seeds 0 1 2] [--sweep]  [--run-root /tmp/bench/cost]

``--sweep`` runs only pools (no training) over several step counts on one seed: where the
solver's pool stops matching plain20's. Writes benchmarks/toy_candidates_cost.json and .md;
resumes from --run-root.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import toy_arms as ta
from toy_arms import Arm

# Benchmark scale (both bases): 32 prompts x (1 + 4 variants) x 4 seeds = 640 candidates, K = 50,
# 100 CRAFT steps; evaluation on 32 held-out prompts x 4 seeds with plain20's sampler.
SCALE = ["prompts.max_prompts=32", "filter.top_k=50", "train.steps=100", "eval.num_prompts=32",
         "eval.seeds_per_prompt=4", "eval.num_inference_steps=20", "train.preview_every=0",
         "generation.early_reject=false"]
BASELINE = {"toy": "ddim", "toy-flow": "euler"}
SWEEP = {"toy": [("dpm", n) for n in (4, 6, 8, 10, 12)] + [("unipc", n) for n in (6, 8, 10)],
         "toy-flow": [("dpm", n) for n in (4, 6, 8, 10, 12)] + [("unipc", n) for n in (6, 8, 10)]
         + [("euler", n) for n in (8, 12)]}


def solver_arm(solver: str, n: int, er: tuple[float, float] | None = None) -> Arm:
    name = f"{solver}{n}" + (f"-er{er[0]:g}m{er[1]:g}" if er else "")
    sets = [f"generation.scheduler={solver}", f"generation.num_inference_steps={n}"]
    if er:
        sets += ["generation.early_reject=true", f"generation.early_reject_at={er[0]}",
                 f"generation.early_reject_margin={er[1]}"]
    return Arm(name, sets)


def arms_for(base: str, args) -> list[Arm]:
    arms = [Arm("plain20", [f"generation.scheduler={BASELINE[base]}",
                            "generation.num_inference_steps=20"])]
    if args.sweep:
        return arms + [solver_arm(s, n) for s, n in SWEEP[base]]
    solver, n = args.solver[base].split(":")
    arms.append(solver_arm(solver, int(n)))
    for extra in args.extra.get(base, []):  # solver:steps[:at:margin]
        s, k, *er = extra.split(":")
        arms.append(solver_arm(s, int(k), (float(er[0]), float(er[1])) if er else None))
    for er in args.early:
        at, margin = er.split(":")
        arms.append(solver_arm(solver, int(n), (float(at), float(margin))))
    return arms


def key(df) -> list[tuple]:
    return list(zip(df["prompt"], df["variant"], df["seed"].astype(int)))


def build_arm(run_dir: Path, cfg) -> tuple:
    """The arm's pool (resumed when there); its cost, times and selection."""
    from craft.stages.engine import open_run, stage_generate, stage_prompts, stage_score
    from craft.stages.selection import candidate_frame, select

    run = open_run(run_dir, cfg)
    run.save_config(cfg)
    stage_prompts(run, cfg)
    times = json.loads((run_dir / "times.json").read_text()) \
        if (run_dir / "times.json").exists() else {}
    if "generate" not in times:
        t0 = time.time()
        stage_generate(run, cfg)
        times["generate"] = time.time() - t0
        t0 = time.time()
        stage_score(run, cfg)
        times["score"] = time.time() - t0
        (run_dir / "times.json").write_text(json.dumps(times))
    stage_score(run, cfg)
    pool = candidate_frame(run.store, cfg)
    kept = select(run.store, cfg).rows
    return run, times, run.store.generation_cost(cfg.model.pretrained, "train"), pool, kept


def fixed_composite(frame, ref_pool, cfg) -> np.ndarray:
    """The composite of ``frame``'s rows on ``ref_pool``'s scale (z-scores with its mean and SD
    per reward, the filter's weights)."""
    w = cfg.filter.weights
    total = sum(w.values())
    out = np.zeros(len(frame))
    for r, wr in w.items():
        x = ref_pool[r].to_numpy(float)
        out += wr / total * (frame[r].to_numpy(float) - np.nanmean(x)) / np.nanstd(x)
    return out


def paired_pool(pool, ref, rewards: list[str], cfg) -> dict:
    """Per reward (and the fixed-scale composite): mean of pool - plain20 on the same keys,
    with a 95 % interval over the keys."""
    a = pool.assign(k=key(pool)).set_index("k")
    b = ref.assign(k=key(ref)).set_index("k")
    common = a.index.intersection(b.index)
    a, b = a.loc[common], b.loc[common]
    out = {}
    cols = {r: (a[r].to_numpy(float), b[r].to_numpy(float)) for r in rewards}
    cols["composite"] = (fixed_composite(a, ref, cfg), fixed_composite(b, ref, cfg))
    for r, (x, y) in cols.items():
        d = x - y
        d = d[np.isfinite(d)]
        se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        out[r] = {"diff": float(d.mean()), "ci": float(1.96 * se), "pool_mean": float(
            np.nanmean(x)), "ref_mean": float(np.nanmean(y)), "pool_sd": float(np.nanstd(x)),
            "ref_sd": float(np.nanstd(y)), "n": int(len(d))}
    return out


def kept_facts(kept, pool_ref, kept_ref, kept_full, cfg) -> dict:
    ks, kr = set(key(kept)), set(key(kept_ref))
    facts = {"kept": len(kept), "overlap20": len(ks & kr) / max(len(kr), 1),
             "kept_composite": float(np.mean(fixed_composite(kept, pool_ref, cfg)))}
    if kept_full is not None:
        kf = set(key(kept_full))
        facts["recall_full"] = len(ks & kf) / max(len(kf), 1)
    return facts


def run_seed(base: str, s: int, args, res: dict) -> None:
    config = str(ta.ROOT / "configs" / f"{base}.yaml")
    common = [*SCALE, f"generation.seed={s}", f"train.seed={s}", *args.overrides]
    arms = arms_for(base, args)
    root = Path(args.run_dir) / base / f"seed-{s}"
    built = {}
    for arm in arms:
        cfg = ta.arm_config(config, common, arm)
        built[arm.name] = (cfg, *build_arm(root / arm.name, cfg))
    cfg20, run20, _, _, pool20, kept20 = built["plain20"]
    rewards = list(cfg20.rewards.names)
    out = res.setdefault(str(s), {})
    for arm in arms:
        cfg, run, times, cost, pool, kept = built[arm.name]
        full = arm.name.split("-er")[0] if "-er" in arm.name else None
        row = {"times": times, "cost": cost, "overrides": arm.overrides,
               **kept_facts(kept, pool20, kept20, built[full][5] if full else None, cfg20)}
        if "-er" not in arm.name:
            row["pool"] = paired_pool(pool, pool20, rewards, cfg20)
        out.setdefault(arm.name, {}).update(row)
    if args.sweep:
        return
    finals = {}
    for arm in arms:
        cfg, run = built[arm.name][:2]
        from craft.stages.engine import stage_train

        t0 = time.time()
        r = stage_train(run, cfg, "craft", resume=None)
        out[arm.name].setdefault("train_s", time.time() - t0)
        finals[arm.name] = str(r.final_dir)
    ev = ta.evaluate_arms(run20, cfg20, finals, "cost", {})
    for arm in arms:
        out[arm.name]["tuned"] = {r: {k: ta.row(ev, arm.name, r).get(k) for k in
                                      ("mean", "diff", "diff_se", "win_rate")}
                                  for r in ["composite", *cfg20.rewards.eval_names, "diversity"]}
        if arm.name != "plain20":  # the tuned model against plain20's, paired on the images
            out[arm.name]["vs_plain20"] = dict(zip(("diff", "se", "win"), ta.paired(
                ev, arm.name, "plain20")))
    out["base_diversity"] = ta.row(ev, "base", "diversity").get("mean")


def main() -> None:
    args = ta.parse_args(__doc__, "/tmp/bench/cost", lambda ap: (
        ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2]),
        ap.add_argument("--bases", nargs="+", default=["toy", "toy-flow"]),
        ap.add_argument("--sweep", action="store_true"),
        ap.add_argument("--solver", type=json.loads,
                        default={"toy": "dpm:8", "toy-flow": "unipc:8"},
                        help='per base "solver:steps", as JSON'),
        ap.add_argument("--early", nargs="+", default=["0.4:1.0", "0.4:2.0", "0.5:1.0"],
                        help="early-rejection settings at:margin"),
        ap.add_argument("--extra", type=json.loads, default={},
                        help='per base, more arms "solver:steps[:at:margin]", as JSON: '
                             '{"toy": ["dpm:12", "dpm:12:0.4:1.0"]}'),
        ap.add_argument("--report-only", action="store_true")))
    t_start = time.time()
    name = "toy_candidates_cost_sweep" if args.sweep else "toy_candidates_cost"
    out = Path(args.out) / f"{name}.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    if not args.report_only:
        for base in args.bases:
            res = results.setdefault(base, {})
            for s in (args.seeds[:1] if args.sweep else args.seeds):
                run_seed(base, s, args, res)
                ta.save_json(out, results)
    from toy_candidates_cost_report import report

    ta.write_report(args.out, f"{name}.md", report(results, args, t_start, SCALE))


if __name__ == "__main__":
    main()
