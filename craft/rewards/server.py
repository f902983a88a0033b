"""Serve registered rewards over HTTP (`craft serve-rewards`), so a reward runs in its own
process, environment or machine: a reward model that does not fit beside the trainer, or whose
dependencies conflict with this one's, scores through the same names in filtering, evaluation,
GRPO and the studio (the client: craft/rewards/remote.py; the format: craft/rewards/wire.py).

Routes: ``GET /info`` names the served rewards (and this package's version); ``POST /score``
scores one batch. The standard library's threading HTTP server: requests are read in parallel,
each reward scores one batch at a time (a model is not shared between threads). Listens on
127.0.0.1 unless told otherwise; with a token every request must carry ``Authorization:
Bearer TOKEN``.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Mapping

from craft.rewards.wire import (ENCODINGS, MAX_BODY_BYTES, MAX_IMAGES, PROTOCOL, TOKEN_HEADER,
                                decode_image, scores_to_json)

log = logging.getLogger(__name__)


class RewardServer:
    """``rewards`` (name -> loaded Reward) served at ``host:port`` (0: a free port)."""

    def __init__(self, rewards: Mapping[str, object], host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, max_images: int = MAX_IMAGES,
                 max_bytes: int = MAX_BODY_BYTES) -> None:
        from craft import __version__

        self.rewards = dict(rewards)
        self.locks = {n: threading.Lock() for n in self.rewards}
        self.token, self.max_images, self.max_bytes = token, max_images, max_bytes
        self.version = __version__
        self.requests = 0
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def info(self) -> dict:
        return {"protocol": PROTOCOL, "server": f"craft-studio {self.version}",
                "max_images": self.max_images, "max_bytes": self.max_bytes,
                "encodings": list(ENCODINGS),
                "rewards": {n: {"class": type(r).__name__,
                                "needs_prompt": bool(getattr(r, "needs_prompt", True)),
                                "batch_size": getattr(r, "batch_size", None)}
                            for n, r in self.rewards.items()}}

    def start(self) -> "RewardServer":
        """Serve in a background thread (tests, the studio); :meth:`serve_forever` blocks."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                        name="reward-server")
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _handler(server: RewardServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # through logging, not stderr
            log.debug("%s %s", self.address_string(), fmt % args)

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._reply(status, {"error": message})

        def _authorized(self) -> bool:
            if server.token is None:
                return True
            given = self.headers.get(TOKEN_HEADER, "")
            if hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                return True
            self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong token (send "
                        "'Authorization: Bearer TOKEN', the token the server was started with)")
            return False

        def do_GET(self):  # noqa: N802 (http.server's names)
            if not self._authorized():
                return
            if self.path.rstrip("/") in ("/info", "/health", ""):
                self._reply(HTTPStatus.OK, server.info())
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}; GET /info, POST /score")

        def do_POST(self):  # noqa: N802
            if not self._authorized():
                return
            if self.path.rstrip("/") != "/score":
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}; POST /score")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > server.max_bytes:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"request of {length} bytes; at most {server.max_bytes} "
                            "(send fewer images a request)")
                return
            try:
                req = json.loads(self.rfile.read(length))
                name, prompts, images = req["reward"], req.get("prompts"), req["images"]
            except (ValueError, KeyError, TypeError) as e:
                self._error(HTTPStatus.BAD_REQUEST, f"not a score request ({e}); send JSON "
                            "{reward, prompts, images: [base64 PNG or {raw, height, width}]}")
                return
            if name not in server.rewards:
                self._error(HTTPStatus.NOT_FOUND, f"reward {name!r} is not served here; "
                            f"served: {sorted(server.rewards)}")
                return
            if len(images) > server.max_images:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"{len(images)} images; at most {server.max_images} a request")
                return
            try:
                decoded = [decode_image(t) for t in images]
            except Exception as e:  # noqa: BLE001 - any undecodable image is the client's error
                self._error(HTTPStatus.BAD_REQUEST, f"an image could not be read: {e}")
                return
            try:
                with server.locks[name]:
                    values = server.rewards[name](decoded, prompts)
            except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
                log.exception("scoring %s failed", name)
                self._error(HTTPStatus.UNPROCESSABLE_ENTITY, f"{name}: {e}")
                return
            server.requests += 1
            self._reply(HTTPStatus.OK, {"reward": name, "scores": scores_to_json(values)})

    return Handler


__all__ = ["RewardServer"]
