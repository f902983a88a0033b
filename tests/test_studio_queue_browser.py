"""Two people's heavy jobs on one studio, in a real browser (headless Chromium, two browser
contexts = two people, as in test_studio_team_browser): the second job waits in the device
queue, its page says so with its place in line, its owner can take it out of the line, and it
starts when the first one ends.
"""

from __future__ import annotations

import time

import pytest

from test_studio_browser import (BROWSER_ARGS, CHROMIUM, JOB_TIMEOUT_MS, TINY, _free_port, fill,
                                 sync_api, tab, toy_model, wait_job)
from test_studio_team_browser import open_run, person

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    from studio.app import build_app, launch
    from studio.jobs import JOBS

    JOBS.configure(devices=["cpu"], per_device=1)  # this machine's CPU: one heavy job at once
    model = toy_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("queue")
    app = build_app(root / "first", overrides=[*TINY, f"model.pretrained={model}"],
                    runs_root=root)
    port = _free_port()
    launch(app, port=port, block=False, quiet=True)
    yield app, f"http://127.0.0.1:{port}/", root
    app.demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


def _job(run_dir, kind="generate"):
    from studio.jobs import JOBS

    return [j for j in JOBS.list() if j.run_dir == str(run_dir) and j.kind == kind][-1]


def test_a_second_heavy_job_waits_in_line_and_starts_when_the_first_ends(studio, browser):
    app, url, root = studio
    (ca, a), (cb, b) = person(browser, url), person(browser, url)
    open_run(a, root / "ann")
    open_run(b, root / "bob")
    for page in (a, b):  # adding prompts is light: both at once, no queue
        tab(page, "Prompts")
        page.click("#prompts-add")
    for page in (a, b):
        wait_job(page, "prompts")
    # before Start, the Train tab says it has no estimate yet on a run that never trained
    tab(a, "Train")
    a.wait_for_selector("#train-estimate:has-text('no estimate yet')")
    # Ann generates a lot (it runs until she cancels it)
    tab(a, "Generate")
    for elem, value in (("gen-seeds", "16"), ("gen-steps", "60")):
        fill(a, elem, value)
        a.locator(f"#{elem} input").first.press("Enter")
    time.sleep(1)
    a.click("#gen-start")
    a.wait_for_selector("#generate-job-bar .job-bar[data-status='running']")
    # Bob's generation waits for the CPU: his page says where it is in line, and after what
    tab(b, "Generate")
    b.click("#gen-start")
    b.wait_for_selector("#generate-job-bar .job-bar[data-status='queued']")
    b.wait_for_selector("#generate-job-status:has-text('1st in line for the CPU')")
    status = b.inner_text("#generate-job-status")
    assert "after Generate candidates" in status or "starts in about" in status, status
    assert _job(root / "bob").status == "queued"
    # Ann's page sees Bob's job waiting: in her job line and in the other runs' list
    a.wait_for_selector("#generate-job-status:has-text('1 job waiting')")
    a.wait_for_selector(f"#other-jobs:has-text('{root / 'bob'}')", timeout=15_000)
    assert "queued: 1st in line for the CPU" in a.inner_text("#other-jobs")
    # Bob takes it out of the line: cancelled at once, nothing ran
    b.click("#gen-cancel")
    b.wait_for_selector("#gen-message:has-text('nothing ran')")
    wait_job(b, "generate", status="cancelled", timeout=15_000)
    cancelled = _job(root / "bob")
    assert any("nothing ran" in line for line in cancelled.log)
    assert app.studio.context(root / "bob").counts()["candidates"] == 0
    # ... and queues it again; it starts once Ann's job ends (she cancels it)
    b.wait_for_selector("#gen-start:not([disabled])")
    b.click("#gen-start")
    b.wait_for_selector("#generate-job-status:has-text('1st in line for the CPU')")
    assert _job(root / "ann").status == "running"
    a.click("#gen-cancel")
    wait_job(a, "generate", status="cancelled", timeout=JOB_TIMEOUT_MS)
    wait_job(b, "generate", timeout=JOB_TIMEOUT_MS)
    ann, bob = _job(root / "ann"), _job(root / "bob")
    assert bob.status == "done" and bob.id != cancelled.id
    assert bob.started >= ann.ended  # it ran after Ann's, never beside it
    assert app.studio.context(root / "bob").counts()["candidates"] > 0
    ca.close()
    cb.close()
