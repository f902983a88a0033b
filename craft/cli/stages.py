"""``craft prompts | expand | generate | score | filter | train | publish | evaluate | export | run``.

Each command is a thin call into one stage of :mod:`craft.stages.engine` on a run directory
(``--run-dir``) with a config (``--config`` + ``--set``; without them, the config stored in the
run by its first command). The same command works as ``accelerate launch [...] -m craft.cli
COMMAND ...``: every process runs it, the stages split the work, only the main process prints,
and every process exits 0 on success. Heavy modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import logging
import time

from craft import CraftError, StageStopped
from craft.cli.common import (Reporter, add_config_arguments, add_job_arguments, stop_check,
                              write_result)

log = logging.getLogger(__name__)


def _open(args):
    """The run (this process's view of it) and the config for this command."""
    from craft.run.handle import run_config
    from craft.stages.engine import load_prompt_sources, open_run, require

    overrides = list(args.overrides)
    if getattr(args, "per_prompt_cap", None) is not None:
        overrides.append(f"filter.per_prompt_cap={args.per_prompt_cap or 'null'}")
    if getattr(args, "method", None):
        overrides.append(f"train.method={args.method}")
    cfg, given = run_config(args.run_dir, args.config, overrides)
    own = _own_source_format(args, overrides, cfg)
    if own != overrides:
        cfg, given = run_config(args.run_dir, args.config, own)
    if getattr(args, "plan_check", False):
        check_fits(cfg, args)
    run = open_run(args.run_dir, cfg)
    if given:
        if args.command in PROMPT_COMMANDS:
            # a prompt source this command refuses (empty, binary, no prompt column...) leaves
            # the run's config byte for byte as it was: the sources load before it is saved
            try:
                if args.command == "run":  # the whole loop's preflight first (model, weights)
                    require(cfg, model=True, rewards=[*cfg.rewards.names,
                                                      *cfg.rewards.eval_names],
                            train=True, processes=run.dist.world)
                run.dist.on_main(lambda: load_prompt_sources(cfg) and None)
            except BaseException:
                run.close()
                raise
        run.save_config(cfg)
    return run, cfg


PROMPT_COMMANDS = ("prompts", "expand", "run")  # the commands that load prompts.source


def _own_source_format(args, overrides: list[str], cfg) -> list[str]:
    """``--set prompts.source=NEW`` on a run's stored config: NEW is read in its own format
    (``prompts.format=auto``, ``prompts.column=null``, unless given too), not in the format of
    the run's previous source (a run that recorded several sources in RUN/prompts/train.jsonl
    said ``format: jsonl``, and a .txt added later was read as JSON)."""
    from pathlib import Path

    from craft.run.handle import RUN_CONFIG_FILE, run_config

    keys = {o.split("=", 1)[0].strip() for o in overrides}
    if (args.config is not None or "prompts.source" not in keys
            or not (Path(args.run_dir).expanduser() / RUN_CONFIG_FILE).is_file()):
        return overrides
    before, _ = run_config(args.run_dir)
    if before.prompts.source == cfg.prompts.source:
        return overrides
    return overrides + [f"{k}={v}" for k, v in (("prompts.format", "auto"),
                                                 ("prompts.column", "null")) if k not in keys]


def check_fits(cfg, args) -> None:
    """Refuse, before any work, a run the plan says does not fit its GPUs (craft.planning):
    on CUDA (or with --gpu / --gpu-memory) and unless --ignore-plan."""
    import os

    from craft.run.devices import resolve_device

    asked = args.gpu is not None or args.gpu_memory is not None
    if args.ignore_plan or not (asked or resolve_device(cfg.model.device).type == "cuda"):
        return
    from craft.cli.plan import gpu_from_args
    from craft.planning import make_plan

    gpus = args.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        plan = make_plan(cfg, gpus=gpus, gpu=gpu_from_args(args))
    except CraftError as e:  # the plan cannot be made (an unknown architecture): say so, go on
        log.warning("no memory plan for this run (%s); running without the fit check", e)
        return
    if not plan.fits:
        raise CraftError(plan.refusal())
    log.info("the plan says this run fits %d x %s (largest stage %.1f GiB per GPU)", gpus,
             plan.gpu.name, max(s.needed for s in plan.stages))


def _say(run, text: str) -> None:
    if run.is_main:
        print(text, flush=True)


def _reporter(args, run) -> Reporter:
    return Reporter(args.progress_file, enabled=run.is_main)


def _finish(args, run, result: dict) -> int:
    if run.is_main:
        write_result(args.result_file, {"status": "done", **result})
    return 0


def _hooks(args, run, reporter):
    from craft.stages.calls import Hooks

    def on_stage(stage: str) -> None:
        if stage == "train" and run.is_main:
            log.info("training on the kept set")
        reporter.write(stage, 0, 0, force=True)

    return Hooks(progress_for=reporter.stage, should_stop=stop_check(args.stop_file),
                 on_stage=on_stage)


def _call(args, say) -> int:
    """``craft COMMAND``: the command's StageCall (craft.stages.calls) run on the run, its
    result printed by ``say(run, cfg, out)`` and written to --result-file."""
    from craft.stages.calls import StageCall, run_call

    run, cfg = _open(args)
    with run:
        reporter = _reporter(args, run)
        try:
            out = run_call(StageCall.from_args(args), run, cfg, _hooks(args, run, reporter))
        except StageStopped as e:
            if run.is_main and getattr(e, "result", None) is not None:
                write_result(args.result_file, {"status": "stopped", **e.result})
            raise
        if run.is_main:
            say(run, cfg, out)
        return _finish(args, run, out)


def cmd_prompts(args) -> int:
    def say(run, cfg, info):
        _say(run, f"training prompts: {info['train_summary']}\nevaluation prompts: "
                  f"{info['eval_summary']}\nvariants written for {info['expanded']} prompts "
                  f"(V={cfg.prompts.num_variants})"
             + (f"\nthe run's prompts come from several sources: recorded in "
                f"{info['sources_file']}, which its config now names"
                if info.get("sources_file") else ""))

    return _call(args, say)


def cmd_generate(args) -> int:
    """``craft generate``: the pool (then the evaluations it cost); ``--list-stopped``: the
    candidates early rejection stopped and which the filter could keep; ``--finish-stopped``:
    finish those (or all) and score them."""
    if getattr(args, "list_stopped", False):
        return _list_stopped(args)

    def say(run, cfg, out):
        first = (f"finished {out['finished']} of {out['asked']} stopped candidates; "
                 if out.get("asked") is not None else "")
        _say(run, f"{first}generated {out['written']} new candidates; {out['total']} in the "
                  f"run\n{out['cost']}")

    return _call(args, say)


def _list_stopped(args) -> int:
    from craft.stages.stopped import keepable_stopped

    run, cfg = _open(args)
    with run:
        result = {}
        if run.is_main:
            df = keepable_stopped(run.store, cfg)
            result = {"stopped": len(df), "could_keep": int(df["could_keep"].sum())}
            if df.empty:
                print("no candidates were stopped early in this run")
            else:
                import pandas as pd

                pred = [c for c in df.columns if c.startswith("predicted_")]
                cols = ["id", "prompt_id", "variant", "seed", "step", "composite", *pred,
                        "could_keep"]
                with pd.option_context("display.max_colwidth", 50, "display.width", 200):
                    print(df[cols].head(args.show).to_string(index=False))
                print(f"{len(df)} stopped candidates; {int(df['could_keep'].sum())} could be "
                      f"kept by the filter settings (within generation.early_reject_margin = "
                      f"{cfg.generation.early_reject_margin:g} SD): finish them with `craft "
                      f"generate --finish-stopped --run-dir {args.run_dir}`")
        return _finish(args, run, result)


def cmd_score(args) -> int:
    return _call(args, lambda run, cfg, out: _say(run, f"wrote {out['written']} scores"))


def cmd_filter(args) -> int:
    """What ``train.method`` would train on (craft.stages.selection.select, as ``craft train``
    and the studio's Curate select), shown and saved as the selection 'craft'."""
    from craft.stages.engine import stage_filter
    from craft.stages.filtering import coverage

    run, cfg = _open(args)
    with run:
        sel = stage_filter(run, cfg)
        kept, f = sel.rows, cfg.filter
        if "candidate_id" not in kept:  # an online method: it samples its own images
            _say(run, f"train.method {sel.method} samples its own images from the "
                      f"{len(kept)} training prompts; the filter does not apply")
            return _finish(args, run, {"method": sel.method, "prompts": len(kept)})
        if run.is_main:
            import pandas as pd

            cols = [c for c in ["candidate_id", "prompt", "variant", *cfg.rewards.names,
                                "composite", "advantage", "weight"] if c in kept]
            with pd.option_context("display.max_colwidth", 60, "display.width", 200):
                print(kept[cols].head(args.show).to_string(index=False))
        cov = coverage(kept)
        if sel.pairs is not None:
            _say(run, f"{sel.method}: {len(sel.pairs)} winner/loser pairs of {cov['kept']} "
                      f"images from {cov['prompts']} prompts (dpo.pairs {cfg.dpo.pairs}, "
                      f"composite gap > {cfg.dpo.margin:g}); saved as selection 'craft'")
            return _finish(args, run, {"method": sel.method, "pairs": len(sel.pairs),
                                       "images": cov["kept"], "prompts": cov["prompts"]})
        cap = f", at most {f.per_prompt_cap} per prompt" if f.per_prompt_cap else ""
        dedup = f", near-duplicates (cos >= {f.dedup_threshold}) dropped" \
            if f.dedup_threshold is not None else ""
        weights = " (SFT: weight 1 each)" if sel.record.get("weighting") == "uniform" else ""
        _say(run, f"kept {cov['kept']} candidates (level {f.level}, top_k {f.top_k}{cap}{dedup}) "
                  f"from {cov['prompts']} prompts, at most {cov['largest']} from one "
                  f"({100 * cov['largest_share']:.0f} % of the set){weights}; saved as "
                  f"selection 'craft'")
        return _finish(args, run, {"method": sel.method, "kept": cov["kept"],
                                   "prompts": cov["prompts"], "largest": cov["largest"],
                                   "largest_share": cov["largest_share"]})


def cmd_train(args) -> int:
    def say(run, cfg, out):
        _say(run, f"training {out['training']} after {out['steps']} steps; tuned "
                  f"{'adapters' if cfg.train.lora else 'pipeline'} at {out['published']} "
                  f"(from {out['final']})")

    return _call(args, say)


def cmd_publish(args) -> int:
    from craft.run.layout import final_dir, train_dir
    from craft.stages.engine import stage_publish
    from craft.methods.training import TrainResult

    run, cfg = _open(args)
    with run:
        out = train_dir(run.run_dir, args.name)
        status = run.dist.on_main(lambda: (run.store.train_run_by_name(args.name) or {}).get(
            "status", "missing"))
        result = TrainResult(None, status, 0, out, final_dir(out) if status == "done" else None,
                             None)
        final = stage_publish(run, result)
        _say(run, f"published {final_dir(out)} as {final}")
        return _finish(args, run, {"published": final})


def cmd_evaluate(args) -> int:
    def say(run, cfg, out):
        _say(run, out["table"])
        _say(run, f"side-by-side grid: {out['grid']}")

    return _call(args, say)


def cmd_export(args) -> int:
    from craft.stages.engine import stage_export, stage_export_pairs

    run, cfg = _open(args)
    with run:
        if args.pairs:
            folder = stage_export_pairs(run, cfg, name=args.name)
            _say(run, f"exported the DPO pairs (Pick-a-Pic layout: caption, jpg_0, jpg_1, "
                      f"label_0, label_1) to {folder}; load them with datasets.load_dataset("
                      f"'{folder}') or pass the folder to diffusers' train_diffusion_dpo.py "
                      f"as --dataset_name")
            return _finish(args, run, {"folder": folder})
        folder, archive = stage_export(run, cfg, name=args.name)
        _say(run, f"exported the kept set to {folder} (and {archive}); load it with "
                  f"datasets.load_dataset('imagefolder', data_dir='{folder}')")
        return _finish(args, run, {"folder": folder, "zip": archive})


def cmd_run(args) -> int:
    """All stages in order; leaves the tuned pipeline at RUN/final and prints the evaluation."""
    t0 = time.time()

    def say(run, cfg, out):
        _say(run, out["table"])
        _say(run, f"\nkept {out['kept']} candidates; training run {args.name}: "
                  f"{out['steps']} steps\ntuned {'adapters' if cfg.train.lora else 'pipeline'}: "
                  f"{out['published']}\nside-by-side grid: {out['grid']}\nstage times: "
                  + ", ".join(f"{k} {v:.0f}s" for k, v in out["timings"].items())
                  + f"; total {time.time() - t0:.0f}s")

    return _call(args, say)


def _common(p: argparse.ArgumentParser, config_positional: bool = False) -> None:
    p.add_argument("--run-dir", required=True, help="the run directory (created if missing)")
    add_config_arguments(p, positional=config_positional)
    add_job_arguments(p)


def _cap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--per-prompt-cap", type=int, default=None, metavar="N",
                   help="keep at most N candidates of one original prompt (0 = no cap); the "
                        "same as --set filter.per_prompt_cap=N")


