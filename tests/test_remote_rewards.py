"""Rewards served over HTTP (craft/rewards/server.py, craft/rewards/remote.py) and the VLM judge
(craft/rewards/vlm.py), over loopback: a served reward scores bit for bit as in-process; a
server that stops mid-run leaves the stored scores and the same command finishes once it is
back; a wrong token, a bad reply and a timeout each say what is wrong and where; the judge
reads P(yes) from a local server that speaks the OpenAI chat API."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from craft.run.config import load_config
from craft.rewards.server import RewardServer
from craft.rewards import load_reward
from craft.rewards.remote import RemoteReward, RemoteRewardError
from reward_fixtures import images

TOY = ("toy_fidelity", "toy_selection", "toy_aesthetic")
PROMPTS = ["a red circle on a blue background", "a photo of a cat",  # NaN: not toy grammar
           "a yellow triangle on a black background", "a green square on a white background"]


@pytest.fixture(scope="module")
def local():
    return {n: load_reward(n, batch_size=7) for n in TOY}


@pytest.fixture
def server(local):
    srv = RewardServer(local).start()
    yield srv
    srv.stop()


def _prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def test_a_served_reward_scores_bit_for_bit_as_in_process(server, local):
    ims, prompts = images(13), _prompts(13)
    for name in TOY:
        for encoding in ("png", "raw"):  # both lossless: the same pixels, the same scores
            remote = RemoteReward(name, server.url, batch_size=5, encoding=encoding)
            got, want = remote(ims, prompts), local[name](ims, prompts)
            assert np.array_equal(got, want, equal_nan=True), (name, encoding, got, want)
            assert np.isnan(got[1])  # "not applicable" stays NaN, never a number
    info = RemoteReward("toy_fidelity", server.url, encoding="raw").info()
    assert set(info["rewards"]) == set(TOY) and info["protocol"] == 1
    assert info["encodings"] == ["png", "raw"]
    with pytest.raises(RemoteRewardError, match="encoding='jpeg'.*not one of"):
        RemoteReward("toy_fidelity", server.url, encoding="jpeg")
    alias = RemoteReward("mine", server.url, reward="toy_aesthetic")
    assert np.array_equal(alias(ims, prompts), local["toy_aesthetic"](ims, prompts),
                          equal_nan=True)
    with pytest.raises(RemoteRewardError, match="serves .* not 'hpsv21'"):
        RemoteReward("hpsv21", server.url).info()


def test_a_token_is_required_when_the_server_has_one(local):
    srv = RewardServer(local, token="s3cret").start()
    try:
        ims, prompts = images(2), _prompts(2)
        for token in (None, "wrong"):
            with pytest.raises(RemoteRewardError, match="refused the token"):
                RemoteReward("toy_fidelity", srv.url, token=token, retries=0)(ims, prompts)
        ok = RemoteReward("toy_fidelity", srv.url, token="s3cret")(ims, prompts)
        assert np.array_equal(ok, local["toy_fidelity"](ims, prompts), equal_nan=True)
    finally:
        srv.stop()


def _fake(handler_body):
    """A loopback HTTP server whose POST answers ``handler_body(request_json)`` -> (status,
    bytes); returns (server, url)."""

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):  # noqa: N802
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, data = handler_body(req)
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def test_a_bad_reply_a_timeout_and_no_server_each_say_what_and_where():
    ims, prompts = images(3), _prompts(3)
    for body, match in ((lambda r: (200, b"hello"), "not JSON"),
                        (lambda r: (200, b'{"scores": [1.0]}'), "answered 1 scores for 3"),
                        (lambda r: (200, b'{"scores": ["a", 1, 2]}'), "not numbers"),
                        (lambda r: (400, b'{"error": "no"}'), "answered 400: no")):
        httpd, url = _fake(body)
        try:
            with pytest.raises(RemoteRewardError, match=match) as e:
                RemoteReward("r", url, retries=0)(ims, prompts)
            assert url in str(e.value)
        finally:
            httpd.shutdown()
    answers = iter([(429, b'{"error": "busy"}'), (200, b'{"scores": [0.5, null, 1]}')])
    httpd, url = _fake(lambda r: next(answers))  # throttled once, then answered: retried
    try:
        got = RemoteReward("r", url, retries=1)(ims, prompts)
        assert got[0] == 0.5 and np.isnan(got[1]) and got[2] == 1
    finally:
        httpd.shutdown()
    httpd, url = _fake(lambda r: (time.sleep(1.5), (200, b'{"scores": [0, 0, 0]}'))[1])
    try:
        with pytest.raises(RemoteRewardError, match="did not answer within 0.3 s"):
            RemoteReward("r", url, timeout_s=0.3, retries=1)(ims, prompts)
    finally:
        httpd.shutdown()
    httpd.server_close()
    with pytest.raises(RemoteRewardError, match="is not reachable.*craft serve-rewards "
                                                "--rewards r --port"):
        RemoteReward("r", url, retries=0)(ims, prompts)


def test_scoring_through_a_server_that_stops_keeps_what_it_stored_and_resumes(tmp_path,
                                                                              local):
    """The scoring stage with served rewards (rewards.remote, the served toy rewards under
    other names): the server stops after two batches, the stage fails naming the URL with the
    scores of those batches stored; the same call after a restart on the same port scores the
    rest, equal to in-process scoring."""
    from craft.stages.scoring import score_candidates
    from craft.run.store import RunStore
    from studio_sample_data import populate

    calls = {"n": 0}
    stop_after = 2

    class Counting:  # the first reward of each batch counts the batches
        needs_prompt, batch_size = True, 8

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, ims, prompts):
            calls["n"] += 1
            if calls["n"] == stop_after:  # the server goes away after this batch
                threading.Thread(target=srv.stop, daemon=True).start()
            return self.inner(ims, prompts)

    srv = RewardServer({"toy_fidelity": Counting(local["toy_fidelity"]),
                        "toy_aesthetic": local["toy_aesthetic"]}).start()
    port = srv.httpd.server_address[1]
    remote = {f"srv_{n.split('_')[1]}": {"url": srv.url, "reward": n, "retries": 0}
              for n in ("toy_fidelity", "toy_aesthetic")}
    cfg = load_config(None, [f"rewards.remote={json.dumps(remote)}", "rewards.batch_size=8"])
    names = list(remote)
    with RunStore(tmp_path / "run") as store:
        n = populate(store, n_prompts=6, num_variants=2, seeds=2)
        with pytest.raises(RemoteRewardError, match=f"127.0.0.1:{port}"):
            score_candidates(store, cfg, names)
        time.sleep(0.2)
        kept = len(store.scores_df(names).dropna(how="all"))
        assert 0 < kept < n  # the batches scored before the stop are stored
        srv = RewardServer({"toy_fidelity": local["toy_fidelity"],
                            "toy_aesthetic": local["toy_aesthetic"]}, port=port).start()
        try:
            assert score_candidates(store, cfg, names) == 2 * n - 2 * kept
        finally:
            srv.stop()
        cands = store.candidates_df()
        from PIL import Image

        ims = [Image.open(p).convert("RGB") for p in cands["image_path"]]
        got = store.scores_df(names).reindex(cands["id"])
        for name, reward in zip(names, ("toy_fidelity", "toy_aesthetic")):
            want = local[reward](ims, list(cands["prompt"]))
            assert np.array_equal(got[name].to_numpy(), want, equal_nan=True), name


def test_a_vlm_judge_reads_p_yes_from_an_openai_compatible_server():
    """The judge against a local server that speaks the chat-completions API with logprobs:
    here P(yes) is the image's red share, so the score is known exactly."""
    from craft.rewards.configured import build_reward
    from craft.rewards.wire import image_from_b64

    seen = []

    def chat(req):
        seen.append(req)
        content = req["messages"][0]["content"]
        image = image_from_b64(content[0]["image_url"]["url"].split(",", 1)[1])
        arr = np.asarray(image, float) + 1
        p_yes = float(arr[..., 0].mean() / arr.sum(-1).mean())
        top = [{"token": " Yes", "logprob": math.log(p_yes * 0.9)},
               {"token": "no", "logprob": math.log((1 - p_yes) * 0.9)},
               {"token": "maybe", "logprob": math.log(0.1)}]
        if "cat" in content[1]["text"]:
            top = top[2:]  # neither yes nor no: not applicable
        return 200, json.dumps({"choices": [{"message": {"content": "Yes"}, "logprobs": {
            "content": [{"token": "Yes", "logprob": top[0]["logprob"],
                         "top_logprobs": top}]}}]}).encode()

    httpd, url = _fake(chat)
    try:
        judge_cfg = {"judge": {"url": url + "/v1", "model": "qwen2-vl", "batch_size": 3}}
        cfg = load_config(None, [f"rewards.vlm={json.dumps(judge_cfg)}"])
        judge = build_reward(cfg, "judge")
        ims, prompts = images(5), _prompts(5)
        got = judge(ims, prompts)
        for im, prompt, g in zip(ims, prompts, got):
            arr = np.asarray(im, float) + 1
            want = arr[..., 0].mean() / arr.sum(-1).mean()
            assert (math.isnan(g) if "cat" in prompt else g == pytest.approx(want, rel=1e-9))
        body = seen[0]
        assert body["model"] == "qwen2-vl" and body["logprobs"] is True
        assert body["max_tokens"] == 1
        assert "Does this image show a red circle on a blue background? Answer yes or no." in \
            [b["messages"][0]["content"][1]["text"] for b in seen]
    finally:
        httpd.shutdown()


