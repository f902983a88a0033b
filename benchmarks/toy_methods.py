"""The paper's headline comparison in the toy world, made fair: CRAFT against SFT, Diffusion-DPO
and online GRPO, each in the setting its own sweep chose (benchmarks/toy_sweep.py: the
references' values, chosen by what the method trains toward on its training prompts, never by
the evaluation), at three budgets.

For each base (the UNet toy, configs/toy.yaml; the flow toy, configs/toy-flow.yaml) and seed
(a new pool and training seed), through the library's own stages (craft.stages.engine, as
``craft train --method M``):

- craft, sft, dpo: trained on the seed's pool (32 prompts x 20 candidates, without early
  rejection so DPO has its losers) in their chosen settings;
- grpo: online GRPO in its chosen setting, a checkpoint every 2 rounds. Its budgets are
  read off its checkpoints: CRAFT's number of images (the pool), CRAFT's wall time (generate +
  score + train of that seed), and on the ceiling seed its run to ``--ceiling-images`` sampled
  images (its best checkpoint and its last).

Every model of a seed is evaluated in one evaluation (held-out prompts and the two held-out
rewards, shared seeds), so all differences are paired. Across seeds: means and 95 % t
intervals over the seeds.

    .venv/bin/python benchmarks/toy_methods.py [--bases toy toy-flow] [--seeds 1 2 0]
        [--run-root /tmp/bench/methods] [--threads 1]

Writes benchmarks/toy_methods_BASE.json and benchmarks/toy_methods.md. Resumes from --run-root (a
finished arm is not trained again, evaluation images are reused).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import toy_arms as ta
import toy_sweep as sw
from toy_arms import Arm

# The benchmark scale (both bases): 32 prompts x 20 = 640 candidates, K = 50 (toy_sweep's).
SCALE = [*sw.ta_common(), "eval.num_prompts=32", "eval.seeds_per_prompt=4",
         "train.preview_every=0"]
CKPT_EVERY = 4  # GRPO steps between checkpoints (2 rounds of grpo.updates = 2)


def chosen_arms(base: str, methods=("craft", "sft", "dpo", "grpo")) -> dict[str, list[str]]:
    """Each method's overrides in the setting its sweep chose (benchmarks/toy_sweep_BASE.json)."""
    path = sw.out_path(base)
    if not path.exists():
        raise SystemExit(f"{path} is missing: run benchmarks/toy_sweep.py --base {base} first")
    res = json.loads(path.read_text())
    out = {}
    for method in methods:
        table = res.get(method) or {}
        if not table:
            raise SystemExit(f"{path} has no {method} sweep: run benchmarks/toy_sweep.py "
                             f"--base {base} --methods {method}")
        pick = sw.chosen(table)
        _, base_sets = sw.settings_of(method, sw.ROUNDS)
        out[method] = [*base_sets, *table[pick]["overrides"]]
        out[method + ":name"] = pick
    return out


def per_round(grpo_sets: list[str]) -> int:
    """Images a GRPO round samples: prompts_per_step x group_size."""
    return int(sw.override_value(grpo_sets, "grpo.prompts_per_step", "8")) * int(
        sw.override_value(grpo_sets, "grpo.group_size", "8"))


def updates(grpo_sets: list[str]) -> int:
    return int(sw.override_value(grpo_sets, "grpo.updates", "2"))


def grpo_metrics(run, name: str):
    rec = run.store.train_run_by_name(name)
    return run.store.metrics_df(int(rec["id"]))


def evaluated_steps(ckpts: list[int], ups: int) -> list[int]:
    """The checkpoints evaluated: every one of the first 16 rounds (the image and time
    budgets fall there), then one every 16 rounds, and the last."""
    early = [s for s in ckpts if s <= 16 * ups]
    late = [s for s in ckpts if s > 16 * ups and s % (16 * ups) == 0]
    return sorted(set(early + late + ckpts[-1:]))


