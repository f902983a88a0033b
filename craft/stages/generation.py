"""Batched, seeded candidate generation.

Three properties make the candidate pool trustworthy and cheap:
- *Batched across prompts*: one pipeline call renders ``batch_size`` images from many prompts,
  instead of one call per prompt; on small models the per-call overhead dominates otherwise.
- *Text encoded once*: each distinct prompt goes through the text encoder(s) once, and the
  embeddings are gathered per batch.
- *Seeded per candidate*: every image has its own ``torch.Generator`` seeded from its own seed,
  so any single candidate can be regenerated exactly, alone or in any batch.

``generate_images`` is the pure part (pipeline in, images out). ``generate_candidates`` adds the
run: it skips (prompt, variant, seed) keys already stored, writes each batch as it is done, and
shards work across ``accelerate`` processes, so a killed run resumes with no duplicates.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (done, total)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The generation settings that, with the seed and prompt, determine an image."""

    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    height: int | None = None  # None = the model's native resolution
    width: int | None = None
    negative_prompt: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, params: dict) -> SamplingParams:
        """The params of a stored candidate's ``params_json`` (which also names its scheduler:
        apply that to the pipeline, craft.stages.generation.apply_scheduler)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


class PromptEncoder:
    """Encodes each distinct prompt once and hands out stacked embeddings for a batch.

    The embeddings are whatever the pipeline's own ``encode_prompt`` returns
    (craft.models.families.encode_prompts), so every family's encoders (one or two CLIPs, T5, pooled
    embeddings) are handled by the pipeline, not re-implemented.
    """

    def __init__(self, pipe, params: SamplingParams):
        from craft.models.families import family_of

        self.pipe = pipe
        self.params = params
        self.cache: dict[str, dict[str, torch.Tensor]] = {}
        # FLUX is guidance-distilled: its guidance scale is an input, never a second pass
        self.cfg = params.guidance_scale > 1.0 and family_of(pipe) != "flux"

    def _encode(self, prompts: list[str]) -> None:
        from craft.models.families import encode_prompts

        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if not todo:
            return
        # An empty negative prompt is passed as None, as the pipeline's own call does: SDXL then
        # uses zeros for the unconditional branch (force_zeros_for_empty_prompt), SD1.5 and SD3
        # the encoding of "" either way.
        neg = [self.params.negative_prompt] * len(todo) if self.params.negative_prompt else None
        with torch.no_grad():
            out = encode_prompts(self.pipe, todo, cfg=self.cfg, negative=neg)
        for i, p in enumerate(todo):
            self.cache[p] = {k: t[i:i + 1] for k, t in out.items()}

    def kwargs(self, prompts: list[str]) -> dict:
        self._encode(prompts)
        return {k: torch.cat([self.cache[p][k] for p in prompts]) for k in self.cache[prompts[0]]}


SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler",
              "euler": "EulerDiscreteScheduler", "pndm": "PNDMScheduler",
              "unipc": "UniPCMultistepScheduler"}
# flow-matching models (SD3): Euler is the model's own FlowMatchEulerDiscrete; DPM-Solver++ and
# UniPC in their flow-sigma forms (diffusers' use_flow_sigmas + flow_prediction, the model's
# shift as flow_shift). FLUX keeps its own sampler (its sigmas shift with the image size).
FLOW_SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler",
                   "dpm": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}


def apply_scheduler(pipe, name: str):
    """Switch ``pipe`` to the sampler ``name`` (config ``generation.scheduler``), keeping the
    model's noise schedule; ``default`` keeps (or restores) the scheduler saved with the
    model."""
    import diffusers

    from craft import CraftError
    from craft.models.families import family_of, is_flow

    if not hasattr(pipe, "_craft_scheduler"):  # the model's own, whatever is switched later
        pipe._craft_scheduler = pipe.scheduler
    own = pipe._craft_scheduler
    if name == "default":
        pipe.scheduler = own
        return pipe
    flow = is_flow(pipe)
    table = FLOW_SCHEDULERS if flow else SCHEDULERS
    if name not in table or (family_of(pipe) == "flux" and name != "euler"):
        if flow:
            raise CraftError(f"generation.scheduler={name!r} is not a sampler for this "
                             f"flow-matching {family_of(pipe)} model; use euler (its own "
                             "FlowMatchEulerDiscrete), default"
                             + (", dpm or unipc (their flow-sigma forms)"
                                if family_of(pipe) != "flux" else ""))
        raise ValueError(f"generation.scheduler={name!r} is not one of "
                         f"{['default', *SCHEDULERS]}")
    cls = getattr(diffusers, table[name])
    if type(pipe.scheduler) is cls:
        return pipe
    if type(own) is cls:
        pipe.scheduler = own
    elif flow and name != "euler":
        pipe.scheduler = cls.from_config(own.config, use_flow_sigmas=True,
                                         prediction_type="flow_prediction",
                                         flow_shift=float(own.config.get("shift", 1.0)))
    else:
        pipe.scheduler = cls.from_config(own.config)
    return pipe


def generators_for(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per image: the seed alone fixes the image's initial noise."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int],
                    params: SamplingParams = SamplingParams(), batch_size: int = 64,
                    progress: ProgressFn | None = None,
                    should_stop: Callable[[], bool] | None = None, cut=None,
                    ) -> Iterator[tuple[slice, list[Image.Image]]]:
    """Yield ``(slice, images)`` for consecutive batches of ``prompts[i]`` with ``seeds[i]``.

    The initial noise is drawn on the CPU from each image's own generator, so the same seed
    gives the same image on any device and in any batch (up to float rounding). ``cut`` (a
    craft.stages.trajectory.StepCut) checks every batch part-way and stops the images it
    rejects: their entries are None.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per "
                         "prompt (repeat a prompt to give it several seeds)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from craft.models.families import denoiser, latent_shape, native_size, pack_latents

    pipe.set_progress_bar_config(disable=True)
    encoder = PromptEncoder(pipe, params)
    native_h, native_w = native_size(pipe)
    height, width = params.height or native_h, params.width or native_w
    shape = latent_shape(pipe, height, width)
    dtype = denoiser(pipe).dtype
    total = len(prompts)
    for start in range(0, total, batch_size):
        if should_stop is not None and should_stop():
            return
        sl = slice(start, min(start + batch_size, total))
        batch_prompts = list(prompts[sl])
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators_for(seeds[sl])])
        extra = {} if cut is None else cut.begin(pipe, range(sl.start, sl.stop))
        try:
            with torch.no_grad():
                images = pipe(**encoder.kwargs(batch_prompts),
                              latents=pack_latents(pipe, latents).to(pipe.device, dtype),
                              num_inference_steps=params.num_inference_steps,
                              guidance_scale=params.guidance_scale, height=height, width=width,
                              output_type="pil", **extra).images
        except BaseException:
            if cut is not None:
                cut.end(pipe, [])  # the scheduler's own step back in place
            raise
        if cut is not None:
            images = cut.end(pipe, images)
        yield sl, images
        if progress:
            progress(sl.stop, total)


