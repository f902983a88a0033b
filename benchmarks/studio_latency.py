"""Studio latency benchmark (results in benchmarks/studio.md).

1. Re-filter alone: ``studio.tabs.curate_views.curate`` (= ``craft.stages.filtering.apply_filter`` + group
   advantages, what one slider move recomputes) on 100k candidates x 4 rewards, per
   normalisation; goal <= 50 ms.
2. In the browser, on runs of 10k and of 100k scored toy candidates: headless Chromium clicks on
   the Curate tab's top-K and weight slider tracks, and an in-page MutationObserver times from
   the slider's pointerup (Gradio's ``release``) to the updated kept count / kept line, and to the
   refreshed first page of the image grid; goals <= 300 ms for the count and <= 1 s for the
   first grid page. The 10k run's images are rendered and scored for real
   (tests/studio_sample_data.py); the 100k run repeats 2,000 of those rendered images under fresh
   candidate rows with random scores (what the filter and the grid read, at the size that
   matters), so it builds in a minute instead of an hour.

    .venv/bin/python benchmarks/studio_latency.py [--root /tmp/studio-bench] [--repeats 15]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # studio_sample_data: the scored toy runs

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

# Installs a timer: on the next pointerup anywhere, note the time; resolve when `selector`'s text
# differs from what it was at pointerup (or after 10 s).
_ARM = """([selector]) => {
  window.__bench = new Promise(resolve => {
    let t0 = null, before = null;
    const target = () => document.querySelector(selector);
    const check = () => {
      if (t0 === null) return;
      const el = target();
      if (el && el.innerText !== before) { obs.disconnect(); resolve(performance.now() - t0); }
    };
    const obs = new MutationObserver(check);
    obs.observe(document.body, {subtree: true, childList: true, characterData: true});
    window.addEventListener('pointerup', () => {
      const el = target(); before = el ? el.innerText : null; t0 = performance.now();
    }, {capture: true, once: true});
    setTimeout(() => resolve(-1), 10000);
  });
}"""


def refilter_timings(n: int = 100_000, group: int = 20, repeats: int = 15) -> list[dict]:
    from craft.run.config import load_config
    from craft.stages.filtering import apply_filter
    from studio.tabs.curate_views import curate, make_settings

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"candidate_id": np.arange(n), "prompt_id": np.arange(n) // group,
                       "variant_idx": np.arange(n) % group // 4, "seed": np.arange(n) % 4})
    rewards = ("toy_fidelity", "toy_selection", "toy_aesthetic", "toy_heldout")
    for r in rewards:
        df[r] = rng.normal(size=n)
    cfg = load_config()
    weights = {"toy_fidelity": 0.4, "toy_selection": 0.3, "toy_aesthetic": 0.2,
               "toy_heldout": 0.1}
    rows = []
    for norm in ("zscore", "rank", "minmax"):
        s = make_settings(cfg, weights, norm, "hpa", [], 0.0, 100, True)
        for name, fn in (("apply_filter", lambda: apply_filter(df, s)),
                         ("curate (filter + advantages)", lambda: curate(df, s))):
            fn()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(1000 * (time.perf_counter() - t0))
            rows.append({"function": name, "normalisation": norm,
                         "median ms": round(statistics.median(ts), 1),
                         "p90 ms": round(float(np.percentile(ts, 90)), 1),
                         "min ms": round(min(ts), 1)})
    return rows


def ensure_run(run_dir: Path, variants: int = 4, seeds: int = 17) -> int:
    """~10k rendered and scored candidates (120 prompts x 5 x 17)."""
    from craft.run.store import RunStore
    from studio_sample_data import populate

    with RunStore(run_dir) as store:
        n = len(store.candidates_df())
        if n:
            return n
        t0 = time.perf_counter()
        n = populate(store, n_prompts=120, num_variants=variants, seeds=seeds, eval_prompts=0)
        print(f"rendered and scored {n} candidates in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr)
        return n


def ensure_large_run(run_dir: Path, source: Path, n_prompts: int = 10_000) -> int:
    """~100k candidates: 10k prompts x 5 x 2, each showing one of ``source``'s rendered
    images, with random toy-reward scores (tests/studio_sample_data.py populate_bulk)."""
    from craft.run.store import RunStore
    from studio_sample_data import populate_bulk

    with RunStore(run_dir) as store:
        n = len(store.candidates_df())
        if n:
            return n
        t0 = time.perf_counter()
        with RunStore(source) as src:
            pngs = [Path(p).read_bytes() for p in src.candidates_df()["image_path"][:2000]]
        n = populate_bulk(store, n_prompts, pngs)
        print(f"built {n} candidates in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        return n


def browser_timings(run_dir: Path, repeats: int, pauses: tuple[float, ...] = (1.5, 3.0)
                    ) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    from playwright.sync_api import sync_playwright

    from studio.app import build_app, launch

    app = build_app(run_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, port=port, block=False, quiet=True)
    out = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Curate").click()
            page.wait_for_selector("#kept-number", timeout=60_000)
            page.wait_for_function("() => document.querySelectorAll('#curate-grid img')"
                                   ".length > 0", timeout=120_000)
            page.get_by_label("I_h (beat the reference on h)").check()  # a large passing pool
            time.sleep(2)

            def measure(elem_id: str, selector: str, positions: list[float],
                        pause: float) -> list[float]:
                track = page.locator(f"#{elem_id} input[type=range]")
                track.scroll_into_view_if_needed()
                box = track.bounding_box()
                times = []
                page.mouse.click(box["x"] + box["width"] * 0.95, box["y"] + box["height"] / 2)
                time.sleep(1.5)  # warm-up move (and away from the thumb's start position)
                for k in range(repeats):
                    frac = positions[k % len(positions)]
                    page.evaluate(_ARM, [selector])
                    page.mouse.click(box["x"] + box["width"] * frac,
                                     box["y"] + box["height"] / 2)
                    ms = page.evaluate("() => window.__bench")
                    if ms >= 0:
                        times.append(ms)
                    else:
                        print(f"{elem_id}: no update within 10 s at {frac}", file=sys.stderr)
                    time.sleep(pause)  # let the previous move's histogram and grid finish
                return times

            cases = [
                ("top-K slider -> kept count", "curate-topk", "#kept-number",
                 [0.1, 0.3, 0.5, 0.2, 0.4]),
                ("weight slider -> kept line (composite cut-off)", "curate-weight-toy_aesthetic",
                 "#cutoff-number", [0.2, 0.8, 0.5, 0.9, 0.1]),
                ("weight slider -> first grid page", "curate-weight-toy_selection",
                 "#curate-grid", [0.2, 0.8, 0.5, 0.9, 0.1]),
            ]
            for pause in pauses:
                for label, elem_id, selector, positions in cases:
                    times = measure(elem_id, selector, positions, pause)
                    row = {"measure": label, "pause s": pause, "n": len(times)}
                    if times:
                        row.update({"median ms": round(statistics.median(times)),
                                    "p90 ms": round(float(np.percentile(times, 90))),
                                    "max ms": round(max(times))})
                    out.append(row)
            browser.close()
    finally:
        app.demo.close()
    return out


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/tmp/studio-bench")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--skip-browser", action="store_true")
    args = ap.parse_args()
    print(markdown(refilter_timings(repeats=args.repeats)), flush=True)
    if not args.skip_browser:
        root = Path(args.root)
        small = root / "10k"
        runs = [(ensure_run(small), small)]
        large = root / "100k"
        runs.append((ensure_large_run(large, small), large))
        for n, run_dir in runs:
            print(f"\nbrowser, {n} scored candidates:\n", flush=True)
            print(markdown(browser_timings(run_dir, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
