"""The studio's device queue (studio.jobs.DeviceQueue): heavy jobs wait their turn per device,
say where they are in line and when they should start, can be cancelled while they wait, and
spread over several GPUs; and the Train tab's time estimate (craft.stages.estimate)."""

from __future__ import annotations

import threading
import time

import pytest

from studio.jobs import DeviceRequest, JobManager, ordinal, per_device_setting


class Gate:
    """A job function that reports progress, then runs until released or cancelled."""

    def __init__(self, total: int = 10):
        self.release = threading.Event()
        self.started = threading.Event()
        self.ran_on: tuple[str, ...] | None = None
        self.total = total

    def __call__(self, jc):
        self.ran_on = jc.devices
        self.started.set()
        jc.progress(0, self.total)
        time.sleep(0.05)
        jc.progress(1, self.total)
        while not self.release.is_set() and not jc.should_stop():
            time.sleep(0.01)
        return "ok"


def _eventually(cond, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_one_per_device_a_second_heavy_job_waits_then_starts():
    jobs = JobManager(devices=["cpu"], per_device=1)
    first, second = Gate(), Gate()
    a = jobs.for_run("/runs/a").start("train", "Train craft-1 · /runs/a", first, owner="ann")
    assert a.status == "running" and first.started.wait(5)
    b = jobs.for_run("/runs/b").start("generate", "Generate candidates · /runs/b", second)
    snap = jobs.get(b.id)
    assert snap.status == "queued" and snap.queue_position == 1 and snap.running
    assert "1st in line for the CPU" in snap.summary()
    # the estimate comes from the running job's ETA (known after its second progress report)
    _eventually(lambda: jobs.get(a.id).eta_s is not None)
    snap = jobs.get(b.id)
    assert snap.start_in_s is not None and snap.start_in_s > 0
    assert "starts in about" in snap.queue_line
    assert "after Train craft-1 in a (ann)" in snap.queue_line
    assert jobs.get(a.id).waiting == 1 and "1 job waiting" in jobs.get(a.id).summary()
    assert not second.started.is_set()  # nothing of it ran
    # another run's page sees it queued, with its place in line
    [other] = jobs.for_run("/runs/a").others()
    assert other.id == b.id and other.status == "queued"
    first.release.set()
    assert jobs.wait(a.id, 5).status == "done"
    assert jobs.get(b.id).status == "running"  # started as the first one ended
    assert second.started.wait(5) and second.ran_on == ("cpu",)
    second.release.set()
    assert jobs.wait(b.id, 5).status == "done"


def test_a_queued_job_says_unknown_when_no_eta_and_its_place_behind_others():
    jobs = JobManager(devices=["cpu"], per_device=1)
    gate = threading.Event()
    a = jobs.start("train", "Train craft-1 · /r", lambda jc: gate.wait(5), run_dir="/r")
    b = jobs.start("generate", "Generate · /s", lambda jc: None, run_dir="/s")
    c = jobs.start("score", "Score · /t", lambda jc: None, run_dir="/t")
    sb, sc = jobs.get(b.id), jobs.get(c.id)
    assert (sb.queue_position, sc.queue_position) == (1, 2)
    assert "start time unknown" in sb.queue_line and "after Train craft-1" in sb.queue_line
    assert "2nd in line for the CPU" in sc.queue_line and "1 job(s) ahead" in sc.queue_line
    gate.set()
    for j in (a, b, c):
        assert jobs.wait(j.id, 5).status == "done"


def test_cancel_while_queued_removes_it_and_nothing_runs():
    jobs = JobManager(devices=["cpu"], per_device=1)
    first, waiting, third = Gate(), Gate(), Gate()
    a = jobs.start("train", "Train · /a", first, run_dir="/a")
    b = jobs.start("generate", "Generate · /b", waiting, run_dir="/b")
    c = jobs.start("score", "Score · /c", third, run_dir="/c")
    assert jobs.get(c.id).queue_position == 2
    # its owner cancels it by kind, as the page's Cancel does
    assert jobs.for_run("/b").cancel("generate")
    snap = jobs.wait(b.id, 1)
    assert snap.status == "cancelled" and not snap.running and snap.ended is not None
    assert any("nothing ran" in line for line in snap.log) and snap.info["never_started"]
    assert jobs.get(c.id).queue_position == 1  # the one behind moves up
    assert not jobs.for_run("/b").cancel("generate")  # nothing left to cancel
    first.release.set()
    jobs.wait(a.id, 5)
    assert third.started.wait(5)
    third.release.set()
    assert jobs.wait(c.id, 5).status == "done"
    assert not waiting.started.is_set()  # the cancelled job never ran


def test_light_jobs_do_not_queue():
    jobs = JobManager(devices=["cpu"], per_device=1)
    gate = Gate()
    a = jobs.start("train", "Train · /a", gate, run_dir="/a")
    light = jobs.start("prompts", "Add prompts · /b", lambda jc: 7, run_dir="/b")
    assert jobs.wait(light.id, 5).status == "done"
    gate.release.set()
    jobs.wait(a.id, 5)


def test_two_gpus_run_two_jobs_at_once_on_different_devices():
    jobs = JobManager(devices=["cpu", "cuda:0", "cuda:1"], per_device=1)
    g1, g2, g3, on_cpu = Gate(), Gate(), Gate(), Gate()
    a = jobs.start("train", "Train · /a", g1, run_dir="/a")
    b = jobs.start("train", "Train · /b", g2, run_dir="/b")
    assert g1.started.wait(5) and g2.started.wait(5)
    assert {jobs.get(a.id).devices, jobs.get(b.id).devices} == {("cuda:0",), ("cuda:1",)}
    assert "on cuda:" in jobs.get(a.id).summary()
    c = jobs.start("generate", "Generate · /c", g3, run_dir="/c")
    assert jobs.get(c.id).status == "queued" and "1st in line for a GPU" in \
        jobs.get(c.id).queue_line
    # a job pinned to the CPU does not wait behind the GPU jobs
    d = jobs.start("score", "Score · /d", on_cpu, run_dir="/d", request=DeviceRequest(("cpu",)))
    assert on_cpu.started.wait(5) and jobs.get(d.id).devices == ("cpu",)
    g2.release.set()
    jobs.wait(b.id, 5)
    assert g3.started.wait(5) and g3.ran_on == jobs.get(b.id).devices  # the freed GPU
    for g in (g1, g3, on_cpu):
        g.release.set()
    for j in (a, c, d):
        assert jobs.wait(j.id, 5).status == "done"


def test_the_least_loaded_gpu_and_a_launch_on_two_gpus():
    jobs = JobManager(devices=["cpu", "cuda:0", "cuda:1"], per_device=2)
    g1, g2, wide = Gate(), Gate(), Gate()
    a = jobs.start("train", "Train · /a", g1, run_dir="/a")
    b = jobs.start("train", "Train · /b", g2, run_dir="/b")
    assert g1.started.wait(5) and g2.started.wait(5)
    assert jobs.get(a.id).devices != jobs.get(b.id).devices  # spread, not stacked
    # two processes (accelerate launch) take a slot on both GPUs
    c = jobs.start("train", "Train · /c", wide, run_dir="/c", request=DeviceRequest(None, 2))
    assert wide.started.wait(5) and sorted(jobs.get(c.id).devices) == ["cuda:0", "cuda:1"]
    for g in (g1, g2, wide):
        g.release.set()
    for j in (a, b, c):
        jobs.wait(j.id, 5)


def test_two_per_device_lets_two_run_on_the_cpu():
    jobs = JobManager(devices=["cpu"], per_device=2)
    g1, g2, g3 = Gate(), Gate(), Gate()
    a = jobs.start("train", "Train · /a", g1, run_dir="/a")
    b = jobs.start("generate", "Generate · /b", g2, run_dir="/b")
    c = jobs.start("score", "Score · /c", g3, run_dir="/c")
    assert g1.started.wait(5) and g2.started.wait(5)
    assert jobs.get(c.id).status == "queued" and jobs.get(c.id).queue_position == 1
    jobs.configure(per_device=3)  # a wider setting lets the waiting one start
    assert g3.started.wait(5)
    for g in (g1, g2, g3):
        g.release.set()
    for j in (a, b, c):
        assert jobs.wait(j.id, 5).status == "done"


def test_the_per_device_setting(monkeypatch):
    from craft import CraftError

    monkeypatch.delenv("CRAFT_STUDIO_JOBS_PER_DEVICE", raising=False)
    assert per_device_setting() == 1
    monkeypatch.setenv("CRAFT_STUDIO_JOBS_PER_DEVICE", "2")
    assert per_device_setting() == 2 and JobManager(devices=["cpu"]).queue.per_device == 2
    assert per_device_setting(0) == 0  # no limit
    for bad in ("two", -1):
        with pytest.raises(CraftError, match="jobs per device"):
            per_device_setting(bad)
    from craft.cli.main import build_parser

    args = build_parser().parse_args(["studio", "--jobs-per-device", "3"])
    assert args.jobs_per_device == 3
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 21, 22)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "21st", "22nd"]


