"""``craft rehearse``: a dress rehearsal of a run at its real sizes, with random weights and tiny
counts, checking the plan (craft.planning) against what it measured.

What it runs: the config's exact architecture at its real size, every reward it names, with
random weights built from their architectures (craft/stages/rehearsal_weights.py) and saved
where the real loaders read them, at the run's resolution, dtype, mixed precision, LoRA or full
fine-tuning (and sharding under ``accelerate launch``), through the very engine ``craft run``
uses (craft.stages.engine.run_all), with tiny counts: a couple of prompts, variants and seeds, a
few sampler steps, two training steps, then a stop (a checkpoint is saved), the same command
again (the checkpoint is loaded back and training resumes for the last step), the final save,
publishing with the model card, and one evaluation image pair.

What it measures, per stage of the plan: the peak of device memory and the time. On a GPU the
peak is CUDA's own (``torch.cuda.max_memory_allocated``, reset at every stage); on a CPU it is
the live-tensor accounting the plan itself uses (craft.planning.memtrack.MemoryTracker), told by
the run what it loads and what a GPU run would move off the device (craft.run.watch). Beside
each peak: ``craft plan``'s prediction for the same settings (``make_plan`` of the rehearsal's
own config: its counts, batch sizes and dtype). A stage that breaks, a loss that is not
finite, or a peak off the plan by more than the plan's stated margin (craft.planning.hardware:
+15 % of the simulated peak, and on a GPU +1 GiB for what fake tensors do not allocate) fails
the rehearsal, naming the stage. The report (report.md, report.json) goes into RUN/rehearsal/.

The training step is measured as the plan prices it, in the steady state: the peak of step 2
(step 1 allocates AdamW's moments); the checkpoint stage is every checkpoint, preview and the
final save; GRPO's sampling is every round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import traceback
from pathlib import Path

import torch

from craft import CraftError, StageStopped
from craft.planning.memtrack import MemoryTracker, _storages

log = logging.getLogger(__name__)

GIB = 2 ** 30
RUN_NAME = "rehearsal"
REPORT_DIR = "rehearsal"
EXIT_STAGE_FAILED = 5  # a stage broke (or a loss was not finite)
EXIT_PLAN_OFF = 6  # a stage's measured peak is off the plan by more than its margin
CPU_FLOOR = 2 ** 20  # bytes: the CPU check's absolute part (see tolerance)
STOP_AFTER = 2  # training steps before the stop: step 1 warms AdamW up, step 2 is measured

# the plan's stage names (craft.planning.plan) the measured sections are filed under
STEP = "training: one step"
CHECKPOINT = "checkpoint + previews"
SAMPLING = "GRPO: sample a round"
AFTER_STEPS = "training: stop and checkpoint"
RESUMED = "training: resumed"
BETWEEN = "between stages (loading the pipeline, moving it)"

TRAIN_PROMPTS = ("a photo of an astronaut riding a horse on the moon",
                 "a cozy cabin in a snowy forest at dusk, oil painting",
                 "a portrait of an old fisherman, dramatic lighting",
                 "a cute corgi wearing sunglasses on a beach",
                 "a bowl of ramen on a wooden table, studio photo",
                 "a lighthouse on a cliff during a storm, digital art")
EVAL_PROMPTS = ("a red vintage car parked in front of a bakery",
                "a watercolor painting of a fox in an autumn forest")


@dataclasses.dataclass(frozen=True)
class Counts:
    """How much the rehearsal runs. ``full_batches``: enough prompts that every batch of the
    config is full (generation, scoring, training micro-batches, evaluation), so the peaks are
    those of the real batch sizes (the GPU default); otherwise every batch holds one image (the
    CPU default: the code paths at the real sizes in minutes)."""

    prompts: int = 2
    variants: int = 1
    seeds: int = 1
    sampler_steps: int = 2
    eval_prompts: int = 1
    full_batches: bool = False

    @property
    def candidates(self) -> int:
        return self.prompts * (1 + self.variants) * self.seeds


@dataclasses.dataclass
class Record:
    """What one stage measured: its peak (bytes, by category where the accounting knows),
    the time spent in it and how many times it ran."""

    label: str
    peak: int = 0
    parts: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    windows: int = 0


# ------------------------------------------------------------------------ meters


class _Labels:
    """The stage being measured (a stack: a section of a stage nests in it), each with its own
    peak: what is allocated while a label is on top counts for that label alone."""

    def _init_labels(self) -> None:
        self.records: dict[str, Record] = {}
        self._stack: list[list] = []  # [label, window peak, parts, running since, seconds]
        self.failed_in: str | None = None  # where an exception left a section

    def where(self) -> str:
        """The stage being run now, or where the last exception left one."""
        if self.failed_in:
            return self.failed_in
        labels = [e[0] for e in self._stack if e[0] != BETWEEN]
        return " > ".join(labels) or self.label or "setup"

    @property
    def label(self) -> str | None:
        return self._stack[-1][0] if self._stack else None

    def _open(self, label: str) -> None:
        self._stack.append([label, self._now_bytes(), self._now_parts(), time.perf_counter(),
                            0.0])
        self._window_started()

    def _close(self) -> None:
        label, peak, parts, since, seconds = self._stack.pop()
        peak, parts = max((peak, parts), self._window_peak(), key=lambda x: x[0])
        rec = self.records.setdefault(label, Record(label))
        if peak > rec.peak:
            rec.peak, rec.parts = peak, dict(parts)
        rec.seconds += seconds + time.perf_counter() - since  # its own time, sections apart
        rec.windows += 1

    def _pause(self) -> None:
        """Fold the top window's peak and time so far into it (a nested label opens)."""
        if self._stack:
            top = self._stack[-1]
            peak, parts = self._window_peak()
            if peak > top[1]:
                top[1], top[2] = peak, parts
            top[4] += time.perf_counter() - top[3]

    def stage(self, label: str) -> None:
        """The bottom label (an engine stage) becomes ``label``."""
        while self._stack:
            self._close()
        self._open(label)

    def open_section(self, label: str) -> None:
        self._pause()
        self._open(label)

    def close_section(self) -> None:
        self._close()
        if self._stack:  # the outer window goes on from what is live now
            self._stack[-1][3] = time.perf_counter()
            self._window_started()

    def switch(self, label: str) -> None:
        """The top window ends; the same level goes on as ``label``."""
        self._close()
        self._open(label)

    def restart_window(self) -> None:
        """Forget the top label's peak so far: it is measured from now on (training's
        steady state, after step 1)."""
        if self._stack:
            self._stack[-1][1], self._stack[-1][2] = self._now_bytes(), self._now_parts()
            self.records.pop(self._stack[-1][0], None)
            self._window_started()

    def finish(self) -> dict[str, Record]:
        while self._stack:
            self._close()
        return self.records

    # the watch hooks (craft.run.watch) shared by both meters
    def section(self, name: str, entering: bool) -> None:
        import sys

        label = self.section_labels.get(name)
        if label is None:
            return
        if entering:
            self.failed_in = None  # (an exception before this one was handled)
            self.open_section(label)
            return
        if sys.exc_info()[0] is not None and self.failed_in is None:
            self.failed_in = self.where()
        self.close_section()


