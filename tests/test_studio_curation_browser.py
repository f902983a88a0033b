"""Curation in a real browser (headless Chromium, as tests/test_studio_browser.py): every kept
image reachable page by page, badges and the "why" text, keys, undo, the per-prompt cap, the map's
selection, Enter applying a typed value, state that survives a reload, and two browsers on two
runs. The runs are filled with rendered and scored toy candidates (tests/studio_sample_data.py), so no
diffusion model is needed and the module stays quick.
"""

from __future__ import annotations

import json
import shutil
import socket

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

N_PROMPTS = 40  # x (1 + 4 variants) x 2 seeds = 400 candidates in run A


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    from craft.run.store import RunStore
    from studio.app import build_app, launch
    from studio_sample_data import populate

    root = tmp_path_factory.mktemp("runs")
    for name, n in (("a", N_PROMPTS), ("b", 6)):
        with RunStore(root / name) as store:
            populate(store, n_prompts=n, num_variants=4, seeds=2, seed=1)
    app = build_app(root / "a", overrides=["filter.level=none", "filter.top_k=100"],
                    runs_root=root)
    port = _free_port()
    launch(app, port=port, block=False, quiet=True)
    yield app, f"http://127.0.0.1:{port}/", root
    app.demo.close()
    app.studio.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


def open_page(browser, url):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    page.wait_for_selector("#run-info")
    return context, page


@pytest.fixture(scope="module")
def page(browser, studio):
    context, pg = open_page(browser, studio[1])
    pg.get_by_role("tab", name="Curate", exact=True).click()
    pg.wait_for_selector("#curate-grid .tg-item")
    yield pg
    context.close()


def grid_ids(page) -> list[int]:
    return page.eval_on_selector_all("#curate-grid .tg-item", "els => els.map(e => +e.dataset.id)")


def kept_number(page) -> int:
    return int(page.inner_text("#kept-number"))


def wait_kept(page, n: int) -> None:
    page.wait_for_function(f"() => {{ const e = document.querySelector('#kept-number'); "
                           f"return e && Number(e.innerText) === {n}; }}")


def type_and_enter(page, elem_id: str, value: str) -> None:
    """Type a number into a slider's (or a number field's) box and press Enter."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(value)
    box.press("Enter")


def all_pages(page) -> list[int]:
    """Every id the grid shows, page by page (the Next button until the last page)."""
    seen = grid_ids(page)
    for _ in range(50):
        text = page.inner_text("#curate-showing")
        current, last = (int(x) for x in text.split("page ")[1].split(" ·")[0].split(" of "))
        if current == last:
            return seen
        first = grid_ids(page)[0]
        page.click("#curate-next")
        page.wait_for_function(f"() => {{ const e = document.querySelector('#curate-grid "
                               f".tg-item'); return e && +e.dataset.id !== {first}; }}")
        seen += grid_ids(page)
    raise AssertionError("the grid never reached its last page")


def curation(studio):
    """What `craft train` selects with the run's saved settings (the truth to compare to: the
    engine's craft.stages.selection.select, read from the store)."""
    from craft.stages.selection import select

    ctx = studio[0].ctx
    return select(ctx.store, ctx.cfg).result


@pytest.mark.parametrize("k", [100, 300])
def test_every_kept_image_is_reachable_page_by_page(page, studio, k):
    """Enter in the top-K box applies the number at once; the pages cover the kept set."""
    type_and_enter(page, "curate-topk", str(k))
    wait_kept(page, k)
    page.wait_for_function(f"() => document.querySelector('#curate-showing').innerText"
                           f".includes('of {k}')")
    shown = all_pages(page)
    assert len(shown) == k == len(set(shown))
    assert set(shown) == set(curation(studio).kept["candidate_id"].tolist())
    assert page.locator("#curate-grid .tg-item").count() == (k - 1) % 60 + 1  # the last page


