"""Speed and memory of the real SD1.5, SDXL, SD3.5-Medium and FLUX.1-dev architectures under
CRAFT's settings.

    .venv/bin/python benchmarks/gpu.py                   # a CUDA machine: real sizes
    .venv/bin/python benchmarks/gpu.py --cpu-smoke       # anywhere: tiny widths, 1-2 steps

The models are the published architectures (UNet, VAE, both text encoders, scheduler; the
configs are written out in ``craft/models/architectures.py``) built from config with random weights:
speed and memory do not depend on the weights, and nothing is downloaded. Settings come from
``configs/sd15.yaml`` / ``configs/sdxl.yaml`` (the paper's) and ``configs/sd35.yaml`` /
``configs/flux.yaml`` (translated; FLUX trains LoRA adapters), measured through the project's
own code paths, so the numbers are what a CRAFT run gets (the flow families in bfloat16, the
UNets in float16):

- **generation**: ``craft.stages.generation.generate_images`` (batched, per-image seeds, prompts
  encoded once), the config's sampler, steps and guidance, float16 on CUDA; images/s at 512
  and 1024 px for each architecture (batch = the config's batch at the native size, scaled by
  the pixel count), after one warm-up batch; peak GPU memory.
- **fine-tuning**: ``craft.methods.training.train`` (the real loop: accelerate, autocast = the config's
  mixed precision, fused AdamW over every UNet parameter, gradient checkpointing when the config
  asks, effective batch 128 from micro-batches + accumulation) on training images at the native
  size; samples/s = effective batch / median optimizer-step time after the first (warm-up)
  step; peak GPU memory; and the time the paper's runs take at that rate: 120 steps x 128
  samples (SD1.5 at 512 px) and 200 x 128 (SDXL at 1024 px). Training is stopped after
  ``--train-steps`` steps by raising from the step callback, so no checkpoint is written.

Beside each measured peak the script prints what ``craft plan`` (craft.planning: the same
architectures simulated on fake tensors) predicts for that stage on this GPU, simulated and with
its margin, so the first GPU lent checks the plan in the same run. On the CPU smoke run the
plan is made from the tiny models' own config files and the measured column is the process's
RSS: the two are not comparable there (tests/test_plan.py compares plan and measurement on the
CPU with one accounting).

``--rehearse`` then runs ``craft rehearse configs/<family>.yaml`` for each family (one process
each): the whole ``craft run`` at the real sizes with random weights, full batches, every
stage's CUDA peak beside the plan's (craft/stages/rehearsal.py), the check to run on the first
GPU lent before a day-long run; its verdicts are printed after the table and each report is in
runs/rehearsal/<family>-<method>-cuda/rehearsal/report.md.

``--cpu-smoke`` runs the same code on the CPU with the tiny-width versions of both
architectures (craft.models.architectures.TINY), 64/128 px instead of 512/1024, 2 sampling steps,
micro-batch 2 / effective batch 4 and 2 optimizer steps, float32: it shows the script works
end to end; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

NATIVE = {"sd15": 512, "sdxl": 1024, "sd35": 1024, "flux": 1024}
# the architecture each benchmarked config builds (craft.models.architectures)
ARCH = {"sd15": "sd15", "sdxl": "sdxl", "sd35": "sd3", "flux": "flux"}
FLOW = ("sd35", "flux")
PROMPTS = ["a photo of an astronaut riding a horse on the moon",
           "an oil painting of a lighthouse at dusk, dramatic sky",
           "a cute corgi wearing sunglasses on a beach",
           "a cozy cabin in a snowy forest, warm light in the windows"]


class _Enough(Exception):
    """Raised from the step callback to end a timing run without writing checkpoints."""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
                f"torch {torch.__version__}")
    from generation import machine  # benchmarks/generation.py

    return f"CPU: {machine()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset; on the CPU, the process's peak RSS
    (over the whole run: only a rough figure)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tokenizers():
    """The real CLIP BPE vocabulary, built offline (reward_fixtures.clip_tokenizer); SDXL's
    second tokenizer pads with "!" as the published one does."""
    import copy

    from reward_fixtures import clip_tokenizer

    tok = copy.deepcopy(clip_tokenizer())
    tok.model_max_length = 77
    tok2 = copy.deepcopy(tok)
    tok2.pad_token = "!"
    return tok, tok2


def t5_tokenizer():
    """A T5 tokenizer built offline (craft.toyworld.model.write_t5_tokenizer): its ids are
    within T5's 32128, and model_max_length 512 keeps diffusers' T5 lengths (SD3 256,
    FLUX 512), so the sequence lengths timed are the real ones."""
    from craft.toyworld.model import load_t5_tokenizer, write_t5_tokenizer

    return load_t5_tokenizer(write_t5_tokenizer(Path(tempfile.mkdtemp()) / "t5", 512))


def build(family: str, device: torch.device, dtype: torch.dtype, tiny: bool):
    from craft.models.architectures import build_pipeline
    from craft.models.loading import apply_memory_options

    tok, tok2 = tokenizers()
    arch = ARCH[family]
    t5 = t5_tokenizer() if arch in ("sd3", "flux") else None
    if arch in ("sd3", "flux"):
        tok2 = tok  # SD3's CLIP-G tokenizer pads with the EOS token, like CLIP-L's
    pipe = build_pipeline(arch, tok, tokenizer_2=tok2, t5_tokenizer=t5, tiny=tiny, dtype=dtype)
    return apply_memory_options(pipe.to(device), "sdpa")


def planned(cfg, model_dir: Path | None, size: int, batch: int, stages: tuple[str, ...]) -> dict:
    """What craft's plan (craft.planning) says the measured stages need on this GPU:
    simulated peak and with the margin, GiB. ``model_dir``: the pipeline's config files (the
    CPU smoke run's tiny models); None plans the published architecture."""
    from craft.run.config import config_from_dict, config_to_dict
    from craft.planning import make_plan
    from craft.planning.hardware import local_gpu, resolve_gpu

    data = config_to_dict(cfg)
    data["generation"].update(height=size, width=size, batch_size=batch)
    if model_dir is not None:
        data["model"].update(pretrained=str(model_dir), family="auto")
    plan = make_plan(config_from_dict(data), gpu=local_gpu() or resolve_gpu(None, 80),
                     suggest=False)
    picked = [s for s in plan.stages if s.stage.startswith(stages)]
    top = max(picked, key=lambda s: s.simulated)
    return {"stage": top.stage, "simulated_gib": top.simulated, "needed_gib": top.needed,
            "fits": top.fits}


