"""One description of a stage invocation, run the same way by both front ends.

A :class:`StageCall` is what ``craft COMMAND ...`` parses its arguments into and what a studio
button builds: the command and its options. :func:`run_call` runs it on an open run with the
caller's hooks (progress, stop, training callbacks), returning a plain dict, so

- ``craft generate`` (craft.cli.stages) is ``run_call(StageCall("generate"), run, cfg, hooks)``
  with a tqdm / progress-file reporter and a stop file;
- the studio runs the same call in a thread of its own (one process) or as
  ``accelerate launch ... -m craft.cli`` + :meth:`StageCall.argv` (several processes), which
  parses back to the same call. No stage is written twice.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

# The stages of the whole loop (``craft run``: the engine's ``run_all``), in order, each with
# what its progress counts (front ends label their bars with it); None: a quick stage that runs
# inside ``train`` (filter: the kept set; publish: RUN/final), with no command or bar of its own.
# The one list of the stages: the commands, the units and the studio's loop line follow it.
STAGES: dict[str, str | None] = {"prompts": "prompt", "generate": "img", "score": "score",
                                 "filter": None, "train": "step", "publish": None,
                                 "evaluate": "img"}
STAGE_UNITS: dict[str, str] = {s: unit for s, unit in STAGES.items() if unit}
# What a StageCall runs: each stage with a command of its own, and "run" (every stage).
COMMANDS: tuple[str, ...] = (*STAGE_UNITS, "run")


@dataclasses.dataclass(frozen=True)
class StageCall:
    command: str  # one of COMMANDS
    name: str | None = None  # train / run: the training run; evaluate: the evaluation
    resume: bool | None = None  # train: True must continue, False must be new, None either
    rewards: tuple[str, ...] = ()  # score: a subset of rewards.names (empty: all)
    force: bool = False  # score: re-score stored scores
    tuned: str | tuple[str, ...] | None = None  # evaluate: the tuned model(s) (default
    # RUN/final); several: compared with the base side by side on the same seeds
    base: str | None = None  # evaluate: the reference (default model.pretrained)
    label: str | None = None  # evaluate: the tuned model's label
    # generate: finish candidates early rejection stopped instead ("keepable": those the
    # config's filter could keep, craft.stages.stopped; "all")
    finish_stopped: str | None = None

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise ValueError(f"unknown stage command {self.command!r}; one of {COMMANDS}")
        if self.finish_stopped not in (None, "keepable", "all"):
            raise ValueError(f"finish_stopped={self.finish_stopped!r}: use 'keepable' or 'all'")

    def argv(self) -> list[str]:
        """The ``craft`` arguments that parse back to this call (before --run-dir)."""
        out = [self.command]
        if self.name is not None:
            out += ["--name", self.name]
        if self.command == "train" and self.resume is not None:
            out.append("--resume" if self.resume else "--new")
        if self.rewards:
            out += ["--rewards", ",".join(self.rewards)]
        if self.force:
            out.append("--force")
        tuned = (self.tuned,) if isinstance(self.tuned, str) else self.tuned or ()
        for t in tuned:
            out += ["--tuned", str(t)]
        for flag, value in (("--base", self.base), ("--label", self.label),
                            ("--finish-stopped", self.finish_stopped)):
            if value is not None:
                out += [flag, str(value)]
        return out

    @classmethod
    def from_args(cls, args) -> StageCall:
        """The call ``craft COMMAND`` was given (its argparse namespace)."""
        get = lambda k: getattr(args, k, None)  # noqa: E731
        resume = True if get("resume") else (False if get("new") else None)
        if args.command == "run":
            resume = None  # `craft run` always resumes (--resume kept for older scripts)
        rewards = tuple(get("rewards").split(",")) if get("rewards") else ()
        command = "prompts" if args.command == "expand" else args.command
        tuned = get("tuned")
        if isinstance(tuned, list):  # --tuned given once or several times
            tuned = tuned[0] if len(tuned) == 1 else tuple(tuned) or None
        return cls(command, name=get("name"), resume=resume, rewards=rewards,
                   force=bool(get("force")), tuned=tuned, base=get("base"),
                   label=get("label"), finish_stopped=get("finish_stopped"))


@dataclasses.dataclass
class Hooks:
    """How the caller watches and steers a call; every member is optional."""

    progress_for: Callable[[str], Callable[[int, int], None] | None] = lambda stage: None
    should_stop: Callable[[], bool] | None = None
    on_stage: Callable[[str], None] | None = None  # "prompts", "generate", "round 2: score"...
    on_round: Callable[[int, str], None] | None = None  # (round, training run name) starts
    callbacks: Any = None  # craft.methods.training.TrainCallbacks for train


def run_call(call: StageCall, run, cfg, hooks: Hooks | None = None) -> dict:
    """Run ``call`` on ``run`` (every process of a launch calls it); the result as a plain
    dict. A stop on request raises craft.StageStopped after what was done is committed."""
    from craft import StageStopped
    from craft.stages import engine as st

    h = hooks or Hooks()
    p = h.progress_for
    if call.command == "prompts":
        return st.stage_prompts(run, cfg, p("prompts"))
    if call.command == "generate" and call.finish_stopped:
        return st.stage_finish_stopped(run, cfg, call.finish_stopped, p("generate"),
                                       h.should_stop)
    if call.command == "generate":
        return st.stage_generate(run, cfg, p("generate"), h.should_stop)
    if call.command == "score":
        return st.stage_score(run, cfg, list(call.rewards) or None, force=call.force,
                              progress=p("score"), should_stop=h.should_stop)
    if call.command == "train":
        name = call.name or st.DEFAULT_RUN_NAME
        result, final = st.stage_tune(run, cfg, name, resume=call.resume, progress_for=p,
                                      should_stop=h.should_stop, callbacks=h.callbacks,
                                      on_stage=h.on_stage, on_round=h.on_round)
        out = train_result(result, final)
        if final is None:
            stop = StageStopped(f"training {name} stopped on request after "
                                f"{result.steps_done} steps (checkpoint "
                                f"{result.last_checkpoint or 'none: nothing trained yet'}); "
                                f"running it again continues it")
            stop.result = out  # what was made (the front ends record it)
            raise stop
        return out
    if call.command == "evaluate":
        ev = st.stage_evaluate(run, cfg, tuned=call.tuned, base=call.base,
                               name=call.name or "eval", label=call.label, progress=p("evaluate"),
                               should_stop=h.should_stop)
        return {"evaluation_id": ev.evaluation_id, "grid": str(ev.grid_path),
                "table": ev.table()}
    out = st.run_all(run, cfg, call.name or st.DEFAULT_RUN_NAME, progress_for=p,
                     should_stop=h.should_stop, on_stage=h.on_stage, on_round=h.on_round)
    ev = out["eval"]
    return {"evaluation_id": ev.evaluation_id, "grid": str(ev.grid_path), "table": ev.table(),
            "kept": out["kept"], "timings": out["timings"], **train_result(out["train"],
                                                                           out["final"])}


def train_result(result, final) -> dict:
    return {"run_id": result.run_id, "training": result.status, "steps": result.steps_done,
            "final": None if result.final_dir is None else str(result.final_dir),
            "checkpoint": None if result.last_checkpoint is None else str(result.last_checkpoint),
            "published": None if final is None else str(Path(final))}


__all__ = ["COMMANDS", "STAGES", "STAGE_UNITS", "Hooks", "StageCall", "run_call", "train_result"]
