"""The tables of benchmarks/toy_candidates_cost.md from toy_candidates_cost.json (kept apart
from the runner so a report can be re-rendered without loading a model)."""

from __future__ import annotations

import time

import numpy as np
import toy_arms as ta


def _seeds(res: dict) -> list[str]:
    return [s for s in res if s.isdigit()]


def _arms(res: dict) -> list[str]:
    first = res[_seeds(res)[0]]
    return [a for a in first if isinstance(first[a], dict)]


def _ti(values, d: int = 3, sign: bool = True) -> str:
    m, h = ta.t_interval(values)
    if not np.isfinite(m):
        return "–"
    body = f"{m:+.{d}f}" if sign else f"{m:.{d}f}"
    return body + (f" [±{h:.{d}f}]" if np.isfinite(h) else "")


def cost_table(res: dict) -> list[str]:
    seeds, arms = _seeds(res), _arms(res)
    plain = np.mean([res[s]["plain20"]["cost"]["evaluations"] for s in seeds])
    lines = ["| arm | denoiser evaluations | share of plain20 | plain sampler would spend | "
             "stopped early | generate s | score s | generate + score s |",
             "|---|---|---|---|---|---|---|---|"]
    for a in arms:
        rows = [res[s][a] for s in seeds]
        ev = np.mean([r["cost"]["evaluations"] for r in rows])
        pl = np.mean([r["cost"]["plain_evaluations"] for r in rows])
        st = np.mean([r["cost"]["stopped"] for r in rows])
        g = np.mean([r["times"]["generate"] for r in rows])
        sc = np.mean([r["times"]["score"] for r in rows])
        lines.append(f"| {a} | {ev:.0f} | {ev / plain:.0%} | {pl:.0f} | {st:.0f} | {g:.0f} | "
                     f"{sc:.0f} | {g + sc:.0f} |")
    return lines


def pool_table(res: dict, rewards: list[str]) -> list[str]:
    seeds, arms = _seeds(res), [a for a in _arms(res) if "-er" not in a and a != "plain20"]
    lines = ["| arm | " + " | ".join(f"{r} Δ" for r in rewards) + " | composite Δ (plain20 "
             "scale) | pool SD of " + rewards[0] + " (plain20) |",
             "|---|" + "---|" * (len(rewards) + 2)]
    for a in arms:
        cells = []
        for r in [*rewards, "composite"]:
            ds = [res[s][a]["pool"][r]["diff"] for s in seeds]
            cis = [res[s][a]["pool"][r]["ci"] for s in seeds]
            cells.append(f"{np.mean(ds):+.4f} ± {np.mean(cis):.4f}")
        p = res[seeds[0]][a]["pool"][rewards[0]]
        cells.append(f"{p['pool_sd']:.3f} ({p['ref_sd']:.3f})")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def kept_table(res: dict) -> list[str]:
    seeds, arms = _seeds(res), _arms(res)
    lines = ["| arm | kept | overlap with plain20's kept set | recall vs the same solver "
             "without early rejection | kept set's mean composite (plain20 scale) |",
             "|---|---|---|---|---|"]
    for a in arms:
        rows = [res[s][a] for s in seeds]
        rec = [r["recall_full"] for r in rows if "recall_full" in r]
        lines.append(f"| {a} | {np.mean([r['kept'] for r in rows]):.0f} | "
                     f"{_ti([r['overlap20'] for r in rows], 2, False)} | "
                     f"{_ti(rec, 2, False) if rec else '–'} | "
                     f"{_ti([r['kept_composite'] for r in rows], 3, False)} |")
    return lines


