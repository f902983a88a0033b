"""The studio used by several people at once, and a newcomer's first open, in a real browser
(headless Chromium, two browser contexts = two people):

- "Run the whole loop" on an empty run ends with Compare showing base vs tuned;
- two people on two runs each start a job: neither sees the other's as its own or can cancel
  it; each sees the other's listed read-only with its full run path;
- two people on one run: a stale page does not overwrite the other's setting and says so;
- prompts: an upload is still the checked source after a reload; a rejected upload leaves
  nothing for Add to add; a run built from two sources saves a YAML that `craft run` plans
  the same prompts from;
- Curate: the "changed by the last move" view after a number-box move survives a click on the
  view; a typed run path opens that run.
"""

from __future__ import annotations

import time

import pytest

from test_studio_browser import (BROWSER_ARGS, CHROMIUM, JOB_TIMEOUT_MS, TINY, _free_port, fill,
                                 sync_api, tab, table_rows, toy_model, wait_job)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    from studio.app import build_app, launch

    model = toy_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("team")
    app = build_app(root / "loop", overrides=[*TINY, f"model.pretrained={model}"],
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


def person(browser, url):
    """A new browser context (a second person has their own cookies and local storage)."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    page.add_init_script("window.ROWS = id => { const g = document.querySelector("
                         "'#' + id + ' [role=grid]'); "
                         "return g ? Number(g.getAttribute('aria-rowcount')) - 1 : 0; };")
    page.goto(url)
    page.wait_for_selector("#run-info")
    return ctx, page


def open_run(page, path) -> None:
    box = page.locator("#run-dir textarea, #run-dir input").first
    box.fill(str(path))
    box.press("Enter")
    page.wait_for_selector(f"#run-info:has-text({str(path)!r})")


def test_run_the_whole_loop_on_an_empty_run_ends_in_compare(studio, browser):
    app, url, root = studio
    ctx, page = person(browser, url)
    page.wait_for_selector("#loop-start", state="visible")  # open on an empty run
    assert "What each tab is for" in page.inner_text("#loop")
    page.click("#loop-start")
    page.wait_for_selector("#loop-stages:has-text('generate')")
    wait_job(page, "loop", timeout=4 * JOB_TIMEOUT_MS)
    page.wait_for_selector("#loop-job-bar .job-bar[data-status='done']")
    # Compare is open on the evaluation the loop made: base vs tuned, same seeds
    page.wait_for_selector("#compare-head:has-text('base')", timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll('#compare-pairs img').length >= 4")
    assert "done" in page.inner_text("#loop-message")
    c = app.ctx.counts()
    assert c["candidates"] > 0 and c["train_runs"] == 1 and c["evaluations"] == 1
    ctx.close()


def test_two_people_on_two_runs_own_their_jobs(studio, browser):
    app, url, root = studio
    (ca, a), (cb, b) = person(browser, url), person(browser, url)
    open_run(a, root / "ann")
    open_run(b, root / "bob")
    for page in (a, b):
        tab(page, "Prompts")
        page.click("#prompts-add")
        wait_job(page, "prompts")
    # both generate, with enough work to overlap
    for page in (a, b):  # 4 batches of 24 images at 20 steps: long enough to overlap
        tab(page, "Generate")
        for elem, value in (("gen-seeds", "8"), ("gen-steps", "20")):
            fill(page, elem, value)
            page.locator(f"#{elem} input").first.press("Enter")
        time.sleep(1)
        page.click("#gen-start")
    for page, mine, other in ((a, "ann", "bob"), (b, "bob", "ann")):
        page.wait_for_selector(f"#generate-job-status:has-text('{root / mine}')")
        assert str(root / other) not in page.inner_text("#generate-job-status")
        # the other run's job is listed read-only with its full path
        page.wait_for_selector(f"#other-jobs:has-text('{root / other}')", timeout=15_000)
    # Ann cancels: only her job stops
    a.click("#gen-cancel")
    wait_job(a, "generate", status="cancelled", timeout=JOB_TIMEOUT_MS)
    from studio.jobs import JOBS

    bob_job = [j for j in JOBS.list() if j.run_dir == str(root / "bob")
               and j.kind == "generate"][-1]
    assert bob_job.status in ("running", "done")
    wait_job(b, "generate", timeout=2 * JOB_TIMEOUT_MS)
    assert "done" in b.inner_text("#generate-job-status")
    ca.close()
    cb.close()


def test_a_stale_page_does_not_overwrite_a_setting_and_says_so(studio, browser):
    app, url, root = studio
    (ca, a), (cb, b) = person(browser, url), person(browser, url)
    for page in (a, b):
        open_run(page, root / "shared")
        tab(page, "Train")
    fill(b, "train-steps", "35")
    b.locator("#train-steps input").first.blur()
    ctx = app.studio.context(root / "shared")
    deadline = time.time() + 10
    while ctx.cfg.train.steps != 35 and time.time() < deadline:
        time.sleep(0.1)
    assert ctx.cfg.train.steps == 35
    # A, open since before, only switches tabs: nothing of hers is saved over B's
    tab(a, "Curate")
    tab(a, "Train")
    time.sleep(1)
    assert ctx.cfg.train.steps == 35
    # A sets the same field from her stale page: refused, and told
    fill(a, "train-steps", "40")
    a.locator("#train-steps input").first.blur()
    a.wait_for_selector("#settings-stale:has-text('train.steps')")
    assert "was not saved" in a.inner_text("#settings-stale")
    assert ctx.cfg.train.steps == 35
    a.click("#settings-reload")
    a.wait_for_function("() => document.querySelector('#train-steps input').value === '35'")
    # after the reload her change goes through
    fill(a, "train-steps", "40")
    a.locator("#train-steps input").first.blur()
    deadline = time.time() + 10
    while ctx.cfg.train.steps != 40 and time.time() < deadline:
        time.sleep(0.1)
    assert ctx.cfg.train.steps == 40
    # and B, now stale, is told within the poll
    b.wait_for_selector("#settings-stale:has-text('train.steps')", timeout=15_000)
    ca.close()
    cb.close()


def test_prompt_sources_survive_reloads_and_rejections(studio, browser, tmp_path):
    from craft.stages.prompts import load_prompts
    from craft.run.handle import run_config

    app, url, root = studio
    c, page = person(browser, url)
    open_run(page, root / "sources")
    tab(page, "Prompts")
    page.click("#prompts-add")  # the toy set (4 prompts)
    wait_job(page, "prompts")
    csv = tmp_path / "more.csv"
    csv.write_text("prompt\na blue square on a red background\na red circle on a green "
                   "background\na white triangle on a black background\n")
    page.get_by_label("Upload a file").check()
    page.set_input_files("#prompts-upload input[type=file]", str(csv))
    page.wait_for_function("() => ROWS('prompts-preview-table') == 3")
    page.reload()
    page.wait_for_selector("#run-info")
    tab(page, "Prompts")
    assert page.get_by_label("Upload a file").is_checked()  # the run's source, not Toy
    page.click("#prompts-add")
    wait_job(page, "prompts")
    page.wait_for_selector("#prompts-message:has-text('several sources')")
    ctx = app.studio.context(root / "sources")
    assert (ctx.store.prompts_df()["split"] == "train").sum() == 7
    # a rejected upload leaves nothing pending: Add adds nothing
    bad = tmp_path / "image.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    page.get_by_label("Upload a file").check()
    page.set_input_files("#prompts-upload input[type=file]", str(bad))
    # gradio's file box refuses the type in the browser (a toast) or the studio refuses it
    page.wait_for_selector("#prompts-message .studio-error, .toast-body:has-text('Invalid file')")
    page.click("#prompts-add")
    page.wait_for_selector("#prompts-message:has-text('choose a prompt set first')")
    assert (ctx.store.prompts_df()["split"] == "train").sum() == 7
    # the run's saved YAML plans the same prompts under `craft run`
    cfg, _ = run_config(ctx.run_dir)
    planned = load_prompts(cfg.prompts.source, cfg.prompts.format, cfg.prompts.column,
                           cfg.prompts.max_prompts).prompts
    stored = ctx.store.prompts_df()
    assert planned == list(stored.loc[stored["split"] == "train", "text"])
    c.close()


def test_the_changed_view_after_a_number_box_move(studio, browser):
    app, url, root = studio
    c, page = person(browser, url)
    open_run(page, root / "loop")  # the run the whole loop filled
    tab(page, "Curate")
    page.wait_for_selector("#kept-number")
    box = page.locator("#curate-topk input").first
    before = int(box.input_value())
    box.fill(str(max(1, before - 3)))
    box.press("Enter")
    page.wait_for_selector("#moved-line")
    moved = page.inner_text("#moved-line")
    page.get_by_label("changed by the last move").check()
    time.sleep(1)
    assert page.inner_text("#moved-line") == moved  # leaving the box again is no new move
    assert page.locator("#curate-grid figure").count() > 0
    c.close()


def test_a_typed_run_path_opens_that_run(studio, browser):
    app, url, root = studio
    c, page = person(browser, url)
    open_run(page, root / "typed-here")
    assert "0 candidates" in page.inner_text("#run-info")
    assert (root / "typed-here" / "store.sqlite").exists()
    assert page.locator("#run-dir textarea, #run-dir input").first.input_value() == str(
        root / "typed-here")
    c.close()
