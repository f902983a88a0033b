"""Expand each original prompt into V more descriptive variants (CRAFT stage 1).

Variants are used only to *generate* candidates: every candidate is scored and trained against
its original prompt (craft/stages/scoring.py). The point of a variant is to steer the base model
toward a better image for the same intent, so a good variant keeps every object, colour and
relation of the original and adds detail (size, lighting, composition, texture, style).

An expander is any callable ``expand(prompts, num_variants, seed) -> list[list[str]]`` returning
``num_variants`` variants per prompt, in prompt order. Built-in expanders also offer
``expand_with_provenance`` which returns, beside each variant, where it came from, because the
LLM expanders fill in with templates wherever the model's answer was unusable, and a user should
be able to see (and filter on) how much of a run really came from the LLM.

Built-in expanders, by name (:func:`make_expander`):

- ``template``: offline and deterministic. A prompt that a registered template rewriter claims
  (:func:`register_template_rewriter`; the toy world registers one for its grammar, with the
  rich words its base model was trained to bind) gets that rewriter's variants. Any other
  prompt gets the original followed by a few
  generic descriptive phrases (lighting, composition, detail, style) drawn from fixed lists by
  the seed. That is a *weak stand-in* for an LLM rewrite: it never adds content specific to the
  prompt (a corgi's fur, a lighthouse's beam), so expect smaller gains on real prompts than the
  paper's Qwen-Plus rewrites give. Use ``llm_local`` or ``llm_http`` for real runs.
- ``llm_local``: a transformers causal LM loaded from a local folder only (no hub access).
- ``llm_http``: an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp server,
  Ollama, a hosted API); the API key is read from ``CRAFT_LLM_API_KEY`` when set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from craft import CraftError
from craft.rewards.http import HTTPFailure, request_bytes

log = logging.getLogger(__name__)

FALLBACK = "template-fallback"
API_KEY_ENV = "CRAFT_LLM_API_KEY"
MAX_VARIANT_CHARS = 500  # the prompt loader's default limit: a variant is held to the same rule


class ExpansionError(CraftError, ValueError):
    """An expander that cannot be built or that failed in a way a user has to fix."""


@runtime_checkable
class Expander(Protocol):
    """Writes ``num_variants`` variants of each prompt; deterministic for a given ``seed``."""

    def __call__(self, prompts: list[str], num_variants: int, seed: int) -> list[list[str]]: ...


ProgressFn = Callable[[int, int], None]  # (prompts done, prompts total)


# --------------------------------------------------------------------------------------------
# Template expansion (the offline default).

# Generic descriptive phrases for non-toy prompts, one list per aspect a rewrite usually adds.
GENERIC_PHRASES: dict[str, tuple[str, ...]] = {
    "lighting": ("soft natural lighting", "warm golden hour light", "dramatic cinematic lighting",
                 "soft diffused studio lighting", "gentle morning light", "volumetric light rays",
                 "rim lighting"),
    "composition": ("centered composition", "rule of thirds composition",
                    "shallow depth of field", "wide angle view", "balanced symmetrical framing",
                    "close-up view", "clean uncluttered background"),
    "detail": ("highly detailed", "intricate fine details", "sharp focus", "crisp textures",
               "rich vivid colors", "high resolution", "realistic textures"),
    "style": ("professional photography", "award-winning photograph", "digital painting",
              "concept art", "masterpiece, trending on artstation", "cinematic still",
              "beautiful illustration"),
}
ASPECTS: tuple[str, ...] = tuple(GENERIC_PHRASES)
# Words that mean the prompt already fixes its medium: a style phrase would contradict it.
_MEDIUM_WORDS = re.compile(
    r"\b(painting|painted|photo|photograph|photography|illustration|sketch|drawing|drawn|"
    r"watercolou?r|oil|render|rendered|3d|pixel|anime|cartoon|print|poster|ukiyo-e|"
    r"stained glass|diorama|mosaic|style)\b", re.IGNORECASE)
# Words that already set the light or time of day: "morning light" on "at night" would contradict.
_LIGHT_WORDS = re.compile(
    r"\b(night|sunset|sunrise|dawn|dusk|twilight|moonlit|moonlight|neon|storm|stormy|"
    r"light|lights|lighting|lit|glowing|dark|darkness|candle|candlelight)\b", re.IGNORECASE)


def _rng(seed: int, *parts: Any) -> random.Random:
    """A generator that depends only on the seed and ``parts`` (never on batching or order)."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


