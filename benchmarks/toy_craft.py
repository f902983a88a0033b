"""CRAFT in the toy world: does the tuned model beat the base, and beat plain fine-tuning?

On the pool of benchmarks/toy_pareto.py (same run directory; trained arms are reused), three
tuned models against the base on the held-out prompts with shared seeds: the paper-plain CRAFT
("craft": I_hpa, K = 100, no controls), CRAFT with configs/toy.yaml as it stands ("toy-default",
the recommended controls), and the control that tells alignment from drift (the same fine-tune
on an *unfiltered random* subset of the model's own plain-prompt samples, weight 1). Writes
benchmarks/toy_craft.md and benchmarks/toy_craft_grid.png.

    .venv/bin/python benchmarks/toy_craft.py [--run-dir /tmp/bench/pareto]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import toy_arms as ta
from toy_arms import Arm


def main() -> None:
    args = ta.parse_args(__doc__, "/tmp/bench/pareto")
    from toy_pareto import PLAIN

    t_start = time.time()
    timings: dict = {}
    plain = ta.arm_config(args.config, [*PLAIN, *args.overrides], Arm("craft"))
    default = ta.arm_config(args.config, list(args.overrides), Arm("toy-default"))
    run = ta.build_pool(Path(args.run_dir), plain, timings)
    facts = {"craft": ta.train_arm(run, plain, Arm("craft"), timings),
             "toy-default": ta.train_arm(run, default, Arm("toy-default"), timings)}
    kept = facts["craft"]["coverage"]["kept"]
    finals = {"craft": facts["craft"]["final"], "toy-default": facts["toy-default"]["final"],
              "control": ta.train_control(run, plain, kept, timings)}
    ev = ta.evaluate_arms(run, plain, finals, "craft-bench", timings)
    out = Path(args.out)
    shutil.copy(ev.grid_path, out / "toy_craft_grid.png")
    cc = ta.paired(ev, "craft", "control")
    dc = ta.paired(ev, "toy-default", "craft")
    f, t = default.filter, default.train
    controls = ", ".join(x for x in (
        f"per_prompt_cap {f.per_prompt_cap}" if f.per_prompt_cap else "",
        f"dedup_threshold {f.dedup_threshold}" if f.dedup_threshold is not None else "",
        f"anchor_weight {t.anchor_weight}" if t.anchor_weight else "",
        f"steps {t.steps}" if t.steps != plain.train.steps else "") if x) or "none"
    n = len(ev.scores[ev.scores.model == "base"])
    c = plain
    lines = [
        "# CRAFT in the toy world",
        "",
        f"Pool: `{Path(args.config).name}`, {len(run.store.candidates_df(model=c.model.pretrained, split='train'))} "
        f"candidates ({c.prompts.num_variants} variants × {c.generation.seeds_per_prompt} seeds "
        f"per prompt). **craft**: level {c.filter.level}, K {c.filter.top_k} "
        f"({facts['craft']['coverage']['kept']} kept from "
        f"{facts['craft']['coverage']['prompts']} prompts, at most "
        f"{facts['craft']['coverage']['largest']} from one), {c.train.steps} steps × "
        f"{c.train.effective_batch}, lr {c.train.lr}, EMA {c.train.ema_decay}, dropout "
        f"{c.train.cond_dropout}, advantage `{c.advantage.mode}`. **toy-default**: the same "
        f"with configs/toy.yaml's controls ({controls}; "
        f"{facts['toy-default']['coverage']['kept']} kept from "
        f"{facts['toy-default']['coverage']['prompts']} prompts). **control**: the same "
        f"fine-tune on {kept} random plain-prompt samples, unfiltered, weight 1.",
        "",
        f"Evaluation: {len(set(ev.scores.prompt))} held-out prompts × {c.eval.seeds_per_prompt} "
        f"seeds = **{n} pairs** per comparison, the same seeds for every model; DDIM "
        f"{c.eval.num_inference_steps} steps, guidance {c.eval.guidance_scale}. The composite "
        "is z-scored over the pooled images of all four models with the filter's weights. "
        "`toy_heldout` and `toy_precision` are never used for training or filtering.",
        "",
        "```",
        ev.table(),
        "```",
        "",
        f"craft vs control on the composite: paired {cc[0]:+.4f} ± {cc[1]:.4f}, craft wins "
        f"{100 * cc[2]:.1f} % of pairs. toy-default vs craft: {dc[0]:+.4f} ± {dc[1]:.4f} "
        f"({100 * dc[2]:.1f} %).",
        "",
        ta.times_line(timings, args.threads, t_start,
                      " (trained arms found in the run are reused)"),
        "",
        "Reproduce: `.venv/bin/python benchmarks/toy_pareto.py` then "
        "`.venv/bin/python benchmarks/toy_craft.py` (same --run-dir).",
        "",
        "![base vs CRAFT vs toy-default vs control](toy_craft_grid.png)",
        "",
        "Each row one held-out prompt; blocks: base, craft, toy-default, control; the same 4 "
        "seeds in each block.",
        "",
    ]
    ta.write_report(args.out, "toy_craft.md", lines)


if __name__ == "__main__":
    main()