def tuned_table(res: dict, rewards: list[str]) -> list[str]:
    seeds, arms = _seeds(res), _arms(res)
    if not all("tuned" in res[s][a] for s in seeds for a in arms):
        return []
    cols = ["composite", *rewards, "diversity"]
    lines = ["| arm | " + " | ".join(f"{c} Δ" for c in cols) + " | composite win % | "
             "composite vs plain20's model (paired, per seed: Δ ± SE) |",
             "|---|" + "---|" * (len(cols) + 2)]
    for a in arms:
        cells = [_ti([res[s][a]["tuned"][c]["diff"] for s in seeds], 1 if c == "diversity"
                     else 3) for c in cols]
        cells.append(_ti([100 * res[s][a]["tuned"]["composite"]["win_rate"] for s in seeds], 1,
                         False))
        vs = [res[s][a].get("vs_plain20") for s in seeds]
        cells.append("–" if a == "plain20" or not all(vs) else "; ".join(
            f"{v['diff']:+.3f} ± {v['se']:.3f}" for v in vs))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def report(results: dict, args, t_start: float, scale: list[str]) -> list[str]:
    sweep = getattr(args, "sweep", False)
    lines = ["# The candidate pool at a fraction of the denoiser evaluations"
             + (": step sweep (pools only)" if sweep else ""), "",
             "Made by `OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python "
             f"benchmarks/toy_candidates_cost.py --threads 1{' --sweep' if sweep else ''}` "
             "(resumable; `--report-only` re-renders this file from its JSON).", "",
             f"Scale: {' '.join(scale)} (32 prompts x (1 + 4 variants) x 4 seeds = 640 "
             "candidates a pool, K = 50). Denoiser evaluations count every image's denoiser "
             "passes (a classifier-free-guided step is 2). Times: seconds on this shared 2-core "
             "machine (one torch thread, other jobs running), means over seeds. Intervals: "
             "pool Δ ± the 95 % interval over the pool's paired keys (same prompt, variant and "
             "starting noise as plain20), mean over seeds; other cells [± half-width of a 95 % "
             "t interval over seeds].", ""]
    for base, res in results.items():
        seeds = _seeds(res)
        if not seeds:
            continue
        first = res[seeds[0]]
        rewards = list(first["plain20"]["pool"])[:-1]
        lines += [f"## {base} (seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)})", "",
                  "### Cost", "", *cost_table(res), "",
                  "### The pool against plain20's (the same keys)", "", *pool_table(res, rewards),
                  "", "### The kept set", "", *kept_table(res), ""]
        tuned = tuned_table(res, ["toy_heldout", "toy_precision"])
        if tuned:
            div = np.mean([res[s].get("base_diversity") or np.nan for s in seeds])
            lines += ["### The tuned model (each arm's CRAFT model against the base, one "
                      "evaluation per seed, plain20's sampler)", "",
                      f"Base diversity {div:.1f} (mean pairwise pixel RMS across seeds).", "",
                      *tuned, ""]
    if not sweep:
        lines += CONCLUSION
    lines += [f"Rendered in {time.time() - t_start:.0f} s on {ta.machine()}.", ""]
    return lines


# What the tables above decided (configs/toy.yaml, toy-flow.yaml, sd15.yaml, sdxl.yaml say it
# beside the setting). Written by hand from the recorded seeds 0-2; re-read it when they change.
CONCLUSION = [
    "## What it says, and the defaults it set", "",
    "- **Toy UNet: the default is now DPM-Solver++ at 12 steps with early rejection after 40 % "
    "of the steps, margin 1 error SD** (`dpm12-er0.4m1`). It spends 46 % of plain20's denoiser "
    "evaluations and generates in 85 s instead of 204 s; its kept set's composite (0.987 against "
    "0.992) and its tuned model's gain (+1.231 against +1.224; paired per seed -0.02, +0.04, "
    "0.00, each within 1.3 SE of zero) are plain20's. The issue's goal of at most 40 % is not met "
    "at an unchanged gain: the 8-step arms reach 31-40 %, but their tuned models fall below "
    "plain20's on two seeds of three (up to -0.23 ± 0.04), so they are not the default.",
    "- **Toy flow base: unchanged (Euler, 20 steps).** UniPC at 8 or 10 steps costs 29-50 % of "
    "the evaluations, but every arm's tuned model is below plain20's on every seed (-0.005 to "
    "-0.17; 11 of the 18 paired differences 2 SE or more below zero): the gain does not hold, so the cheaper solver stays an option "
    "(configs/toy-flow.yaml names it).",
    "- **Early rejection's recall** against the same solver without it: 0.96-0.99 on the UNet, "
    "0.85-0.96 on the flow base (its predicted image at 40 % of the steps is noisier); margin 2 "
    "recovers most of the flow base's loss at 35 % of the evaluations instead of 29 %.",
    "- **Real models** (configs/sd15.yaml, sdxl.yaml): the UNet's setting, resting on this toy "
    "evidence alone. `craft plan configs/sdxl.yaml` prices the 100k-candidate pool at 10.0 H100 "
    "hours against 24.8 for DPM-Solver++ at 25 plain steps (2.48x, just short of the issue's "
    "2.5x), with the filter's rewards on the GPU during generation (18.1 GiB instead of 9.6). "
    "The plan assumes half the variants survive the check, as measured here with K = 50 of 640; "
    "the paper's K = 100 of 100k is stricter, so it should stop more.", ""]