# Template rewriters for prompts of a known grammar: (name, claims(prompt), variants(prompt, n,
# seed)). The first one that claims a prompt rewrites it; plugins add theirs.
_REWRITERS: list[tuple[str, Callable[[str], bool], Callable[..., list[str]]]] = []


def register_template_rewriter(name: str, claims: Callable[[str], bool],
                               variants: Callable[..., list[str]]) -> None:
    """Rewrite the prompts ``claims(prompt)`` accepts with ``variants(prompt, n, seed)`` in the
    ``template`` expander (registering a name again replaces it)."""
    _REWRITERS[:] = [r for r in _REWRITERS if r[0] != name]
    _REWRITERS.append((name, claims, variants))


def generic_template_variants(prompt: str, num_variants: int, seed: int = 0) -> list[str]:
    """``prompt`` plus generic descriptive phrases; deterministic in (prompt, seed).

    The first variant adds one phrase of every aspect (as the toy templates' first variant names
    every favourable attribute); the others add random subsets of at least two aspects, so the
    variants differ from one another. A phrase the prompt already contains is not repeated,
    no style is added to a prompt that names its medium ("an oil painting of ...") and no
    lighting to one that sets its light or time of day ("at night").
    """
    base = prompt.strip().rstrip(".,;")
    lower = base.lower()
    clash = {"style": _MEDIUM_WORDS, "lighting": _LIGHT_WORDS}
    aspects = [a for a in ASPECTS if not (a in clash and clash[a].search(base))]
    rng = _rng(seed, prompt)
    variants: list[str] = []
    seen = {base.casefold()}
    for i in range(num_variants):
        for _attempt in range(20):  # distinct where the phrase lists allow it
            if i == 0 or len(aspects) < 2:
                chosen = list(aspects)
            else:
                chosen = sorted(rng.sample(aspects, rng.randint(2, len(aspects))),
                                key=ASPECTS.index)
            phrases = []
            for aspect in chosen:
                options = [p for p in GENERIC_PHRASES[aspect] if p.lower() not in lower]
                if options:
                    phrases.append(rng.choice(options))
            text = ", ".join([base, *phrases])
            if text.casefold() not in seen:
                break
        seen.add(text.casefold())
        variants.append(text)
    return variants


def template_variants(prompt: str, num_variants: int, seed: int = 0) -> list[str]:
    """A registered rewriter's variants for the prompts it claims (toy prompts: the toy
    grammar's), generic phrase templates for anything else."""
    from craft.plugins import load_plugins

    load_plugins()
    for _name, claims, variants in _REWRITERS:
        if claims(prompt):
            return variants(prompt, num_variants, seed)
    return generic_template_variants(prompt, num_variants, seed)


class TemplateExpander:
    """The offline default expander (see the module docstring for what it can and cannot do)."""

    name = "template"

    def __call__(self, prompts: list[str], num_variants: int, seed: int) -> list[list[str]]:
        return [template_variants(p, num_variants, seed) for p in prompts]

    def expand_with_provenance(self, prompts: list[str], num_variants: int, seed: int
                               ) -> list[list[tuple[str, str]]]:
        return [[(v, self.name) for v in vs] for vs in self(prompts, num_variants, seed)]


# --------------------------------------------------------------------------------------------
# What the LLM expanders share: the instruction, the parsing, the template fill-in.

SYSTEM_PROMPT = (
    "You rewrite prompts for a text-to-image model. Given a short prompt, write {n} richer, "
    "more descriptive versions of it. Keep every object, colour, count and spatial relation of "
    "the original and contradict none of them; add concrete visual detail such as size, "
    "position, lighting, composition, texture and style. Answer with exactly {n} numbered "
    "lines ('1. ...'), one rewrite per line, and nothing else.")
