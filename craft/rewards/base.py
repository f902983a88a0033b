"""The reward protocol, the registry of reward factories, and the offline weight lookup.

A reward is a plain callable object::

    reward.name                           # the registry name, e.g. "hpsv21"
    reward.score(images, prompts)         # -> np.ndarray, float64, one value per image
    reward(images, prompts)               # the same as score

Images are PIL images (uint8 ``(H, W, 3)`` arrays are accepted too); ``prompts`` holds one
prompt per image, the *original* prompt in CRAFT. NaN means "not applicable" (the toy rewards
return it for a caption outside their grammar); it is never a silent 0.

Why a registry of *factories* rather than of instances: a real reward model is gigabytes of
weights. The factory is the only place that imports torch / open_clip / transformers and reads
weights, so ``import craft.rewards`` stays cheap (the CLI and the studio import it to list the
names), and the caller decides when to pay for a load. A loaded reward keeps its model in
memory and scores in batches; load it once per process and reuse it.

Why ``check_available`` is separate from loading: a run that will need HPSv2.1 after an hour of
generation should fail in the first second if the checkpoint is not on disk. It resolves the
files exactly as the loader will, but reads no weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from craft import CraftError, MissingWeightsError
from craft.run.devices import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "Reward", "FunctionReward", "TorchReward", "RewardSpec", "RewardError",
    "UnknownRewardError", "MissingWeightsError", "MissingDependencyError",
    "register_reward", "load_reward", "check_available", "available_rewards", "reward_spec",
    "NOT_PROVIDED", "unique_prompts",
    # offline weight lookup and safe loading, shared by the reward modules
    "hf_cache_dir", "find_hf_file", "find_hf_snapshot", "missing_files", "missing_weights",
    "download_hint", "load_tensor_state_dict", "load_matching",
    "from_pretrained_strict",
]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

class RewardError(CraftError):
    """A reward cannot be loaded or used as asked (bad argument, incompatible checkpoint)."""


class UnknownRewardError(RewardError, ValueError):
    """The name is not in the registry; the message lists the known names."""


class MissingDependencyError(RewardError, ImportError):
    """An optional package a reward needs is not installed; the message says how to install."""


# Rewards users ask for that this project deliberately does not provide, with the reason. An
# unknown-name error for one of these explains itself instead of just listing the known names.
NOT_PROVIDED: dict[str, str] = {
    "mps": (
        "MPS (Multi-dimensional Preference Score) is not provided: its published checkpoint "
        "(MPS_overall_checkpoint.pth) is a whole pickled model object, and loading it means "
        "unpickling (executing) foreign code from the MPS repository; CRAFT Studio only loads "
        "plain tensor state dicts. Score MPS with the upstream code in its own environment"),
}


# --------------------------------------------------------------------------------------------
# The protocol and two base implementations
# --------------------------------------------------------------------------------------------

class Reward:
    """Base class for rewards: input checks, batching, float64 output.

    Subclasses set ``name`` and implement ``_score_batch(images, prompts) -> array-like`` for
    at most ``batch_size`` images. ``needs_prompt = False`` marks prompt-free rewards (AES),
    which then accept ``prompts=None``.
    """

    name: str = "reward"
    needs_prompt: bool = True

    def __init__(self, *, batch_size: int = 32) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise RewardError(f"{self.name}: batch_size must be a positive integer, got "
                              f"{batch_size!r}; use e.g. 32 (images per forward pass)")
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, batch_size={self.batch_size})"

    def __call__(self, images: Sequence, prompts: Sequence[str] | None = None) -> np.ndarray:
        return self.score(images, prompts)

    def score(self, images: Sequence, prompts: Sequence[str] | None = None) -> np.ndarray:
        """One float64 per image (NaN = not applicable), scored in batches of ``batch_size``."""
        images, prompts = self._check_inputs(images, prompts)
        out = np.full(len(images), np.nan, dtype=np.float64)
        for start, stop in self._spans(len(images)):
            values = self._score_batch(images[start:stop], prompts[start:stop])
            self._store(out, start, stop, values)
        return out

    def _spans(self, n: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]

    def _store(self, out: np.ndarray, start: int, stop: int, values) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape[0] != stop - start:  # a bug in a subclass, not a user error
            raise RuntimeError(f"{self.name}: scored {values.shape[0]} of {stop - start} images "
                               "in a batch")
        out[start:stop] = values

    def _check_inputs(self, images, prompts) -> tuple[list, list]:
        if isinstance(images, (str, bytes)) or not isinstance(images, Iterable):
            raise RewardError(f"{self.name}: images must be a list of PIL images, got "
                              f"{type(images).__name__}")
        images = list(images)
        if prompts is None:
            if self.needs_prompt:
                raise RewardError(f"{self.name}: this reward scores an image against its prompt;"
                                  " pass one prompt per image (the original prompt in CRAFT)")
            prompts = [""] * len(images)
        elif isinstance(prompts, str):
            raise RewardError(f"{self.name}: prompts must be a list with one prompt per image, "
                              f"got a single string {prompts[:40]!r}; use [prompt] * len(images)")
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise RewardError(f"{self.name}: got {len(images)} images but {len(prompts)} "
                              "prompts; pass one prompt per image")
        return images, prompts

    def _score_batch(self, images: list, prompts: list[str]):  # pragma: no cover - abstract
        raise NotImplementedError


class FunctionReward(Reward):
    """Wraps a plain function ``fn(images, prompts) -> array`` (the toy rewards) as a Reward."""

    def __init__(self, name: str, fn: Callable[[Sequence, Sequence[str]], Any], *,
                 batch_size: int = 32, needs_prompt: bool = True) -> None:
        self.name = name
        self.needs_prompt = needs_prompt
        super().__init__(batch_size=batch_size)
        self.fn = fn
        self.__doc__ = getattr(fn, "__doc__", None) or self.__doc__

    def _score_batch(self, images, prompts):
        return self.fn(images, prompts)


class TorchReward(Reward):
    """A reward backed by torch modules: device/dtype, inference mode, overlapped preprocessing.

    Subclasses split a batch into ``_prepare(images, prompts)`` (CPU work: decode, resize,
    tokenise; no model) and ``_forward(prepared) -> array`` (the model). With ``prefetch`` one
    worker thread prepares batch k+1 while the model runs batch k, so on a GPU the CPU-side
    preprocessing is hidden behind the forward instead of leaving the device idle. The default
    (``prefetch=None``) turns it on for accelerators and off on a CPU, where torch's forward
    already uses every core and a preprocessing thread would only compete with it. Scores do
    not depend on it.
    """

    def __init__(self, *, device: str = "cpu", dtype=None, batch_size: int = 32,
                 prefetch: bool | None = None) -> None:
        super().__init__(batch_size=batch_size)
        import torch

        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, key="reward dtype")
        self.prefetch = self.device.type != "cpu" if prefetch is None else bool(prefetch)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, "
                f"dtype={str(self.dtype).replace('torch.', '')!r}, batch_size={self.batch_size})")

    def _prepare(self, images: list, prompts: list[str]):
        return images, prompts

    def _forward(self, prepared):
        return self._score_batch(*prepared)

    def score(self, images, prompts=None) -> np.ndarray:
        import torch

        images, prompts = self._check_inputs(images, prompts)
        out = np.full(len(images), np.nan, dtype=np.float64)
        spans = self._spans(len(images))
        with torch.inference_mode():
            if not self.prefetch or len(spans) < 2:
                for start, stop in spans:
                    prepared = self._prepare(images[start:stop], prompts[start:stop])
                    self._store(out, start, stop, self._forward(prepared))
                return out
            from concurrent.futures import ThreadPoolExecutor

            def prepare(span):
                with torch.inference_mode():  # inference mode is per thread
                    return self._prepare(images[span[0]:span[1]], prompts[span[0]:span[1]])

            with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-prep") as pool:
                pending = pool.submit(prepare, spans[0])
                for k, (start, stop) in enumerate(spans):
                    prepared = pending.result()
                    if k + 1 < len(spans):
                        pending = pool.submit(prepare, spans[k + 1])
                    self._store(out, start, stop, self._forward(prepared))
        return out


def unique_prompts(prompts: Sequence[str]) -> tuple[list[str], list[int]]:
    """Distinct prompts in first-seen order, and each input's index into them.

    CRAFT scores every image of a group against the same original prompt, so a batch usually
    holds a few distinct prompts: encoding each once saves most of the text-tower work.
    """
    index: dict[str, int] = {}
    inverse = [index.setdefault(p, len(index)) for p in prompts]
    return list(index), inverse


# --------------------------------------------------------------------------------------------
# Offline weight lookup (local path, then the Hugging Face cache; never the network)
# --------------------------------------------------------------------------------------------

def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (tests move it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def find_hf_file(repo_id: str, filename: str) -> Path | None:
    """The cached copy of ``repo_id/filename`` if it is on disk, else None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def find_hf_snapshot(repo_id: str, required: Sequence[str | tuple[str, ...]]) -> Path | None:
    """A cached snapshot folder of ``repo_id`` holding every required file.

    Each entry of ``required`` is a file name or a tuple of alternatives (e.g. safetensors or
    bin weights). Loading ``from_pretrained`` on that folder never touches the network.
    """
    for entry in required:
        for name in (entry,) if isinstance(entry, str) else entry:
            hit = find_hf_file(repo_id, name)
            if hit is not None:
                return hit.parent if not missing_files(hit.parent, required) else None
    return None


