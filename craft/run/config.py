"""Typed, validated configuration for every CRAFT stage.

One frozen dataclass per concern, gathered in :class:`CraftConfig`. Defaults live in the
dataclasses; YAML files and ``--set section.key=value`` overrides only *override* them, and an
unknown key is an error rather than a silently ignored typo (a misspelt ``lr`` that falls back to
the default wastes a training run). Every field carries a help text (units, scope) in its
metadata so the CLI and the studio can show it next to the value.

Paths inside a config (``model.pretrained``, ``prompts.source``, ``rewards.paths``) are stored as
written and resolved at use time by :func:`resolve_path`: first against the current working
directory, then against the project root (the checkout that holds ``configs/`` and ``assets/``).
They are deliberately *not* resolved against the config file's folder, because the same config is
copied into run directories and passed between the CLI and the studio, and a copy must keep
meaning the same files.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence, Union

import yaml

from craft import CraftError
from craft.run.choices import (ADVANTAGE_MODES, DIVERSITY_ENCODERS, EMBED_ENCODERS,
                               GRPO_REUSE, GRPO_STEP_SELECTION, IMAGE_ENCODINGS, LEVEL_ROLES,
                               LEVELS, MODEL_FAMILIES, NORMALIZATIONS, PAIR_RULES, PROMPT_FORMATS,
                               ROLES, TIMESTEP_SAMPLING, TIMESTEP_WEIGHTINGS, TRACKERS,
                               TRAIN_METHODS, parse_report_to)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configs" / "toy.yaml"


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.IGNORECASE)


class ConfigError(CraftError, ValueError):
    """A config value or file a user has to fix; ``keys`` names the offending ``section.field``s."""

    def __init__(self, message: str, keys: Sequence[str] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


def _opt(default: Any, help: str) -> Any:
    """A dataclass field with its help text; mutable defaults are copied per instance."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _fail(key: str, value: Any, rule: str, fix: str, *also: str) -> typing.NoReturn:
    raise ConfigError(f"{key} = {value!r}: {rule}; {fix}", keys=(key, *also))


def _require(ok: bool, key: str, value: Any, rule: str, fix: str, *also: str) -> None:
    if not ok:
        _fail(key, value, rule, fix, *also)


# --------------------------------------------------------------------------------------------
# Type checking from annotations. One function serves YAML, --set and Python callers, so a
# value is checked the same way wherever it comes from.


class _Mismatch(Exception):
    pass


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    if origin is tuple:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return hint.__name__