def run_seed(base_name: str, config: str, s: int, args, res: dict, grpo_only: bool) -> bool:
    """One seed: its pool, GRPO in its chosen setting, then CRAFT, SFT and DPO in theirs and one
    evaluation of them all. ``grpo_only`` stops after GRPO (its sweep is done before the
    others', so the long GRPO run can start while they are swept). Returns whether the seed is
    complete. Times go to ``res["timings"]`` as they are measured (a resumed stage keeps its
    first measurement)."""
    from craft.run.layout import checkpoint_dirs, checkpoint_step, train_dir
    from craft.stages.engine import stage_train

    timings: dict = {}
    common = [*SCALE, f"generation.seed={s}", f"train.seed={s}", *args.overrides]
    cfg = ta.arm_config(config, common, Arm("pool"))
    run = ta.build_pool(Path(args.run_dir) / base_name / f"seed-{s}", cfg, timings)

    def keep_times():
        for k, v in timings.items():
            res["timings"].setdefault(f"{s}:{k}", v)

    keep_times()
    pool = len(run.store.candidates_df(model=cfg.model.pretrained, split="train"))
    g = chosen_arms(base_name, ("grpo",))["grpo"]
    img_round, ups = per_round(g), updates(g)
    images = args.ceiling_images if s == args.ceiling_seed else args.grpo_images
    # whole checkpoints: the last step is one (CKPT_EVERY steps = 2 rounds of 2 updates)
    per_ckpt = max(1, CKPT_EVERY // ups)
    rounds = math.ceil(images / img_round / per_ckpt) * per_ckpt
    gcfg = ta.arm_config(config, [*common, *g, f"train.steps={rounds * ups}",
                                  f"train.checkpoint_every={CKPT_EVERY}"], Arm("grpo"))
    if not getattr(args, "grpo_as_is", False):
        stage_train(run, gcfg, "grpo", resume=None)
    if grpo_only:
        return False
    arms_sets = chosen_arms(base_name)
    res["arms"] = arms_sets
    finals, facts = {}, {}
    for name in ("craft", "sft", "dpo"):
        acfg = ta.arm_config(config, common, Arm(name, arms_sets[name]))
        t0 = time.time()
        r = stage_train(run, acfg, name, resume=None)
        ta._add(timings, f"train {name}", time.time() - t0)
        keep_times()
        finals[name] = str(r.final_dir)
        rec = run.store.train_run_by_name(name)
        sel = run.store.selection_settings(int(rec["selection_id"]))
        facts[name] = {"n_pairs": sel.get("n_pairs"), "n_train": len(
            run.store.selection_items_df(int(rec["selection_id"])))}
    m = grpo_metrics(run, "grpo")
    wall = dict(zip(m["step"].astype(int), np.cumsum(m["step_time"].to_numpy(float))))
    sampled = sw.grpo_signal(m, dict(cfg.filter.weights))["curve"]
    ckpts = {checkpoint_step(c): str(c) for c in checkpoint_dirs(train_dir(run.run_dir,
                                                                           "grpo"))}
    models = dict(finals)
    for step in evaluated_steps(sorted(ckpts), ups):
        models[f"grpo@{step}"] = ckpts[step]
    ev = ta.evaluate_arms(run, cfg, models, "methods", timings)
    keep_times()
    rewards = ["composite", *cfg.rewards.eval_names, "diversity"]
    tm = res["timings"]
    craft_time = sum(tm.get(f"{s}:{k}", 0.0) for k in ("generate", "score", "train craft"))
    res["seeds"][str(s)] = {
        "pool": pool, "craft_time": craft_time, "images_per_round": img_round,
        "updates": ups, "wall": {str(k): float(v) for k, v in wall.items()},
        "sampled": sampled, "warnings": ev.warnings, "facts": facts,
        "base": {r: ta.row(ev, "base", r).get("mean") for r in rewards},
        "models": {mm: {r: {k: ta.row(ev, mm, r).get(k) for k in
                            ("mean", "diff", "diff_se", "win_rate")} for r in rewards}
                   for mm in models}}
    return True


def out_json(out: str, base: str) -> Path:
    return Path(out) / f"toy_methods_{base}.json"


def save_merged(out: Path, res: dict, s: int) -> None:
    """Write this seed's results into the base's file, keeping the seeds another process (one
    running the long GRPO seed beside the others) wrote meanwhile."""
    now = json.loads(out.read_text()) if out.exists() else {"seeds": {}, "timings": {}}
    if str(s) in res["seeds"]:
        now["seeds"][str(s)] = res["seeds"][str(s)]
    for k, v in res["timings"].items():
        if k.startswith(f"{s}:"):
            now["timings"].setdefault(k, v)
    if "arms" in res:
        now["arms"] = res["arms"]
    now.setdefault("notes", {}).update(res.get("notes", {}))
    ta.save_json(out, now)


def main() -> None:
    args = ta.parse_args(__doc__, "/tmp/bench/methods", lambda ap: (
        ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 0]),
        ap.add_argument("--bases", nargs="+", default=["toy", "toy-flow"]),
        ap.add_argument("--grpo-images", type=int, default=1024,
                        help="GRPO's sampled images on every seed but the ceiling seed"),
        ap.add_argument("--ceiling-seed", type=int, default=0),
        ap.add_argument("--ceiling-images", type=int, default=10_000),
        ap.add_argument("--grpo-only", action="store_true",
                        help="train only the seeds' GRPO runs (its sweep done, the others' "
                             "not yet)"),
        ap.add_argument("--grpo-as-is", action="store_true",
                        help="evaluate a stopped GRPO run's checkpoints as they are (its run "
                             "to the ceiling cut short), without training it further"),
        ap.add_argument("--report-only", action="store_true",
                        help="re-render toy_methods.md from the json files, run nothing")))
    t_start = time.time()
    if not args.report_only:
        for base_name in args.bases:
            out = out_json(args.out, base_name)
            res = json.loads(out.read_text()) if out.exists() else {"seeds": {}, "timings": {}}
            config = str(ta.ROOT / "configs" / f"{base_name}.yaml")
            for s in args.seeds:
                if str(s) in res["seeds"]:
                    continue
                run_seed(base_name, config, s, args, res, args.grpo_only)
                save_merged(out, res, s)
    results = {b: json.loads(out_json(args.out, b).read_text()) for b in ("toy", "toy-flow")
               if out_json(args.out, b).exists()}
    ta.write_report(args.out, "toy_methods.md", report(results, args, t_start))