USER_PROMPT = "Prompt: {prompt}"

_ITEM_RE = re.compile(r"^\s*(?:\(?\d{1,2}\s*[.):\]]|[-*\u2022])\s*(?P<text>.+?)\s*$")


def build_messages(prompt: str, num_variants: int) -> list[dict[str, str]]:
    """The chat messages asking for ``num_variants`` rewrites of ``prompt``."""
    return [{"role": "system", "content": SYSTEM_PROMPT.format(n=num_variants)},
            {"role": "user", "content": USER_PROMPT.format(prompt=prompt)}]


def parse_variant_lines(text: str, original: str = "", limit: int | None = None,
                        max_chars: int = MAX_VARIANT_CHARS) -> list[str]:
    """The usable rewrites in an LLM answer: numbered (``1.``, ``2)``) or bulleted lines.

    Preambles ("Here are four rewrites:") are not numbered and so are ignored. A line is unusable
    when it has no letters, is longer than ``max_chars``, repeats the original or an earlier
    line (case-insensitive): none of those would give the group a new image to learn from.
    """
    found: list[str] = []
    seen = {" ".join(original.split()).casefold()} if original else set()
    for line in text.splitlines():
        m = _ITEM_RE.match(line)
        if not m:
            continue
        item = m.group("text").strip()
        item = re.sub(r"^\*\*(.+)\*\*$", r"\1", item)  # markdown bold around the whole item
        item = " ".join(item.strip("\"'\u201c\u201d` ").split())
        if not re.search(r"[^\W\d_]", item) or len(item) > max_chars:
            continue
        if item.casefold() in seen:
            continue
        seen.add(item.casefold())
        found.append(item)
        if limit is not None and len(found) >= limit:
            break
    return found


def fill_with_templates(prompt: str, found: Sequence[str], num_variants: int, seed: int,
                        source: str) -> list[tuple[str, str]]:
    """``found`` LLM variants (tagged ``source``), topped up to V with template variants.

    Filling only the missing slots keeps every usable LLM line; the template lines are tagged
    :data:`FALLBACK` so the store and the studio can tell them apart.
    """
    out = [(v, source) for v in found[:num_variants]]
    missing = num_variants - len(out)
    if missing > 0:
        have = {v.casefold() for v, _ in out}
        pool = template_variants(prompt, num_variants + missing, seed)
        extra = [v for v in pool if v.casefold() not in have] or pool
        while len(extra) < missing:
            extra += extra
        out += [(v, FALLBACK) for v in extra[:missing]]
    return out


def _derived_seed(seed: int, *parts: Any) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


class _LLMExpander:
    """The plain-callable view of an expander that records provenance."""

    name = "llm"

    def __call__(self, prompts: list[str], num_variants: int, seed: int) -> list[list[str]]:
        return [[v for v, _ in row] for row in
                self.expand_with_provenance(prompts, num_variants, seed)]

    def expand_with_provenance(self, prompts: list[str], num_variants: int, seed: int
                               ) -> list[list[tuple[str, str]]]:
        answers = self.generate_answers(prompts, num_variants, seed)
        rows = []
        for prompt, answer in zip(prompts, answers):
            found = parse_variant_lines(answer, prompt, num_variants)
            rows.append(fill_with_templates(prompt, found, num_variants, seed, self.name))
            if len(found) < num_variants:
                log.debug("%s: %d of %d variants usable for %r; filled with templates",
                          self.name, len(found), num_variants, prompt)
        return rows

    def generate_answers(self, prompts: list[str], num_variants: int, seed: int) -> list[str]:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# llm_local: a transformers causal LM from a local folder.