def test_badges_why_keys_and_undo(page, studio):
    ctx = studio[0].ctx
    type_and_enter(page, "curate-topk", "100")
    wait_kept(page, 100)
    page.get_by_label("I_hpa (h, p and a; strictest)").check()
    page.wait_for_function("() => document.querySelector('#curate-levels').innerText"
                           ".includes('I_hpa')")
    page.wait_for_selector("#curate-grid .tg-item")
    before = kept_number(page)
    # a kept image: its badge and why
    first = page.locator("#curate-grid .tg-item").first
    cid = int(first.get_attribute("data-id"))
    assert "kept" in first.inner_text()
    first.click()
    page.wait_for_selector(f"#curate-why:has-text('#{cid}')")
    assert "Kept" in page.inner_text("#curate-why") and "cut-off" in page.inner_text("#curate-why")
    assert "R +" in first.get_attribute("title") or "R -" in first.get_attribute("title")
    # exclude it with the key x: it stays on the page with its new badge, the count drops
    page.keyboard.press("x")
    page.wait_for_function(f"() => document.querySelector('#curate-grid .tg-item"
                           f"[data-id=\"{cid}\"]').innerText.includes('excluded')")
    wait_kept(page, before - 1)
    assert ctx.store.overrides() == {cid: "exclude"}
    assert "excluded by hand" in page.inner_text("#curate-why")
    assert cid in grid_ids(page)
    # a failing image: the view of those failing the level
    page.get_by_label("fails the level").check()
    page.wait_for_selector("#curate-grid .tg-item:has-text('fails')")
    failing = page.locator("#curate-grid .tg-item").first
    fid = int(failing.get_attribute("data-id"))
    failing.click()
    page.wait_for_selector(f"#curate-why:has-text('#{fid}')")
    assert "fails level hpa" in page.inner_text("#curate-why")
    # undo (u) restores the automatic choice of the excluded one
    page.keyboard.press("u")
    wait_kept(page, before)
    assert ctx.store.overrides() == {}
    # enlarge without changing anything
    page.keyboard.press("z")
    page.wait_for_selector("#tg-lightbox:not([hidden])")
    page.keyboard.press("Escape")
    page.wait_for_selector("#tg-lightbox[hidden]", state="attached")
    assert ctx.store.overrides() == {}
    # keep by hand, then clear all overrides (one undoable step)
    page.click("#curate-keep")
    page.wait_for_function("() => document.querySelector('#curate-message').innerText"
                           ".includes('kept by hand')")
    assert ctx.store.overrides() == {fid: "include"}
    page.click("#curate-clear")
    page.wait_for_function("() => document.querySelector('#curate-message').innerText"
                           ".includes('cleared 1')")
    assert ctx.store.overrides() == {}
    page.get_by_label("kept", exact=True).check()


def test_a_weight_move_says_what_entered_and_left(page, studio):
    page.get_by_label("kept", exact=True).check()
    k = int(page.inner_text("#kept-number"))
    wait_kept(page, k)  # settled: no earlier move still on its way
    slider = page.locator("#curate-weight-toy_fidelity input[type=range]")
    slider.fill("0.9")
    slider.dispatch_event("pointerup")
    page.wait_for_selector("#moved-line")
    # the kept count changed by exactly what entered minus what left (a weight move at a full
    # K changes nothing else: entered == left); the page settles on that after the move's
    # events (input, then release) have both answered
    page.wait_for_function(f"""() => {{
        const n = id => Number(document.querySelector(id).innerText.replace(/[^0-9]/g, ''));
        return n('#kept-number') - {k} === n('#moved-entered') - n('#moved-left'); }}""")
    entered = int(page.inner_text("#moved-entered").lstrip("+"))
    left = int(page.inner_text("#moved-left").lstrip("−"))
    if entered:
        page.get_by_label("changed by the last move").check()
        # (the kept view shows 'entered' badges too: wait for the view itself to change)
        page.wait_for_function("() => document.querySelectorAll('#curate-grid .tg-item')"
                               f".length === {entered + left}")
        assert page.locator("#curate-grid .tg-item:has-text('entered')").count() == entered
    page.get_by_label("kept", exact=True).check()