def _coerce(value: Any, hint: Any) -> Any:
    """Return ``value`` converted to ``hint`` (list -> tuple, int -> float), or raise _Mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, args[0]) for v in value)
        raise _Mismatch
    if origin is dict:
        if isinstance(value, Mapping):
            return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
        raise _Mismatch
    if hint is dict:  # a free-form mapping: its section's _check validates the entries
        if isinstance(value, Mapping):
            return dict(value)
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads `1e-4` (no dot) as a string; accept numeric text rather than punish it.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config annotation {hint!r}")


def _coerce_field(key: str, value: Any, hint: Any) -> Any:
    try:
        return _coerce(value, hint)
    except _Mismatch:
        pass
    expected = _type_name(hint)
    hint_text = ""
    choices = _literal_choices(hint)
    if choices and isinstance(value, str):
        close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
        if close:
            hint_text = f"; did you mean {close[0]!r}?"
    if choices and isinstance(value, bool):
        bare = [c for c in choices if str(c).lower() in ("no", "yes", "on", "off")]
        if bare:
            hint_text = f"; YAML reads bare no/yes/on/off as booleans, so quote it: {bare[0]!r}"
    raise ConfigError(
        f"{key}: expected {expected}, got {type(value).__name__} {value!r}{hint_text}", keys=(key,)
    )


def _literal_choices(hint: Any) -> tuple | None:
    if typing.get_origin(hint) in (Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclass(frozen=True)
class _Section:
    """Shared behaviour: type-check and normalise every field, then run the section's checks."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            value = _coerce_field(f"{self.section}.{f.name}", getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Single-section rules; cross-section rules live in CraftConfig."""

    def _key(self, name: str) -> str:
        return f"{self.section}.{name}"

    def _positive(self, *names: str, allow_zero: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if value is None:
                continue
            ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
            bound = ">= 0" if allow_zero else "> 0"
            _require(ok, self._key(name), value, f"must be finite and {bound}",
                     f"set {self._key(name)} to a number {bound}")

    def _fraction(self, name: str) -> None:
        value = getattr(self, name)
        _require(0.0 <= value < 1.0, self._key(name), value, "must lie in [0, 1)",
                 f"set {self._key(name)} to a value in [0, 1)")

    def _device(self, name: str) -> None:
        value = getattr(self, name)
        _require(bool(_DEVICE_RE.match(value)), self._key(name), value,
                 "must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
                 "use 'auto' to pick CUDA when available and the CPU otherwise")


# --------------------------------------------------------------------------------------------
# The sections.

_TOY_REWARDS = ("toy_fidelity", "toy_selection", "toy_aesthetic")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Which diffusion model to align and how to place it."""

    section: ClassVar[str] = "model"

    pretrained: str = _opt(
        "assets/toy-base",
        "Base model: a Hugging Face hub id, a local diffusers folder, or a single .safetensors "
        "checkpoint. A relative path is looked up in the working directory, then the project root.")
    family: Literal[MODEL_FAMILIES] = _opt(
        "auto", "Architecture family; 'auto' detects it from the checkpoint's components. sd15 "
                "(SD1.x/2.x), sdxl: UNets; sd3 (SD3 / SD3.5), flux (FLUX.1 dev / schnell): "
                "flow-matching transformers; toy: the UNet toy base (loads as sd15).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = _opt(
        "auto", "Weight dtype for generation; 'auto' = float16 on CUDA, float32 on the CPU.")
    device: str = _opt("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'; 'auto' = CUDA if available.")
    revision: str | None = _opt(None, "Hub revision (branch, tag or commit); null = default.")
    variant: str | None = _opt(None, "Hub weight variant, e.g. 'fp16'; null = full weights.")
    single_file_config: str | None = _opt(
        None, "For a single-file checkpoint: a local diffusers folder (its configs, tokenizer "
              "and scheduler files are enough) or a cached hub id describing its architecture; "
              "null = the hub repo diffusers associates with the checkpoint, if cached.")
    max_sequence_length: int | None = _opt(
        None, "T5 tokens per prompt (sd3, flux; others have no T5). null = the model's own: "
              "diffusers' default (SD3 256, FLUX 512), or less where the saved T5 tokenizer's "
              "model_max_length says so (the flow toy base: 16). FLUX.1-schnell: 256.")
    attention: Literal["sdpa", "default"] = _opt(
        "sdpa", "Attention implementation: PyTorch scaled-dot-product, or the model's default.")
    vae_tiling: bool = _opt(False, "Decode latents tile by tile (lower peak memory, large images).")
    vae_slicing: bool = _opt(False, "Decode a batch one image at a time (lower peak memory).")
    gradient_checkpointing: bool = _opt(
        False, "Recompute the denoiser's (UNet's or transformer's) activations in the backward "
               "pass (less memory, ~30% slower).")

    def _check(self) -> None:
        _require(bool(self.pretrained.strip()), self._key("pretrained"), self.pretrained,
                 "must not be empty", "give a hub id, a diffusers folder or a .safetensors file")
        self._device("device")
        self._positive("max_sequence_length")
        _require(not (self.device == "cpu" and self.dtype == "float16"), self._key("dtype"),
                 self.dtype, "float16 is not supported for CPU inference",
                 "use 'float32' (or 'auto') on the CPU", self._key("device"))


@dataclass(frozen=True)
class PromptsConfig(_Section):
    """Where the original prompts come from and how they are expanded into variants."""

    section: ClassVar[str] = "prompts"

    source: str = _opt(
        "toy", "Training prompts: 'toy' (built-in toy prompt set) or a file path "
               "(relative: working directory, then project root).")
    format: Literal[PROMPT_FORMATS] = _opt(
        "auto", "File format of prompts.source; 'auto' infers it from the file extension.")
    column: str | None = _opt(
        None, "Column/field holding the prompt text in csv/jsonl/parquet; null = guess "
              "('prompt', 'caption' or 'text').")
    max_prompts: int | None = _opt(None, "Use at most this many training prompts; null = all.")
    eval_source: str = _opt(
        "toy-heldout", "Held-out evaluation prompts: 'toy-heldout' or a file path.")
    max_eval_prompts: int | None = _opt(None, "Use at most this many evaluation prompts; null = all.")
    num_variants: int = _opt(
        4, "V: descriptive variants written per original prompt (0 = originals only).")
    expander: Literal["template", "llm_local", "llm_http"] = _opt(
        "template", "How variants are written: toy-vocabulary templates, a local transformers "
                    "LLM, or an OpenAI-compatible HTTP endpoint.")
    expander_model: str | None = _opt(
        None, "Local path of the transformers LLM (expander = llm_local).")
    expander_url: str | None = _opt(
        None, "Base URL of the OpenAI-compatible endpoint (expander = llm_http).")
    expander_api_model: str | None = _opt(
        None, "Model name sent to the HTTP endpoint (expander = llm_http); null = server default.")
    expander_max_new_tokens: int = _opt(96, "Token budget per generated variant (LLM expanders).")
    seed: int = _opt(0, "Seed for prompt sampling and template expansion.")

    def _check(self) -> None:
        self._positive("max_prompts", "max_eval_prompts", "expander_max_new_tokens")
        self._positive("num_variants", allow_zero=True)
        for name in ("source", "eval_source"):
            value = getattr(self, name)
            _require(bool(value.strip()), self._key(name), value, "must not be empty",
                     "use 'toy' / 'toy-heldout' or a prompt file path")
        if self.expander == "llm_local":
            _require(self.expander_model is not None, self._key("expander_model"), None,
                     "is required when prompts.expander is 'llm_local'",
                     "set it to a local transformers model folder, or use expander 'template'",
                     self._key("expander"))
        if self.expander == "llm_http":
            _require(self.expander_url is not None, self._key("expander_url"), None,
                     "is required when prompts.expander is 'llm_http'",
                     "set it to the endpoint's base URL, e.g. http://127.0.0.1:8000/v1",
                     self._key("expander"))


@dataclass(frozen=True)
class GenerationConfig(_Section):
    """How candidate images are sampled from the base model."""

    section: ClassVar[str] = "generation"

    seeds_per_prompt: int = _opt(4, "S: seeds per (prompt, variant); group size is (1+V)*S.")
    num_inference_steps: int = _opt(20, "Denoising steps per image.")
    guidance_scale: float = _opt(3.0, "Classifier-free guidance scale (1 = no guidance).")
    height: int | None = _opt(None, "Image height in pixels (multiple of 8); null = model native.")
    width: int | None = _opt(None, "Image width in pixels (multiple of 8); null = model native.")
    batch_size: int = _opt(16, "Images per pipeline call, per device.")
    scheduler: Literal["ddim", "dpm", "euler", "pndm", "unipc", "default"] = _opt(
        "ddim", "Sampler (diffusers'), also used by evaluation; 'default' keeps the scheduler "
                "saved with the model. dpm = DPMSolverMultistep (DPM-Solver++), unipc = "
                "UniPCMultistep: good at few steps. On a flow-matching model (SD3, FLUX) euler "
                "is its FlowMatchEulerDiscrete and dpm / unipc their flow-sigma forms "
                "(use_flow_sigmas, flow_prediction, the model's shift).")
    seed: int = _opt(0, "Base seed; image seeds are derived from it, so runs are reproducible.")
    early_reject: bool = _opt(
        False, "Stop a variant's candidate part-way when the scheduler's prediction of its "
               "final image, scored with the filter's rewards, has no realistic chance of being "
               "kept (it misses its group's reference images or the running top-K cut-off by "
               "more than early_reject_margin). Stopped candidates are stored as such and can "
               "be finished later (`craft generate --finish-stopped`); false = every candidate "
               "runs to the end (the paper's cost).")
    early_reject_at: float = _opt(
        0.4, "Where the early check runs: the fraction of the denoising steps done (rounded "
             "to a step).")
    early_reject_margin: float = _opt(
        1.0, "Safety margin of the early check, in standard deviations of the prediction's "
             "error (each reward's final score predicted from its early one, calibrated and "
             "measured on the original prompts' images): a candidate stops only if its "
             "prediction misses by more.")

    def _check(self) -> None:
        self._positive("seeds_per_prompt", "num_inference_steps", "batch_size", "height", "width")
        self._positive("guidance_scale", "seed", "early_reject_margin", allow_zero=True)
        _require(0.0 < self.early_reject_at < 1.0, self._key("early_reject_at"),
                 self.early_reject_at, "must lie in (0, 1)",
                 "use e.g. 0.4: the check runs after 40 % of the steps")
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(value is None or value % 8 == 0, self._key(name), value,
                     "must be a multiple of 8 (the VAE downsamples by 8)",
                     f"use {None if value is None else max(8, round(value / 8) * 8)}")


@dataclass(frozen=True)
class RewardsConfig(_Section):
    """Which reward models score the candidates, and which of them play the CRF roles."""

    section: ClassVar[str] = "rewards"

    names: tuple[str, ...] = _opt(
        _TOY_REWARDS, "Rewards computed for every candidate (against the original prompt).")
    roles: dict[str, str] = _opt(
        {"h": "toy_fidelity", "p": "toy_selection", "a": "toy_aesthetic"},
        "Role -> reward name: which rewards the CRF levels I_h / I_ha / I_hpa compare "
        "(h = HPS-like, p = PickScore-like, a = aesthetic).")
    eval_names: tuple[str, ...] = _opt(
        (*_TOY_REWARDS, "toy_heldout", "toy_precision"),
        "Rewards reported by evaluation; include some not used for training (held-out signal).")
    batch_size: int = _opt(32, "Images per reward-model forward pass, per device.")
    device: str = _opt("auto", "'auto', 'cpu', 'cuda' or 'cuda:N' for the reward models.")
    paths: dict[str, str] = _opt(
        {}, "Reward name -> local checkpoint path, for weights not in the hub cache.")
    remote: dict[str, dict] = _opt(
        {}, "Rewards served by `craft serve-rewards` (another process, environment or machine): "
        "local name -> {url: http://HOST:PORT, reward: the served name (default: the local "
        "one), token_env: the environment variable holding the server's token, batch_size, "
        "timeout_s, retries, encoding: png (default, smaller) or raw (pixels: far cheaper to "
        "encode, for the same machine or a fast link)}. Scored like a local reward, under the "
        "local name.")
    vlm: dict[str, dict] = _opt(
        {}, "Vision-language judges on an OpenAI-compatible endpoint (vLLM, SGLang): name -> "
        "{url: http://HOST:PORT/v1, model, question: a yes/no question with {prompt}, "
        "token_env, batch_size, timeout_s, retries}. Score: P(yes) / (P(yes) + P(no)) of the "
        "answer token.")

    def _check(self) -> None:
        self._positive("batch_size")
        self._device("device")
        allowed = {"remote": {"url", "reward", "token_env", "batch_size", "timeout_s", "retries",
                              "encoding"},
                   "vlm": {"url", "model", "question", "token_env", "batch_size", "timeout_s",
                           "retries"}}
        for kind, keys in allowed.items():
            for name, entry in getattr(self, kind).items():
                key = f"{self._key(kind)}.{name}"
                _require(isinstance(entry, Mapping), key, entry, "must be a mapping",
                         "e.g. {url: 'http://127.0.0.1:8765'}")
                extra = sorted(set(entry) - keys)
                _require(not extra, key, dict(entry), f"has unknown keys {extra}",
                         f"use only {sorted(keys)}")
                url = entry.get("url")
                _require(isinstance(url, str) and bool(re.match(r"^https?://[^/\s]+", url)),
                         f"{key}.url", url, "must be an http(s) URL",
                         "e.g. http://127.0.0.1:8765" + ("/v1" if kind == "vlm" else ""))
                for k in ("batch_size", "retries"):
                    v = entry.get(k, 1)
                    _require(isinstance(v, int) and not isinstance(v, bool)
                             and v >= (1 if k == "batch_size" else 0), f"{key}.{k}", v,
                             "must be a whole number " + (">= 1" if k == "batch_size" else ">= 0"),
                             "e.g. 32" if k == "batch_size" else "e.g. 2")
                t = entry.get("timeout_s", 1)
                _require(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0,
                         f"{key}.timeout_s", t, "must be a number of seconds > 0", "e.g. 120")
                for k in ("reward", "token_env", "model", "question"):
                    _require(entry.get(k) is None or isinstance(entry[k], str), f"{key}.{k}",
                             entry.get(k), "must be a string", "quote it")
                if kind == "remote":
                    _require(entry.get("encoding", "png") in IMAGE_ENCODINGS, f"{key}.encoding",
                             entry.get("encoding"), f"must be one of {list(IMAGE_ENCODINGS)}",
                             "png on a network, raw on the same machine")
                if kind == "vlm" and entry.get("question") is not None:
                    _require("{prompt}" in entry["question"], f"{key}.question",
                             entry["question"], "must contain {prompt}",
                             "e.g. 'Does this image show {prompt}? Answer yes or no.'")
        both = sorted(set(self.remote) & set(self.vlm))
        _require(not both, self._key("vlm"), both, "names rewards that rewards.remote names too",
                 "give each reward one source")
        for name in ("names", "eval_names"):
            value = getattr(self, name)
            dupes = sorted({n for n in value if value.count(n) > 1})
            _require(not dupes, self._key(name), list(value), f"lists {dupes} more than once",
                     "list each reward once")
        _require(bool(self.names), self._key("names"), [], "must name at least one reward",
                 "e.g. [toy_fidelity, toy_selection, toy_aesthetic]")
        for role, reward in self.roles.items():
            _require(role in ROLES, self._key("roles"), self.roles,
                     f"role {role!r} is not one of {list(ROLES)}", "use the roles h, p and a")
            _require(reward in self.names, self._key("roles"), self.roles,
                     f"role {role!r} names {reward!r}, which is not in rewards.names "
                     f"{list(self.names)}", f"add {reward!r} to rewards.names or change the role",
                     self._key("names"))
        known = set(self.names) | set(self.eval_names)
        for reward in self.paths:
            _require(reward in known, self._key("paths"), self.paths,
                     f"{reward!r} is in neither rewards.names nor rewards.eval_names",
                     "remove it or add the reward to one of those lists")


@dataclass(frozen=True)
class FilterConfig(_Section):
    """Composite Reward Filtering: which candidates are kept for fine-tuning."""

    section: ClassVar[str] = "filter"

    normalization: Literal[NORMALIZATIONS] = _opt(
        "zscore", "How each reward is mapped to a common scale over the whole candidate pool.")
    level: Literal[LEVELS] = _opt(
        "hpa", "Pass rule: beat the group's reference on h / h+a / h+p+a, on filter.require "
               "(custom), or keep everything (none).")
    require: tuple[str, ...] = _opt((), "Rewards a candidate must beat the reference on "
                                        "(level = custom).")
    margin: float = _opt(0.0, "A candidate must beat the reference by more than this, in "
                              "normalised units.")
    weights: dict[str, float] = _opt(
        {"toy_fidelity": 0.4, "toy_selection": 0.4, "toy_aesthetic": 0.2},
        "Reward name -> weight of its normalised score in the composite R (relative importance).")
    top_k: int = _opt(100, "K: keep at most this many passing candidates, best composite first.")
    include_reference: bool = _opt(
        True, "Whether images generated from the original prompt itself may be selected.")
    per_prompt_cap: int | None = _opt(
        None, "Keep at most this many candidates of one original prompt (its best by R); null = "
              "no cap. Spreads the kept set over more prompts (coverage).")
    replace_excluded: bool = _opt(
        False, "An image excluded by hand (the studio's Curate) gives its place in the top K "
               "to the next passing candidate, so K stays K; false: it is just left out.")
    dedup_threshold: float | None = _opt(
        None, "Drop a candidate whose image embedding (embed.encoder) has cosine similarity >= "
              "this with a better kept one, and keep the next instead; null = off. 0.98 with "
              "the toy world's pixel embeddings drops near-copies.")

    def _check(self) -> None:
        self._positive("top_k", "per_prompt_cap")
        if self.dedup_threshold is not None:
            _require(-1.0 <= self.dedup_threshold <= 1.0, self._key("dedup_threshold"),
                     self.dedup_threshold, "must lie in [-1, 1] (a cosine similarity)",
                     "use e.g. 0.98, or null to keep near-duplicates")
        _require(math.isfinite(self.margin), self._key("margin"), self.margin,
                 "must be finite", "use a small number such as 0.0 or 0.1")
        if self.level == "custom":
            _require(bool(self.require), self._key("require"), list(self.require),
                     "must name at least one reward when filter.level is 'custom'",
                     "list rewards, e.g. [toy_fidelity, toy_aesthetic], or pick level h/ha/hpa",
                     self._key("level"))
        _require(bool(self.weights), self._key("weights"), self.weights,
                 "must weight at least one reward", "e.g. {toy_fidelity: 1.0}")
        for reward, w in self.weights.items():
            _require(math.isfinite(w) and w >= 0, self._key("weights"), self.weights,
                     f"weight of {reward!r} must be finite and >= 0"
                     + (" (it is negative: weights are relative importances, and a negative "
                        "one would reward getting worse on that reward)" if w < 0 else ""),
                     "use a weight >= 0 (0 leaves the reward out of the composite)")
        _require(sum(self.weights.values()) > 0, self._key("weights"), self.weights,
                 "weights must not all be zero", "give at least one reward a positive weight")


@dataclass(frozen=True)
class AdvantageConfig(_Section):
    """How group advantages become per-sample loss weights."""

    section: ClassVar[str] = "advantage"

    mode: Literal[ADVANTAGE_MODES] = _opt(
        "clamp", "clamp: A = max(A, 0), weights renormalised to mean 1 over the batch; raw: A as "
                 "is (may be negative); softmax: softmax(A / tau) scaled to mean 1; uniform: "
                 "every weight 1 (plain SFT on the kept set, the paper's Table 6 baseline).")
    tau: float = _opt(1.0, "Softmax temperature (mode = softmax); smaller = sharper.")
    eps: float = _opt(1e-6, "Added to the group std before dividing, so no group divides by 0.")

    def _check(self) -> None:
        self._positive("tau", "eps")


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Advantage-weighted fine-tuning of the denoiser (UNet or flow transformer)."""

    section: ClassVar[str] = "train"

    method: Literal[TRAIN_METHODS] = _opt(
        "craft", "craft: the kept set, each image's loss weighted by its group advantage (the "
                 "paper); sft: the same kept set, weight 1 (advantage.mode uniform, named as a "
                 "method); dpo: Diffusion-DPO on winner / loser pairs of each prompt's group "
                 "(section dpo; the kept-set filter does not apply); grpo: online group RL, "
                 "sampling new groups from the model being trained (section grpo).")
    steps: int = _opt(150, "Optimizer steps (grpo: sampling rounds, each grpo.updates steps).")
    lr: float = _opt(1e-4, "Peak learning rate (AdamW).")
    effective_batch: int = _opt(
        32, "Samples per optimizer step across all processes (micro_batch x processes x "
            "gradient accumulation).")
    micro_batch: int = _opt(16, "Samples per forward pass, per device.")
    weight_decay: float = _opt(1e-2, "AdamW weight decay.")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    timestep_weighting: Literal[TIMESTEP_WEIGHTINGS] = _opt(
        "uniform", "w(t). UNet models: plain loss on the model's target, the paper's ELBO weight, "
                   "or min-SNR(gamma). Flow models (sd3, flux): uniform (the SD3/FLUX recipes' "
                   "default), sigma_sqrt or cosmap (diffusers' compute_loss_weighting_for_sd3).")
    snr_gamma: float = _opt(5.0, "gamma for timestep_weighting = min_snr.")
    timestep_sampling: Literal[TIMESTEP_SAMPLING] = _opt(
        "logit_normal", "Flow models only: the density sigma is drawn from, as diffusers' SD3 / "
                        "FLUX scripts draw it (the model scheduler's shift applies on top). "
                        "UNet models always draw t uniformly from the training steps.")
    logit_mean: float = _opt(0.0, "Mean of the logit-normal density (timestep_sampling).")
    logit_std: float = _opt(1.0, "Std of the logit-normal density (timestep_sampling).")
    mode_scale: float = _opt(1.29, "Scale of the 'mode' density (timestep_sampling).")
    guidance_scale: float = _opt(
        3.5, "FLUX.1-dev only: the guidance value fed to its guidance-embedding input during "
             "training (diffusers' FLUX scripts: 3.5). Other models have no such input.")
    conditioning: Literal["original", "variant"] = _opt(
        "original", "Train on (original prompt, image) - what transfers variant quality to plain "
                    "prompts - or on the variant that generated the image.")
    cond_dropout: float = _opt(
        0.1, "Probability of replacing the prompt with the empty prompt (keeps CFG calibrated).")
    ema_decay: float = _opt(0.99, "EMA decay of the tuned weights per step; 0 disables EMA.")
    lora: bool = _opt(False, "Train LoRA adapters instead of all UNet parameters.")
    lora_rank: int = _opt(16, "LoRA rank (lora = true).")
    lora_alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha / rank.")
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = _opt(
        "auto", "Autocast precision; 'auto' = bf16 on CUDA GPUs that support it, else none.")
    use_8bit_adam: bool = _opt(False, "bitsandbytes 8-bit AdamW (CUDA only; saves memory).")
    checkpoint_every: int = _opt(50, "Save a resumable checkpoint every N steps; 0 = only at "
                                     "the end.")
    preview_every: int = _opt(25, "Render preview images every N steps; 0 disables previews.")
    preview_prompts: tuple[str, ...] = _opt(
        (), "Prompts for the fixed-seed previews; empty = the first few evaluation prompts.")
    seed: int = _opt(0, "Seed for timesteps, noise, dropout and data order.")
    lr_warmup_steps: int = _opt(0, "Linear learning-rate warm-up steps (constant afterwards).")
    rounds: int = _opt(
        1, "Online CRAFT: rounds of generate -> filter -> train. Round r > 1 generates new "
           "candidates (new noise) with the model round r-1 tuned, filters them against that "
           "model's own original-prompt images and trains on from it; train.steps is the total, "
           "split evenly over the rounds (must divide). 1 = the paper's offline CRAFT.")
    sharding: Literal["none", "fsdp"] = _opt(
        "none", "How training spreads over several processes: none = data parallel (each GPU "
                "holds the whole model); fsdp = full fine-tuning sharded with FSDP2 (each GPU "
                "holds 1/N of the float32 weights, gradients and AdamW state; craft/models/sharding.py). "
                "`accelerate launch --use_fsdp` turns it on too. `craft plan` says which fits.")
    save_merged: bool = _opt(
        False, "LoRA runs: also write final/ as a complete pipeline with the adapters merged "
               "(the size of the base model). Off: final/ holds the adapter file "
               "pytorch_lora_weights.safetensors, which pipe.load_lora_weights loads.")
    anchor_weight: float = _opt(
        0.0, "beta of a KL-style penalty beta * ||eps_tuned(x_t) - eps_base(x_t)||^2 on the same "
             "noisy inputs, which keeps the tuned model near the frozen base (DiffusionNFT / "
             "AWM); in units of the denoiser's loss (noise, or velocity for flow models); 0 = off "
             "(the plain CRAFT loss). One "
             "more base forward pass per micro-batch, no extra weights in memory.")
    report_to: str = _opt(
        "none", "Experiment trackers the training run logs to: none, tensorboard, wandb, or a "
                "comma-separated list (tensorboard,wandb). Their files go to "
                "RUN/train/NAME/trackers/; wandb runs offline unless WANDB_MODE says otherwise. "
                "Needs the tracker's package (pip install craft-studio[trackers]).")

    def _check(self) -> None:
        _require(all(n in TRACKERS for n in parse_report_to(self.report_to)),
                 self._key("report_to"),
                 self.report_to, f"names trackers other than none, {', '.join(TRACKERS)}",
                 "e.g. tensorboard, or tensorboard,wandb")
        self._positive("steps", "lr", "effective_batch", "micro_batch", "snr_gamma",
                       "lora_rank", "lora_alpha", "logit_std", "guidance_scale")
        self._positive("weight_decay", "max_grad_norm", "checkpoint_every", "preview_every",
                       "lr_warmup_steps", "seed", "anchor_weight", allow_zero=True)
        self._fraction("adam_beta1")
        self._fraction("adam_beta2")
        self._fraction("cond_dropout")
        self._fraction("ema_decay")
        _require(self.effective_batch % self.micro_batch == 0, self._key("effective_batch"),
                 self.effective_batch, f"must be a multiple of train.micro_batch "
                 f"({self.micro_batch}), the remainder would be dropped every step",
                 f"use {max(1, round(self.effective_batch / self.micro_batch)) * self.micro_batch}"
                 " or change train.micro_batch", self._key("micro_batch"))
        _require(not (self.sharding == "fsdp" and self.lora), self._key("sharding"),
                 self.sharding, "shards full fine-tuning; LoRA trains adapters on a frozen "
                 "model, whose weights stay whole on every GPU (that is why it fits)",
                 "set train.sharding=none, or train.lora=false to shard full fine-tuning",
                 self._key("lora"))
        self._positive("rounds")
        _require(self.steps % self.rounds == 0, self._key("rounds"), self.rounds,
                 f"must divide train.steps ({self.steps}): each round trains steps / rounds",
                 f"use rounds that divide {self.steps}, or change train.steps",
                 self._key("steps"))
        _require(self.rounds == 1 or self.method in ("craft", "sft"), self._key("rounds"),
                 self.rounds, f"online rounds regenerate and re-filter the pool; train.method="
                 f"{self.method!r} does not train on a filtered pool",
                 "use rounds 1 (grpo is online by itself)", self._key("method"))
        _require(self.anchor_weight == 0 or self.method in ("craft", "sft"),
                 self._key("anchor_weight"), self.anchor_weight,
                 f"applies to the craft / sft losses; train.method={self.method!r} has its own "
                 "tie to the base", "set it to 0 and use dpo.beta or grpo.kl_weight",
                 self._key("method"))
        _require(self.lr_warmup_steps <= self.steps, self._key("lr_warmup_steps"),
                 self.lr_warmup_steps, f"must not exceed train.steps ({self.steps})",
                 "shorten the warm-up", self._key("steps"))


@dataclass(frozen=True)
class DPOConfig(_Section):
    """Diffusion-DPO (Wallace et al. 2023) on pairs from the pool (train.method = dpo)."""

    section: ClassVar[str] = "dpo"

    pairs: Literal[PAIR_RULES] = _opt(
        "best_worst", "How pairs are drawn from each original prompt's group, winner = higher "
                      "composite (filter.weights, filter.normalization): best_worst = the best "
                      "against the worst of every group; above_margin = every pair whose "
                      "composite differs by more than dpo.margin.")
    margin: float = _opt(0.0, "A pair's winner must beat its loser by more than this, in "
                              "composite units (normalised rewards: group z-scores by default).")
    max_pairs: int | None = _opt(
        None, "Use at most this many pairs, the widest composite gaps first; null = all.")
    beta: float = _opt(
        2000.0, "beta of the DPO loss -log sigmoid(-beta/2 * (err_w - ref_w - err_l + ref_l)), "
                "in units of the denoiser's per-pixel squared error (noise, or velocity for flow "
                "models). The paper uses 5000 for SD1.5 / SDXL; benchmarks/toy_methods.md "
                "sweeps it for the toy world.")

    def _check(self) -> None:
        self._positive("beta", "max_pairs")
        self._positive("margin", allow_zero=True)


@dataclass(frozen=True)
class GRPOConfig(_Section):
    """Online group RL with the same rewards (train.method = grpo): DDPO / Flow-GRPO."""

    section: ClassVar[str] = "grpo"

    prompts_per_step: int = _opt(
        4, "Training prompts sampled per round, across all processes (must divide by them).")
    group_size: int = _opt(8, "Images sampled per prompt each round: the group advantages are "
                              "taken over (reward - group mean) / group std.")
    num_inference_steps: int = _opt(
        10, "Sampler steps of each trajectory (each one is a policy action with a log-prob).")
    eta: float = _opt(1.0, "UNet models: DDIM's eta (> 0: a stochastic step with a "
                           "log-prob; 1 = DDPM variance), as ddpo-pytorch.")
    noise_level: float = _opt(
        0.7, "Flow models: the SDE sampler's noise level a (sigma_t = a * sqrt(t / (1 - t))), "
             "as Flow-GRPO.")
    clip_range: float = _opt(
        1e-4, "PPO clip of the ratio pi_theta / pi_old around 1; matters from the second update "
              "on a round's samples. ddpo-pytorch and flow_grpo use 1e-4 (flow_grpo's video "
              "configs 1e-3); 0.2 (LLM PPO) clips nothing after a diffusion update.")
    kl_weight: float = _opt(
        0.0, "Flow-GRPO's beta: weight of the KL to the frozen base, per step the mean over the "
             "latent of ||mu_theta - mu_base||^2 / (2 s^2), s the flow SDE's noise scale "
             "a * sqrt(sigma / (1 - sigma)) without sqrt(|dt|) as flow_grpo writes it, or DDIM's "
             "step std (the exact Gaussian KL). flow_grpo uses 0.01-0.04; 0 = off.")
    updates: int = _opt(2, "Optimizer steps per round (the ratio departs from 1 after the "
                           "first). With grpo.reuse = split each is one minibatch of the round.")
    reuse: Literal[GRPO_REUSE] = _opt(
        "split", "How a round's trajectories feed its updates: split = shuffled into "
                 "grpo.updates disjoint minibatches, each trajectory used once per round "
                 "(ddpo-pytorch, flow_grpo); whole = every update on the whole round.")
    timestep_fraction: float = _opt(
        0.9, "Fraction of each trajectory's sampler steps trained on per update "
             "(round(steps x fraction), at least 1).")
    step_selection: Literal[GRPO_STEP_SELECTION] = _opt(
        "first", "Which steps are trained: first = the first ones in sampling order, leaving "
                 "out the last low-noise steps (flow_grpo trains 9 of 10, DanceGRPO drops the "
                 "last ones); random = a random subset per sample and update (ddpo-pytorch).")
    adv_clip: float = _opt(5.0, "Clip advantages to [-adv_clip, adv_clip].")
    store_every: int = _opt(
        1, "Store the sampled images (as candidates of the training run) every N rounds; 0 = "
           "never.")

    def _check(self) -> None:
        self._positive("prompts_per_step", "num_inference_steps", "eta", "noise_level",
                       "clip_range", "updates", "timestep_fraction", "adv_clip")
        self._positive("kl_weight", "store_every", allow_zero=True)
        _require(self.group_size >= 2, self._key("group_size"), self.group_size,
                 "must be >= 2: an advantage compares an image with its group",
                 "sample at least 2 images per prompt")
        _require(self.timestep_fraction <= 1, self._key("timestep_fraction"),
                 self.timestep_fraction, "must lie in (0, 1]", "use 1.0 for every step")


@dataclass(frozen=True)
class EvalConfig(_Section):
    """Base-vs-tuned evaluation on held-out prompts with shared seeds."""

    section: ClassVar[str] = "eval"

    num_prompts: int | None = _opt(64, "Held-out prompts to evaluate; null = all of them.")
    seeds_per_prompt: int = _opt(4, "Seeds per prompt; base and tuned use the same seeds.")
    num_inference_steps: int = _opt(20, "Denoising steps per evaluation image.")
    guidance_scale: float = _opt(3.0, "Classifier-free guidance scale for evaluation images.")
    batch_size: int = _opt(16, "Images per pipeline call, per device.")
    diversity_encoder: Literal[DIVERSITY_ENCODERS] = _opt(
        "pixels", "Diversity across seeds (mean pairwise distance of one prompt's images): "
                  "pixels = RMS pixel difference, 0-255 (no weights; the toy world); dinov2 = "
                  "1 - cosine of self-supervised DINOv2 embeddings (real models); clip = 1 - "
                  "cosine of CLIP image embeddings; none = not measured.")
    diversity_model: str | None = _opt(
        None, "For diversity_encoder dinov2 / clip: a transformers folder or a hub id in the "
              "local cache; null = facebook/dinov2-base (dinov2) or "
              "openai/clip-vit-large-patch14 (clip).")
    drift_se: float = _opt(
        2.0, "Warn when a held-out reward or the diversity falls by more than this many "
             "standard errors (paired) while a training reward rises by as many.")

    def _check(self) -> None:
        self._positive("num_prompts", "seeds_per_prompt", "num_inference_steps", "batch_size",
                       "drift_se")
        self._positive("guidance_scale", allow_zero=True)


@dataclass(frozen=True)
class EmbedConfig(_Section):
    """Image embeddings of the pool: the studio's map, "more like this", near-duplicates."""

    section: ClassVar[str] = "embed"

    encoder: Literal[EMBED_ENCODERS] = _opt(
        "pixels", "pixels: 16x16 RGB of the image (no weights; enough for the toy world); clip: "
                  "the projected image embedding of a CLIP vision tower (embed.encoder_model).")
    encoder_model: str | None = _opt(
        None, "For encoder = clip: a transformers CLIP folder or a hub id in the local cache; "
              "null = openai/clip-vit-large-patch14 (the one AES uses).")
    batch_size: int = _opt(64, "Images per encoder forward pass.")
    duplicate_threshold: float = _opt(
        0.98, "Cosine similarity at or above which two kept images count as near-duplicates.")

    def _check(self) -> None:
        self._positive("batch_size")
        _require(-1.0 <= self.duplicate_threshold <= 1.0, self._key("duplicate_threshold"),
                 self.duplicate_threshold, "must lie in [-1, 1] (a cosine similarity)",
                 "use e.g. 0.98")


SECTIONS: dict[str, type[_Section]] = {
    cls.section: cls
    for cls in (ModelConfig, PromptsConfig, GenerationConfig, RewardsConfig, FilterConfig,
                AdvantageConfig, TrainConfig, DPOConfig, GRPOConfig, EvalConfig, EmbedConfig)
}


def _sub(cls: type[_Section], help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass(frozen=True)
class CraftConfig:
    """The whole pipeline's settings; YAML top-level keys are the section names."""

    model: ModelConfig = _sub(ModelConfig, "Base diffusion model.")
    prompts: PromptsConfig = _sub(PromptsConfig, "Prompt sets and variant expansion.")
    generation: GenerationConfig = _sub(GenerationConfig, "Candidate generation.")
    rewards: RewardsConfig = _sub(RewardsConfig, "Reward models and their CRF roles.")
    filter: FilterConfig = _sub(FilterConfig, "Composite Reward Filtering.")
    advantage: AdvantageConfig = _sub(AdvantageConfig, "Group-advantage loss weights.")
    train: TrainConfig = _sub(TrainConfig, "Advantage-weighted fine-tuning.")
    dpo: DPOConfig = _sub(DPOConfig, "Diffusion-DPO baseline (train.method = dpo).")
    grpo: GRPOConfig = _sub(GRPOConfig, "Online GRPO baseline (train.method = grpo).")
    eval: EvalConfig = _sub(EvalConfig, "Base-vs-tuned evaluation.")
    embed: EmbedConfig = _sub(EmbedConfig, "Image embeddings for the studio's map.")

    def __post_init__(self) -> None:
        for f in fields(self):
            _require(isinstance(getattr(self, f.name), SECTIONS[f.name]), f.name,
                     getattr(self, f.name), f"must be a {SECTIONS[f.name].__name__}",
                     f"pass {SECTIONS[f.name].__name__}(...)")
        names = self.rewards.names
        for reward in self.filter.weights:
            _require(reward in names, "filter.weights", self.filter.weights,
                     f"{reward!r} is not in rewards.names {list(names)}",
                     f"add {reward!r} to rewards.names or drop its weight", "rewards.names")
        for reward in self.filter.require:
            _require(reward in names, "filter.require", list(self.filter.require),
                     f"{reward!r} is not in rewards.names {list(names)}",
                     f"add {reward!r} to rewards.names or remove it from filter.require",
                     "rewards.names")
        missing = [r for r in LEVEL_ROLES.get(self.filter.level, ()) if r not in self.rewards.roles]
        _require(not missing, "filter.level", self.filter.level,
                 f"needs rewards.roles for {missing} (it compares roles "
                 f"{list(LEVEL_ROLES.get(self.filter.level, ()))})",
                 "map those roles to rewards in rewards.roles, or use level 'custom' with "
                 "filter.require", "rewards.roles")
        cpu = self.model.device == "cpu"
        _require(not (cpu and self.train.mixed_precision == "fp16"), "train.mixed_precision",
                 self.train.mixed_precision, "fp16 autocast needs CUDA and model.device is 'cpu'",
                 "use 'no' or 'auto'", "model.device")
        _require(not (cpu and self.train.use_8bit_adam), "train.use_8bit_adam", True,
                 "8-bit AdamW needs CUDA and model.device is 'cpu'", "set it to false",
                 "model.device")


# --------------------------------------------------------------------------------------------
# Introspection for front ends.


def field_help(section: str, name: str) -> str:
    """The help text of ``section.name`` (for tooltips and ``--help`` output)."""
    return _section_fields(section, name, "<code>")[name].metadata["help"]


def field_choices(section: str, name: str) -> tuple | None:
    """The allowed values of a choice field (for dropdowns), or None for free-form fields."""
    _section_fields(section, name, "<code>")
    return _literal_choices(_hints(SECTIONS[section])[name])


def _section_fields(section: str, name: str, source: str) -> dict[str, dataclasses.Field]:
    if section not in SECTIONS:
        raise ConfigError(_unknown_message(section, list(SECTIONS), "section", source),
                          keys=(section,))
    known = {f.name: f for f in fields(SECTIONS[section])}
    if name not in known:
        raise ConfigError(
            _unknown_message(name, list(known), f"key in section {section!r}", source,
                             full=f"{section}.{name}"),
            keys=(f"{section}.{name}",))
    return known


def _unknown_message(name: str, allowed: list[str], what: str, source: str,
                     full: str | None = None) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return (f"unknown {what}: {full or name!r} (from {source}){guess} "
            f"allowed: {', '.join(allowed)}")


# --------------------------------------------------------------------------------------------
# Loading and saving.


def resolve_path(value: str | Path) -> Path | None:
    """Find a config path on disk: as given if absolute, else in the working directory, else in
    the project root. Returns None when nothing exists (the value may be a hub id)."""
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]
    return next((p for p in candidates if p.exists()), None)


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; pass an existing YAML file "
                          f"(the toy default is {DEFAULT_CONFIG_PATH})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    return {} if data is None else data


class _Layers:
    """Raw values merged from successive sources, remembering where each value came from."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}
        self.origin: dict[str, str] = {}

    def add_mapping(self, data: Any, source: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping of sections "
                              f"({', '.join(SECTIONS)}), got {type(data).__name__}")
        for section, body in data.items():
            if body is None:
                continue
            if not isinstance(section, str) or section not in SECTIONS:
                raise ConfigError(_unknown_message(str(section), list(SECTIONS), "section",
                                                   source), keys=(str(section),))
            if not isinstance(body, Mapping):
                raise ConfigError(f"{section}: expected a mapping of keys, got "
                                  f"{type(body).__name__} {body!r} (from {source})",
                                  keys=(section,))
            for name, value in body.items():
                self.set(section, str(name), value, source)

    def set(self, section: str, name: str, value: Any, source: str) -> None:
        _section_fields(section, name, source)
        self.values.setdefault(section, {})[name] = value
        self.origin[f"{section}.{name}"] = source

    def add_override(self, text: str) -> None:
        source = f"--set {text}"
        key, sep, raw = text.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"bad override {text!r}: expected section.key=value, e.g. "
                              f"train.lr=1e-4 or filter.weights.toy_fidelity=0.5")
        section, name = parts[0], parts[1]
        _section_fields(section, name, source)
        hint = _hints(SECTIONS[section])[name]
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"bad value in {source}: {' '.join(str(e).split())}; quote "
                              f"strings with YAML syntax, e.g. \"key='a: b'\"") from None
        if len(parts) == 3:  # one entry of a mapping field, merged into the current mapping
            if typing.get_origin(hint) is not dict:
                raise ConfigError(f"{section}.{name} is not a mapping, so {key!r} cannot set an "
                                  f"entry in it (from {source}); use {section}.{name}=VALUE")
            current = self.values.get(section, {}).get(name)
            if current is None:
                current = getattr(SECTIONS[section](), name)
            value = {**current, parts[2]: value}
        elif _text_field(hint) and value is not None and not isinstance(value, str):
            value = raw.strip()  # `model.variant=16` means the string "16"
        self.set(section, name, value, source)

    def build(self) -> CraftConfig:
        try:
            sections = {name: cls(**self.values.get(name, {})) for name, cls in SECTIONS.items()}
            return CraftConfig(**sections)
        except ConfigError as e:
            sources = sorted({self.origin[k] for k in e.keys if k in self.origin})
            where = f" (from {', '.join(sources)})" if sources else " (from the defaults)"
            raise ConfigError(f"{e}{where}", keys=e.keys) from None


def _text_field(hint: Any) -> bool:
    """Whether a field takes text, so a --set value YAML reads as a number or bool stays text."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_text_field(a) for a in typing.get_args(hint))
    choices = _literal_choices(hint)
    return hint is str or bool(choices) and all(isinstance(c, str) for c in choices)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CraftConfig:
    """Load a config: dataclass defaults, then the YAML file, then ``--set`` overrides.

    ``path=None`` loads ``configs/toy.yaml`` (the CPU-friendly default world). Each override is
    ``section.key=value`` with the value parsed as YAML (``rewards.names=[a, b]``,
    ``model.revision=null``); ``section.key.entry=value`` sets one entry of a mapping field.
    """
    layers = _Layers()
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    layers.add_mapping(_read_yaml(file), str(file))
    for text in overrides:
        layers.add_override(text)
    return layers.build()


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> CraftConfig:
    """Build a config from a nested mapping (e.g. the studio's form), over dataclass defaults."""
    layers = _Layers()
    layers.add_mapping(data, source)
    return layers.build()


def config_to_dict(cfg: CraftConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples as lists) that :func:`config_from_dict` turns back into ``cfg``."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {f.name: {g.name: plain(getattr(getattr(cfg, f.name), g.name))
                     for g in fields(getattr(cfg, f.name))}
            for f in fields(cfg)}


def config_to_yaml(cfg: CraftConfig) -> str:
    """Every field, in declaration order; ``load_config`` of the text gives back ``cfg``.

    Non-ASCII is written escaped (``allow_unicode=False``): written raw, YAML folds Unicode line
    breaks such as U+0085 or U+2028 inside a prompt into spaces, and the round trip is lost.
    """
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=False,
                          default_flow_style=False, width=100)


def save_config(cfg: CraftConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (creating parent folders) and return the path."""
    from craft.run.fsutil import write_text_atomic

    return write_text_atomic(path, config_to_yaml(cfg))


__all__ = [
    "AdvantageConfig", "ConfigError", "CraftConfig", "DEFAULT_CONFIG_PATH", "EmbedConfig",
    "EvalConfig",
    "FilterConfig", "GenerationConfig", "LEVEL_ROLES", "ModelConfig", "PROJECT_ROOT",
    "PromptsConfig", "RewardsConfig", "SECTIONS", "TrainConfig", "config_from_dict",
    "config_to_dict", "config_to_yaml", "field_choices", "field_help", "load_config",
    "resolve_path", "save_config",
]