def bench_generation(pipe, cfg, device, size: int, batch: int, batches: int, steps: int) -> dict:
    from craft.stages.generation import SamplingParams, apply_scheduler, generate_images

    g = cfg.generation
    apply_scheduler(pipe, g.scheduler)
    if cfg.model.vae_slicing:
        pipe.vae.enable_slicing()
    params = SamplingParams(num_inference_steps=steps, guidance_scale=g.guidance_scale,
                            height=size, width=size)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch * (batches + 1))]
    seeds = list(range(len(prompts)))
    reset_peak(device)
    times = []
    sync(device)
    t0 = time.perf_counter()
    for _ in generate_images(pipe, prompts, seeds, params, batch_size=batch):
        sync(device)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    timed = times[1:]  # the first batch warms up kernels and the text-encoding cache
    return {"size": size, "batch": batch, "steps": steps, "guidance": g.guidance_scale,
            "scheduler": g.scheduler, "images_per_s": batch * len(timed) / sum(timed),
            "s_per_batch": statistics.median(timed), "peak_gib": peak_gib(device)}


def training_frame(folder: Path, size: int, n: int):
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth, picture-like content
        path = folder / f"{i}.png"
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(path)
        paths.append(str(path))
    return pd.DataFrame({"image_path": paths, "prompt": [PROMPTS[i % 4] for i in range(n)],
                         "weight": np.linspace(0.5, 1.5, n)})


