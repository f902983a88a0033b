"""Controls show only values that were saved, in a real browser (headless Chromium, two browser
contexts = two people on one studio and one run, as tests/test_studio_team_browser.py):

- a number outside its box's bounds, or no number, is refused with the field, the bounds and the
  value: nothing is saved (RUN/config.yaml stays byte for byte) and the box shows the saved value;
- a stale page's edit that the version check refuses shows the saved value and says
  "top-K (filter.top_k) is 50, set in another window; your 80 was not saved";
- a reload shows a Curate header that agrees with the controls, even when the tab is opened
  before the page has loaded the run's settings;
- a hand override made on one page reaches the other within 5 s, without a tab switch (and the
  why table fits its column at 1400 px).

The run is filled with rendered, scored toy candidates (tests/studio_sample_data.py): no
diffusion model, so the module stays quick.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from test_studio_curation_browser import BROWSER_ARGS, CHROMIUM, _free_port, sync_api

pytestmark = [pytest.mark.browser, pytest.mark.slow]

K = 100  # the run's top-K at the start of each test


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    from craft.run.store import RunStore
    from studio.app import StudioApp, launch
    from studio.context import Studio
    from studio_sample_data import populate

    root = tmp_path_factory.mktemp("controls")
    with RunStore(root / "run") as store:
        populate(store, n_prompts=20, num_variants=2, seeds=2, seed=1)
    app = StudioApp(Studio(root / "run", None, ("filter.level=none", f"filter.top_k={K}"),
                           root))
    app.build()
    # A slow server, on demand: the page load answers after the user has opened a tab.
    app.slow_load = threading.Event()
    restored = app._restored_values

    def slow_restored(ctx):
        if app.slow_load.is_set():
            time.sleep(3)
        return restored(ctx)

    app._restored_values = slow_restored
    port = _free_port()
    launch(app, port=port, block=False, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    app.demo.close()
    app.studio.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


@pytest.fixture(autouse=True)
def fresh_settings(studio):
    """Each test starts from top-K = K, margin 0, no overrides, no slow load."""
    import dataclasses

    app = studio[0]
    ctx = app.ctx
    app.slow_load.clear()
    ctx.set_config(dataclasses.replace(ctx.cfg, filter=dataclasses.replace(
        ctx.cfg.filter, top_k=K, margin=0.0)))
    ctx.clear_overrides()
    ctx.save_settings()
    yield


def person(browser, url, tab_name: str | None = "Curate"):
    """A new browser context (a second person: own cookies and storage), on ``tab_name``."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    page.wait_for_selector("#run-info")
    if tab_name:
        tab(page, tab_name)
        if tab_name == "Curate":
            page.wait_for_selector("#curate-grid .tg-item")
    return context, page


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def number_box(page, elem_id: str):
    return page.locator(f"#{elem_id} input[type=number]").first


def type_and_enter(page, elem_id: str, value: str) -> None:
    box = number_box(page, elem_id)
    box.fill(value)
    box.press("Enter")


def wait_text(page, selector: str, text: str, timeout: int = 15_000) -> None:
    page.wait_for_function(
        "([s, t]) => { const e = document.querySelector(s); return e && e.innerText.includes(t); }",
        arg=[selector, text], timeout=timeout)


def wait_value(page, elem_id: str, value: str) -> None:
    page.wait_for_function(
        "([s, v]) => { const e = document.querySelector(s); return e && e.value === v; }",
        arg=[f"#{elem_id} input[type=number]", value])


def kept_number(page) -> int:
    return int(page.inner_text("#kept-number"))


def wait_kept(page, n: int, timeout: int = 15_000) -> None:
    page.wait_for_function(f"() => {{ const e = document.querySelector('#kept-number'); "
                           f"return e && Number(e.innerText) === {n}; }}", timeout=timeout)


def saved_bytes(app) -> bytes:
    app.ctx.flush()
    return (app.ctx.run_dir / "config.yaml").read_bytes()


