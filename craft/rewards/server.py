"""Serve registered rewards over HTTP (`craft serve-rewards`), so a reward runs in its own
process, environment or machine: a reward model that does not fit beside the trainer, or whose
dependencies conflict with this one's, scores through the same names in filtering, evaluation,
GRPO and the studio (the client: craft/rewards/remote.py; the format: craft/rewards/wire.py).

Routes: ``GET /info`` names the served rewards (and this package's version); ``POST /score``
scores one batch. The standard library's threading HTTP server: requests are read in parallel,
each reward scores one batch at a time (a model is not shared between threads). Listens on
127.0.0.1 unless told otherwise; with a token every request must carry ``Authorization:
Bearer TOKEN``. A connection that sends nothing for ``read_timeout`` seconds (a request that
announces a body and never sends it, an idle keep-alive) is closed, so it does not hold a
server thread for ever; a request whose fields are not what they must be gets a 400 naming the
field.
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

READ_TIMEOUT_S = 30.0  # default: a connection silent this long is closed (its thread freed)


class RewardServer:
    """``rewards`` (name -> loaded Reward) served at ``host:port`` (0: a free port)."""

    def __init__(self, rewards: Mapping[str, object], host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, max_images: int = MAX_IMAGES,
                 max_bytes: int = MAX_BODY_BYTES,
                 read_timeout: float | None = READ_TIMEOUT_S) -> None:
        from craft import __version__

        if read_timeout is not None and not read_timeout > 0:
            raise ValueError(f"read_timeout={read_timeout!r}: seconds > 0 (or None: never)")

        self.rewards = dict(rewards)
        self.locks = {n: threading.Lock() for n in self.rewards}
        self.token, self.max_images, self.max_bytes = token, max_images, max_bytes
        self.read_timeout = read_timeout
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
    """The request handler class of ``server`` (http.server builds one per connection)."""
    return type("Handler", (_Handler,), {"rs": server, "timeout": server.read_timeout})


class _Handler(BaseHTTPRequestHandler):
    """GET /info, POST /score. ``rs`` is the RewardServer; ``timeout`` (StreamRequestHandler's
    socket timeout of each connection) frees a thread whose client stops sending."""

    protocol_version = "HTTP/1.1"
    rs: RewardServer

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
        if self.rs.token is None:
            return True
        given = self.headers.get(TOKEN_HEADER, "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.rs.token}".encode()):
            return True
        self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong token (send "
                    "'Authorization: Bearer TOKEN', the token the server was started with)")
        return False

    def do_GET(self):  # noqa: N802 (http.server's names)
        if not self._authorized():
            return
        if self.path.rstrip("/") in ("/info", "/health", ""):
            self._reply(HTTPStatus.OK, self.rs.info())
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}; GET /info, POST /score")

    def do_POST(self):  # noqa: N802
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/score":
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}; POST /score")
            return
        body = self._read_body()
        if body is None:
            return
        try:
            name, prompts, images = _score_request(json.loads(body))
        except ValueError as e:  # bad JSON, or a field that is not what it must be
            self._error(HTTPStatus.BAD_REQUEST, f"not a score request ({e}); send JSON "
                        "{reward, prompts, images: [base64 PNG or {raw, height, width}]}")
            return
        if name not in self.rs.rewards:
            self._error(HTTPStatus.NOT_FOUND, f"reward {name!r} is not served here; "
                        f"served: {sorted(self.rs.rewards)}")
            return
        if len(images) > self.rs.max_images:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"{len(images)} images; at most {self.rs.max_images} a request")
            return
        decoded = self._decode(images)
        if decoded is not None:
            self._score(name, prompts, decoded)

    def _read_body(self) -> bytes | None:
        """The announced body, or None after an error reply (a bad or too large length, a body
        that stops coming within the read timeout, a client that closed early)."""
        rs = self.rs
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "Content-Length "
                        f"{self.headers.get('Content-Length')!r} is not a byte count")
            self.close_connection = True
            return None
        if length > rs.max_bytes:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request of {length} bytes; at "
                        f"most {rs.max_bytes} (send fewer images a request)")
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:  # the announced body did not come: free this thread
            log.warning("%s: a request announced %d bytes and did not send them within %g s; "
                        "connection closed", self.address_string(), length, rs.read_timeout)
            self.close_connection = True
            try:  # the client may still be there: say why
                self._error(HTTPStatus.REQUEST_TIMEOUT, f"the request announced {length} bytes "
                            f"(Content-Length) but they did not arrive within "
                            f"{rs.read_timeout:g} s; send the whole body")
            except OSError:
                pass
            return None
        if len(body) < length:  # the client closed its side early
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, f"the request announced {length} bytes "
                        f"(Content-Length) and sent {len(body)}")
            return None
        return body

    def _decode(self, images: list) -> list | None:
        decoded = []
        for i, t in enumerate(images):
            try:
                decoded.append(decode_image(t))
            except Exception as e:  # noqa: BLE001 - an undecodable image: the client's error
                self._error(HTTPStatus.BAD_REQUEST, f"an image could not be read: "
                            f"images[{i}]: {e}")
                return None
        return decoded

    def _score(self, name: str, prompts, decoded: list) -> None:
        try:
            with self.rs.locks[name]:
                values = self.rs.rewards[name](decoded, prompts)
        except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
            log.exception("scoring %s failed", name)
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, f"{name}: {e}")
            return
        self.rs.requests += 1
        self._reply(HTTPStatus.OK, {"reward": name, "scores": scores_to_json(values)})


def _score_request(req) -> tuple[str, list[str] | None, list]:
    """(reward, prompts, images) of a parsed score request; ValueError naming the field (and
    the entry) that is not what it must be."""
    if not isinstance(req, dict):
        raise ValueError(f"the request is a JSON {type(req).__name__}, not an object")
    for key in ("reward", "images"):
        if key not in req:
            raise ValueError(f"field {key!r} is missing")
    name, prompts, images = req["reward"], req.get("prompts"), req["images"]
    if not isinstance(name, str):
        raise ValueError(f"field 'reward' must be a string (a served reward's name), not "
                         f"{type(name).__name__}")
    if not isinstance(images, list):
        raise ValueError(f"field 'images' must be a list (one entry per image), not "
                         f"{type(images).__name__}")
    if prompts is not None:
        if not isinstance(prompts, list):
            raise ValueError(f"field 'prompts' must be a list of strings (one per image) or "
                             f"null, not {type(prompts).__name__}")
        if len(prompts) != len(images):
            raise ValueError(f"field 'prompts' has {len(prompts)} entries for {len(images)} "
                             f"images; send one prompt per image")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompts[{i}] must be a string (the prompt of images[{i}]), "
                                 f"not {type(p).__name__}")
    return name, prompts, images


__all__ = ["READ_TIMEOUT_S", "RewardServer"]