def bench_training(pipe, cfg, device, size: int, steps: int) -> dict:
    from craft.run.config import config_from_dict, config_to_dict
    from craft.methods.training import TrainCallbacks, resolve_mixed_precision, train

    data = config_to_dict(cfg)
    data["generation"].update(height=size, width=size)  # train() trains at this size
    cfg = config_from_dict(data)
    tc = cfg.train
    step_times = []

    def on_step(step, total, metrics):
        step_times.append(metrics["step_time"])
        if step >= steps:
            raise _Enough

    with tempfile.TemporaryDirectory() as tmp:
        frame = training_frame(Path(tmp), size, max(16, tc.micro_batch))
        reset_peak(device)
        try:
            train(cfg, frame, Path(tmp) / "out", pipe=pipe,
                  callbacks=TrainCallbacks(on_step=on_step))
        except _Enough:
            pass
        peak = peak_gib(device)
    reset_peak(device)
    per_step = statistics.median(step_times[1:] or step_times)
    paper = tc.steps  # the config's run: the paper's 120 / 200, the flow configs' 200
    return {"size": size, "micro_batch": tc.micro_batch, "effective_batch": tc.effective_batch,
            "mixed_precision": resolve_mixed_precision(tc.mixed_precision, device),
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "steps_timed": max(1, len(step_times) - 1), "s_per_step": per_step,
            "samples_per_s": tc.effective_batch / per_step, "peak_gib": peak,
            "paper_steps": paper, "paper_run_min": paper * per_step / 60}


def run(args) -> dict:
    from craft.run.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    smoke = args.cpu_smoke
    device = torch.device("cpu") if smoke else torch.device("cuda")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --cpu-smoke to check the script on the "
                         "CPU (tiny widths); GPU figures need a GPU")
    scale = 8 if smoke else 1  # tiny models: 512 -> 64 px, 1024 -> 128 px
    result = {"device": device_name(device), "torch": torch.__version__, "smoke": smoke,
              "families": {}}
    import diffusers

    result["diffusers"] = diffusers.__version__
    for family in args.families:
        overrides = ["train.checkpoint_every=0", "train.preview_every=0"]
        if smoke:
            overrides += ["model.device=cpu", "model.dtype=float32", "train.micro_batch=2",
                          "train.effective_batch=4", "train.mixed_precision=no"]
        cfg = load_config(ROOT / "configs" / f"{family}.yaml", overrides)
        dtype = torch.float32 if smoke else torch.bfloat16 if family in FLOW else torch.float16
        pipe = build(family, device, dtype, tiny=smoke)
        from craft.models.families import denoiser, denoiser_name

        out = {"generation": [], "training": None, "denoiser": denoiser_name(pipe),
               "lora": cfg.train.lora,
               "unet_params_m": sum(p.numel() for p in denoiser(pipe).parameters()) / 1e6}
        native_batch = 2 if smoke else cfg.generation.batch_size
        model_dir = None
        if smoke:  # the plan reads the tiny model's own config files
            model_dir = Path(tempfile.mkdtemp()) / family
            pipe.save_pretrained(model_dir)
        for size in args.resolutions:
            px = size // scale
            batch = max(1, round(native_batch * (NATIVE[family] / size) ** 2))
            steps = 2 if smoke else cfg.generation.num_inference_steps
            out["generation"].append(bench_generation(pipe, cfg, device, px, batch,
                                                      args.gen_batches, steps))
            out["generation"][-1]["plan"] = planned(cfg, model_dir, px, batch, ("generation",))
            print(f"{family} generation {size}px: {out['generation'][-1]}", flush=True)
        out["training"] = bench_training(pipe, cfg, device, NATIVE[family] // scale,
                                         args.train_steps)
        out["training"]["plan"] = planned(cfg, model_dir, NATIVE[family] // scale,
                                          cfg.generation.batch_size, ("training", "checkpoint"))
        print(f"{family} training: {out['training']}", flush=True)
        result["families"][family] = out
        del pipe
        reset_peak(device)
    return result