def test_a_refused_number_changes_no_setting_and_says_why(studio, browser):
    app, url = studio
    ctx = app.ctx
    (ca, a), (cb, b) = person(browser, url), person(browser, url)
    wait_kept(a, K)
    before = saved_bytes(app)
    # out of the margin's bounds, both ways: said with the bounds and the value; the box is
    # back at the saved value, the kept set is the saved settings' (not a clamped value's)
    for typed in ("50", "-1"):
        type_and_enter(a, "curate-margin", typed)
        wait_text(a, "#curate-notice", f"your {typed} was not saved")
        notice = a.inner_text("#curate-notice")
        assert "filter.margin" in notice and "from 0 to 2" in notice, notice
        wait_value(a, "curate-margin", "0")
        assert kept_number(a) == K
        assert f"your {typed} was not saved" in a.inner_text("#settings-stale")
    # top-K 0 is not silently made 1, and letters are no number
    type_and_enter(a, "curate-topk", "0")
    wait_text(a, "#curate-notice", "your 0 was not saved")
    assert "filter.top_k" in a.inner_text("#curate-notice")
    assert "from 1 to" in a.inner_text("#curate-notice")
    wait_value(a, "curate-topk", str(K))
    box = number_box(a, "curate-topk")
    box.fill("")
    box.press_sequentially("abc")
    box.press("Enter")
    wait_text(a, "#curate-notice", "held no number")
    wait_value(a, "curate-topk", str(K))
    # a number box of another tab (the app saves it): refused on leaving the box, said at the
    # top, the box shows the saved value
    tab(a, "Train")
    steps = ctx.cfg.train.steps
    box = a.locator("#train-steps input").first
    box.fill("0")
    box.blur()
    wait_text(a, "#settings-stale", "your 0 was not saved")
    assert "train.steps" in a.inner_text("#settings-stale")
    assert "at least 1" in a.inner_text("#settings-stale")
    a.wait_for_function(f"() => document.querySelector('#train-steps input').value === "
                        f"'{steps}'")
    # nothing was saved: the run's config, the file the CLI reads, and the other page
    assert ctx.cfg.filter.margin == 0.0 and ctx.cfg.filter.top_k == K
    assert ctx.cfg.train.steps == steps
    assert saved_bytes(app) == before
    assert b.inner_text("#settings-stale").strip() == ""
    # a valid value after all that is saved, and the refusal notes go
    tab(a, "Curate")
    type_and_enter(a, "curate-topk", "60")
    wait_kept(a, 60)
    assert ctx.cfg.filter.top_k == 60
    a.wait_for_function("() => document.querySelector('#curate-notice').innerText.trim() "
                        "=== ''")
    a.wait_for_function("() => !document.querySelector('#settings-stale').innerText"
                        ".includes('not saved')")
    ca.close()
    cb.close()


def test_a_stale_pages_refused_edit_shows_the_saved_value_and_says_so(studio, browser):
    app, url = studio
    ctx = app.ctx
    (ca, a), (cb, b) = person(browser, url), person(browser, url)
    wait_kept(a, K)
    wait_kept(b, K)
    type_and_enter(b, "curate-topk", "50")  # B sets K = 50
    wait_kept(b, 50)
    assert ctx.cfg.filter.top_k == 50
    # A, whose page still shows K = 100, moves K to 80: refused, and her page shows the saved
    # state: the box, the header and the grid of K = 50, and why
    assert number_box(a, "curate-topk").input_value() == str(K)
    type_and_enter(a, "curate-topk", "80")
    wait_text(a, "#curate-notice",
              "top-K (filter.top_k) is 50, set in another window; your 80 was not saved")
    assert "your 80 was not saved" in a.inner_text("#settings-stale")
    wait_value(a, "curate-topk", "50")
    wait_kept(a, 50)
    assert "80" not in a.inner_text("#kept-number")
    a.wait_for_function("() => document.querySelector('#curate-showing').innerText"
                        ".includes('of 50')")
    assert ctx.cfg.filter.top_k == 50
    # what Train says it will train on is the same kept set
    tab(a, "Train")
    wait_text(a, "#train-will", "50")
    # her next move, from the saved state, goes through
    tab(a, "Curate")
    type_and_enter(a, "curate-topk", "80")
    wait_kept(a, 80)
    assert ctx.cfg.filter.top_k == 80
    a.wait_for_function("() => document.querySelector('#curate-notice').innerText.trim() "
                        "=== ''")
    ca.close()
    cb.close()