class LocalLLMExpander(_LLMExpander):
    """Rewrites with a local transformers causal LM (e.g. a Qwen2.5-Instruct folder).

    The model is loaded once, here, with ``local_files_only=True``: this path never reaches a
    hub. Sampling is seeded from (seed, batch) and runs under a forked RNG, so a run is
    reproducible for the same prompts, seed and ``batch_size`` and leaves the caller's global RNG
    untouched. ``max_new_tokens`` is the budget per variant; an answer gets V times that.
    """

    name = "llm_local"

    def __init__(self, model_path: str | Path, *, device: str = "cpu", dtype: str = "auto",
                 max_new_tokens: int = 96, temperature: float = 0.8, top_p: float = 0.95,
                 batch_size: int = 8, max_input_tokens: int = 1024):
        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise ExpansionError(
                f"expander_model={str(model_path)!r}: the local LLM folder {what}; download a "
                f"model on a machine with hub access (e.g. `huggingface-cli download "
                f"Qwen/Qwen2.5-1.5B-Instruct --local-dir {path}`), copy the folder here and pass "
                f"its path, or use expander 'template'")
        for arg, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                           ("max_input_tokens", max_input_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ExpansionError(f"{arg}={value!r} must be an integer >= 1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from craft.run.devices import resolve_device, resolve_dtype

        self.device = resolve_device(device, key="expander device")
        # LLMs are trained in bfloat16: "auto" means bf16 on CUDA here, not the float16 that
        # craft.run.devices picks for diffusion models.
        torch_dtype = (torch.bfloat16 if dtype == "auto" and self.device.type == "cuda"
                       else resolve_dtype(dtype, self.device, key="expander dtype"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=torch_dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise ExpansionError(
                f"expander_model={str(path)!r}: could not load a causal LM and its tokenizer "
                f"from this folder ({' '.join(str(e).split())[:300]}); it needs config.json, "
                f"the weights and the tokenizer files saved by save_pretrained") from None
        self.tokenizer.padding_side = "left"  # decoder-only batches must end at the prompt
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model_path = path
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = batch_size
        self.max_input_tokens = max_input_tokens

    @property
    def uses_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def instruction(self, prompt: str, num_variants: int) -> str:
        """The model input: its chat template when it has one, a plain instruction otherwise."""
        messages = build_messages(prompt, num_variants)
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        return f"{messages[0]['content']}\n\n{messages[1]['content']}\nRewrites:\n"

    def generate_answers(self, prompts: list[str], num_variants: int, seed: int) -> list[str]:
        import torch

        answers: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            # A chat template already writes the special tokens (BOS); adding them again would
            # give the model an input it never saw in training.
            enc = self.tokenizer([self.instruction(p, num_variants) for p in batch],
                                 return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_input_tokens,
                                 add_special_tokens=not self.uses_chat_template).to(self.device)
            devices = ([self.device.index if self.device.index is not None
                        else torch.cuda.current_device()] if self.device.type == "cuda" else [])
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(_derived_seed(seed, *batch))
                out = self.model.generate(
                    **enc, do_sample=True, temperature=self.temperature, top_p=self.top_p,
                    max_new_tokens=self.max_new_tokens * num_variants,
                    pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            answers += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return answers


# --------------------------------------------------------------------------------------------
# llm_http: an OpenAI-compatible chat-completions endpoint.


def chat_completions_url(url: str) -> str:
    """The full endpoint for a base URL: ``http://h:8000`` and ``http://h:8000/v1`` both work."""
    url = url.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if re.search(r"/v\d+$", url):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def _failure_text(f: HTTPFailure) -> str:
    return f"HTTP {f.code} {f.detail}".strip() if f.kind == "status" else f.detail


class HTTPExpander(_LLMExpander):
    """Rewrites through an OpenAI-compatible ``/v1/chat/completions`` endpoint (stdlib only).

    One request per prompt, ``max_workers`` at a time. Connection errors, timeouts, 429 and 5xx
    answers are retried ``max_retries`` times with exponential backoff (servers restart and
    throttle); other 4xx answers are a configuration problem and fail at once. The request
    carries a seed derived from (seed, prompt), which servers that support it use to make the
    answer reproducible.
    """

    name = "llm_http"

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0,
                 max_tokens: int = 96, temperature: float = 0.8, max_workers: int = 4):
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url.strip()):
            raise ExpansionError(f"expander_url={url!r} is not an http(s) URL; give the "
                                 f"endpoint's base URL, e.g. http://127.0.0.1:8000/v1")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ExpansionError(f"max_retries={max_retries!r} must be an integer >= 0")
        self.url = chat_completions_url(url)
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.max_workers = max(1, max_workers)

    def request_body(self, prompt: str, num_variants: int, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": build_messages(prompt, num_variants),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens * num_variants,
            "seed": _derived_seed(seed, prompt),
        }
        if self.model:
            body["model"] = self.model
        return body

    def generate_answers(self, prompts: list[str], num_variants: int, seed: int) -> list[str]:
        if len(prompts) <= 1 or self.max_workers == 1:
            return [self._ask(p, num_variants, seed) for p in prompts]
        with ThreadPoolExecutor(min(self.max_workers, len(prompts))) as pool:
            return list(pool.map(lambda p: self._ask(p, num_variants, seed), prompts))

    def _ask(self, prompt: str, num_variants: int, seed: int) -> str:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        attempts = self.max_retries + 1

        def warn(attempt: int, failure: HTTPFailure) -> None:
            log.warning("llm_http: %s: %s (attempt %d of %d)", self.url, _failure_text(failure),
                        attempt, attempts)

        try:
            payload = request_bytes(
                self.url, self.request_body(prompt, num_variants, seed), headers=headers,
                timeout_s=self.timeout, retries=self.max_retries,
                pause_s=lambda n: min(self.backoff * 2 ** (n - 1), 30.0), on_retry=warn)
        except HTTPFailure as f:
            if not f.retryable:
                fix = (f"set {API_KEY_ENV} to a valid API key" if f.code in (401, 403) else
                       "check expander_url and expander_api_model")
                raise ExpansionError(f"llm_http: POST {self.url} answered {_failure_text(f)}; "
                                     f"{fix}") from None
            raise ExpansionError(
                f"llm_http: POST {self.url} failed after {f.attempts} attempts (last: "
                f"{_failure_text(f)}); check that the server is running and expander_url is "
                f"right, or use expander 'template'") from None
        return self._content(payload)

    def _content(self, payload: bytes) -> str:
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = " ".join(payload[:200].decode("utf-8", "replace").split())
            raise ExpansionError(
                f"llm_http: {self.url} did not answer in the chat-completions format "
                f"(choices[0].message.content) but {snippet!r}; point expander_url at an "
                f"OpenAI-compatible /v1 endpoint") from None
        return content if isinstance(content, str) else ""


# --------------------------------------------------------------------------------------------
# Registry and the stage function.

EXPANDERS: dict[str, Callable[..., Expander]] = {
    "template": TemplateExpander,
    "llm_local": LocalLLMExpander,
    "llm_http": HTTPExpander,
}


def register_expander(name: str, factory: Callable[..., Expander]) -> None:
    """Make ``factory(**options)`` available to :func:`make_expander` under ``name``."""
    EXPANDERS[name] = factory


def make_expander(name: str, **options: Any) -> Expander:
    """Build the expander registered as ``name`` with ``options`` (its factory's arguments)."""
    if name not in EXPANDERS:
        raise ExpansionError(f"expander {name!r} is unknown; known expanders: "
                             f"{sorted(EXPANDERS)} (register_expander adds one)")
    factory = EXPANDERS[name]
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as e:
        raise ExpansionError(f"expander {name!r}: {e}; pass its options to make_expander, or "
                             f"build it from a config with expander_from_config") from None
    except ValueError:  # no introspectable signature: let the call itself complain
        pass
    return factory(**options)


def expander_from_config(cfg: Any, device: str = "cpu") -> Expander:
    """The expander a :class:`craft.run.config.PromptsConfig` describes (device: for llm_local)."""
    if cfg.expander == "llm_local":
        return make_expander("llm_local", model_path=cfg.expander_model, device=device,
                             max_new_tokens=cfg.expander_max_new_tokens)
    if cfg.expander == "llm_http":
        return make_expander("llm_http", url=cfg.expander_url, model=cfg.expander_api_model,
                             max_tokens=cfg.expander_max_new_tokens)
    return make_expander(cfg.expander)


@dataclasses.dataclass(frozen=True)
class Expansion:
    """The variants of each prompt and where each came from (an expander name or FALLBACK)."""

    prompts: list[str]
    variants: list[list[str]]
    provenance: list[list[str]]
    expander: str

    def rows(self, index: int) -> list[tuple[int, str, str]]:
        """``(idx, text, provenance)`` of prompt ``index``'s variants, idx from 1 (0 is the
        original prompt), the shape :meth:`craft.run.store.RunStore.add_variants` takes."""
        return [(i, v, p) for i, (v, p) in
                enumerate(zip(self.variants[index], self.provenance[index]), 1)]

    @property
    def num_fallback(self) -> int:
        return sum(p == FALLBACK for row in self.provenance for p in row)


def expand_prompts(prompts: Sequence[str], expander: str | Expander, num_variants: int,
                   seed: int = 0, progress: ProgressFn | None = None,
                   chunk_size: int = 8) -> Expansion:
    """Write ``num_variants`` variants of every prompt with ``expander`` (a name or callable).

    Prompts go to the expander ``chunk_size`` at a time so ``progress(done, total)`` can report
    as it goes. Whatever the expander returns is checked here, at the boundary: one list of V
    non-empty strings per prompt, or an error naming the expander and the prompt.
    """
    prompts = list(prompts)
    if not isinstance(num_variants, int) or isinstance(num_variants, bool) or num_variants < 0:
        raise ExpansionError(f"num_variants={num_variants!r} must be an integer >= 0 "
                             f"(0 = generate from the original prompts only)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ExpansionError(f"chunk_size={chunk_size!r} must be an integer >= 1")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ExpansionError(f"prompts[{bad[0]}] = {prompts[bad[0]]!r} is empty or not text; "
                             f"load prompts with craft.stages.prompts.load_prompts, which drops these")
    fn = make_expander(expander) if isinstance(expander, str) else expander
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    variants: list[list[str]] = []
    provenance: list[list[str]] = []
    total = len(prompts)
    if num_variants == 0:
        variants, provenance = [[] for _ in prompts], [[] for _ in prompts]
        chunks: list[list[str]] = []
    else:
        chunks = [prompts[i:i + chunk_size] for i in range(0, total, chunk_size)]
    for chunk in chunks:
        with_prov = getattr(fn, "expand_with_provenance", None)
        if with_prov is not None:
            rows = with_prov(chunk, num_variants, seed)
        else:
            rows = [[(v, name) for v in vs] if isinstance(vs, (list, tuple)) else vs
                    for vs in fn(chunk, num_variants, seed)]
        _check_rows(name, chunk, rows, num_variants, len(variants))
        variants += [[v for v, _ in row] for row in rows]
        provenance += [[p for _, p in row] for row in rows]
        if progress is not None:
            progress(len(variants), total)
    result = Expansion(prompts, variants, provenance, name)
    if result.num_fallback:
        log.warning("expander %s: %d of %d variants came from the template fallback", name,
                    result.num_fallback, num_variants * total)
    return result


def _check_rows(name: str, chunk: list[str], rows: Any, num_variants: int, offset: int) -> None:
    if not isinstance(rows, list) or len(rows) != len(chunk):
        got = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise ExpansionError(f"expander {name!r} returned {got} variant lists for {len(chunk)} "
                             f"prompts; an expander must return one list per prompt, in order")
    for i, row in enumerate(rows):
        texts = [v[0] if isinstance(v, tuple) else v for v in row] if isinstance(row, list) \
            else None
        if texts is None or len(texts) != num_variants or not all(
                isinstance(t, str) and t.strip() for t in texts):
            raise ExpansionError(
                f"expander {name!r} returned {repr(row)[:200]} for prompt {offset + i} "
                f"({chunk[i]!r}); expected a list of {num_variants} non-empty strings")


__all__ = ["API_KEY_ENV", "EXPANDERS", "Expander", "Expansion", "ExpansionError", "FALLBACK",
           "GENERIC_PHRASES", "HTTPExpander", "LocalLLMExpander", "TemplateExpander",
           "build_messages", "chat_completions_url", "expand_prompts", "expander_from_config",
           "fill_with_templates", "generic_template_variants", "make_expander",
           "parse_variant_lines", "register_expander", "register_template_rewriter",
           "template_variants"]