def images_to_array(images: Sequence[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------ store-backed stage


def candidate_seed(base_seed: int, prompt: str, s: int) -> int:
    """Seed of the s-th image of every prompt in ``prompt``'s group.

    The original prompt and all its variants share these seeds (so a variant is compared with
    the original on the same starting noise), while different prompts get different seeds. It
    depends on the prompt text, not on store ids, so it is the same in every run directory.
    """
    import zlib

    return (base_seed * 1_000_003 + zlib.crc32(prompt.encode()) * 131 + s) % (2**31 - 1)


def plan_candidates(store, cfg, split: str = "train") -> list[tuple[int, int, int, str]]:
    """Every ``(prompt_id, variant_id, seed, text)`` the config asks for, in a stable order."""
    variants = store.variants_df(split)
    S = cfg.generation.seeds_per_prompt
    return [(int(r.prompt_id), int(r.id), candidate_seed(cfg.generation.seed, r.prompt, s), r.text)
            for r in variants.itertuples() for s in range(S)]


def sampling_params(g) -> SamplingParams:
    """The :class:`SamplingParams` of a ``generation`` config section."""
    return SamplingParams(num_inference_steps=g.num_inference_steps,
                          guidance_scale=g.guidance_scale, height=g.height, width=g.width)


def passes_per_step(pipe, params: SamplingParams) -> int:
    """Denoiser evaluations per image and step: 2 with classifier-free guidance (the
    unconditional and the conditional pass), else 1 (FLUX's guidance is an input)."""
    return 2 if PromptEncoder(pipe, params).cfg else 1


def _missing(store, cfg, split: str) -> list[tuple]:
    """``(prompt_id, variant_id, seed, text, variant_idx, original prompt)`` of every planned
    candidate that is neither stored nor stopped early, in plan order."""
    model = cfg.model.pretrained
    done = store.existing_candidate_keys(model) | store.stopped_keys(model)
    variants = store.variants_df(split).set_index("id")
    return [(*c, int(variants.at[c[1], "idx"]), str(variants.at[c[1], "prompt"]))
            for c in plan_candidates(store, cfg, split) if c[:3] not in done]


def generate_candidates(run, cfg, pipe=None, split: str = "train",
                        progress: ProgressFn | None = None,
                        should_stop: Callable[[], bool] | None = None) -> int:
    """Generate every planned candidate that is not yet in the run; returns how many were
    written (the same number on every process).

    ``run`` is a :class:`craft.run.handle.Run` (or, in a single process, a RunStore). Resumable: the
    main process plans the missing keys and hands them out; process ``r`` of ``n`` takes every
    n-th one. The processes move in rounds of one batch each: every process writes its batch's
    images, then sends the rows to the main process, which commits them, so a killed launch
    loses at most the round in flight and a rerun skips every stored key. No process returns
    before every candidate of this call exists (the next stage may read them all).

    With ``generation.early_reject`` the original prompts' images (every group's reference)
    are made first and scored with the filter's rewards; then the variants' candidates, in a
    seeded shuffled order, each checked part-way (craft.stages.early_reject): a stopped one is
    recorded as such (``RunStore.stopped_df``) and skipped by a rerun like a stored one; a
    finished one is scored at once (its scores are stored: the score stage skips them) and
    raises the running top-K cut-off. Every candidate records the denoiser evaluations it cost
    (``RunStore.generation_cost``).
    """
    from craft.run.handle import as_run

    run = as_run(run)
    todo = None
    if run.is_main:
        todo = _missing(run.store, cfg, split)
        if not todo:
            log.info("generation: nothing to do (every planned candidate is stored or stopped)")
    return _generate(run, cfg, run.dist.broadcast(todo), pipe, split, progress, should_stop)


def finish_candidates(run, cfg, todo: list, pipe=None, progress: ProgressFn | None = None,
                      should_stop: Callable[[], bool] | None = None) -> int:
    """Finish stopped candidates: ``todo`` (the same list on every process) holds
    ``(prompt_id, variant_id, seed, text, variant_idx, original prompt, evaluations spent)``;
    each is generated from its seed to the last step (no early check), recorded as finished
    (no longer stopped) with the evaluations of both tries. Returns how many were written."""
    from craft.run.handle import as_run

    g = dataclasses.replace(cfg.generation, early_reject=False)
    return _generate(as_run(run), dataclasses.replace(cfg, generation=g), todo, pipe, "train",
                     progress, should_stop)


def _generate(run, cfg, todo: list, pipe, split: str, progress, should_stop) -> int:
    from craft.run.store import writing_images

    dist = run.dist
    if not todo:
        return 0
    job = _Generation(run, cfg, _pipeline(run, cfg, pipe), len(todo), progress)
    dist.barrier()  # every process has its model: the rounds start together
    if run.is_main and progress:
        progress(0, len(todo))
    with writing_images(run.run_dir):
        job.generate(todo, split, should_stop)
        dist.barrier()  # every process's last rows are committed: its marker can go
    written, stopped = dist.broadcast((job.written, job.stopped))
    log.info("generation: wrote %d candidates%s", written,
             f", stopped {stopped} early" if stopped else "")
    return written


def _pipeline(run, cfg, pipe):
    if pipe is None:
        from craft.models.loading import load_from_config

        pipe = load_from_config(cfg.model, device=str(run.dist.model_device(cfg.model.device)))
    apply_scheduler(pipe, cfg.generation.scheduler)
    return pipe


# reference images the early check's calibration is fitted on, at least: a resumed call whose
# references were made before re-runs the first steps of that many to score them part-way
CALIBRATION_IMAGES = 64


class _Generation:
    """One generation call's rounds over the processes: images written by each, rows (and,
    with early rejection, scores and stopped candidates) committed by the main process."""

    def __init__(self, run, cfg, pipe, total: int, progress: ProgressFn | None):
        self.run, self.cfg, self.pipe = run, cfg, pipe
        self.params = sampling_params(cfg.generation)
        self.record = {**self.params.as_dict(), "scheduler": cfg.generation.scheduler}
        self.model = cfg.model.pretrained
        self.per_step = passes_per_step(pipe, self.params)
        self.plain = cfg.generation.num_inference_steps * self.per_step
        self.total, self.progress = total, progress
        self.written = self.stopped = 0
        self.judge, self.settings, self.names, self.rewards, self.cut_at = None, None, (), {}, 0
        self.capture = False  # the references: scored part-way on the way (the calibration)
        self.calibration: list = []  # (early, final) score rows of reference images (main)
        self.calibrated: set[int] = set()

    def generate(self, todo: list, split: str, should_stop) -> None:
        g = self.cfg.generation
        if not g.early_reject:
            self.rounds(todo, should_stop)
            return
        from craft.stages.trajectory import require_cut

        require_cut(self.pipe)
        self.load_rewards()
        refs = [c for c in todo if c[4] == 0]
        rest = [c for c in todo if c[4] != 0]
        self.capture = True
        halted = self.rounds(refs, should_stop)
        self.capture = False
        if halted or not rest:
            return
        self.start_early(split, should_stop)
        order = np.random.default_rng(g.seed).permutation(len(rest))
        self.rounds([rest[i] for i in order], should_stop)

    def rounds(self, todo: list, should_stop) -> bool:
        return self.run.dist.in_rounds(todo, self.cfg.generation.batch_size, self.work,
                                       self.commit, should_stop)

    def load_rewards(self) -> None:
        """The filter's rewards, on every process (the early check scores with them)."""
        from craft.rewards.configured import build_reward
        from craft.stages.filtering import FilterSettings
        from craft.stages.trajectory import cut_step

        cfg = self.cfg
        self.settings = FilterSettings.from_config(cfg)
        self.names = tuple(self.settings.used_rewards)
        device = str(self.run.dist.model_device(cfg.rewards.device, key="rewards.device"))
        self.rewards = {n: build_reward(cfg, n, device=device, batch_size=cfg.rewards.batch_size)
                        for n in self.names}
        self.cut_at = cut_step(cfg.generation.num_inference_steps, cfg.generation.early_reject_at)

    def start_early(self, split: str, should_stop) -> None:
        """Score what is stored (references made before this call above all), calibrate,
        build the rule on the main process and hand it to every process."""
        from craft.stages.early_reject import build_judge
        from craft.stages.scoring import score_candidates

        run, names = self.run, list(self.names)
        score_candidates(run, self.cfg, names, split=split, should_stop=should_stop)
        self.top_up(split, should_stop)

        def judge():
            cands = run.store.candidates_df(model=self.model, split=split)
            frame = cands[["id", "prompt_id", "variant_idx"]].join(
                run.store.scores_df(names), on="id")
            early = np.array([e for e, _ in self.calibration]).reshape(-1, len(names))
            final = np.array([f for _, f in self.calibration]).reshape(-1, len(names))
            return build_judge(frame, self.settings, self.cfg.generation.early_reject_margin,
                               early, final)

        self.judge = run.dist.broadcast(judge() if run.is_main else None)
        log.info("early rejection: check after %d of %d steps, calibrated on %d reference "
                 "images (prediction error SD %s)", self.cut_at,
                 self.cfg.generation.num_inference_steps, self.judge.calibrated_on,
                 ", ".join(f"{n} {e:.3g}" for n, e in zip(names, self.judge.error_sd)))

    def top_up(self, split: str, should_stop) -> None:
        """References made before this call were not scored part-way: when fewer than
        CALIBRATION_IMAGES were, the first steps of a seeded sample of the others run again
        (their cost is added to theirs)."""
        run, todo = self.run, None
        if run.is_main and len(self.calibration) < CALIBRATION_IMAGES:
            cands = run.store.candidates_df(model=self.model, split=split)
            refs = cands[(cands["variant_idx"] == 0) & ~cands["id"].isin(self.calibrated)]
            refs = refs.sample(n=min(CALIBRATION_IMAGES - len(self.calibration), len(refs)),
                               random_state=self.cfg.generation.seed)
            final = run.store.scores_df(list(self.names)).reindex(refs["id"]).to_numpy(float)
            todo = [(int(r.id), str(r.variant), int(r.seed), str(r.prompt), f)
                    for r, f in zip(refs.itertuples(), final)]
        todo = run.dist.broadcast(todo)
        if not todo:
            return

        def work(chunk):
            from craft.stages.trajectory import StepCut

            got: dict = {}

            def check(idx, previews):
                got.update(zip(idx.tolist(), self.scores(previews, [chunk[i][3] for i in idx])))
                return np.zeros(len(idx), dtype=bool)  # the first steps are all it needs

            for _ in generate_images(self.pipe, [c[1] for c in chunk], [c[2] for c in chunk],
                                     self.params, max(len(chunk), 1),
                                     cut=StepCut(self.cut_at, check) if chunk else None):
                pass
            return [(c[0], got[i], c[4]) for i, c in enumerate(chunk) if i in got]

        def commit(rows):
            self.calibration += [(e, f) for _, e, f in rows]
            run.store.add_evaluations([(cid, self.cut_at * self.per_step) for cid, _, _ in rows])

        run.dist.in_rounds(todo, self.cfg.generation.batch_size, work, commit, should_stop)

    def scores(self, images: list, prompts: list) -> np.ndarray:
        """The filter's rewards (``self.names``' order) of ``images`` against their original
        ``prompts``."""
        if not images:
            return np.zeros((0, len(self.names)))
        return np.column_stack([np.asarray(self.rewards[n](images, prompts), dtype=float)
                                for n in self.names])

    def work(self, chunk: list) -> list:
        """This process's batch: images written; returns what the main process commits."""
        from craft.run.store import NewCandidate, write_candidate_images
        from craft.stages.trajectory import StepCut

        judge, early, cut = self.judge, {}, None
        if judge is not None:  # the main process's running cut-off, to every process
            judge.cutoff = self.run.dist.broadcast(judge.state() if self.run.is_main else None)
        if chunk and (judge is not None or self.capture):
            cut = StepCut(self.cut_at, lambda idx, previews: self.check(chunk, idx, previews,
                                                                        early))
        images = [im for _, b in generate_images(self.pipe, [c[3] for c in chunk],
                                                 [c[2] for c in chunk], self.params,
                                                 max(len(chunk), 1), cut=cut) for im in b]
        done = [i for i, im in enumerate(images) if im is not None]
        rows = write_candidate_images(self.run.run_dir, [
            NewCandidate(chunk[i][0], chunk[i][1], chunk[i][2], self.model, self.record,
                         images[i], self.plain + (chunk[i][6] if len(chunk[i]) > 6 else 0),
                         self.plain) for i in done])
        final = self.scores([images[i] for i in done], [chunk[i][5] for i in done]) \
            if self.rewards else [None] * len(done)
        items = [("done", row, sc, early.get(i) if self.capture else None)
                 for i, row, sc in zip(done, rows, final)]
        return items + [("stopped", self.stopped_candidate(chunk[i], *early[i]))
                        for i, im in enumerate(images) if im is None]

    def stopped_candidate(self, c: tuple, raw, pred, comp):
        from craft.run.store import StoppedCandidate

        names, judge = self.names, self.judge
        return StoppedCandidate(c[0], c[1], c[2], self.model, self.record, self.cut_at,
                                self.cut_at * self.per_step, self.plain,
                                dict(zip(names, raw.tolist())), comp,
                                dict(zip(names, pred.tolist())),
                                dict(zip(names, judge.error_sd.tolist())))

    def check(self, chunk: list, idx: np.ndarray, previews: list, early: dict) -> np.ndarray:
        """The early check of a batch: the previews scored; a reference (capturing) goes on,
        a variant's candidate as the judge says."""
        raw = self.scores(previews, [chunk[i][5] for i in idx])
        if self.judge is None:
            early.update(zip(idx.tolist(), raw))
            return np.ones(len(idx), dtype=bool)
        keep, pred, comp = self.judge.decide([chunk[i][0] for i in idx], raw)
        for i, r, p, c in zip(idx.tolist(), raw, pred, comp):
            early[i] = (r, p, float(c))
        return keep

    def commit(self, items: list) -> None:
        store = self.run.store
        done = [it for it in items if it[0] == "done"]
        ids = store.record_candidates([it[1] for it in done])
        if self.rewards and done:
            store.add_scores([(cid, n, v) for cid, it in zip(ids, done)
                              for n, v in zip(self.names, it[2])])
        if self.judge is not None and done:
            self.judge.add_finished([it[1][0] for it in done], np.stack([it[2] for it in done]),
                                    [False] * len(done))
        if self.capture:
            self.calibration += [(it[3], it[2]) for it in done if it[3] is not None]
            self.calibrated.update(ids)
        self.stopped += store.record_stopped([it[1] for it in items if it[0] == "stopped"])
        self.written += len(ids)
        if self.progress:
            self.progress(self.written + self.stopped, self.total)