def test_remote_and_vlm_entries_are_checked():
    from craft.run.config import ConfigError

    for bad, match in (({"r": {"url": "ftp://x"}}, "must be an http"),
                       ({"r": {"url": "http://x:1", "colour": 1}}, "unknown keys"),
                       ({"r": {"url": "http://x:1", "batch_size": 0}}, "whole number >= 1"),
                       ({"r": {"url": "http://x:1", "encoding": "jpeg"}},
                        r"rewards\.remote\.r\.encoding.*one of \['png', 'raw'\]")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [f"rewards.remote={json.dumps(bad)}"])
    with pytest.raises(ConfigError, match="must contain {prompt}"):
        load_config(None, ['rewards.vlm={"j": {"url": "http://x:1/v1", "question": "Nice?"}}'])


def test_a_batch_larger_than_a_request_is_split_under_the_size_limit(server, local,
                                                                      monkeypatch):
    import craft.rewards.remote as remote

    monkeypatch.setattr(remote, "REQUEST_BYTES", 1)  # every image its own request
    ims, prompts = images(5), _prompts(5)
    before = server.requests
    got = RemoteReward("toy_selection", server.url, batch_size=32)(ims, prompts)
    assert server.requests - before == 5
    assert np.array_equal(got, local["toy_selection"](ims, prompts), equal_nan=True)


