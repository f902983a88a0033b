"""Run a stage as a ``craft`` subprocess, on one or several processes (``accelerate launch``),
inside a studio job: same progress, ETA, log lines, cancel and resume as an in-process job.

Why a subprocess: several GPUs need several processes, which a thread in the studio cannot
give; the command is exactly the one a user would type (it is logged), so what the studio runs
on N processes is what the README documents. How it talks to the command:

- ``--config FILE``: the studio's current settings, written into the job's folder;
- ``--progress-file``: the command's main process writes its stage progress there as JSON, and
  the job polls it every half second;
- ``--stop-file``: Cancel creates it; the command stops at the next batch or optimizer step,
  leaving what it committed (and, in training, a checkpoint), and exits 3. If it has not ended
  :data:`STOP_GRACE_S` later, its whole process group is sent SIGTERM, then SIGKILL;
- ``--result-file``: what the command made (training run, checkpoint, evaluation id).

Job folders live under RUN/.studio-jobs/ (config, log, progress, result), so a finished job can
still be read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from craft import CraftError

log = logging.getLogger(__name__)

JOBS_DIR = ".studio-jobs"
STOP_GRACE_S = 120.0
POLL_S = 0.5
_BAR = re.compile(r"\d+%\|.*\|")  # a tqdm bar line: not worth a log line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_prefix(processes: int) -> list[str]:
    """The program that runs ``craft``: this Python for one process, ``accelerate launch`` with
    ``processes`` processes on this machine otherwise (one per GPU, or CPU processes)."""
    if processes <= 1:
        return [sys.executable, "-m", "craft.cli"]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or \
        shutil.which("accelerate")
    if accelerate is None:
        raise CraftError("several processes need accelerate's launcher, but the `accelerate` "
                         "command is not installed beside this Python; pip install accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "craft.cli"]


def subprocess_job(command: list[str], run_dir: Path, cfg, processes: int,
                   kind: str) -> Callable[[Any], Any]:
    """The job function (``fn(jc)`` for :meth:`studio.jobs.JobManager.start`) that runs
    ``craft COMMAND --run-dir RUN ...`` in a subprocess and relays it to the job."""
    from craft.run.config import save_config

    def job(jc):
        folder = Path(run_dir) / JOBS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        config = save_config(cfg, folder / "config.yaml")
        files = {k: folder / f"{k}.json" for k in ("progress", "result")}
        stop = folder / "stop"
        argv = [*launch_prefix(processes), *command, "--run-dir", str(run_dir), "--config",
                str(config), "--progress-file", str(files["progress"]), "--stop-file", str(stop),
                "--result-file", str(files["result"])]
        jc.set_info(processes=processes, command=" ".join(argv), job_dir=str(folder))
        jc.log("$ " + " ".join(argv))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        gpus = [d for d in getattr(jc, "devices", ()) if d.startswith("cuda")]
        if gpus:  # the GPUs the studio's device queue gave this job, and only those
            env["CUDA_VISIBLE_DEVICES"] = visible_devices(gpus)
            jc.log(f"on {', '.join(gpus)} (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})")
        if processes > 1:
            env.setdefault("OMP_NUM_THREADS", "1")  # N CPU processes share the cores
        with open(folder / "log.txt", "w") as logfile:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=env, start_new_session=True)
            reader = threading.Thread(target=_relay, args=(proc, jc, logfile), daemon=True)
            reader.start()
            rc = _watch(proc, jc, files["progress"], stop)
            reader.join(timeout=10)
        result = json.loads(files["result"].read_text()) if files["result"].exists() else {}
        if rc == 0:
            return result
        if jc.should_stop():
            jc.log(f"stopped (exit code {rc}); run it again to continue")
            return result
        from craft.cli.common import EXIT_STOPPED

        if rc == EXIT_STOPPED:
            return result
        last = _last_error(folder / "log.txt")
        raise CraftError(f"`craft {command[0]}` on {processes} process(es) failed (exit code "
                         f"{rc}): {last}")

    return job


def _relay(proc, jc, logfile) -> None:
    for line in proc.stdout:
        line = line.rstrip()
        logfile.write(line + "\n")
        logfile.flush()
        if line and not _BAR.search(line):
            jc.log(line)


def _watch(proc, jc, progress_file: Path, stop: Path) -> int:
    stop_sent = None
    signalled = 0
    while proc.poll() is None:
        _read_progress(jc, progress_file)
        if jc.should_stop() and stop_sent is None:
            stop.touch()
            stop_sent = time.time()
            jc.log("cancel requested: the command stops at its next batch or step")
        if stop_sent is not None and time.time() - stop_sent > STOP_GRACE_S * (1 + signalled):
            sig = signal.SIGTERM if signalled == 0 else signal.SIGKILL
            jc.log(f"the command did not stop within {STOP_GRACE_S:.0f} s; sending "
                   f"{sig.name} to its processes")
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            signalled += 1
        time.sleep(POLL_S)
    _read_progress(jc, progress_file)
    return proc.returncode


def _read_progress(jc, path: Path) -> None:
    try:
        p = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if p.get("total"):
        jc.progress(int(p["done"]), int(p["total"]), f"{p.get('stage', '')} "
                    f"{p['done']}/{p['total']} {p.get('unit', '')}".strip())


def _last_error(log_path: Path) -> str:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("craft: error:") or "Error" in ln:
            return ln.removeprefix("craft: error:").strip()[:500]
    return lines[-1][:500] if lines else "no output"


def job_hooks(jc):
    """craft.stages.calls.Hooks that report into a studio job: progress per stage, the stage
    and round being run (``info``: what the tabs show), training steps, previews and
    checkpoints as log lines, cancel."""
    from craft.stages.calls import Hooks
    from craft.methods.training import TrainCallbacks

    def progress_for(stage):
        return lambda done, total: jc.progress(done, total, f"{stage} {done}/{total}")

    def on_stage(stage):
        jc.log(stage)
        jc.set_info(stage=stage)

    def on_step(step, total, metrics):
        jc.progress(step, total, f"step {step}/{total} · loss {metrics['loss']:.4f}")

    return Hooks(progress_for=progress_for, should_stop=jc.should_stop, on_stage=on_stage,
                 on_round=lambda r, name: jc.set_info(name=name, round=r),
                 callbacks=TrainCallbacks(
                     on_step=on_step,
                     on_preview=lambda step, ims, ps: jc.log(f"previews at step {step}"),
                     on_checkpoint=lambda step, path: jc.log(f"checkpoint at step {step}: "
                                                             f"{path}")))


def visible_devices(gpus: list[str]) -> str:
    """CUDA_VISIBLE_DEVICES for a subprocess on ``gpus`` (this process's ``cuda:N`` names),
    through this process's own CUDA_VISIBLE_DEVICES when it has one (cuda:0 may be GPU 2)."""
    ids = [int(d.partition(":")[2] or 0) for d in gpus]
    mine = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return ",".join(mine[i] if i < len(mine) else str(i) for i in ids)


def device_request(call, cfg, processes: int = 1):
    """What a stage call asks of the studio's device queue (studio.jobs.DeviceRequest): the
    device its config pins (``cpu``, ``cuda:1``; rewards.device for scoring, model.device
    otherwise), else any GPU (the CPU without one); ``processes`` GPUs for a launch on
    several processes. None for a light call: prompts without a local LLM expander."""
    from studio.jobs import DeviceRequest

    if call.command == "prompts" and cfg.prompts.expander != "llm_local":
        return None
    section = cfg.rewards if call.command == "score" else cfg.model
    device = str(getattr(section, "device", None) or "auto")
    if device == "cpu" or (processes <= 1 and device.startswith("cuda:")):
        return DeviceRequest((device,), 1)
    return DeviceRequest(None, max(1, int(processes)))


def on_device(cfg, devices: tuple[str, ...]):
    """``cfg`` with its unpinned devices (``auto``, ``cuda``) set to the GPU the queue gave the
    job (model.device, rewards.device); unchanged on the CPU or with pinned devices."""
    import dataclasses

    gpu = next((d for d in devices if d.startswith("cuda")), None)
    if gpu is None:
        return cfg
    changes = {}
    for name in ("model", "rewards"):
        section = getattr(cfg, name)
        if str(section.device or "auto") in ("auto", "cuda"):
            changes[name] = dataclasses.replace(section, device=gpu)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def stage_job(call, run_dir: Path, cfg, processes: int) -> Callable[[Any], Any]:
    """A job function for one stage call (craft.stages.calls.StageCall): run in a thread of the
    studio for one process, or as ``craft`` + ``call.argv()`` on ``processes`` processes
    (:func:`subprocess_job`): the same call either way, as the CLI runs it. The function
    carries its ``device_request``: the studio's device queue runs it when its device is
    free, on the device it gives (:func:`on_device`, or CUDA_VISIBLE_DEVICES for a launch)."""
    processes = int(processes or 1)
    if processes < 1:
        raise CraftError(f"processes = {processes}: use 1 (in the studio) or more (accelerate "
                         f"launch)")
    if processes > 1:
        fn = subprocess_job(call.argv(), run_dir, cfg, processes, call.command)
        fn.device_request = device_request(call, cfg, processes)
        return fn

    def job(jc):
        from craft.stages.calls import run_call
        from craft.stages.engine import open_run

        run_cfg = on_device(cfg, getattr(jc, "devices", ()))
        if run_cfg is not cfg:
            jc.log(f"on {run_cfg.model.device} (the studio's device queue)")
        with open_run(run_dir, run_cfg) as run:
            out = run_call(call, run, run_cfg, job_hooks(jc))
        jc.log(f"{call.command} finished: " + ", ".join(
            f"{k} {v}" for k, v in out.items() if isinstance(v, (int, float, str))
            and k != "table"))
        return out

    job.device_request = device_request(call, cfg, processes)
    return job


__all__ = ["JOBS_DIR", "STOP_GRACE_S", "device_request", "job_hooks", "launch_prefix",
           "on_device", "stage_job", "subprocess_job", "visible_devices"]