def _grpo_points(sr: dict) -> list[tuple[int, float, float]]:
    """(step, wall seconds, composite gain) of each evaluated GRPO checkpoint of a seed."""
    pts = []
    for m, v in sr["models"].items():
        if m.startswith("grpo@"):
            step = int(m.split("@")[1])
            pts.append((step, sr["wall"].get(str(step), float("nan")), v["composite"]["diff"]))
    return sorted(pts)


def _cosine(a: dict, b: dict, rewards: list[str]) -> float:
    """Cosine of two models' per-reward gain profiles, each gain in units of its SE: do they
    move the same rewards the same way?"""
    x = np.array([a[r]["diff"] / a[r]["diff_se"] for r in rewards])
    y = np.array([b[r]["diff"] / b[r]["diff_se"] for r in rewards])
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def craft_wall(res: dict, s: str) -> float:
    """CRAFT's whole-pipeline time of seed ``s``: its pool's generation and scoring and its
    training, from the recorded stage times."""
    return sum(float(res["timings"].get(f"{s}:{k}", 0.0))
               for k in ("generate", "score", "train craft"))


def budget_step(sr: dict, budget: str) -> int:
    """The GRPO checkpoint of a seed at a budget: ``images`` the first with at least the pool's
    images sampled, ``time`` the one nearest CRAFT's whole-pipeline time."""
    pts = _grpo_points(sr)
    per = sr["images_per_round"] / sr["updates"]
    if budget == "images":
        return next((p[0] for p in pts if p[0] * per >= sr["pool"]), pts[-1][0])
    return min(pts, key=lambda p: abs(p[1] - sr["craft_time"]))[0]