def test_the_server_says_what_is_wrong_with_a_raw_image(server):
    from craft.rewards.remote import http_json

    url = f"{server.url}/score"
    for image, match in (({"raw": "AAAA", "height": 2, "width": 2}, "needs 12 bytes, got 3"),
                         ({"raw": "AAAA", "height": 0, "width": 2}, "height and width"),
                         ({"pixels": "AAAA"}, "base64 PNG string or"),
                         (7, "not int")):
        body = {"reward": "toy_fidelity", "prompts": ["a"], "images": [image]}
        with pytest.raises(RemoteRewardError, match=f"answered 400: an image could not be "
                                                    f"read: .*{match}"):
            http_json(url, body, retries=0)



def test_both_encodings_carry_the_same_rgb_pixels():
    """What the server decodes is the same RGB image either way, for PIL images and for
    arrays with or without colour channels (the PNG path's conversion, done for raw too)."""
    from PIL import Image

    from craft.rewards.wire import decode_image, encode_image

    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
                  rng.integers(0, 256, (5, 7, 4), dtype=np.uint8),
                  rng.integers(0, 256, (5, 7), dtype=np.uint8),
                  Image.fromarray(rng.integers(0, 256, (6, 4, 3), dtype=np.uint8))):
        png, raw = (np.asarray(decode_image(encode_image(image, e))) for e in ("png", "raw"))
        assert png.shape[2] == 3 and np.array_equal(png, raw)


def test_a_request_whose_body_never_comes_is_closed_and_the_server_goes_on(local):
    """Content-Length: 1000 and no body used to hold a server thread for ever: with a read
    timeout the server answers 408 (the client may still be there), closes the connection,
    and scores the next request as usual."""
    import socket

    srv = RewardServer(local, read_timeout=0.5).start()
    try:
        host, port = srv.httpd.server_address[:2]
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 1000\r\n\r\n")
            started, got = time.monotonic(), b""
            for _ in range(100):  # bounded: the server closes within its timeout
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            waited = time.monotonic() - started
        assert got.startswith(b"HTTP/1.1 408"), got
        assert b"announced 1000 bytes" in got and b"0.5 s" in got
        assert 0.3 < waited < 5
        ims, prompts = images(2), _prompts(2)
        ok = RemoteReward("toy_fidelity", srv.url, retries=0)(ims, prompts)
        assert np.array_equal(ok, local["toy_fidelity"](ims, prompts), equal_nan=True)
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="read_timeout"):
        RewardServer(local, read_timeout=0)


def test_a_request_field_of_the_wrong_type_is_a_400_naming_it(server):
    from craft.rewards.remote import http_json
    from craft.rewards.wire import encode_image

    url = f"{server.url}/score"
    ims = [encode_image(im, "png") for im in images(2)]
    for body, match in (
            ({"reward": "toy_fidelity", "prompts": ["a", 7], "images": ims},
             r"prompts\[1\] must be a string \(the prompt of images\[1\]\), not int"),
            ({"reward": "toy_fidelity", "prompts": "a", "images": ims},
             "field 'prompts' must be a list of strings .*not str"),
            ({"reward": "toy_fidelity", "prompts": ["a"], "images": ims},
             "field 'prompts' has 1 entries for 2 images"),
            ({"reward": 3, "prompts": ["a", "b"], "images": ims},
             "field 'reward' must be a string .*not int"),
            ({"reward": "toy_fidelity", "prompts": ["a", "b"], "images": {"0": ims[0]}},
             "field 'images' must be a list .*not dict"),
            ({"prompts": ["a", "b"], "images": ims}, "field 'reward' is missing"),
            ([1, 2], "the request is a JSON list, not an object")):
        with pytest.raises(RemoteRewardError, match=f"answered 400: not a score request "
                                                    f"\\(.*{match}"):
            http_json(url, body, retries=0)
    good = {"reward": "toy_fidelity", "prompts": [PROMPTS[0], PROMPTS[2]], "images": ims}
    assert len(http_json(url, good, retries=0)["scores"]) == 2