def missing_files(folder: Path, required: Sequence[str | tuple[str, ...]]) -> list[str]:
    """The entries of ``required`` (names or tuples of alternatives) absent from ``folder``."""
    missing = []
    for entry in required:
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        if not any((folder / n).is_file() for n in names):
            missing.append(" or ".join(names))
    return missing


def download_hint(repo_id: str, filename: str | None = None) -> str:
    what = f"{repo_id} {filename}" if filename else repo_id
    return (f"`hf download {what}` (older huggingface_hub: `huggingface-cli download {what}`) "
            "on a machine with internet and copy the HF cache here")


def missing_weights(reward: str, what: str, looked: Iterable[str], how: str) -> MissingWeightsError:
    """Build the one-line error: what is missing, where we looked, how to provide it."""
    places = "; ".join(looked) or "nowhere (no path given)"
    return MissingWeightsError(
        f"{reward}: {what} not found (looked in: {places}). Provide it with {how}, "
        f"or point to a local copy with --set rewards.paths.{reward}=/local/path")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """A registered reward: its factory, its availability check, one line on what it is."""

    name: str
    factory: Callable[..., Reward]
    check: Callable[..., Mapping[str, Any]] | None = None
    description: str = ""


_REGISTRY: dict[str, RewardSpec] = {}


