"""CRAFT on the flow-matching toy base: does the tuned MMDiT beat its base, and plain fine-tuning?

The pool, filter, training and evaluation of configs/toy-flow.yaml, through the library's own
stages (benchmarks/toy_arms.py): the toy base of the SD3 architecture (assets/toy-flow) generates
its candidates with its flow sampler, the composite filter keeps K = 100, the transformer is
fine-tuned with the flow-matching CRAFT loss (craft/models/flow.py). Against the base and the control
(the same fine-tune on as many *unfiltered random* plain-prompt samples of its own, weight 1),
on the held-out prompts with shared seeds. Writes benchmarks/toy_craft_flow.md and
benchmarks/toy_craft_flow_grid.png.

    .venv/bin/python benchmarks/toy_craft_flow.py [--run-dir /tmp/bench/flow]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import toy_arms as ta
from toy_arms import Arm

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    args = ta.parse_args(__doc__, "/tmp/bench/flow")
    if args.config.endswith("toy.yaml"):
        args.config = str(ROOT / "configs" / "toy-flow.yaml")
    t_start = time.time()
    timings: dict = {}
    cfg = ta.arm_config(args.config, list(args.overrides), Arm("craft"))
    run = ta.build_pool(Path(args.run_dir), cfg, timings)
    facts = ta.train_arm(run, cfg, Arm("craft"), timings)
    kept = facts["coverage"]["kept"]
    finals = {"craft": facts["final"], "control": ta.train_control(run, cfg, kept, timings)}
    ev = ta.evaluate_arms(run, cfg, finals, "flow-bench", timings)
    out = Path(args.out)
    shutil.copy(ev.grid_path, out / "toy_craft_flow_grid.png")
    cb, cc = ta.paired(ev, "craft", "base"), ta.paired(ev, "craft", "control")
    held = {r: ta.paired(ev, "craft", "base", r) for r in ("toy_heldout", "toy_precision")}
    n = len(ev.scores[ev.scores.model == "base"])
    c, f, t = cfg, cfg.filter, cfg.train
    z = cb[0] / cb[1]
    checks = [
        (cb[2] >= 0.80, f"composite win rate vs base {100 * cb[2]:.1f} % (bar: >= 80 %)"),
        (z > 5, f"composite gain {z:.1f} SE (bar: > 5)"),
        (held["toy_heldout"][0] + 2 * held["toy_heldout"][1] >= 0,
         f"held-out toy_heldout not worse: {held['toy_heldout'][0]:+.4f} ± "
         f"{held['toy_heldout'][1]:.4f} (bar: not below 0 by more than 2 SE)"),
    ]
    lines = [
        "# CRAFT on the flow-matching toy base",
        "",
        f"Base: `{c.model.pretrained}` (StableDiffusion3Pipeline: a 4-layer MMDiT, two CLIP + "
        "a T5 encoder, flow-matching Euler sampler; benchmarks/toy_base_flow.md). Pool: "
        f"`{Path(args.config).name}`, "
        f"{len(run.store.candidates_df(model=c.model.pretrained, split='train'))} candidates "
        f"({c.prompts.num_variants} variants × {c.generation.seeds_per_prompt} seeds per "
        f"prompt). **craft**: level {f.level}, K {f.top_k} ({kept} kept from "
        f"{facts['coverage']['prompts']} prompts, at most {facts['coverage']['largest']} from "
        f"one), {t.steps} steps × {t.effective_batch}, lr {t.lr}, EMA {t.ema_decay}, dropout "
        f"{t.cond_dropout}, advantage `{c.advantage.mode}`, flow-matching loss with "
        f"{t.timestep_sampling} sigmas and `{t.timestep_weighting}` w(sigma). **control**: the "
        f"same fine-tune on {kept} random plain-prompt samples, unfiltered, weight 1.",
        "",
        f"Evaluation: {len(set(ev.scores.prompt))} held-out prompts × {c.eval.seeds_per_prompt} "
        f"seeds = **{n} pairs** per comparison, the same seeds for every model; flow Euler "
        f"{c.eval.num_inference_steps} steps, guidance {c.eval.guidance_scale}. The composite "
        "is z-scored over the pooled images of all three models with the filter's weights. "
        "`toy_heldout` and `toy_precision` are never used for training or filtering; diversity "
        "is the mean pairwise pixel-RMS distance between one prompt's seed images.",
        "",
        "```",
        ev.table(),
        "```",
        "",
        f"craft vs base on the composite: paired {cb[0]:+.4f} ± {cb[1]:.4f}, craft wins "
        f"{100 * cb[2]:.1f} % of pairs. craft vs control: {cc[0]:+.4f} ± {cc[1]:.4f} "
        f"({100 * cc[2]:.1f} %). Held-out rewards, craft − base: "
        + ", ".join(f"{r} {d:+.4f} ± {se:.4f}" for r, (d, se, _) in held.items()) + ".",
        "",
        "Must show: " + "; ".join(f"{'yes' if ok else 'NO'}: {what}" for ok, what in checks)
        + ".",
        "",
        ta.times_line(timings, args.threads, t_start,
                      " (stages found done in the run are reused)"),
        "",
        "Reproduce: `.venv/bin/python benchmarks/toy_craft_flow.py`.",
        "",
        "![base vs CRAFT vs control](toy_craft_flow_grid.png)",
        "",
        "Each row one held-out prompt; blocks: base, craft, control; the same seeds in each "
        "block.",
        "",
    ]
    lines += controls_section(run, args, cfg, facts["final"], timings)
    ta.write_report(args.out, "toy_craft_flow.md", lines)


# The controls of benchmarks/toy_pareto.md, one at a time, on this base (at the strengths that
# kept most of the gain on the UNet base).
CONTROLS = [Arm("anchor1", ["train.anchor_weight=1.0"], "anchor to the base, beta 1.0"),
            Arm("cap3", ["filter.per_prompt_cap=3"], "at most 3 kept images per prompt"),
            Arm("steps50", ["train.steps=50"], "half the steps (50)")]


def controls_section(run, args, cfg, craft_final: str, timings: dict) -> list[str]:
    """A second evaluation: craft and each control against the base (its own composite
    z-scale, pooled over these models), to see which control buys back diversity and at what
    price in composite gain."""
    finals = {"craft": craft_final}
    for arm in CONTROLS:
        arm_cfg = ta.arm_config(args.config, list(args.overrides), arm)
        finals[arm.name] = ta.train_arm(run, arm_cfg, arm, timings)["final"]
    ev = ta.evaluate_arms(run, cfg, finals, "flow-controls", timings)
    out = ["## The alignment controls on this base", "",
           "A second evaluation (same prompts and seeds; composite z-scored over these models' "
           "images, so its values are not comparable with the table above): each control of "
           "benchmarks/toy_pareto.md alone, at the strength that kept most of the gain on the "
           "UNet base.", "",
           "| arm | what | composite vs base | win % | toy_heldout vs base | diversity (base "
           f"{ta.row(ev, 'base', 'diversity').get('mean', float('nan')):.1f}) |",
           "|---|---|---|---|---|---|"]
    notes = {"craft": "configs/toy-flow.yaml as it stands", **{a.name: a.note for a in CONTROLS}}
    for name in finals:
        d, se, win = ta.paired(ev, name, "base")
        h, hse, _ = ta.paired(ev, name, "base", "toy_heldout")
        div = ta.row(ev, name, "diversity")
        out.append(f"| {name} | {notes[name]} | {d:+.3f} ± {se:.3f} | {100 * win:.1f} | "
                   f"{h:+.4f} ± {hse:.4f} | {div.get('mean', float('nan')):.1f} |")
    return out + [""]


if __name__ == "__main__":
    main()