def _sweep_lines() -> list[str]:
    text = (ta.ROOT / "benchmarks" / "toy_sweep.md").read_text().splitlines()
    return ["## The sweep (seed 0 of each base)", "",
            "From benchmarks/toy_sweep.md (its own file has the recipes in full):", "",
            *[ln.replace("## ", "### ", 1) if ln.startswith("## ") else ln
              for ln in text[text.index("") + 1:] if not ln.startswith("# ")]]


def _weighting_lines() -> list[str]:
    text = (ta.ROOT / "benchmarks" / "toy_weighting.md").read_text().splitlines()
    table = [ln for ln in text if ln.startswith("|")]
    return ["## When weighting pays (toy base, 3 seeds; benchmarks/toy_weighting.md)", "",
            "CRAFT and SFT on the very same kept sets as the set grows and loosens: the "
            "weighting adds nothing on small strict sets and pays on large loose ones.", "",
            *table, ""]


def report(results: dict, args, t_start: float) -> list[str]:
    lines = ["# CRAFT against SFT, Diffusion-DPO and online GRPO in the toy world, each tuned",
             "",
             "Made by `.venv/bin/python benchmarks/toy_methods.py --threads 1` after "
             "`benchmarks/toy_sweep.py` (resumable; `--report-only` re-renders this file from "
             "toy_methods_toy.json and toy_methods_toy-flow.json). Each method runs in the "
             "setting its own sweep chose (below: "
             "the references' values, chosen on seed 0 by what the method trains toward on its "
             "training prompts, never by this evaluation).", "",
             f"Scale: {' '.join(SCALE)}. Every model of a seed is evaluated in one evaluation "
             "(32 held-out prompts x 4 seeds, the same starting noise for every model; the "
             "composite over the three training rewards, standardised within the evaluation, "
             "and the two held-out rewards), so each Δ is a paired difference from the base. "
             "Cells: the mean over seeds and, in brackets, the half-width of a 95 % t interval "
             "over the seeds (3 seeds: t = 4.30, so intervals are wide by construction). "
             "Times: this machine (2 cores), two to four benchmark processes side by side at "
             "one thread each (the long GRPO runs beside the other seeds), so every time is "
             "inflated by the load, and not evenly: read the cost ratios as rough, the image "
             "counts as exact; GRPO's time is the sum of its "
             "step times (sampling, scoring, updates; loading and checkpoint saving left out, "
             "which favours GRPO); CRAFT's is its pool's generation and scoring plus its "
             "training.", ""]
    for base_name, res in results.items():
        seeds = [s for s in ("0", "1", "2") if s in res["seeds"]]
        if not seeds:
            continue
        arms = res["arms"]
        first = res["seeds"][seeds[0]]
        rewards = list(first["base"])
        tm = res["timings"]

        def t(s, key):
            return float(tm.get(f"{s}:{key}", 0.0))

        for s in seeds:
            res["seeds"][s]["craft_time"] = craft_wall(res, s)
        lines += [f"## {base_name} ({len(seeds)} seeds: {', '.join(seeds)})", "",
                  *[f"Note (seed {k}): {v}.\n" for k, v in res.get("notes", {}).items()],
                  "Chosen settings: " + "; ".join(
                      f"{m} **{arms[m + ':name']}** (`{' '.join(arms[m])}`)"
                      for m in ("craft", "sft", "dpo", "grpo")), "",
                  "| model | trained on | " + " | ".join(f"{r} Δ" for r in rewards)
                  + " | composite win % | images generated + scored | wall s |",
                  "|---|---|" + "---|" * len(rewards) + "---|---|---|"]

        def cells(model_of: dict, ss: list[str]) -> list[str]:
            out = []
            for r in rewards:
                d = 1 if r == "diversity" else 3
                m, h = ta.t_interval([res["seeds"][s]["models"][model_of[s]][r]["diff"]
                                      for s in ss])
                out.append(f"{m:+.{d}f} [±{h:.{d}f}]" if len(ss) > 1 else f"{m:+.{d}f}")
            w, wh = ta.t_interval([100 * res["seeds"][s]["models"][model_of[s]]["composite"][
                "win_rate"] for s in ss])
            return out + ([f"{w:.1f} [±{wh:.1f}]"] if len(ss) > 1 else [f"{w:.1f}"])

        pool = first["pool"]
        for name in ("craft", "sft", "dpo"):
            what = (f"{first['facts'][name]['n_pairs']} pairs" if name == "dpo" else
                    f"K={first['facts'][name]['n_train']} kept" + (", weight 1"
                                                                  if name == "sft" else ""))
            wall = np.mean([t(s, "generate") + t(s, "score") + t(s, f"train {name}")
                            for s in seeds])
            lines.append(f"| {name} | {what} | " + " | ".join(cells({s: name for s in seeds},
                                                                     seeds))
                         + f" | {pool} | {wall:.0f} |")
        for budget, label in (("images", "grpo at CRAFT's images"),
                              ("time", "grpo at CRAFT's wall time")):
            steps = {s: budget_step(res["seeds"][s], budget) for s in seeds}
            imgs = np.mean([steps[s] // res["seeds"][s]["updates"]
                            * res["seeds"][s]["images_per_round"] for s in seeds])
            wall = np.mean([res["seeds"][s]["wall"][str(steps[s])] for s in seeds])
            lines.append(f"| {label} | steps {', '.join(str(steps[s]) for s in seeds)} | "
                         + " | ".join(cells({s: f"grpo@{steps[s]}" for s in seeds}, seeds))
                         + f" | {imgs:.0f} | {wall:.0f} |")
        ceil = [s for s in seeds if max(p[0] for p in _grpo_points(res["seeds"][s]))
                > 2 * budget_step(res["seeds"][s], "images")]
        for s in ceil:
            sr = res["seeds"][s]
            pts = _grpo_points(sr)
            best = max(pts, key=lambda p: p[2])
            for label, p in ((f"grpo ceiling, best checkpoint (seed {s})", best),
                             (f"grpo ceiling, last (seed {s})", pts[-1])):
                imgs = p[0] // sr["updates"] * sr["images_per_round"]
                lines.append(f"| {label} | step {p[0]} | " + " | ".join(
                    cells({s: f"grpo@{p[0]}"}, [s])) + f" | {imgs} | {p[1]:.0f} |")
        if ceil:
            lines.append("")
            lines.append("Ceiling rows are one seed: no interval; the CRAFT row to set them "
                         "beside is that seed's (the cost table below).")

        lines += ["", "### The measured cost ratio (GRPO's wall time and images to reach "
                  "CRAFT's gain)", "",
                  "Per seed: the first evaluated GRPO checkpoint whose composite gain reaches "
                  "CRAFT's on the same evaluation; on the ceiling seed GRPO runs to "
                  f"{args.ceiling_images} sampled images, on the others to {args.grpo_images}.",
                  "", "| seed | CRAFT gain | CRAFT wall s | GRPO checkpoint that reaches it | "
                  "GRPO wall s | cost ratio | GRPO images | data ratio (÷ CRAFT's pool) | "
                  "GRPO's best gain (step) |", "|---|---|---|---|---|---|---|---|---|"]
        for s in seeds:
            sr = res["seeds"][s]
            gain = sr["models"]["craft"]["composite"]["diff"]
            pts = _grpo_points(sr)
            reach = next((p for p in pts if p[2] >= gain), None)
            p = reach or pts[-1]
            imgs = p[0] // sr["updates"] * sr["images_per_round"]
            more = "" if reach else "> "
            best = max(pts, key=lambda q: q[2])
            lines.append(f"| {s} | {gain:+.3f} | {sr['craft_time']:.0f} | "
                         + (f"step {p[0]}" if reach else f"none up to step {p[0]}")
                         + f" | {more}{p[1]:.0f} | {more}{p[1] / sr['craft_time']:.2f} | "
                         f"{more}{imgs} | {more}{imgs / sr['pool']:.2f} | "
                         f"{best[2]:+.3f} ({best[0]}) |")

        for s in seeds:
            sr = res["seeds"][s]
            pts = _grpo_points(sr)
            if s not in ceil:
                continue
            curve = sr["sampled"]
            k = max(1, len(curve) // 10)
            lines += ["", f"### GRPO's run to its ceiling (seed {s}): the training reward it "
                      "samples and the evaluation of its checkpoints", "",
                      "The sampled composite (filter.weights over each round's mean rewards, "
                      f"the images GRPO trains on), averaged over blocks of {k} rounds:", "",
                      "| rounds | images sampled | sampled composite |", "|---|---|---|"]
            for i in range(0, len(curve), k):
                blk = curve[i:i + k]
                lines.append(f"| {i}-{i + len(blk) - 1} | {(i + len(blk)) * sr['images_per_round']}"
                             f" | {np.mean(blk):.4f} |")
            f3, l3 = sw._thirds(curve)
            lines += ["", f"First third of the rounds {f3:.4f}, last third {l3:.4f} "
                      f"({'above' if l3 > f3 else 'NOT above'} the first third, {l3 - f3:+.4f}).",
                      "", "| step | images sampled | wall s | composite Δ ± SE | win % | "
                      "toy_heldout Δ | diversity Δ |", "|---|---|---|---|---|---|---|"]
            for step, wall, gain in pts:
                mm = sr["models"][f"grpo@{step}"]
                lines.append(f"| {step} | {step // sr['updates'] * sr['images_per_round']} | "
                             f"{wall:.0f} | {gain:+.3f} ± {mm['composite']['diff_se']:.3f} | "
                             f"{100 * mm['composite']['win_rate']:.1f} | "
                             f"{mm['toy_heldout']['diff']:+.3f} | "
                             f"{mm['diversity']['diff']:+.1f} |")

        profile = [r for r in rewards if r != "composite"]
        lines += ["", "### Does CRAFT move the rewards the way GRPO's first steps do?", "",
                  "Theorem 3.1 (the advantage-weighted loss is a first-order lower bound of the "
                  "group-RL objective) predicts that at the base CRAFT's update points where "
                  "GRPO's first on-policy steps point. Checked on what can be measured: the "
                  "cosine between the per-reward gain profiles (each Δ in units of its SE, over "
                  f"{', '.join(profile)}) of CRAFT and of GRPO at CRAFT's images, against the "
                  "same for SFT and DPO.", "",
                  "| seed | GRPO checkpoint | cos(CRAFT, GRPO) | cos(SFT, GRPO) | "
                  "cos(DPO, GRPO) |", "|---|---|---|---|---|"]
        for s in seeds:
            sr = res["seeds"][s]
            k = f"grpo@{budget_step(sr, 'images')}"
            lines.append(f"| {s} | {k} | " + " | ".join(
                f"{_cosine(sr['models'][m], sr['models'][k], profile):+.2f}"
                for m in ("craft", "sft", "dpo")) + " |")
        counts: dict[tuple[str, str], int] = {}
        for s in seeds:
            for w in res["seeds"][s]["warnings"]:
                model, _, rest = w.partition(": ")
                if model.startswith("grpo@"):
                    model = "grpo (any checkpoint)"
                what = rest.split(" fell")[0]
                counts[(model, what)] = counts.get((model, what), 0) + 1
        lines += ["", "Drift warnings the evaluations raised (a held-out reward or the diversity "
                  "down by more than 2 SE while a training reward rose), counted over the seeds:",
                  "", "| model | fell | times |", "|---|---|---|",
                  *[f"| {m} | {w} | {n} |" for (m, w), n in sorted(counts.items())], ""]
    lines += _sweep_lines() + [""] + _weighting_lines()
    lines += ["", f"Rendered in {time.time() - t_start:.0f} s on {ta.machine()} "
              f"({args.threads} threads).", ""]
    return lines


if __name__ == "__main__":
    main()