def test_a_reload_shows_a_header_that_agrees_with_the_controls(studio, browser):
    app, url = studio
    ctx = app.ctx
    c, page = person(browser, url)
    type_and_enter(page, "curate-topk", "60")
    wait_kept(page, 60)
    type_and_enter(page, "curate-margin", "0.1")
    page.wait_for_function("() => document.querySelector('#curate-margin input"
                           "[type=number]').value === '0.1'")
    time.sleep(1)
    assert (ctx.cfg.filter.top_k, ctx.cfg.filter.margin) == (60, 0.1)
    from craft.stages.selection import select

    expected = select(ctx.store, ctx.cfg).result.counts.kept
    wait_kept(page, expected)
    # a slow load: Curate is opened before the page has the run's settings (its controls
    # still hold the values the studio started with: K = 100, margin 0)
    app.slow_load.set()
    page.reload(wait_until="commit")
    tab(page, "Curate")
    wait_value(page, "curate-topk", "60")  # the load has put the saved settings in
    page.wait_for_selector("#kept-number")
    time.sleep(1.5)  # anything still on its way has arrived
    assert kept_number(page) == expected
    assert number_box(page, "curate-topk").input_value() == "60"
    assert number_box(page, "curate-margin").input_value() == "0.1"
    header = page.inner_text("#curate-kept")
    cutoff = select(ctx.store, ctx.cfg).result.cutoff
    if cutoff is not None:
        assert f"{cutoff:+.3f}" in header, header
    # and a plain reload, Curate opened after the load
    app.slow_load.clear()
    page.reload()
    page.wait_for_selector("#run-info")
    tab(page, "Curate")
    wait_kept(page, expected)
    assert number_box(page, "curate-topk").input_value() == "60"
    c.close()


def test_an_override_on_one_page_reaches_the_other_within_5_s(studio, browser):
    app, url = studio
    ctx = app.ctx
    (ca, a), (cb, b) = person(browser, url), person(browser, url)
    type_and_enter(a, "curate-topk", "30")
    wait_kept(a, 30)
    b.wait_for_function("() => document.querySelector('#settings-stale').innerText"
                        ".includes('filter.top_k')", timeout=5_000)  # B is told K changed
    b.click("#settings-reload")
    wait_kept(b, 30)
    first = a.locator("#curate-grid .tg-item").first
    cid = int(first.get_attribute("data-id"))
    first.click()
    a.wait_for_selector(f"#curate-why:has-text('#{cid}')")
    # (the why table fits its column at 1400 px: nothing of it is cut off)
    fits = a.evaluate("() => { const t = document.querySelector('#curate-why table'); "
                      "return t.scrollWidth <= t.clientWidth + 1 && "
                      "t.getBoundingClientRect().right <= innerWidth; }")
    assert fits
    assert b.locator(f"#curate-grid .tg-item[data-id='{cid}']").count() == 1
    a.click("#curate-exclude")
    deadline = time.time() + 10
    while ctx.store.overrides() != {cid: "exclude"} and time.time() < deadline:
        time.sleep(0.05)
    assert ctx.store.overrides() == {cid: "exclude"}
    t0 = time.time()
    # B, who switches nothing, sees it: the badge on her page and the count
    b.wait_for_function(f"() => {{ const e = document.querySelector('#curate-grid .tg-item"
                        f"[data-id=\"{cid}\"]'); return e && e.innerText.includes('excluded'); }}",
                        timeout=5_000)
    wait_kept(b, 29, timeout=max(500, int(5_000 - 1000 * (time.time() - t0))))
    assert time.time() - t0 < 5
    # and back: A's undo reaches B as well
    a.click("#curate-undo")
    wait_kept(a, 30)
    wait_kept(b, 30, timeout=5_000)
    assert re.search(r"excluded", b.inner_text(f"#curate-grid .tg-item[data-id='{cid}']")) is None
    ca.close()
    cb.close()