def test_no_limit_runs_everything_at_once():
    jobs = JobManager(devices=["cpu"], per_device=0)
    gates = [Gate() for _ in range(3)]
    snaps = [jobs.start("train", f"Train · /{i}", g, run_dir=f"/{i}") for i, g in
             enumerate(gates)]
    assert all(g.started.wait(5) for g in gates)
    for g in gates:
        g.release.set()
    for s in snaps:
        jobs.wait(s.id, 5)


def test_stage_jobs_ask_for_their_device_and_run_on_the_one_given():
    from craft.run.config import load_config
    from craft.stages.calls import StageCall
    from studio.launcher import device_request, on_device, stage_job, visible_devices

    cfg = load_config(None, ["model.device=auto", "rewards.device=auto"])
    assert device_request(StageCall("train", name="x"), cfg) == DeviceRequest()
    assert device_request(StageCall("train", name="x"), cfg, 2) == DeviceRequest(None, 2)
    pinned = load_config(None, ["model.device=cpu"])
    assert device_request(StageCall("generate"), pinned) == DeviceRequest(("cpu",))
    assert device_request(StageCall("prompts"), cfg) is None  # template expansion: light
    assert stage_job(StageCall("generate"), "/r", cfg, 1).device_request == DeviceRequest()
    moved = on_device(cfg, ("cuda:1",))
    assert (moved.model.device, moved.rewards.device) == ("cuda:1", "cuda:1")
    assert on_device(cfg, ("cpu",)) is cfg and on_device(pinned, ("cuda:0",)).model.device == \
        "cpu"
    import os

    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "4,6"
    try:
        assert visible_devices(["cuda:1"]) == "6"
        assert visible_devices(["cuda:0", "cuda:1"]) == "4,6"
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


