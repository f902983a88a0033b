"""Reward scoring speed: hpsv2.score's loop vs our batched HPS scorer vs the bare model forward.

    .venv/bin/python benchmarks/rewards.py [--model geometry224|tests] [--images 64]
                                           [--repeats 5] [--sizes 64 512] [--distinct]

All cases run the same tiny open_clip model of the ViT-H-14 classes (random weights, real
vocabulary and 77-token text, no download), on the same images and prompts, with
``torch.set_num_threads(1)``, interleaved in each repeat; medians are reported. ``--model
geometry224`` (default): 64-wide 2-layer towers at the real input geometry (224 px, 14 px
patches); ``--model tests``: the HPS parity test's model (64 px input, 16 px patches).

(a) hpsv2.score-style: the hpsv2 package's own ``img_score.score(image, prompt, cp=...)``,
    called once per image as its API invites. Like the real thing it re-reads the checkpoint
    from disk and re-loads the state dict on every call, then scores one image. Its model slot
    is pre-filled with the tiny model built by hpsv2's own factory, so no ViT-H-14 download.
(b) ours: ``load_reward("hpsv21", ...)`` once (load time excluded and reported apart), then
    ``reward(images, prompts)``: preprocessing + tokenising + forward, batches of 32, default
    settings (on a CPU: one thread, no prefetch). (b+) is the same with ``prefetch=True``: a
    second thread prepares the next batch (the GPU default; on a loaded 2-core CPU it competes).
(c) bare forward: ``model.encode_image`` + ``model.encode_text`` on the same batches of
    already-preprocessed pixels and already-tokenised prompts (one text per image, as a plain
    ``model(images, texts)`` call encodes them). No preprocessing: a lower bound on time.
(d) bare end to end: what a hand-written batched loop would do with hpsv2's own pieces: its
    ``preprocess_val`` per image, ``torch.stack``, its tokenizer, then (c)'s forward.

Prompts: CRAFT scores every image of a group against its original prompt, so by default 64
images share 8 prompts (groups of 8); ``--distinct`` gives every image its own prompt (our
per-batch prompt de-duplication then saves nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import reward_fixtures as rf  # noqa: E402
from craft.rewards import load_reward  # noqa: E402
from craft.rewards.hps import hps_preprocess  # noqa: E402
from generation import machine as generation_machine, timed  # noqa: E402

logger = logging.getLogger("benchmarks.rewards")

BENCH_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32,
                   "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}


def machine() -> str:
    """generation.py's machine line plus the load average: this machine is shared."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{generation_machine()}, Python {platform.python_version()}, load average "
            f"{load:.2f} at start")


def prompts_for(n: int, distinct: bool, group: int = 8) -> list[str]:
    if distinct:
        return [f"{rf.PROMPTS[i % len(rf.PROMPTS)]}, variation {i}" for i in range(n)]
    return [f"{rf.PROMPTS[(i // group) % len(rf.PROMPTS)]}, group {i // group}" for i in range(n)]


def build_hpsv2_side(ckpt: Path, workdir: Path, model_config: dict = BENCH_CONFIG):
    """hpsv2.img_score with its model slot filled by the tiny model from hpsv2's factory."""
    hoc = rf.import_hpsv2_open_clip()
    name = rf.register_hpsv2_config(hoc, workdir / "cfg", "craft-bench-hps", model_config)
    model, _, preprocess_val = hoc.create_model_and_transforms(
        name, None, precision="amp", device="cpu", light_augmentation=True, output_dict=True)
    from hpsv2 import img_score

    img_score.model_dict.clear()
    img_score.model_dict.update({"model": model, "preprocess_val": preprocess_val})
    img_score.root_path = str(workdir)
    img_score.device = "cpu"

    def score_one_by_one(images, prompts):
        out = []
        for image, prompt in zip(images, prompts):
            out.extend(img_score.score(image, prompt, cp=str(ckpt)))
        return out

    def bare_end_to_end(images, prompts, batch_size):
        tokenizer = hoc.get_tokenizer(name)
        with torch.inference_mode():
            for s in range(0, len(images), batch_size):
                pixels = torch.stack([preprocess_val(im) for im in images[s:s + batch_size]])
                tokens = tokenizer(prompts[s:s + batch_size])
                yield pixels, tokens

    return score_one_by_one, bare_end_to_end


def bare_forward_inputs(reward, images, prompts, batch_size):
    batches = []
    for s in range(0, len(images), batch_size):
        pixels = hps_preprocess(images[s:s + batch_size], reward.image_size)
        tokens = reward.tokenizer(prompts[s:s + batch_size])
        batches.append((pixels, tokens))
    return batches


def bare_forward(model, batches):
    with torch.inference_mode():
        for pixels, tokens in batches:
            image_features = model.encode_image(pixels, normalize=True)
            text_features = model.encode_text(tokens, normalize=True)
            (image_features * text_features).sum(-1)


def timed_both(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads). On a shared machine the CPU
    seconds are the steadier measure of work done; wall time is what a user waits."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


MODELS = {"geometry224": BENCH_CONFIG, "tests": rf.TINY_OPEN_CLIP}