def _name(p: argparse.ArgumentParser) -> None:
    from craft.stages.engine import DEFAULT_RUN_NAME

    p.add_argument("--name", default=DEFAULT_RUN_NAME,
                   help=f"training run name: RUN/train/NAME (default {DEFAULT_RUN_NAME})")


def _method(p: argparse.ArgumentParser) -> None:
    from craft.run.choices import TRAIN_METHODS

    p.add_argument("--method", choices=TRAIN_METHODS, default=None,
                   help="the training method (the same as --set train.method=M): craft, sft "
                        "(kept set, weight 1), dpo (Diffusion-DPO on pool pairs), grpo (online)")


def _plan_check(p: argparse.ArgumentParser) -> None:
    from craft.cli.plan import add_gpu_arguments

    add_gpu_arguments(p, gpus_default=None)
    p.add_argument("--ignore-plan", action="store_true",
                   help="run even when the memory plan says a stage does not fit (the plan "
                        "is checked on CUDA, or against --gpu / --gpu-memory, before any work)")
    p.set_defaults(plan_check=True)


def add_stage_commands(subparsers: argparse._SubParsersAction) -> None:
    specs = [
        ("prompts", cmd_prompts, "load the training and evaluation prompts and write variants"),
        ("expand", cmd_prompts, "same as prompts: (re)write missing variants"),
        ("generate", cmd_generate, "generate candidates (resumable; skips stored ones)"),
        ("score", cmd_score, "score candidates against their original prompt (cached)"),
        ("filter", cmd_filter, "Composite Reward Filtering: show and save the kept set"),
        ("train", cmd_train, "fine-tune by train.method (craft: advantage-weighted on the kept "
                             "set; sft; dpo; grpo), then publish RUN/final (an unfinished run "
                             "continues from its checkpoint)"),
        ("publish", cmd_publish, "copy a finished training run's pipeline to RUN/final"),
        ("evaluate", cmd_evaluate, "base vs tuned on held-out prompts, same seeds"),
        ("export", cmd_export, "write the kept set as a Hugging Face imagefolder (+ zip), or "
                               "--pairs: the DPO pairs as a Pick-a-Pic parquet"),
    ]
    for name, fn, help_text in specs:
        p = subparsers.add_parser(name, help=help_text)
        _common(p)
        p.set_defaults(handler=fn)
        if name == "generate":
            how = p.add_mutually_exclusive_group()
            how.add_argument("--finish-stopped", nargs="?", const="keepable", default=None,
                             choices=("keepable", "all"),
                             help="finish the candidates early rejection stopped, from their "
                                  "seeds to the last step, and score them: those the filter "
                                  "settings could keep (default) or all")
            how.add_argument("--list-stopped", action="store_true",
                             help="list the stopped candidates and which the filter settings "
                                  "could keep; generate nothing")
            p.add_argument("--show", type=int, default=20, help="rows --list-stopped prints")
        if name == "score":
            p.add_argument("--rewards", default=None, help="comma-separated subset of rewards")
            p.add_argument("--force", action="store_true", help="re-score stored scores")
        if name == "filter":
            p.add_argument("--show", type=int, default=10, help="rows to print")
        if name in ("filter", "train", "export"):
            _cap(p)
        if name in ("train", "publish"):
            _name(p)
        if name == "train":
            _method(p)
        if name == "train":
            _plan_check(p)
            how = p.add_mutually_exclusive_group()
            how.add_argument("--resume", action="store_true",
                             help="require an unfinished run of this name to continue")
            how.add_argument("--new", action="store_true",
                             help="require a new name (refuse to continue an existing run)")
        if name == "evaluate":
            p.add_argument("--base", default=None, help="reference model (default model.pretrained)")
            p.add_argument("--tuned", default=None, action="append",
                           help="tuned pipeline or RUN/train/NAME/checkpoint-N (default "
                                "RUN/final); repeat it to compare several models (methods) "
                                "with the base on the same seeds")
            p.add_argument("--name", default="eval", help="evaluation name: RUN/eval/NAME")
            p.add_argument("--label", default=None,
                           help="the tuned model's label (default: its training run's name)")
        if name == "export":
            p.add_argument("--name", default=None,
                           help="export name: RUN/exports/NAME (default kept-DATE-TIME)")
            p.add_argument("--pairs", action="store_true",
                           help="export the DPO pairs (dpo.pairs / margin / max_pairs) as a "
                                "Pick-a-Pic parquet instead of the kept set")
    run = subparsers.add_parser("run", help="every stage in order; leaves RUN/final; rerun the "
                                            "same command to resume")
    _common(run, config_positional=True)
    _plan_check(run)
    _cap(run)
    _name(run)
    _method(run)
    run.add_argument("--resume", action="store_true",
                     help="accepted for older scripts: `craft run` always resumes")
    run.set_defaults(handler=cmd_run)


__all__ = ["add_stage_commands"]
