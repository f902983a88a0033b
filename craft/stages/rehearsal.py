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
STOP_AFTER = 2  # training steps before the stop: step 1 warms AdamW up, step 2 is measured

# the plan's stage names (craft.planning.plan) the measured sections are filed under
STEP = "training: one step"
CHECKPOINT = "checkpoint + previews"
SAMPLING = "GRPO: sample a round"
AFTER_STEPS = "training: stop and checkpoint"
RESUMED = "training: resumed"
_STAGE_LABELS = {"generate": "generation", "score": "scoring", "evaluate": "evaluation",
                 "prompts": "prompts"}

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
        self._stack: list[list] = []  # [label, window peak, parts, started]

    @property
    def label(self) -> str | None:
        return self._stack[-1][0] if self._stack else None

    def _open(self, label: str) -> None:
        self._stack.append([label, self._now_bytes(), self._now_parts(), time.perf_counter()])
        self._window_started()

    def _close(self) -> None:
        label, peak, parts, started = self._stack.pop()
        peak, parts = max((peak, parts), self._window_peak(), key=lambda x: x[0])
        rec = self.records.setdefault(label, Record(label))
        if peak > rec.peak:
            rec.peak, rec.parts = peak, dict(parts)
        rec.seconds += time.perf_counter() - started
        rec.windows += 1

    def _pause(self) -> None:
        """Fold the top window's peak so far into it (before a nested label opens)."""
        if self._stack:
            top = self._stack[-1]
            peak, parts = self._window_peak()
            if peak > top[1]:
                top[1], top[2] = peak, parts

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
            self._window_started()

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
        label = self.section_labels.get(name)
        if label is None:
            return
        self.open_section(label) if entering else self.close_section()


class CpuMeter(_Labels, MemoryTracker):
    """Live tensors on a CPU, as the plan counts device memory: what the run loads is counted
    from when it is loaded, what a GPU run would move to the host stops counting until it
    would come back, and copies made for the host (craft.run.watch.host) never count."""

    kind = "live tensors (craft.planning.memtrack), as the plan counts them"

    def __init__(self, section_labels: dict[str, str]):
        MemoryTracker.__init__(self)
        self._init_labels()
        self.section_labels = section_labels
        self._host_depth = 0
        self._host: dict[int, object] = {}
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
        if self._host_depth or self._host:
            keys = [st._cdata for st in _storages(tensor)]
            if self._host_depth:
                for st, key in zip(_storages(tensor), keys):
                    if key not in self._live and key not in self._host:
                        import weakref

                        self._host[key] = weakref.ref(st, lambda _, k=key: self._host.pop(k, None))
                return
            if any(k in self._host for k in keys):
                return
        MemoryTracker.track(self, tensor, category)
        if self.total > self._win[0]:
            self._win = (self.total, self._now_parts())

    def untrack(self, tensor: torch.Tensor) -> None:
        for st in _storages(tensor):
            self._release(st._cdata)

    # craft.run.watch
    def loaded(self, obj) -> None:
        for m in modules_of(obj):
            for t in [*m.parameters(), *m.buffers()]:
                self.track(t, "weights")

    def left_device(self, obj) -> None:
        for m in modules_of(obj):
            for t in [*m.parameters(), *m.buffers()]:
                self.untrack(t)

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
    sections = {"checkpoint": CHECKPOINT, "preview": CHECKPOINT, "sample": SAMPLING,
                "encode": method.data_stage or "training: encode"}
    if device.type == "cuda":
        return CudaMeter(sections, device)
    return CpuMeter(sections)


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


def write_prompts(folder: Path, counts: Counts) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    train, held = folder / "train.txt", folder / "eval.txt"
    pick = lambda pool, n, tag: [pool[i % len(pool)] + (f", variation {i // len(pool)}"  # noqa
                                                        if i >= len(pool) else "")
                                 for i in range(n)]
    train.write_text("\n".join(pick(TRAIN_PROMPTS, counts.prompts, "t")) + "\n")
    held.write_text("\n".join(pick(EVAL_PROMPTS, counts.eval_prompts, "e")) + "\n")
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
    return [f"{k}={json.dumps(v)}" for k, v in out.items()], _notes(cfg, device, out)


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


def _run_twice(run, rcfg, meter, on_pass=None) -> tuple[dict | None, Failure | None]:
    """``run_all`` stopped after STOP_AFTER training steps (a checkpoint is saved), then
    ``run_all`` again: the checkpoint loaded back, the last steps, publish and evaluation."""
    from craft.stages.engine import run_all

    state = {"pass": 1, "stop": False}

    def on_stage(stage: str) -> None:
        if stage == "train":
            meter.stage(STEP if state["pass"] == 1 else RESUMED)
        else:
            meter.stage(_STAGE_LABELS.get(stage, stage))

    def progress_for(stage: str):
        if stage != "train":
            return None

        def progress(step: int, total: int) -> None:
            if state["pass"] == 1 and step == 1:
                meter.restart_window()  # the steady state: AdamW's moments exist from now on
            if state["pass"] == 1 and step == STOP_AFTER:
                meter.stage(AFTER_STEPS)
                state["stop"] = True

        return progress

    def go():
        return run_all(run, rcfg, RUN_NAME, progress_for=progress_for,
                       should_stop=lambda: state["stop"], on_stage=on_stage)

    try:
        try:
            go()
            raise CraftError(f"training did not stop after step {STOP_AFTER} as asked")
        except StageStopped:
            pass
        state.update({"pass": 2, "stop": False})
        if on_pass:
            on_pass(2)
        return go(), None
    except Exception as e:  # noqa: BLE001 - a stage broke: the report names it
        return None, Failure(meter.label or "setup", f"{type(e).__name__}: {e}",
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


__all__ = ["Counts", "CpuMeter", "CudaMeter", "EXIT_PLAN_OFF", "EXIT_STAGE_FAILED", "Failure",
           "Record", "full_batch_counts", "gpu_dtype", "losses", "make_meter", "mixed_precision",
           "modules_of", "rehearsal_overrides", "run_dtype", "write_prompts"]