def table(result: dict) -> str:
    smoke = result["smoke"]
    note = " (CPU smoke: tiny widths; px shown as the full-size equivalent / actual)" \
        if smoke else ""
    mem = "peak RSS GiB (process)" if smoke else "peak GPU GiB"
    lines = [f"Device: {result['device']}; diffusers {result['diffusers']}{note}", "",
             f"| architecture | generation px | batch | steps | images/s | {mem} | "
             f"planned GiB (simulated / +margin) |",
             "|---|---|---|---|---|---|---|"]
    for fam, out in result["families"].items():
        for g in out["generation"]:
            shown = g["size"] * (8 if smoke else 1)
            px = f"{shown} / {g['size']}" if smoke else str(shown)
            kind = "transformer" if out.get("denoiser") == "transformer" else "UNet"
            lines.append(f"| {fam} ({out['unet_params_m']:.3g}M {kind} params) | {px} | "
                         f"{g['batch']} | {g['steps']} | {g['images_per_s']:.2f} | "
                         f"{g['peak_gib']:.2f} | {_planned(g)} |")
    lines += ["", f"| architecture | train px | micro x accum -> batch | precision | grad ckpt | "
                  f"s/step | samples/s | {mem} | planned GiB (simulated / +margin) | "
                  f"the paper's run at this rate |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for fam, out in result["families"].items():
        t = out["training"]
        lines.append(
            f"| {fam}{' (LoRA)' if out.get('lora') else ''} | {t['size']} | {t['micro_batch']} x "
            f"{t['effective_batch'] // t['micro_batch']} -> {t['effective_batch']} | "
            f"{t['mixed_precision']} | "
            f"{t['gradient_checkpointing']} | {t['s_per_step']:.2f} | {t['samples_per_s']:.2f} | "
            f"{t['peak_gib']:.2f} | {_planned(t)} | {t['paper_steps']} steps x "
            f"{t['effective_batch']}: "
            f"{t['paper_run_min']:.1f} min |")
    return "\n".join(lines)


def _planned(row: dict) -> str:
    p = row.get("plan")
    return "" if not p else f"{p['simulated_gib']:.2f} / {p['needed_gib']:.2f} ({p['stage']})"


def rehearse(families) -> dict:
    """``craft rehearse configs/<family>.yaml`` for each family, one process each: the exit
    code (0 passed, 5 a stage broke, 6 the plan is off) and the report's verdict."""
    import subprocess

    out = {}
    for family in families:
        proc = subprocess.run([sys.executable, "-m", "craft.cli", "rehearse",
                               str(ROOT / "configs" / f"{family}.yaml")], cwd=ROOT,
                              capture_output=True, text=True)
        verdict = next((ln for ln in proc.stdout.splitlines()[::-1]
                        if ln.startswith(("passed", "PLAN OFF", "FAILED"))), proc.stderr[-300:])
        out[family] = {"exit": proc.returncode, "verdict": verdict}
        print(f"rehearsal of {family}: exit {proc.returncode}: {verdict}", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny widths on the CPU, 1-2 steps: checks the script, not a GPU figure")
    ap.add_argument("--families", nargs="+", default=list(NATIVE), choices=list(NATIVE),
                    help="configs/<name>.yaml: sd15, sdxl, sd35 (SD3.5-Medium), flux (FLUX.1-dev)")
    ap.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--gen-batches", type=int, default=3, help="timed batches after warm-up")
    ap.add_argument("--train-steps", type=int, default=3,
                    help="optimizer steps (the first is warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", default=None, help="also write the raw result here")
    ap.add_argument("--rehearse", action="store_true",
                    help="then `craft rehearse configs/<family>.yaml` for each family: every "
                         "stage of the run at the real sizes, its peak beside the plan's")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.gen_batches = min(args.gen_batches, 1)
        args.train_steps = min(args.train_steps, 2)
    result = run(args)
    print()
    print(table(result))
    if args.rehearse:
        result["rehearsals"] = rehearse(args.families)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