def test_per_prompt_cap(page, studio):
    page.get_by_label("none (keep every scorable)").check()
    type_and_enter(page, "curate-topk", "300")
    wait_kept(page, 300)
    assert int(page.inner_text("#coverage-largest")) == 10  # all of one prompt's images
    type_and_enter(page, "curate-cap", "1")
    wait_kept(page, N_PROMPTS)  # one per prompt
    assert int(page.inner_text("#coverage-largest")) == 1
    assert int(page.inner_text("#coverage-prompts")) == N_PROMPTS
    assert studio[0].ctx.cfg.filter.per_prompt_cap == 1
    type_and_enter(page, "curate-cap", "0")
    wait_kept(page, 300)


def test_the_maps_box_selects_images(page, studio):
    page.get_by_text("Map of the pool: image embeddings in 2-D").click()
    page.click("#curate-map-start")
    page.wait_for_selector("#map-job-bar .job-bar[data-status='done']", timeout=120_000)
    page.wait_for_function("() => document.querySelector('#curate-map .pm-note').innerText"
                           ".includes('drag a box')")
    canvas = page.locator("#curate-map canvas")
    canvas.scroll_into_view_if_needed()
    b = canvas.bounding_box()
    # the left half of the map
    page.mouse.move(b["x"] + 2, b["y"] + 2)
    page.mouse.down()
    page.mouse.move(b["x"] + b["width"] / 2, b["y"] + b["height"] - 2, steps=5)
    page.mouse.up()
    page.wait_for_function("() => document.querySelector('#curate-showing').innerText"
                           ".includes('map selection')")
    ids, xy, _ = studio[0].ctx.pool_map()
    chosen = set(ids[xy[:, 0] <= 0.5].tolist())
    shown = set(grid_ids(page))
    assert shown and shown <= chosen
    total = int(page.inner_text("#curate-showing").split(" of ")[1].split(" ")[0])
    assert abs(total - len(chosen)) <= max(3, len(chosen) // 20)  # the box edge is a few px
    # more like this: the selected image and its neighbours
    page.locator("#curate-grid .tg-item").first.click()
    page.click("#curate-similar")
    page.wait_for_function("() => document.querySelector('#curate-showing').innerText"
                           ".includes('similar to the selected image')")
    assert page.locator("#curate-grid .tg-item").count() == 60
    page.get_by_label("kept", exact=True).check()


def test_near_duplicates_dropped_from_the_kept_set(page, studio):
    """After the map (its embeddings) exists: a near-duplicate threshold drops images from the
    kept set, says how many, marks them, and the library's filter agrees."""
    from craft.stages.embeddings import space_name
    from craft.stages.filtering import apply_filter
    from craft.stages.selection import filter_settings

    ctx = studio[0].ctx
    k = int(page.inner_text("#kept-number"))
    type_and_enter(page, "curate-dedup", "0.9")
    page.wait_for_function("() => document.querySelector('#curate-coverage').innerText"
                           ".includes('near-duplicates dropped')")
    text = page.inner_text("#curate-coverage")
    dropped = int(text.split(" near-duplicates dropped")[0].split("·")[-1])
    assert ctx.cfg.filter.dedup_threshold == pytest.approx(0.9)
    settings = filter_settings(ctx.cfg)
    res = apply_filter(ctx.frame(), settings, ctx.store.overrides(),
                       ctx.store.embeddings(space_name(ctx.cfg)))
    assert res.counts.duplicates == dropped > 0
    wait_kept(page, res.counts.kept)
    assert res.counts.kept <= k
    type_and_enter(page, "curate-dedup", "0")
    page.wait_for_function("() => !document.querySelector('#curate-coverage').innerText"
                           ".includes('near-duplicates dropped')")
    assert ctx.cfg.filter.dedup_threshold is None


def test_reload_keeps_curate_train_and_compare_state(browser, studio):
    from craft.run.handle import run_config

    context, page = open_page(browser, studio[1])
    page.get_by_role("tab", name="Curate", exact=True).click()
    page.wait_for_selector("#curate-grid .tg-item")
    type_and_enter(page, "curate-topk", "123")
    wait_kept(page, 123)
    slider = page.locator("#curate-weight-toy_aesthetic input[type=range]")
    slider.fill("0.75")
    slider.dispatch_event("pointerup")
    page.get_by_role("tab", name="Train", exact=True).click()
    page.locator("#train-steps input").fill("77")
    page.locator("#train-name textarea").fill("my-run")
    page.get_by_role("tab", name="Compare", exact=True).click()
    page.locator("#compare-seeds input").fill("3")
    page.wait_for_timeout(1500)  # the debounced save
    page.reload()
    page.wait_for_selector("#run-info")
    page.get_by_role("tab", name="Train", exact=True).click()
    page.wait_for_function("() => { const e = document.querySelector('#train-steps input'); "
                           "return e && e.value === '77'; }")
    assert page.input_value("#train-name textarea") == "my-run"
    page.get_by_role("tab", name="Compare", exact=True).click()
    page.wait_for_function("() => { const e = document.querySelector('#compare-seeds input'); "
                           "return e && e.value === '3'; }")
    page.get_by_role("tab", name="Curate", exact=True).click()
    wait_kept(page, 123)
    assert page.input_value("#curate-topk input[type=number]") == "123"
    assert float(page.input_value("#curate-weight-toy_aesthetic input[type=number]")) == 0.75
    # the command line selects what Curate shows: the run's saved config
    cfg, _ = run_config(studio[0].ctx.run_dir)
    assert cfg.filter.top_k == 123 and cfg.filter.weights["toy_aesthetic"] == 0.75
    assert cfg.train.steps == 77 and cfg.eval.seeds_per_prompt == 3
    type_and_enter(page, "curate-topk", "100")
    wait_kept(page, 100)
    context.close()


def test_two_browsers_on_two_runs_do_not_disturb_each_other(browser, studio):
    app, url, root = studio
    ctx_a, a = open_page(browser, url)
    ctx_b, b = open_page(browser, url)
    b.locator("#run-dir input").fill(str(root / "b"))
    b.click("#run-open")
    b.wait_for_function(f"() => document.querySelector('#run-info').innerText"
                        f".includes({json.dumps(str(root / 'b'))})")
    b.get_by_role("tab", name="Curate", exact=True).click()
    b.wait_for_selector("#curate-grid .tg-item")
    type_and_enter(b, "curate-topk", "7")
    wait_kept(b, 7)
    # browser A still looks at run a, with its own settings
    a.get_by_role("tab", name="Curate", exact=True).click()
    assert str(root / "a") in a.inner_text("#run-info")
    wait_kept(a, 100)
    a.reload()
    a.wait_for_selector("#run-info")
    assert str(root / "a") in a.inner_text("#run-info")
    b.reload()
    b.wait_for_selector("#run-info")
    b.wait_for_function(f"() => document.querySelector('#run-info').innerText"
                        f".includes({json.dumps(str(root / 'b'))})")
    b.get_by_role("tab", name="Curate", exact=True).click()
    wait_kept(b, 7)
    assert b.input_value("#curate-topk input[type=number]") == "7"
    assert app.studio.context(root / "a").cfg.filter.top_k == 100
    assert app.studio.context(root / "b").cfg.filter.top_k == 7
    # a folder outside --runs-root is refused, and nothing is created there
    outside = root.parent / "not-allowed"
    b.locator("#run-dir input").fill(str(outside))
    b.click("#run-open")
    b.wait_for_selector("#run-info:has-text('outside the folder this studio serves')")
    assert not outside.exists()
    ctx_a.close()
    ctx_b.close()
