"""Rewards scored by another process: a reward served by `craft serve-rewards`
(:class:`RemoteReward`) and the HTTP they share with the VLM judge (craft/rewards/vlm.py).

A remote reward is a :class:`craft.rewards.Reward` like any other: the same name in
filtering, the same NaN for "not applicable", scored in batches. Every failure says which URL
and what to do: a server that is not there (start it, or fix the URL), a wrong token, a reply
that is not a reward server's, a timeout. Errors leave the scores already stored in place, so
the same command goes on once the server is back.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from craft.rewards.http import HTTPFailure, request_bytes
from craft.rewards.base import Reward, RewardError
from craft.rewards.wire import (ENCODINGS, MAX_BODY_BYTES, MAX_IMAGES, TOKEN_HEADER,
                                encode_image, encoded_size, scores_from_json)

log = logging.getLogger(__name__)
# Images per request stop here (prompts and JSON besides): a reward batch of 32 raw 512 px
# images (1 MiB of base64 each) goes in one request. A batch split over requests is scored as
# smaller batches on the server, equal to in-process scoring up to float rounding only.
REQUEST_BYTES = MAX_BODY_BYTES * 3 // 4


class RemoteRewardError(RewardError):
    """A served reward could not score: the message names the URL and the fix."""


def http_json(url: str, body: dict | None = None, *, token: str | None = None,
              timeout_s: float = 60.0, retries: int = 2, what: str = "reward server",
              fix: str = "") -> dict:
    """GET (``body`` None) or POST JSON to ``url`` and return the JSON reply. Connection
    failures, timeouts, 429 (a busy VLM server throttling) and 5xx replies are retried
    ``retries`` times (1 s, 2 s, ... apart); other 4xx replies are not (the request itself is
    wrong)."""
    headers = {TOKEN_HEADER: f"Bearer {token}"} if token else {}
    try:
        raw = request_bytes(url, body, headers=headers, timeout_s=timeout_s, retries=retries)
    except HTTPFailure as f:
        if f.code == 401:
            raise RemoteRewardError(f"{what} at {url} refused the token ({f.detail}); set the "
                                    f"token it was started with{fix}") from None
        if not f.retryable:
            raise RemoteRewardError(f"{what} at {url} answered {f.code}: {f.detail}") from None
        last = {"status": f"answered {f.code}: {f.detail}",
                "timeout": f"did not answer within {timeout_s:g} s (raise timeout_s, or lower "
                           "batch_size)",
                "unreachable": f"is not reachable ({f.detail})"}[f.kind]
        raise RemoteRewardError(f"{what} at {url} {last} after {f.attempts} attempt(s){fix}") \
            from None
    try:
        return json.loads(raw)
    except ValueError:
        raise RemoteRewardError(f"{what} at {url} sent a reply that is not JSON "
                                f"({raw[:80]!r}); is that URL a {what}?") from None


class RemoteReward(Reward):
    """The reward ``reward`` (default: ``name``) of the `craft serve-rewards` server at
    ``url``, under the local name ``name``. Images travel as PNG (``encoding="png"``, smaller)
    or as raw pixels (``"raw"``, much cheaper to encode: craft/rewards/wire.py)."""

    def __init__(self, name: str, url: str, *, reward: str | None = None,
                 token: str | None = None, batch_size: int = 32, timeout_s: float = 120.0,
                 retries: int = 2, needs_prompt: bool = True, encoding: str = "png") -> None:
        if encoding not in ENCODINGS:
            raise RemoteRewardError(f"encoding={encoding!r} for the served reward {name!r} is "
                                    f"not one of {ENCODINGS}; use 'png' (smaller) or 'raw' "
                                    "(faster on the same machine or a fast link)")
        self.name, self.encoding = name, encoding
        self.needs_prompt = needs_prompt
        super().__init__(batch_size=min(batch_size, MAX_IMAGES))
        self.url, self.served = url.rstrip("/"), reward or name
        self.token, self.timeout_s, self.retries = token, float(timeout_s), int(retries)
        self._fix = (f"; start it with `craft serve-rewards --rewards {self.served} --port "
                     f"{self.url.rsplit(':', 1)[-1].split('/')[0]}` on that machine (rewards.remote"
                     f".{name} in the config names it), then rerun the same command: the scores "
                     "already stored are kept")

    def __repr__(self) -> str:
        return f"RemoteReward(name={self.name!r}, url={self.url!r}, reward={self.served!r})"

    def info(self) -> dict:
        """The server's /info, checked to serve this reward (a preflight)."""
        info = http_json(f"{self.url}/info", token=self.token, timeout_s=min(self.timeout_s, 10),
                         retries=0, fix=self._fix)
        served = info.get("rewards") if isinstance(info, dict) else None
        if not isinstance(served, dict):
            raise RemoteRewardError(f"{self.url}/info is not a reward server's reply; is that "
                                    "URL a `craft serve-rewards` server?")
        if self.served not in served:
            raise RemoteRewardError(f"the reward server at {self.url} serves {sorted(served)}, "
                                    f"not {self.served!r}; start it with --rewards "
                                    f"{self.served} or fix rewards.remote.{self.name}.reward")
        if self.encoding not in info.get("encodings", ["png"]):
            raise RemoteRewardError(f"the reward server at {self.url} reads images as "
                                    f"{info.get('encodings', ['png'])}, not {self.encoding!r}; "
                                    f"update it or set rewards.remote.{self.name}.encoding: png")
        return info

    def _score_batch(self, images, prompts):
        encoded = [encode_image(im, self.encoding) for im in images]
        out, start = [], 0
        while start < len(encoded):  # requests under the server's size limit
            stop, size = start, 0
            while stop < len(encoded) and (stop == start or size + encoded_size(encoded[stop])
                                           < REQUEST_BYTES):
                size += encoded_size(encoded[stop])
                stop += 1
            out.append(self._request(encoded[start:stop], list(prompts[start:stop])))
            start = stop
        return np.concatenate(out)

    def _request(self, encoded: list[str], prompts: list[str]) -> np.ndarray:
        body = {"reward": self.served, "prompts": prompts, "images": encoded}
        reply = http_json(f"{self.url}/score", body, token=self.token, timeout_s=self.timeout_s,
                          retries=self.retries, fix=self._fix)
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list) or len(scores) != len(encoded):
            got = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RemoteRewardError(f"the reward server at {self.url} answered {got} scores for "
                                    f"{len(encoded)} images of {self.served!r}; a bad reply (is "
                                    "it a `craft serve-rewards` server of this version?)")
        try:
            return scores_from_json(scores)
        except (TypeError, ValueError):
            raise RemoteRewardError(f"the reward server at {self.url} answered scores that are "
                                    f"not numbers for {self.served!r}") from None


__all__ = ["RemoteReward", "RemoteRewardError", "http_json"]
