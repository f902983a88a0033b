"""The one HTTP client with retries that every server-facing part shares: served rewards
(craft/rewards/remote.py), VLM judges (craft/rewards/vlm.py) and the LLM expander
(craft/stages/expansion.py). Stdlib only, so a reward or expander server needs nothing installed here.

Servers restart and throttle: connection failures, timeouts and the statuses a caller names as
transient are tried again after a pause; any other error status is the request's own fault and
ends at once. What failed is returned as an :class:`HTTPFailure` the caller turns into its own
error with its own fix (the URL, the config field, the command to start the server).
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Callable

DETAIL_CHARS = 300  # of an error reply's body kept for the message


class HTTPFailure(Exception):
    """The request failed: ``kind`` is "status" (the server answered ``code``), "timeout" or
    "unreachable"; ``detail`` is the server's error text or the socket's reason; ``attempts``
    how many tries were made (1 when the status was not worth retrying)."""

    def __init__(self, kind: str, detail: str, *, code: int | None = None,
                 attempts: int = 1, retryable: bool = True) -> None:
        super().__init__(f"{kind}: {code or ''} {detail}".strip())
        self.kind, self.detail, self.code, self.attempts = kind, detail, code, attempts
        self.retryable = retryable  # False: the server refused the request itself (a 4xx)


def transient_status(code: int) -> bool:
    """Statuses worth another try: the server is busy (429, throttling) or failing (5xx);
    any other error status is the request's own fault."""
    return code == 429 or code >= 500


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The reply's ``{"error": ...}`` when it is JSON (craft serve-rewards, OpenAI-compatible
    servers), its first characters otherwise."""
    try:
        raw = e.read(64 * 1024)
    except (OSError, AttributeError):
        return str(e.reason)
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict):  # OpenAI's {"error": {"message": ...}}
            err = err.get("message", err)
        if err:
            return str(err)
    except (ValueError, AttributeError):
        pass
    text = " ".join(raw[:DETAIL_CHARS].decode("utf-8", "replace").split())
    return text or str(e.reason)


def request_bytes(url: str, body: dict | None = None, *, headers: dict[str, str] | None = None,
                  timeout_s: float, retries: int,
                  pause_s: Callable[[int], float] = float,
                  on_retry: Callable[[int, HTTPFailure], None] | None = None) -> bytes:
    """GET (``body`` None) or POST ``body`` as JSON to ``url``; the reply's bytes.

    Tried ``retries + 1`` times at most (a status :func:`transient_status` calls the request's
    own fault ends at once), ``pause_s(n)`` seconds before the n-th retry (default n seconds);
    ``on_retry(n, failure)`` is told of each failure that will be retried. Raises
    :class:`HTTPFailure` with the last failure.
    """
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               **(headers or {})}
    failure = HTTPFailure("unreachable", "no attempt made")
    for attempt in range(retries + 1):
        if attempt:
            if on_retry is not None:
                on_retry(attempt, failure)
            time.sleep(pause_s(attempt))
        req = urllib.request.Request(url, data=data, headers=headers,
                                     method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            failure = HTTPFailure("status", _error_detail(e), code=e.code, attempts=attempt + 1,
                                  retryable=transient_status(e.code))
            if not failure.retryable:
                raise failure from None
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            kind = ("timeout" if isinstance(e, (socket.timeout, TimeoutError))
                    or isinstance(reason, (socket.timeout, TimeoutError)) else "unreachable")
            failure = HTTPFailure(kind, str(reason), attempts=attempt + 1)
    raise failure


__all__ = ["HTTPFailure", "request_bytes", "transient_status"]