class CpuMeter(_Labels, MemoryTracker):
    """Live tensors on a CPU, as the plan counts device memory: what the run loads is counted
    from when it is loaded; what a GPU run would move to the host (craft.run.watch.left_device)
    and copies made for the host (craft.run.watch.host) are not counted, nor any view of them,
    until they would be back on the device."""

    kind = "live tensors (craft.planning.memtrack), as the plan counts them"

    def __init__(self, section_labels: dict[str, str]):
        MemoryTracker.__init__(self)
        self._init_labels()
        self.section_labels = section_labels
        self._host_depth = 0
        self._away: dict[int, object] = {}  # storage -> weakref: not on the device
        self._win = (0, {})

    def _now_bytes(self) -> int:
        return self.total

    def _now_parts(self) -> dict:
        return {k: v for k, v in self.by_category.items() if v}

    def _window_started(self) -> None:
        self._win = (self.total, self._now_parts())

    def _window_peak(self) -> tuple[int, dict]:
        return self._win

    def track(self, tensor: torch.Tensor, category: str) -> None:
        if self._host_depth or self._away:
            storages = _storages(tensor)
            if self._host_depth:  # new storages made for the host; views of live ones stay
                for st in storages:
                    if st._cdata not in self._live:
                        self._send_away(st)
                return
            if any(st._cdata in self._away for st in storages):
                return
        MemoryTracker.track(self, tensor, category)
        if self.total > self._win[0]:
            self._win = (self.total, self._now_parts())

    def _send_away(self, st) -> None:
        import weakref

        key = st._cdata
        self._release(key)
        if key not in self._away:
            self._away[key] = weakref.ref(st, lambda _, k=key: self._away.pop(k, None))

    # craft.run.watch
    def loaded(self, obj) -> None:
        for m in modules_of(obj):
            for t in [*m.parameters(), *m.buffers()]:
                for st in _storages(t):
                    self._away.pop(st._cdata, None)
                self.track(t, "weights")

    def left_device(self, obj) -> None:
        for m in modules_of(obj):
            for t in [*m.parameters(), *m.buffers()]:
                for st in _storages(t):
                    self._send_away(st)

    def back_on_device(self, obj) -> None:
        self.loaded(obj)

    def section(self, name: str, entering: bool) -> None:
        if name == "host":
            self._host_depth += 1 if entering else -1
            return
        _Labels.section(self, name, entering)