def run(n_images: int, repeats: int, size: int, distinct: bool, batch_size: int,
        workdir: Path, model_config: dict = BENCH_CONFIG) -> dict:
    images = rf.images(n_images, sizes=((size, size),), seed=size)
    prompts = prompts_for(n_images, distinct)
    ckpt = rf.write_hps_checkpoint(workdir, "HPS_v2.1_compressed.pt", model_config, seed=0)
    t0 = time.perf_counter()
    ours = load_reward("hpsv21", path=ckpt, model_config=model_config, batch_size=batch_size)
    load_s = time.perf_counter() - t0
    ours_pf = load_reward("hpsv21", path=ckpt, model_config=model_config,
                          batch_size=batch_size, prefetch=True)
    hpsv2_loop, hpsv2_batches = build_hpsv2_side(ckpt, workdir, model_config)
    batches = bare_forward_inputs(ours, images, prompts, batch_size)

    # Same numbers from all three (the benchmark compares like with like).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hpsv2_loop(images[:4], prompts[:4])
    got = ours(images[:4], prompts[:4])
    max_diff = max(abs(float(a) - float(b)) for a, b in zip(ref, got))

    cases = {
        "a": lambda: hpsv2_loop(images, prompts),
        "b": lambda: ours(images, prompts),
        "b+": lambda: ours_pf(images, prompts),
        "c": lambda: bare_forward(ours.model, batches),
        "d": lambda: bare_forward(ours.model, hpsv2_batches(images, prompts, batch_size)),
    }
    for fn in cases.values():  # warm-up: allocator, lazy inits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    for r in range(repeats):
        for k in order[r % len(order):] + order[:r % len(order)]:  # rotate to spread drift
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wall, used = timed_both(cases[k])
            times[k].append(wall)
            cpu[k].append(used)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}

    # Where (a)'s time goes: the per-call checkpoint reload, measured alone.
    from hpsv2 import img_score

    model = img_score.model_dict["model"]

    def reload():
        model.load_state_dict(torch.load(str(ckpt), map_location="cpu")["state_dict"])

    reload()
    reload_s = statistics.median(timed(reload) for _ in range(max(5, repeats)))
    ips = {k: n_images / v for k, v in med.items()}
    return {"size": size, "distinct": distinct, "n": n_images, "repeats": repeats,
            "input_px": model_config["vision_cfg"]["image_size"],
            "load_s": load_s, "max_abs_diff_vs_hpsv2": max_diff, "reload_s": reload_s,
            "checkpoint_mb": ckpt.stat().st_size / 1e6, "median_s": med,
            "images_per_s": ips, "all_s": times, "cpu_median_s": cpu_med, "all_cpu_s": cpu,
            "cpu_b_over_a": cpu_med["a"] / cpu_med["b"],
            "cpu_b_over_c": cpu_med["c"] / cpu_med["b"],
            "cpu_b_over_d": cpu_med["d"] / cpu_med["b"],
            "b_over_a": ips["b"] / ips["a"], "b_over_c": ips["b"] / ips["c"],
            "b_over_d": ips["b"] / ips["d"], "bp_over_c": ips["b+"] / ips["c"]}


def markdown(results: list[dict]) -> str:
    lines = ["| input | prompts | (a) hpsv2.score loop | (b) ours | (b+) ours, prefetch | "
             "(c) bare forward | (d) bare end to end | b/a | b/c | b/d | b+/c |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    header = "Images per second (wall clock, median of the repeats):"
    for r in results:
        ips = r["images_per_s"]
        lines.append(
            f"| {r['size']}x{r['size']} | {'distinct' if r['distinct'] else 'groups of 8'} | "
            f"{ips['a']:.1f} | {ips['b']:.1f} | {ips['b+']:.1f} | {ips['c']:.1f} | "
            f"{ips['d']:.1f} | {r['b_over_a']:.1f}x | {r['b_over_c']:.0%} | "
            f"{r['b_over_d']:.0%} | {r['bp_over_c']:.0%} |")
    lines.insert(0, header + "\n")
    lines += ["", "Same runs, CPU seconds of the process (all threads) instead of wall time:", "",
              "| input | prompts | (a) | (b) | (b+) | (c) | (d) | b/a | b/c | b/d |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["cpu_median_s"]
        lines.append(
            f"| {r['size']}x{r['size']} | {'distinct' if r['distinct'] else 'groups of 8'} | "
            + " | ".join(f"{c[k]:.3f} s" for k in ("a", "b", "b+", "c", "d"))
            + f" | {r['cpu_b_over_a']:.1f}x | {r['cpu_b_over_c']:.0%} | {r['cpu_b_over_d']:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 512],
                   help="input image sizes (square), e.g. 64 (toy world) and 512 (SD1.5)")
    p.add_argument("--distinct", action="store_true", help="also run with one prompt per image")
    p.add_argument("--model", choices=sorted(MODELS), default="geometry224",
                   help="geometry224: tiny widths at ViT-H-14's input geometry (224 px, 257 "
                        "tokens); tests: the tiny model of the HPS parity test (64 px input)")
    p.add_argument("--json", type=Path, help="write the raw timings here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    logger.info("machine: %s; model: %s %s", machine(), args.model, MODELS[args.model])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for distinct in ([False, True] if args.distinct else [False]):
                r = run(args.images, args.repeats, size, distinct, args.batch_size, Path(tmp),
                        MODELS[args.model])
                logger.info("size %d, %s prompts: %s", size,
                            "distinct" if distinct else "grouped",
                            {k: f"{v:.3f}s" for k, v in r["median_s"].items()})
                results.append(r)
    logger.info("\n%s", markdown(results))
    logger.info("load once (ours): %s", ", ".join(f"{r['load_s']:.2f}s" for r in results))
    for r in results:
        per_call = r["median_s"]["a"] / r["n"]
        logger.info("(a) %dpx: %.1f ms per call, of which checkpoint reload (%.1f MB) %.1f ms; "
                    "(b) %.2f ms per image", r["size"], per_call * 1e3, r["checkpoint_mb"],
                    r["reload_s"] * 1e3, r["median_s"]["b"] / r["n"] * 1e3)
    logger.info("max |ours - hpsv2| on 4 images: %s",
                ", ".join(f"{r['max_abs_diff_vs_hpsv2']:.1e}" for r in results))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