# ------------------------------------------------------------------------------ time estimate


def test_train_time_estimate_from_the_runs_measured_steps(tmp_path):
    from craft.run.config import config_to_dict, load_config
    from craft.run.store import RunStore
    from craft.stages.estimate import estimate_train_time

    cfg = load_config(None, ["model.device=cpu", "train.steps=20", "train.effective_batch=8",
                             "train.micro_batch=4"])
    with RunStore(tmp_path / "run") as store:
        est = estimate_train_time(store, cfg)
        assert est.seconds is None and "no estimate yet" in est.text()
        assert "no earlier craft run on the CPU" in est.text()
        rid = store.create_train_run("craft-1", config_to_dict(cfg))
        store.add_metrics(rid, [{"step": s, "loss": 0.1, "step_time": 1.5} for s in
                                range(1, 11)])
        est = estimate_train_time(store, cfg)
        assert est.seconds == pytest.approx(30.0, abs=1) and est.measured_in == "craft-1"
        assert "Estimated time on the CPU" in est.text() and "craft-1" in est.text()
        # a step twice as large takes about twice as long; another method has no estimate
        bigger = load_config(None, ["model.device=cpu", "train.steps=20",
                                    "train.effective_batch=16", "train.micro_batch=4"])
        assert estimate_train_time(store, bigger).seconds == pytest.approx(60.0, abs=1)
        grpo = load_config(None, ["model.device=cpu", "train.method=grpo", "train.steps=20"])
        assert estimate_train_time(store, grpo).seconds is None


def test_time_outside_the_steps_leaves_out_a_pause():
    import pandas as pd

    from craft.stages.estimate import outside_steps

    # loaded for 5 s, steps of 1 s, a 3 s preview after step 2, then cancelled and resumed an
    # hour later: 5 + 3 s of work outside the steps, the hour is not
    created = [106.0, 107.0, 111.0, 3711.0]
    m = pd.DataFrame({"step": [1, 2, 3, 4], "step_time": [1.0] * 4, "created": created})
    assert outside_steps(m, 100.0) == pytest.approx(8.0)
    assert outside_steps(m.iloc[:0], 100.0) is None
