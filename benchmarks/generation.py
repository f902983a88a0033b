"""Candidate generation speed: our batched path against a per-prompt loop and against its bound.

On the same pipeline, the same P prompts x G seeds, steps and guidance, side by side:

(a) ours      ``craft.stages.generation.generate_images`` (batched across prompts, text encoded once,
              one generator per image), PIL images out;
(b) loop      one ``pipe(prompt, num_images_per_prompt=G, generator=[G generators])`` call per
              prompt, PIL images out: what one writes without a batched generator;
(c) bound     the UNet forwards alone for the same images, steps and batch composition as (a)
              (classifier-free guidance doubles the batch): the work no sampler can skip.

Goals (issue 3): (b)/(a) >= 2 and (c)/(a) >= 0.9. Each round times (a), (b), (c) in rotating
order; the medians over ``--repeats`` rounds are reported. (a) and (b) are also checked to make
the same images (within 2/255), so they really do the same work.

    .venv/bin/python benchmarks/generation.py                # assets/toy-base if present
    .venv/bin/python benchmarks/generation.py --from-config  # the toy architecture, random weights
    .venv/bin/python benchmarks/generation.py --write-md     # also write benchmarks/generation.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from craft.stages.generation import (SamplingParams, generate_images, generators_for,  # noqa: E402
                              images_to_array)

SHIPPED = ROOT / "assets" / "toy-base"


def build_from_config(directory: Path) -> Path:
    """The toy model's architecture (craft.toyworld.model) with random weights: the same speed
    as the trained model, for machines where assets/toy-base has not been built."""
    from craft.toyworld import model as toy

    toy.write_tokenizer(directory / "tok")
    tokenizer = toy.load_tokenizer(directory / "tok")
    torch.manual_seed(0)
    vae = toy.build_vae()
    vae.register_to_config(scaling_factor=1.0)
    pipe = toy.assemble_pipeline(vae, toy.build_text_encoder(tokenizer), tokenizer,
                                 toy.build_unet())
    pipe.save_pretrained(directory / "model")
    return directory / "model"


def workload(n_prompts: int, seeds_per_prompt: int) -> tuple[list[str], list[int]]:
    """P distinct toy prompts (plain and rich captions mixed, as in a candidate pool)."""
    from craft.toyworld.grammar import toy_prompt_split

    train, _ = toy_prompt_split()
    texts = list(dict.fromkeys(train))[:n_prompts]
    if len(texts) < n_prompts:
        raise SystemExit(f"only {len(texts)} toy prompts available; use --prompts <= that")
    return texts, [1000 + 17 * i for i in range(seeds_per_prompt)]


def run_ours(pipe, texts, seeds, params, batch_size):
    prompts = [t for t in texts for _ in seeds]
    all_seeds = [s for _ in texts for s in seeds]
    return [im for _, batch in generate_images(pipe, prompts, all_seeds, params, batch_size)
            for im in batch]


def run_loop(pipe, texts, seeds, params):
    images = []
    with torch.no_grad():
        for text in texts:
            out = pipe(text, num_images_per_prompt=len(seeds), generator=generators_for(seeds),
                       num_inference_steps=params.num_inference_steps,
                       guidance_scale=params.guidance_scale, output_type="pil")
            images.extend(out.images)
    return images


def bound_inputs(pipe, texts, seeds, params, batch_size):
    """Per batch of (a): the CFG-doubled latents and text states, and the timesteps."""
    prompts = [t for t in texts for _ in seeds]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(list(dict.fromkeys(prompts)), pipe.device, 1,
                                          params.guidance_scale > 1, negative_prompt=None)
    index = {t: i for i, t in enumerate(dict.fromkeys(prompts))}
    pipe.scheduler.set_timesteps(params.num_inference_steps, device=pipe.device)
    timesteps = pipe.scheduler.timesteps.clone()
    c = pipe.unet.config
    size = c.sample_size
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        idx = torch.tensor([index[p] for p in chunk])
        states = cond[idx]
        if uncond is not None:
            states = torch.cat([uncond[idx], states])
        latents = torch.randn(len(states), c.in_channels, size, size, dtype=pipe.unet.dtype)
        batches.append((latents.to(pipe.device), states))
    return batches, timesteps


def run_bound(pipe, batches, timesteps):
    unet = pipe.unet
    with torch.no_grad():
        for latents, states in batches:
            for t in timesteps:
                unet(latents, t, encoder_hidden_states=states)


def timed(fn) -> float:
    return timed2(fn)[0]


def timed2(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time of a
    one-thread run is much less disturbed by other jobs than the wall time."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="diffusers folder (default assets/toy-base)")
    ap.add_argument("--from-config", action="store_true",
                    help="benchmark the toy architecture built from config (random weights)")
    ap.add_argument("--prompts", type=int, default=40, help="P distinct prompts")
    ap.add_argument("--seeds", type=int, default=4, help="G images per prompt")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=40, help="our images per pipeline call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1],
                    help="torch intra-op threads; several values = one measurement each")
    ap.add_argument("--sweep", type=int, nargs="*", default=[],
                    help="also time ours alone at these batch sizes (first thread count)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--write-md", action="store_true", help="write benchmarks/generation.md")
    ap.add_argument("--json", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)

    from craft.models.loading import load_pipeline

    tmp = None
    if args.from_config or (args.model is None and not (SHIPPED / "model_index.json").exists()):
        tmp = tempfile.TemporaryDirectory(prefix="craft-bench-")
        model = build_from_config(Path(tmp.name))
        source = "toy architecture from config (craft.toyworld.model), random weights"
    else:
        model = Path(args.model) if args.model else SHIPPED
        source = str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model)
    pipe = load_pipeline(model, family="toy", dtype=args.dtype, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    params = SamplingParams(num_inference_steps=args.steps, guidance_scale=args.guidance)
    texts, seeds = workload(args.prompts, args.seeds)
    results = [measure(pipe, source, texts, seeds, params, args, threads)
               for threads in args.threads]
    sweep = {}
    if args.sweep:
        torch.set_num_threads(args.threads[0])
        for bs in args.sweep:
            times = [timed(lambda: run_ours(pipe, texts, seeds, params, bs))
                     for _ in range(args.repeats)]
            sweep[bs] = statistics.median(times)
            print(f"sweep: batch {bs:4d}: {sweep[bs]:.2f} s", file=sys.stderr, flush=True)
    for r in results:
        print(report(r))
    if sweep:
        print("ours by batch size (median s): "
              + ", ".join(f"{bs}: {t:.2f}" for bs, t in sweep.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "sweep": sweep}, indent=1))
    if args.write_md:
        (ROOT / "benchmarks" / "generation.md").write_text(markdown(results, sweep, argv))
    if tmp is not None:
        tmp.cleanup()
    return {"results": results, "sweep": sweep}


def measure(pipe, source, texts, seeds, params, args, threads: int) -> dict:
    torch.set_num_threads(threads)
    n_images = len(texts) * len(seeds)
    # Same work: (a) and (b) make the same images. Warms up both paths as well.
    a = images_to_array(run_ours(pipe, texts[:3], seeds, params, args.batch_size))
    b = images_to_array(run_loop(pipe, texts[:3], seeds, params))
    same = int(np.abs(a.astype(int) - b.astype(int)).max())
    batches, timesteps = bound_inputs(pipe, texts, seeds, params, args.batch_size)
    run_bound(pipe, batches[:1], timesteps[:2])

    fns = {"ours": lambda: run_ours(pipe, texts, seeds, params, args.batch_size),
           "loop": lambda: run_loop(pipe, texts, seeds, params),
           "bound": lambda: run_bound(pipe, batches, timesteps)}
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    order = list(fns)
    for r in range(args.repeats):
        for k in order[r % 3:] + order[:r % 3]:
            wall, c = timed2(fns[k])
            times[k].append(wall)
            cpu[k].append(c)
            print(f"threads {threads}, round {r + 1}: {k:5s} {wall:7.2f} s wall, {c:7.2f} s CPU",
                  file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "model": source, "machine": machine(), "device": args.device, "dtype": args.dtype,
        "threads": threads,
        "prompts": len(texts), "seeds_per_prompt": len(seeds), "images": n_images,
        "steps": args.steps, "guidance": args.guidance, "batch_size": args.batch_size,
        "repeats": args.repeats, "times_s": times, "median_s": med,
        "images_per_s": {k: n_images / v for k, v in med.items()},
        "speedup_vs_loop": med["loop"] / med["ours"],
        "fraction_of_bound": med["bound"] / med["ours"],
        "ceiling_vs_loop": med["loop"] / med["bound"],
        "cpu_s": cpu, "median_cpu_s": cmed,
        "cpu_speedup_vs_loop": cmed["loop"] / cmed["ours"],
        "cpu_fraction_of_bound": cmed["bound"] / cmed["ours"],
        "cpu_ceiling_vs_loop": cmed["loop"] / cmed["bound"],
        "max_pixel_diff_ours_vs_loop": same,
        "load_avg_1min": os.getloadavg()[0],
    }


def report(r: dict) -> str:
    lines = [f"model: {r['model']}; {r['prompts']} prompts x {r['seeds_per_prompt']} seeds = "
             f"{r['images']} images, {r['steps']} steps, guidance {r['guidance']}, our batch "
             f"{r['batch_size']}; {r['machine']}",
             f"{'path':6s} {'median s':>9s} {'img/s':>8s}  runs"]
    for k in ("ours", "loop", "bound"):
        runs = ", ".join(f"{t:.2f}" for t in r["times_s"][k])
        lines.append(f"{k:6s} {r['median_s'][k]:9.2f} {r['images_per_s'][k]:8.2f}  {runs}")
    lines.append(f"speed-up over the per-prompt loop: {r['speedup_vs_loop']:.2f}x (goal >= 2); "
                 f"the bound itself is {r['ceiling_vs_loop']:.2f}x the loop")
    lines.append(f"fraction of the UNet-only bound: {100 * r['fraction_of_bound']:.1f} % "
                 "(goal >= 90 %)")
    lines.append(f"by CPU time: {r['cpu_speedup_vs_loop']:.2f}x the loop, "
                 f"{100 * r['cpu_fraction_of_bound']:.1f} % of the bound, bound "
                 f"{r['cpu_ceiling_vs_loop']:.2f}x the loop")
    lines.append("ours vs loop, same images: max pixel difference "
                 f"{r['max_pixel_diff_ours_vs_loop']}/255")
    return "\n".join(lines)


def markdown(results: list[dict], sweep: dict, argv=None) -> str:
    cmd = " ".join(["OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generation.py",
                    *(argv if argv is not None else sys.argv[1:])])
    r0 = results[0]
    parts = [
        "# Candidate generation speed", "",
        "Written by `benchmarks/generation.py --write-md` (numbers and notes); recorded with", "",
        f"    {cmd}", "",
        f"- model: {r0['model']} ({r0['dtype']}, {r0['device']})",
        f"- machine: {r0['machine'].rsplit(',', 1)[0]}",
        f"- workload: {r0['prompts']} prompts x {r0['seeds_per_prompt']} seeds = "
        f"{r0['images']} images, {r0['steps']} DDIM steps, guidance {r0['guidance']} "
        "(classifier-free guidance doubles every UNet batch); ours renders "
        f"{r0['batch_size']} images per pipeline call, the loop {r0['seeds_per_prompt']}",
        f"- each round times (a) ours, (b) the per-prompt loop and (c) the UNet-only bound, in "
        f"rotating order; {r0['repeats']} rounds, medians reported", ""]
    for r in results:
        parts += [
            f"## {r['threads']} torch thread(s); 1-minute load average after the run: "
            f"{r['load_avg_1min']:.1f}", "",
            "| path | median wall s | images/s | wall runs (s) | median CPU s |",
            "|---|---|---|---|---|"]
        for k in ("ours", "loop", "bound"):
            parts.append(f"| {k} | {r['median_s'][k]:.2f} | {r['images_per_s'][k]:.2f} | "
                         f"{', '.join(f'{t:.2f}' for t in r['times_s'][k])} | "
                         f"{r['median_cpu_s'][k]:.2f} |")
        parts += [
            "",
            f"- ours vs the per-prompt loop: **{r['speedup_vs_loop']:.2f}x** (goal >= 2x); "
            f"by CPU time {r['cpu_speedup_vs_loop']:.2f}x",
            f"- bound time / our time: **{100 * r['fraction_of_bound']:.1f} %** (goal >= 90 %); "
            f"by CPU time {100 * r['cpu_fraction_of_bound']:.1f} % (above 100 % = within noise)",
            f"- the bound itself vs the loop: {r['ceiling_vs_loop']:.2f}x (CPU time "
            f"{r['cpu_ceiling_vs_loop']:.2f}x): the most any sampler that runs these UNet "
            "forwards could gain over the loop on this machine",
            "- ours and the loop make the same images: max pixel difference "
            f"{r['max_pixel_diff_ours_vs_loop']}/255", ""]
    if sweep:
        parts += ["## Ours by batch size (images per pipeline call), median wall s", "",
                  "| batch | " + " | ".join(str(b) for b in sweep) + f" | {r0['batch_size']} "
                  "(above) |",
                  "|---|" + "---|" * (len(sweep) + 1),
                  "| s | " + " | ".join(f"{t:.2f}" for t in sweep.values())
                  + f" | {r0['median_s']['ours']:.2f} |", ""]
    parts.append(notes(results))
    return "\n".join(parts)


def notes(results: list[dict]) -> str:
    r = results[0]
    speed_ok = r["speedup_vs_loop"] >= 2
    bound_ok = r["fraction_of_bound"] >= 0.9
    lines = ["## Notes", ""]
    lines.append(
        f"- Bound goal (>= 90 %): {'met' if bound_ok else 'NOT met'}. Our path spends its time "
        "in the UNet forwards; text encoding (once per distinct prompt), noise drawing, the "
        "scheduler, one batched VAE decode per call and the PIL conversion are within the "
        "run-to-run noise of this machine.")
    lines.append(
        f"- Speed-up goal (>= 2x over the per-prompt loop): {'met' if speed_ok else 'NOT met'} "
        "on this machine. "
        + ("" if speed_ok else
           "Batching cannot reach it here: the UNet forwards alone (the bound) are only "
           f"{r['ceiling_vs_loop']:.2f}x faster than the loop. On one CPU thread the toy UNet is "
           "compute-bound and its cost per sample hardly depends on the batch size (see the "
           "batch-size table), so the loop loses only its per-call overhead: text encoder and "
           "negative prompt on every call, a VAE decode of a few images, pipeline set-up, "
           "small-batch kernel overhead. The goal's premise, per-call overhead dominating a "
           "small model, is expected where kernels are launch-bound (a GPU); no GPU was lent "
           "to this session, so that is not measured: run the script with `--device cuda` "
           "there."))
    lines.append(
        "- Not done to chase 2x: making our UNet math cheaper than the loop's (bf16 autocast, "
        "channels-last, torch.compile) changes the model's numerics or mutates the caller's "
        "pipeline, and would move the bound with it; those are model-level choices for the "
        "caller (model.dtype), not generation's.")
    lines.append(
        "- The machine is a shared 2-core VM and other jobs ran during the measurement (see the "
        "load average): wall times are up to 2x the CPU times. The three paths are timed in "
        "rotating order in every round so that load drifts hit them alike, and CPU-time "
        "ratios are given as a cross-check. Two torch threads were much slower than one in a "
        "probe with other jobs running, so the benchmark uses one.")
    lines.append(
        "- Same work: (a) and (b) are checked to make the same images (the loop passes "
        "`generator=[one generator per image]` with the same seeds).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