class CudaMeter(_Labels):
    """CUDA's own peak of allocated memory on this process's GPU, reset at every stage."""

    kind = "torch.cuda.max_memory_allocated, reset at every stage"

    def __init__(self, section_labels: dict[str, str], device: torch.device):
        self._init_labels()
        self.section_labels = section_labels
        self.device = device

    def _now_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def _now_parts(self) -> dict:
        return {}

    def _window_started(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def _window_peak(self) -> tuple[int, dict]:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device), {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def modules_of(obj) -> list[torch.nn.Module]:
    """The torch modules of a model object: itself, a pipeline's components, a reward's
    modules."""
    if isinstance(obj, torch.nn.Module):
        return [obj]
    found = getattr(obj, "components", None)
    values = found.values() if isinstance(found, dict) else vars(obj).values()
    return [v for v in values if isinstance(v, torch.nn.Module)]


def make_meter(device: torch.device, method) -> _Labels:
    """The meter of ``device``, filing the run's sections (craft.run.watch) under the plan's
    stage names for ``method``."""
    sections = {"prompts": "prompts", "generate": "generation", "score": "scoring",
                "train": STEP, "evaluate": "evaluation", "checkpoint": CHECKPOINT,
                "preview": CHECKPOINT, "sample": SAMPLING,
                "encode": method.data_stage or "training: encode"}
    meter = CudaMeter(sections, device) if device.type == "cuda" else CpuMeter(sections)
    meter.stage(BETWEEN)
    return meter


# ------------------------------------------------------------------------ the config


def gpu_dtype(cfg) -> torch.dtype:
    from craft.run.devices import resolve_dtype

    return resolve_dtype(cfg.model.dtype, torch.device("cuda"))


def run_dtype(cfg, device: torch.device) -> torch.dtype:
    """The weights' dtype: the config's on a GPU; on a CPU the same bytes, bfloat16 standing in
    for float16 (CPUs lack float16 kernels; the plan simulates float16 as bfloat16 too)."""
    d = gpu_dtype(cfg)
    return torch.bfloat16 if device.type != "cuda" and d == torch.float16 else d


def mixed_precision(cfg, device: torch.device) -> str:
    """train.mixed_precision as the run's GPU would resolve it (auto: bf16); fp16 becomes bf16
    on a CPU (its autocast has no float16)."""
    mp = cfg.train.mixed_precision
    if device.type == "cuda":
        return mp
    return "bf16" if mp in ("auto", "fp16") else mp


def _batches(cfg, counts: Counts, world: int) -> dict[str, int]:
    """The batch sizes of the rehearsal: the config's (capped by what there is to batch) with
    ``full_batches``, else one image each."""
    n = counts.candidates
    if not counts.full_batches:
        return {"gen": 1, "reward": 1, "eval": 1, "micro": 1}
    return {"gen": min(cfg.generation.batch_size, n), "reward": min(cfg.rewards.batch_size, n),
            "eval": min(cfg.eval.batch_size, counts.eval_prompts * counts.seeds),
            "micro": min(cfg.train.micro_batch, max(1, n // world))}


def full_batch_counts(cfg, counts: Counts, world: int = 1) -> Counts:
    """``counts`` with enough prompts that the config's generation, scoring and training batches
    are full on every process, and enough evaluation prompts for one evaluation batch."""
    per = (1 + counts.variants) * counts.seeds
    need = max(cfg.generation.batch_size, cfg.rewards.batch_size,
               cfg.train.micro_batch) * world
    return dataclasses.replace(counts, prompts=max(counts.prompts, -(-need // per)),
                               eval_prompts=max(counts.eval_prompts,
                                                -(-cfg.eval.batch_size * world // counts.seeds)),
                               full_batches=True)


def prompt_pools(cfg) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(training prompts, evaluation prompts, where from): the config's own sources when they
    are on this machine, else a few prompts of the HPDv2 kind shipped here."""
    from craft.stages.engine import load_prompt_sources

    try:
        train, held = load_prompt_sources(cfg)
    except CraftError as e:
        return TRAIN_PROMPTS, EVAL_PROMPTS, f"built-in prompts ({' '.join(str(e).split())[:120]})"
    if not train.prompts or not held.prompts:
        return TRAIN_PROMPTS, EVAL_PROMPTS, "built-in prompts (the config's sources are empty)"
    return (tuple(train.prompts), tuple(held.prompts),
            f"the first prompts of {cfg.prompts.source} and {cfg.prompts.eval_source}")


def write_prompts(folder: Path, counts: Counts, pools=(TRAIN_PROMPTS, EVAL_PROMPTS)):
    """RUN/rehearsal/prompts/train.txt and eval.txt: the first prompts of each pool (cycled,
    each repeat made distinct, when a pool is short)."""
    folder.mkdir(parents=True, exist_ok=True)

    def pick(pool, n):
        return [pool[i % len(pool)] + (f", take {i // len(pool) + 1}" if i >= len(pool) else "")
                for i in range(n)]

    train, held = folder / "train.txt", folder / "eval.txt"
    train.write_text("\n".join(pick(pools[0], counts.prompts)) + "\n")
    held.write_text("\n".join(pick(pools[1], counts.eval_prompts)) + "\n")
    return train, held


def rehearsal_overrides(cfg, device: torch.device, counts: Counts, paths: dict,
                        world: int = 1) -> tuple[list[str], list[str]]:
    """(``--set`` overrides that turn ``cfg`` into its rehearsal, notes on what differs from
    the real run). ``paths``: model, rewards (name -> path), diversity, train / eval prompts."""
    from craft.methods.registry import get_method

    t, g, b = cfg.train, cfg.grpo, _batches(cfg, counts, world)
    online = get_method(t.method).online
    boundary = min(g.updates, STOP_AFTER) if online else 1
    steps = STOP_AFTER + boundary
    accumulation = max(1, t.effective_batch // (t.micro_batch * world))
    dtype = str(run_dtype(cfg, device)).replace("torch.", "")
    out = {
        "model.pretrained": paths["model"], "model.revision": None, "model.variant": None,
        "model.single_file_config": None, "model.dtype": dtype, "model.device": device.type,
        "prompts.source": paths["train"], "prompts.format": "auto", "prompts.column": None,
        "prompts.max_prompts": None, "prompts.eval_source": paths["eval"],
        "prompts.max_eval_prompts": None, "prompts.num_variants": counts.variants,
        "prompts.expander": "template",
        "generation.seeds_per_prompt": counts.seeds,
        "generation.num_inference_steps": counts.sampler_steps, "generation.batch_size": b["gen"],
        "rewards.batch_size": b["reward"],
        "filter.level": "none", "filter.top_k": counts.candidates, "filter.per_prompt_cap": None,
        "dpo.max_pairs": counts.prompts,
        "train.steps": steps, "train.rounds": 1, "train.checkpoint_every": 0,
        "train.preview_every": steps, "train.micro_batch": b["micro"],
        "train.effective_batch": b["micro"] * world * min(accumulation, 2),
        "train.mixed_precision": mixed_precision(cfg, device),
        "train.lr_warmup_steps": min(t.lr_warmup_steps, steps), "train.report_to": "none",
        "train.preview_prompts": list(t.preview_prompts[:1 if not counts.full_batches else None]),
        "grpo.prompts_per_step": world * max(1, min(g.prompts_per_step // world,
                                                    counts.prompts if counts.full_batches
                                                    else 1)),
        "grpo.group_size": max(2, min(g.group_size, counts.candidates // counts.prompts
                                      if counts.full_batches else 2)),
        "grpo.num_inference_steps": counts.sampler_steps, "grpo.updates": boundary,
        "eval.num_prompts": counts.eval_prompts, "eval.seeds_per_prompt": counts.seeds,
        "eval.num_inference_steps": counts.sampler_steps, "eval.batch_size": b["eval"],
    }
    if device.type != "cuda":
        out["train.use_8bit_adam"] = False
    for name, path in paths.get("rewards", {}).items():
        out[f"rewards.paths.{name}"] = path
    if paths.get("diversity"):
        out["eval.diversity_model"] = paths["diversity"]
    notes = _notes(cfg, device, out) + ([f"prompts: {paths['prompts']}"]
                                         if paths.get("prompts") else [])
    return [f"{k}={json.dumps(v)}" for k, v in out.items()], notes


def _notes(cfg, device: torch.device, out: dict) -> list[str]:
    notes = []
    if cfg.prompts.expander != "template":
        notes.append(f"prompts.expander {cfg.prompts.expander} (a language model) is not "
                     "rehearsed: template variants instead")
    if str(gpu_dtype(cfg)) != f"torch.{out['model.dtype']}":
        notes.append(f"weights in {out['model.dtype']} standing in for "
                     f"{str(gpu_dtype(cfg)).replace('torch.', '')} (the same bytes; a CPU has "
                     "no float16 kernels)")
    if cfg.train.mixed_precision != out["train.mixed_precision"]:
        notes.append(f"train.mixed_precision {cfg.train.mixed_precision} -> "
                     f"{out['train.mixed_precision']} (what a bf16-capable GPU resolves)")
    if cfg.train.use_8bit_adam and device.type != "cuda":
        notes.append("8-bit AdamW needs CUDA: plain AdamW here (the plan counts the same)")
    if cfg.train.rounds > 1:
        notes.append(f"train.rounds {cfg.train.rounds}: one round rehearsed")
    notes.append("filter.level none, top_k = every candidate: random rewards keep an arbitrary "
                 "(possibly empty) set at the config's level, and training needs data")
    return notes


# ------------------------------------------------------------------------ running


@dataclasses.dataclass
class Failure:
    stage: str
    message: str
    trace: str = ""


def _run_twice(run, rcfg, meter) -> tuple[dict | None, Failure | None]:
    """``run_all`` stopped after STOP_AFTER training steps (a checkpoint is saved), then
    ``run_all`` again: the checkpoint loaded back, the last steps, publish and evaluation."""
    from craft.stages.engine import run_all

    state = {"pass": 1, "stop": False}

    def progress_for(stage: str):
        if stage != "train":
            return None

        def progress(step: int, total: int) -> None:
            if state["pass"] == 1 and step == 1:
                meter.restart_window()  # the steady state: AdamW's moments exist from now on
            if state["pass"] == 1 and step == STOP_AFTER:
                meter.switch(AFTER_STEPS)
                state["stop"] = True

        return progress

    def go():
        return run_all(run, rcfg, RUN_NAME, progress_for=progress_for,
                       should_stop=lambda: state["stop"])

    try:
        try:
            go()
            raise CraftError(f"training did not stop after step {STOP_AFTER} as asked")
        except StageStopped:
            pass
        state.update({"pass": 2, "stop": False})
        meter.section_labels["train"] = RESUMED
        import gc

        gc.collect()  # the first command's pipeline goes, as it would with its process
        return go(), None
    except Exception as e:  # noqa: BLE001 - a stage broke: the report names it
        return None, Failure(meter.where(), f"{type(e).__name__}: {e}",
                             "".join(traceback.format_exception(e))[-4000:])


def losses(run) -> dict:
    """The training run's per-step metrics (the store), and whether every loss is finite."""
    store = run.store
    rec = store.train_run_by_name(RUN_NAME) if store is not None else None
    if rec is None:
        return {"steps": [], "finite": False}
    m = store.metrics_df(int(rec["id"]))
    rows = m.to_dict(orient="records") if not m.empty else []
    finite = bool(rows) and all(math.isfinite(float(r["loss"])) for r in rows
                                if r.get("loss") is not None)
    return {"steps": rows, "finite": finite}


# ------------------------------------------------------------------------ the check


@dataclasses.dataclass
class Check:
    """One stage of the plan beside what the rehearsal measured (bytes and seconds)."""

    stage: str
    simulated: float  # the plan's simulated peak
    needed: float  # with the plan's margin
    measured: int | None
    tolerance: float
    seconds: float | None
    plan_seconds: float | None
    plan_parts: dict
    measured_parts: dict

    @property
    def ok(self) -> bool | None:
        if self.measured is None:
            return None
        return abs(self.measured - self.simulated) <= self.tolerance

    @property
    def difference(self) -> float | None:
        if self.measured is None or not self.simulated:
            return None
        return (self.measured - self.simulated) / self.simulated


def tolerance(simulated: float, gpu: bool, margin: float | None = None) -> float:
    """How far a measured peak may lie from the simulated one: the plan's stated margin
    (craft.planning.hardware): ``FRAGMENTATION`` of the simulated peak, plus on a GPU the
    ``CUDA_OVERHEAD_GIB`` it adds for what fake tensors do not allocate (cuBLAS and attention
    workspaces; CUDA's context is not in max_memory_allocated, which leaves the margin on the
    safe side); on a CPU ``CPU_FLOOR`` instead, for the small tensors no plan prices (token
    ids, an image on its way to PIL). ``margin`` (``--margin``) replaces all of it: the check
    is then ``|measured - simulated| <= margin x simulated``."""
    from craft.planning.hardware import CUDA_OVERHEAD_GIB, FRAGMENTATION

    if margin is not None:
        return margin * simulated
    return FRAGMENTATION * simulated + (CUDA_OVERHEAD_GIB * GIB if gpu else CPU_FLOOR)


def compare(plan, records: dict[str, Record], gpu: bool, margin: float | None = None,
            step_seconds: float | None = None) -> list[Check]:
    """Every stage of ``plan`` beside its measured record (None where the rehearsal has none)."""
    out = []
    for s in plan.stages:
        rec = records.get(s.stage)
        sim = s.simulated * GIB
        secs = rec.seconds if rec is not None else None
        if s.stage == STEP and step_seconds is not None:
            secs = step_seconds
        out.append(Check(s.stage, sim, s.needed * GIB, None if rec is None else rec.peak,
                         tolerance(sim, gpu, margin), secs,
                         None if s.hours is None else s.hours * 3600,
                         {k: v * GIB for k, v in s.parts.items()},
                         {} if rec is None else dict(rec.parts)))
    return out


def step_seconds(metrics: list[dict], records: dict[str, Record]) -> float | None:
    """Training's time: the steps' own times (the loop's step_time), less an online method's
    sampling rounds (which run inside a step and are timed apart)."""
    times = [float(m["step_time"]) for m in metrics if m.get("step_time") is not None]
    if not times:
        return None
    sampling = records.get(SAMPLING)
    return max(0.0, sum(times) - (sampling.seconds if sampling else 0.0))


# ------------------------------------------------------------------------ the rehearsal


@dataclasses.dataclass
class Rehearsal:
    """A rehearsal's outcome: the checks, what else it measured, what broke, the losses."""

    config: str
    method: str
    device: str
    meter: str
    setting: dict  # dtype, mixed precision, LoRA / full, processes, resolution, counts
    notes: list[str]
    checks: list[Check]
    extra: list[Record]
    failure: Failure | None
    metrics: list[dict]
    seconds: float
    weights: dict
    plan_table: str = ""
    margin: float | None = None
    run_dir: str = ""

    @property
    def off(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    @property
    def losses_finite(self) -> bool:
        return bool(self.metrics) and all(math.isfinite(float(m["loss"])) for m in self.metrics
                                          if m.get("loss") is not None)

    @property
    def exit_code(self) -> int:
        if self.failure is not None:
            return EXIT_STAGE_FAILED
        return EXIT_PLAN_OFF if self.off else 0

    def verdict(self) -> str:
        if self.failure is not None:
            return f"FAILED at stage {self.failure.stage!r}: {self.failure.message}"
        if self.off:
            return "PLAN OFF by more than its margin at " + "; ".join(
                f"{c.stage!r} (measured {c.measured / GIB:.2f} GiB, planned "
                f"{c.simulated / GIB:.2f} GiB +- {c.tolerance / GIB:.2f})" for c in self.off)
        return "passed: every stage ran, losses finite, every measured peak within the plan's margin"


def _device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare(cfg, run_dir: Path, device: torch.device, counts: Counts, cache_dir: Path,
            say=print) -> dict:
    """The random weights (cached) and the prompt files: the paths the rehearsal's config
    names (the main process; the others wait)."""
    from craft.stages import rehearsal_weights as rw

    t0 = time.perf_counter()
    say(f"rehearsal: random weights of the real sizes under {cache_dir} (built once, reused)")
    model = rw.build_model(cfg, cache_dir, run_dtype(cfg, device))
    rewards = rw.build_rewards(cfg, cache_dir)
    diversity = rw.build_diversity_encoder(cfg, cache_dir)
    train_pool, eval_pool, source = prompt_pools(cfg)
    train, held = write_prompts(Path(run_dir) / REPORT_DIR / "prompts", counts,
                                (train_pool, eval_pool))
    sizes = {"model": rw.weight_bytes(model),
             **{n: rw.weight_bytes(Path(p) if Path(p).is_dir() else Path(p).parent)
                for n, p in rewards.items()}}
    return {"model": str(model), "rewards": rewards, "diversity": diversity, "train": str(train),
            "eval": str(held), "bytes": sizes, "seconds": time.perf_counter() - t0,
            "prompts": source}


def rehearsal_config(cfg, run_dir: Path, device: torch.device, counts: Counts, paths: dict,
                     world: int = 1):
    """(the rehearsal's config, notes): ``cfg`` with :func:`rehearsal_overrides`, its base
    written to RUN/rehearsal/base.yaml (the overrides apply to it as ``--set`` would)."""
    from craft.run.config import load_config, save_config

    base = save_config(cfg, Path(run_dir) / REPORT_DIR / "base.yaml")
    overrides, notes = rehearsal_overrides(cfg, device, counts, paths, world)
    return load_config(base, overrides), notes


def rehearse(cfg, run_dir, *, counts: Counts | None = None, device=None,
             margin: float | None = None, cache_dir=None, keep_weights: bool = False,
             say=print, make_plan=None, name: str | None = None) -> Rehearsal | None:
    """Rehearse ``cfg`` in ``run_dir`` (see the module docstring); returns the outcome on the
    main process (None on the others) after writing RUN/rehearsal/report.md and report.json.
    ``counts``: default one image a batch on a CPU, full batches on a GPU. ``margin``: the
    relative tolerance instead of the plan's stated one. ``make_plan``: the plan to check
    against (default craft.planning.make_plan). ``name``: how the report names the config."""
    import os

    from craft.methods.registry import get_method
    from craft.stages.common import open_run
    from craft.stages.rehearsal_weights import default_cache_dir

    t0 = time.perf_counter()
    dev = _device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if counts is None:
        counts = full_batch_counts(cfg, Counts(), world) if dev.type == "cuda" else Counts()
    method = get_method(cfg.train.method)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=dev.type))
    run = open_run(Path(run_dir), cfg)
    with run:
        paths = run.dist.on_main(prepare, cfg, run.run_dir, dev, counts,
                                 Path(cache_dir or default_cache_dir()), say)
        rcfg, notes = rehearsal_config(cfg, run.run_dir, dev, counts, paths, run.dist.world)
        run.save_config(rcfg)
        plan = _plan(rcfg, run.dist.world, dev, make_plan)
        meter = make_meter(run.dist.model_device(rcfg.model.device), method)
        if run.is_main:
            say(f"rehearsal: {method.name}, {rcfg.model.dtype}, "
                f"{'LoRA' if rcfg.train.lora else 'full'}, {plan.size[0]}x{plan.size[1]} px on "
                f"{_device_name(dev)}; measuring {meter.kind}")
        failure = _measure(run, rcfg, meter)
        gathered = run.dist.gather(meter.finish())
        if not run.is_main:
            return None
        records = _merged(gathered)
        metrics = losses(run)["steps"]
        failure = failure or _after_checks(run, metrics)
    out = _outcome(name or cfg.model.pretrained, rcfg, method, dev, meter, counts, notes,
                   plan, records, metrics, failure, paths, margin, run.run_dir)
    out.seconds = time.perf_counter() - t0
    if not keep_weights:
        out.weights["removed_bytes"] = drop_run_weights(run.run_dir)
    from craft.stages.rehearsal_report import write_report

    write_report(out)
    return out


def _plan(rcfg, world: int, dev: torch.device, make_plan=None):
    from craft.planning import make_plan as default_plan, resolve_gpu
    from craft.planning.hardware import local_gpu

    gpu = (local_gpu() if dev.type == "cuda" else None) or resolve_gpu(None, None)
    return (make_plan or default_plan)(rcfg, gpus=world, gpu=gpu, suggest=False)


def _measure(run, rcfg, meter) -> Failure | None:
    from craft.run.watch import watching

    with meter, watching(meter):
        _, failure = _run_twice(run, rcfg, meter)
    return failure


def _merged(gathered: list[dict[str, Record]]) -> dict[str, Record]:
    """Every process's records: the largest peak and the longest time of each stage."""
    out: dict[str, Record] = {}
    for records in gathered:
        for label, rec in records.items():
            have = out.setdefault(label, Record(label))
            if rec.peak > have.peak:
                have.peak, have.parts = rec.peak, rec.parts
            have.seconds = max(have.seconds, rec.seconds)
            have.windows = max(have.windows, rec.windows)
    return out


def _after_checks(run, metrics: list[dict]) -> Failure | None:
    """What a finished rehearsal must have left: finite losses, a published model card."""
    from craft.run.layout import final_dir

    bad = [m for m in metrics if m.get("loss") is not None and not math.isfinite(float(m["loss"]))]
    if not metrics or bad:
        return Failure(STEP, "no training step was recorded" if not metrics else
                       f"the loss is not finite at step(s) {[int(m['step']) for m in bad]}")
    if not (final_dir(run.run_dir) / "README.md").is_file():
        return Failure("publish", f"no model card at {final_dir(run.run_dir) / 'README.md'}")
    return None


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return f"{p.name} ({p.total_memory / GIB:.0f} GiB)"
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _outcome(name, rcfg, method, dev, meter, counts, notes, plan, records, metrics, failure,
             paths, margin, run_dir) -> Rehearsal:
    from craft.models.sharding import effective_sharding

    t = rcfg.train
    steps = step_seconds(metrics, records)
    checks = compare(plan, records, dev.type == "cuda", margin, steps)
    priced = {c.stage for c in checks}
    setting = {"dtype": rcfg.model.dtype, "mixed_precision": t.mixed_precision,
               "training": f"LoRA rank {t.lora_rank}" if t.lora else "full fine-tuning",
               "sharding": effective_sharding(rcfg), "processes": plan.gpus,
               "resolution": list(plan.size), "counts": dataclasses.asdict(counts),
               "batches": {"generation": rcfg.generation.batch_size,
                           "rewards": rcfg.rewards.batch_size, "micro_batch": t.micro_batch,
                           "effective_batch": t.effective_batch, "eval": rcfg.eval.batch_size},
               "train_steps": t.steps, "stop_after": STOP_AFTER,
               "sampler_steps": rcfg.generation.num_inference_steps}
    return Rehearsal(str(name), method.name,
                     _device_name(dev), meter.kind, setting, notes, checks,
                     [r for label, r in records.items() if label not in priced], failure,
                     metrics, 0.0, {"paths": {k: v for k, v in paths.items()
                                              if k in ("model", "rewards", "diversity")},
                                    "bytes": paths.get("bytes", {}),
                                    "build_seconds": paths.get("seconds")},
                     plan.table(markdown=True), margin, str(run_dir))


def drop_run_weights(run_dir: Path) -> int:
    """Delete the random weights the rehearsal's training wrote (checkpoints, final/, the
    published copy): tens of GB for a full fine-tuning of a real-size model, worth nothing.
    Configs, model cards and images stay. Returns the bytes freed."""
    from craft.run.layout import final_dir

    freed = 0
    for root in (Path(run_dir) / "train", final_dir(Path(run_dir))):
        if not root.exists():
            continue
        for f in root.rglob("*"):
            if f.is_file() and f.suffix in (".safetensors", ".pt", ".bin"):
                freed += f.stat().st_size
                f.unlink()
    return freed


__all__ = ["Check", "Counts", "CpuMeter", "CudaMeter", "EXIT_PLAN_OFF", "EXIT_STAGE_FAILED",
           "Failure", "Record", "Rehearsal", "compare", "drop_run_weights", "full_batch_counts",
           "gpu_dtype", "losses", "make_meter", "mixed_precision", "modules_of", "prepare",
           "rehearsal_config", "rehearsal_overrides", "rehearse", "run_dtype", "step_seconds",
           "tolerance", "write_prompts"]
