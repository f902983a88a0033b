"""Everything a run will need, checked at once before anything heavy starts.

Why: a real-model run is set up by hand (weights copied from a machine with internet, prompt
files put in place, packages installed), then launched on expensive GPUs. ``craft run`` already
stops at the *first* missing piece; ``craft config check`` lists *every* piece, found or not,
so one pass fixes them all. Nothing here reads model weights: it resolves files and settings
with the same functions the stages call (``check_model``, ``check_reward``,
``check_train_options``, ``load_prompts``), so a green report means the stages will find them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from craft import CraftError


@dataclasses.dataclass(frozen=True)
class Check:
    what: str  # e.g. "model", "reward hpsv21 (filter)"
    ok: bool
    detail: str  # what was found, or the error: what is wrong, where, how to fix it


def _run(what: str, fn) -> Check:
    try:
        return Check(what, True, fn())
    except CraftError as exc:
        return Check(what, False, str(exc))


def preflight(cfg, plan: tuple | None = None) -> list[Check]:
    """One :class:`Check` per model, prompt set, expander, reward and training option; with
    ``plan=(gpus, Gpu)`` also the memory plan's verdict (craft.planning; seconds for the toy
    world, about a minute for a 12 B model)."""
    from craft.models.loading import check_model
    from craft.stages.prompts import load_prompts
    from craft.rewards.configured import check_reward
    from craft.methods.training import check_train_options

    p = cfg.prompts
    checks = [_run("model", lambda: f"{cfg.model.pretrained} -> {check_model(cfg.model)}")]
    for what, source, fmt, column, limit in (
            ("training prompts", p.source, p.format, p.column, p.max_prompts),
            ("evaluation prompts", p.eval_source, "auto", None, p.max_eval_prompts)):
        checks.append(_run(what, lambda s=source, f=fmt, c=column, n=limit: _prompts(
            load_prompts(s, f, c, n, seed=p.seed))))
    checks.append(_run(f"expander {p.expander}", lambda: _expander(p)))
    roles = {name: role for role, name in cfg.rewards.roles.items()}
    for name in dict.fromkeys([*cfg.rewards.names, *cfg.rewards.eval_names]):
        use = ("filter, role " + roles[name]) if name in roles else (
            "filter" if name in cfg.rewards.names else "evaluation only")
        checks.append(_run(f"reward {name} ({use})", lambda n=name: _reward(
            check_reward(cfg, n))))
    checks.append(_run("training options", lambda: (check_train_options(cfg), _train(cfg))[1]))
    checks.append(_run(f"diversity encoder {cfg.eval.diversity_encoder} (evaluation)",
                       lambda: _diversity(cfg)))
    if plan is not None:
        checks.append(_run(f"memory plan ({plan[0]} x {plan[1].name})",
                           lambda: _plan(cfg, *plan)))
    return checks


def _plan(cfg, gpus: int, gpu) -> str:
    """The run plan's verdict (craft.planning): fits, or what does not and the change that
    fits."""
    from craft.planning import make_plan

    p = make_plan(cfg, gpus=gpus, gpu=gpu)
    if not p.fits:
        raise CraftError(p.refusal().replace("; --ignore-plan runs it anyway", ""))
    top = max(p.stages, key=lambda s: s.needed)
    return (f"every stage fits {gpus} x {gpu.memory_gib:g} GiB (largest: {top.stage}, "
            f"{top.needed:.1f} GiB per GPU with the margin); `craft plan` shows the details")


def _diversity(cfg) -> str:
    from craft.stages import diversity

    if cfg.eval.diversity_encoder == "dinov2":
        return str(diversity.dinov2_location(cfg.eval.diversity_model))
    if cfg.eval.diversity_encoder == "clip":
        from craft.stages.embeddings import clip_location

        return str(clip_location(cfg.eval.diversity_model, "eval.diversity_model"))
    return diversity.describe(cfg)


def _prompts(ps) -> str:
    counts = ps.skip_counts()
    skipped = f" ({sum(counts.values())} skipped: {', '.join(counts)})" if counts else ""
    return f"{len(ps.prompts)} prompts from {ps.source}{skipped}"


def _expander(p) -> str:
    if p.expander == "template":
        return "toy-vocabulary templates (offline)"
    if p.expander == "llm_local":
        path = Path(p.expander_model).expanduser()
        if not (path / "config.json").is_file():
            raise CraftError(f"prompts.expander_model={p.expander_model!r}: no transformers "
                             f"model folder there (config.json missing in {path}); copy the "
                             "model there or use --set prompts.expander=template")
        return f"local model {path}"
    from urllib.parse import urlparse

    from craft.stages.expansion import API_KEY_ENV

    host = urlparse(p.expander_url or "").hostname or ""
    local = host in ("localhost", "127.0.0.1", "::1") or host.endswith(".local")
    if not local and not os.environ.get(API_KEY_ENV):
        raise CraftError(f"prompts.expander_url={p.expander_url!r} is a remote endpoint but "
                         f"{API_KEY_ENV} is not set; export {API_KEY_ENV}=<key>, or serve a "
                         "model locally (--set prompts.expander_url=http://127.0.0.1:8000/v1)")
    return f"HTTP endpoint {p.expander_url} (not contacted here; the prompts stage calls it)"


def _reward(found: dict) -> str:
    shown = {k: v for k, v in found.items() if v is not None}
    return ", ".join(f"{k} {v}" for k, v in shown.items()) or "no weights needed"


def _train(cfg) -> str:
    t = cfg.train
    from craft.models.families import FLOW_FAMILIES

    what = ("transformer" if cfg.model.family in FLOW_FAMILIES else "UNet"
            if cfg.model.family != "auto" else "denoiser")
    return (f"{t.steps} steps x {t.effective_batch} samples, lr {t.lr}, "
            f"{f'LoRA rank {t.lora_rank}' if t.lora else f'full {what}'}, "
            f"mixed precision {t.mixed_precision}")
