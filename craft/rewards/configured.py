"""A config's reward by name, wherever it runs: in this process (the registry), on a
`craft serve-rewards` server (``rewards.remote``), or a VLM judge (``rewards.vlm``). Scoring,
evaluation, GRPO and the preflight all ask here, so a reward's source is one config entry and
every stage sees the same name.
"""

from __future__ import annotations

import os

from craft.rewards.base import RewardError, check_available, load_reward


def _token(entry: dict, where: str) -> str | None:
    var = entry.get("token_env")
    if not var:
        return None
    token = os.environ.get(var)
    if not token:
        raise RewardError(f"{where}.token_env names ${var}, which is not set; export the "
                          f"server's token as {var}")
    return token


def _given(entry: dict, *also: str) -> dict:
    """The entry's timeout_s / retries (and ``also``) as set; unset ones keep the reward
    class's defaults."""
    return {k: entry[k] for k in ("timeout_s", "retries", *also) if k in entry}


def build_reward(cfg, name: str, *, device: str = "cpu", batch_size: int | None = None):
    """The reward ``name`` of ``cfg``, ready to score (a local one loads its weights here)."""
    r = cfg.rewards
    bs = batch_size or r.batch_size
    if name in r.remote:
        from craft.rewards.remote import RemoteReward

        e = r.remote[name]
        return RemoteReward(name, e["url"], reward=e.get("reward"),
                            token=_token(e, f"rewards.remote.{name}"),
                            batch_size=int(e.get("batch_size", bs)), **_given(e, "encoding"))
    if name in r.vlm:
        from craft.rewards.vlm import DEFAULT_QUESTION, VLMJudgeReward

        e = r.vlm[name]
        return VLMJudgeReward(name, e["url"], model=e.get("model"),
                              question=e.get("question") or DEFAULT_QUESTION,
                              token=_token(e, f"rewards.vlm.{name}"),
                              **_given(e, "batch_size"))
    return load_reward(name, device=device, batch_size=bs, path=r.paths.get(name))


def check_reward(cfg, name: str) -> dict:
    """Fail fast on what scoring with ``name`` will need: a local reward's files, a served
    reward's server (reachable, right token, serving it). A VLM judge is not called (a chat
    request costs a forward pass); its URL and token variable are checked."""
    r = cfg.rewards
    if name in r.remote:
        info = build_reward(cfg, name).info()
        return {"server": r.remote[name]["url"], "serves": sorted(info["rewards"])}
    if name in r.vlm:
        _token(r.vlm[name], f"rewards.vlm.{name}")
        return {"endpoint": r.vlm[name]["url"]}
    return check_available(name, r.paths.get(name))


def is_remote(cfg, name: str) -> bool:
    """Whether ``name`` is scored by another process (no weights here, no GPU memory)."""
    return name in cfg.rewards.remote or name in cfg.rewards.vlm


__all__ = ["build_reward", "check_reward", "is_remote"]