def register_reward(name: str, *, check: Callable[..., Mapping[str, Any]] | None = None,
                    description: str = ""):
    """Decorator registering ``factory(*, device, dtype, batch_size, path, **kw) -> Reward``.

    ``check(path=None, **kw)`` resolves the files the factory will read without loading them
    and raises :class:`MissingWeightsError` / :class:`MissingDependencyError`; it returns a
    mapping of what it found (for logs and the studio). Re-registering a name replaces it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorate(factory):
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = RewardSpec(name, factory, check, description or (doc[0] if doc else ""))
        return factory

    return decorate


def available_rewards() -> list[str]:
    """The registered reward names (plugins' included), sorted."""
    from craft.plugins import load_plugins

    load_plugins()
    return sorted(_REGISTRY)


def reward_spec(name: str) -> RewardSpec:
    """The registered spec for ``name``; unknown names raise with the list of known ones."""
    from craft.plugins import load_plugins

    load_plugins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    known = ", ".join(available_rewards())
    reason = NOT_PROVIDED.get(str(name).lower())
    if reason:
        raise UnknownRewardError(f"unknown reward {name!r}: {reason}. Known rewards: {known}")
    import difflib

    close = difflib.get_close_matches(str(name), available_rewards(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownRewardError(f"unknown reward {name!r}; {hint}known rewards: {known} "
                             "(rewards.names / rewards.eval_names take these names)")


def check_available(name: str, path: str | os.PathLike | None = None, **kw) -> dict[str, Any]:
    """Fail fast: resolve the files ``load_reward(name, path=path, **kw)`` would read.

    Reads no weights and imports no model code. Returns what was found (e.g. ``{"checkpoint":
    Path(...)}``; empty for rewards without weights). Raises :class:`UnknownRewardError`,
    :class:`MissingWeightsError` or :class:`MissingDependencyError`.
    """
    spec = reward_spec(name)
    if spec.check is None:
        return {}
    return dict(spec.check(path=path, **kw))


def load_reward(name: str, *, device: str = "cpu", dtype=None, batch_size: int = 32,
                path: str | os.PathLike | None = None, **kw) -> Reward:
    """Build the reward ``name`` once: weights read, model on ``device`` in eval mode.

    ``device``: 'cpu', 'cuda', 'cuda:N' or 'auto'. ``dtype``: None (float32), a torch dtype or
    'float16' / 'bfloat16'. ``batch_size``: images per forward pass. ``path``: a local
    checkpoint file or folder (``rewards.paths.<name>`` in the config); without it the Hugging
    Face cache is searched. Extra keyword arguments go to the factory (see each reward module).
    """
    spec = reward_spec(name)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise RewardError(f"load_reward({name!r}): batch_size must be a positive integer, got "
                          f"{batch_size!r}; use e.g. 32")
    from craft.run.devices import LOAD_LOCK
    from craft.run.watch import host, loaded

    # one model build at a time in a process (craft.run.devices); the build and the checkpoint
    # read are host memory until the model is on its device (what a memory meter is told)
    with LOAD_LOCK, host():
        reward = spec.factory(device=str(resolve_device(device, key="rewards.device")),
                              dtype=dtype, batch_size=batch_size,
                              path=None if path is None else str(path), **kw)
    logger.info("loaded reward %s: %r", name, reward)
    return loaded(reward)  # (a memory meter watching the run counts it from here)


# --------------------------------------------------------------------------------------------
# Safe checkpoint reading (tensors only, never arbitrary pickled objects)
# --------------------------------------------------------------------------------------------

def load_tensor_state_dict(path: str | os.PathLike, reward: str, *, key: str | None = "state_dict"):
    """Read a plain ``{name: tensor}`` state dict with ``torch.load(weights_only=True)``.

    ``key``: if the file holds a dict with this entry (HPS checkpoints: ``{"state_dict": ...}``)
    that entry is the state dict. A ``module.`` prefix (from DataParallel) is stripped. A file
    that needs arbitrary unpickling is refused: it could run code, and it is not what the
    published checkpoints hold.
    """
    import pickle

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RewardError(
            f"{reward}: {path} is not a plain tensor state dict that torch.load(weights_only=True)"
            f" can read ({first}); re-save it as torch.save(model.state_dict(), path) or use "
            "the published checkpoint file") from e
    if isinstance(obj, dict) and key is not None and isinstance(obj.get(key), dict):
        obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor)
                                                       for v in obj.values()):
        raise RewardError(f"{reward}: {path} does not hold a state dict of tensors (found "
                          f"{type(obj).__name__}); pass the published checkpoint file")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_matching(module, state_dict: Mapping, reward: str, source: str) -> None:
    """``module.load_state_dict(strict=True)`` with an error that says what did not match."""
    missing = sorted(set(module.state_dict()) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(module.state_dict()))
    if missing or unexpected:
        raise RewardError(
            f"{reward}: checkpoint {source} does not fit the model architecture: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}; check that the checkpoint belongs to this reward (and, for a "
            "custom architecture, that model_name/model_config match it)")
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        shape_lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise RewardError(f"{reward}: checkpoint {source} has tensors of the wrong shape "
                          f"({'; '.join(shape_lines[:2]) or e}); check model_name/model_config "
                          "against the checkpoint") from e


def from_pretrained_strict(cls, folder, reward: str, **kw):
    """``cls.from_pretrained(folder)`` offline, failing on missing or re-initialised weights.

    transformers only *warns* when a weight is missing or has the wrong shape and then leaves
    it randomly initialised: a reward would load and quietly score nonsense. Keys present in the
    file but unused (e.g. the text tower when only the vision tower is built) are fine. The
    loading report and progress bars are silenced for the call; the check replaces them.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True,
                                          output_loading_info=True, **kw)
    except (RuntimeError, ValueError, OSError) as e:  # e.g. size mismatches (transformers 5)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RewardError(f"{reward}: the weights in {folder} do not fit {cls.__name__} "
                          f"({first[:200]}); some are missing or of the wrong shape: check that "
                          "the folder holds the right model") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    bad = sorted(info.get("missing_keys") or []) + [
        str(m[0] if isinstance(m, (tuple, list)) else m) for m in info.get("mismatched_keys") or []]
    if bad:
        raise RewardError(
            f"{reward}: the weights in {folder} do not fit {cls.__name__}: {len(bad)} weights "
            f"missing or of the wrong shape (e.g. {bad[:3]}); check that the folder holds the "
            "right model")
    return model.eval()
