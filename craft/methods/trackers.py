"""Experiment trackers (``train.report_to``: tensorboard, wandb): what a training run and its
evaluations look like in the tools people already watch their jobs in.

One tracker run per training run, in RUN/train/NAME/trackers/ (tensorboard/ for the event
files, wandb/ for wandb's run folder), so rounds and methods stay apart and a resumed run
continues the same tracker run (TensorBoard: the same folder, the steps go on; wandb: a run id
fixed by the folder, ``resume="allow"``; offline unless ``WANDB_MODE`` says otherwise, so no
network is needed to log). Only the main process logs. Logged: the config as
hyper-parameters, what the run trains on (kept set or pairs, coverage), every step's metrics
(loss, lr, grad norm, step time and the method's own), the fixed-seed previews as images, and
each evaluation of the run's model (per reward: tuned mean, Δ against the base, win rate;
diversity; the drift warnings as text). accelerate's tracker classes do the writing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from craft import CraftError
from craft.run.choices import TRACKERS, parse_report_to

log = logging.getLogger(__name__)

FOLDER = "trackers"


def _flat(cfg_dict: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg_dict.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = v if v is not None else "null"
        else:
            out[key] = json.dumps(v)
    return out


class RunTrackers:
    """The trackers of one training run (its folder ``train_dir``); a no-op with none."""

    def __init__(self, names: list[str], train_dir: Path, run_name: str) -> None:
        self.trackers = []
        self.folder = Path(train_dir) / FOLDER
        for name in names:
            self.trackers.append(self._open(name, run_name))

    def _open(self, name: str, run_name: str):
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            if name == "tensorboard":
                t = TensorBoardTracker("tensorboard", self.folder)
            else:
                run_id = hashlib.sha1(str(self.folder.resolve()).encode()).hexdigest()[:16]
                (self.folder / "wandb").mkdir(exist_ok=True)
                t = WandBTracker("craft-studio", name=run_name, id=run_id, resume="allow",
                                 dir=str(self.folder / "wandb"),
                                 mode=os.environ.get("WANDB_MODE", "offline"))
            t.start()
        except ImportError as e:
            raise CraftError(f"train.report_to names {name}, which is not installed ({e}); "
                             f"pip install {name} (or `pip install craft-studio[trackers]`)"
                             ) from None
        return t

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def config(self, values: dict) -> None:
        flat = _flat(values)
        for t in self.trackers:
            t.store_init_configuration(flat)

    def scalars(self, values: dict, step: int) -> None:
        clean = {k: float(v) for k, v in values.items()
                 if isinstance(v, (int, float, np.floating)) and np.isfinite(v)}
        for t in self.trackers:
            t.log(clean, step=step)

    def images(self, tag: str, images: list, step: int) -> None:
        if not images:
            return
        arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])
        for t in self.trackers:
            if t.name == "tensorboard":
                t.writer.add_images(tag, arrays, global_step=step, dataformats="NHWC")
            else:
                t.log_images({tag: list(arrays)}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        for t in self.trackers:
            if t.name == "tensorboard":
                t.writer.add_text(tag, text, global_step=step)
            else:
                import wandb

                t.log({tag: wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def close(self) -> None:
        for t in self.trackers:
            try:
                if t.name == "tensorboard":
                    t.writer.flush()
                t.finish()
            except Exception as e:  # noqa: BLE001 - a tracker's exit never fails a finished run
                log.warning("closing tracker %s: %s", t.name, e)
        self.trackers = []


def open_run_trackers(cfg, train_dir: Path, run_name: str, meta: dict | None = None,
                      main: bool = True) -> RunTrackers:
    """The run's trackers with the config and what it trains on logged (main process; the
    others get an empty set)."""
    from craft.run.config import config_to_dict

    names = parse_report_to(cfg.train.report_to) if main else []
    trackers = RunTrackers(names, train_dir, run_name)
    if trackers:
        facts = {k: v for k, v in (meta or {}).items()
                 if isinstance(v, (int, float, str, bool)) and k != "kept_digest"}
        trackers.config({**config_to_dict(cfg), "run": facts})
        trackers.text("run/trained_on", json.dumps(meta or {}, indent=1, default=str), 0)
    return trackers


def log_evaluation(cfg, train_dir: Path, run_name: str, label: str, evaluation,
                   step: int) -> None:
    """An evaluation of the model of the training run in ``train_dir``, into its tracker run
    at ``step`` (its last step): per reward the tuned mean, Δ and win rate; the warnings."""
    names = parse_report_to(cfg.train.report_to)
    if not names or not (Path(train_dir) / FOLDER).exists():
        return
    from craft.stages.model_card import evaluation_rows

    rows = evaluation_rows(evaluation, label)
    trackers = RunTrackers(names, train_dir, run_name)
    try:
        values = {}
        for r in rows:
            key = f"eval/{evaluation.name}/{r['reward']}"
            values.update({f"{key}/tuned": r["tuned"], f"{key}/delta": r["diff"],
                           f"{key}/win_rate": r["win_rate"]})
        trackers.scalars(values, step)
        table = "\n".join(f"{r['reward']:>16}  base {r['base']:.4f}  tuned {r['tuned']:.4f}  "
                          f"Δ {r['diff']:+.4f} ± {1.96 * r['diff_se']:.4f}  win "
                          f"{100 * r['win_rate']:.1f} %" for r in rows)
        warns = [w for w in evaluation.warnings if w.startswith(f"{label}:")]
        trackers.text(f"eval/{evaluation.name}", table + "\n\nwarnings: "
                      + ("; ".join(warns) or "none"), step)
    finally:
        trackers.close()


__all__ = ["FOLDER", "TRACKERS", "RunTrackers", "log_evaluation", "open_run_trackers",
           "parse_report_to"]
