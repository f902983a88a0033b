"""The report of ``craft rehearse`` (craft/stages/rehearsal.py): RUN/rehearsal/report.md and
report.json, and the table the command prints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

GIB = 2 ** 30
MIB = 2 ** 20


def _size(b: float | None) -> str:
    if b is None:
        return "-"
    return f"{b / GIB:.2f} GiB" if abs(b) >= 0.1 * GIB else f"{b / MIB:.1f} MiB"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s:.2g} s"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def checks_table(r, markdown: bool = True) -> str:
    """Every stage of the plan: planned (simulated, with its margin), measured, the difference,
    the tolerance, the verdict and the times."""
    head = ["stage", "plan (simulated)", "plan + margin", "measured peak", "measured - plan",
            "tolerance", "verdict", "time", "plan's time"]
    rows = []
    for c in r.checks:
        verdict = {True: "ok", False: "OFF", None: "not measured"}[c.ok]
        diff = None if c.measured is None else c.measured - c.simulated
        rows.append([c.stage, _size(c.simulated), _size(c.needed), _size(c.measured),
                     f"{'+' if (diff or 0) >= 0 else '-'}{_size(abs(diff)) if diff is not None else '-'}"
                     f" ({_pct(c.difference)})", f"± {_size(c.tolerance)}", verdict,
                     _secs(c.seconds), _secs(c.plan_seconds)])
    return _table(head, rows, markdown)


def extra_table(r, markdown: bool = True) -> str:
    head = ["measured, not a stage of the plan", "peak", "time"]
    return _table(head, [[e.label, _size(e.peak), _secs(e.seconds)] for e in r.extra], markdown)


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                          *("| " + " | ".join(row) + " |" for row in rows)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                               for i, (x, w) in enumerate(zip(row, widths)))
                     for row in [head, *rows])


def losses_table(r) -> str:
    keys = [k for k in ("step", "loss", "ratio", "clip_fraction", "kl", "dpo_accuracy",
                        "grad_norm", "step_time") if any(k in m for m in r.metrics)]
    rows = [[_num(m.get(k)) for k in keys] for m in r.metrics]
    return _table(keys, rows, True) if rows else "(no training step recorded)"


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != int(v):
        return f"{v:.6g}"
    return str(int(v)) if isinstance(v, (int, float)) else str(v)


def markdown(r) -> str:
    s = r.setting
    lines = [f"# Rehearsal of {r.config}: {r.method}, {s['training']}", "",
             f"**{r.verdict()}**", "",
             f"Device: {r.device}. Memory measured as {r.meter}. "
             f"{s['dtype']} weights, mixed precision {s['mixed_precision']}, "
             f"{s['resolution'][0]}x{s['resolution'][1]} px, {s['processes']} process(es), "
             f"sharding {s['sharding']}. Counts: {json.dumps(s['counts'])}; batches "
             f"{json.dumps(s['batches'])}; {s['train_steps']} training steps (stopped after "
             f"{s['stop_after']}, resumed from the checkpoint), {s['sampler_steps']} sampler "
             f"steps. Whole rehearsal {r.seconds / 60:.1f} min.", "",
             "## Every stage of the plan beside what the rehearsal measured", "",
             checks_table(r), "",
             "Tolerance: the plan's stated margin" + (f" (--margin {r.margin:g} instead of "
                                                      "its relative part)" if r.margin is not None
                                                      else "") +
             ", on both sides of the simulated peak. The plan's time is its estimate for the "
             "same work on the GPU it plans for; on a CPU the two times are not comparable.", ""]
    if r.extra:
        lines += [extra_table(r), ""]
    if r.failure is not None:
        lines += ["## What broke", "", f"Stage **{r.failure.stage}**: {r.failure.message}", "",
                  "```", r.failure.trace.strip(), "```", ""]
    lines += ["## Training steps", "", losses_table(r), "", "## What differs from the real run",
              "", *(f"- {n}" for n in r.notes), "",
              "## Weights", "", f"Random weights at the real sizes (built in "
              f"{_secs(r.weights.get('build_seconds'))}, cached): "
              + ", ".join(f"{k} {_size(v)}" for k, v in r.weights.get("bytes", {}).items()),
              "", "## The plan it was checked against", "", r.plan_table, ""]
    return "\n".join(lines)


def record(r) -> dict:
    out = dataclasses.asdict(r)
    out["checks"] = [{**dataclasses.asdict(c), "ok": c.ok, "difference": c.difference}
                     for c in r.checks]
    out["verdict"] = r.verdict()
    out["exit_code"] = r.exit_code
    return out


def write_report(r) -> tuple[Path, Path]:
    from craft.run.fsutil import write_text_atomic

    folder = Path(r.run_dir) / "rehearsal"
    md = write_text_atomic(folder / "report.md", markdown(r))
    js = write_text_atomic(folder / "report.json", json.dumps(record(r), indent=1, default=str))
    return Path(md), Path(js)


__all__ = ["checks_table", "extra_table", "markdown", "record", "write_report"]
