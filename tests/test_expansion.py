"""Prompt expansion: templates, a tiny local causal LM built from config, a local HTTP server."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest

from craft.stages.expansion import (FALLBACK, ExpansionError, HTTPExpander, LocalLLMExpander,
                             TemplateExpander, chat_completions_url, expand_prompts,
                             expander_from_config, fill_with_templates, make_expander,
                             parse_variant_lines, register_expander, template_variants)
from craft.toyworld.grammar import parse_caption, toy_prompt_split

TOY = toy_prompt_split()[0][:6]
REAL = ["a corgi wearing a red scarf sitting in the snow", "an owl perched on a lantern at night",
        "an oil painting of a stormy sea"]


# --------------------------------------------------------------------------------------------
# Template expander.


def test_template_toy_variants_are_valid_and_keep_the_scene():
    exp = expand_prompts(TOY, "template", num_variants=5, seed=3)
    assert exp.expander == "template" and exp.prompts == TOY
    for prompt, variants, prov in zip(TOY, exp.variants, exp.provenance):
        assert len(variants) == 5 and prov == ["template"] * 5
        plain = parse_caption(prompt)
        for v in variants:
            rich = parse_caption(v)  # raises if outside the toy grammar
            assert {k: rich[k] for k in ("colour", "shape", "background")} == plain
            assert len(rich) > 3  # adds at least one rich word


def test_template_is_deterministic_per_seed():
    prompts = TOY + REAL
    a = expand_prompts(prompts, "template", 4, seed=1).variants
    assert a == expand_prompts(prompts, TemplateExpander(), 4, seed=1).variants
    assert a != expand_prompts(prompts, "template", 4, seed=2).variants
    # chunking is only for progress: results do not depend on it
    assert a == expand_prompts(prompts, "template", 4, seed=1, chunk_size=1).variants


def test_generic_templates_extend_the_prompt_without_contradiction():
    corgi, owl, oil = (template_variants(p, 6, seed=0) for p in REAL)
    for prompt, variants in zip(REAL, (corgi, owl, oil)):
        assert len(set(variants)) == 6 and prompt not in variants
        assert all(v.startswith(prompt + ", ") for v in variants)
    assert not any("light" in v.split(", ", 1)[1] for v in owl)  # the prompt sets its light
    assert not any(s in v for v in oil for s in ("photograph", "digital painting", "concept art"))


def test_expand_prompts_progress_and_zero_variants():
    calls = []
    exp = expand_prompts(REAL * 3, "template", 2, progress=lambda d, t: calls.append((d, t)),
                         chunk_size=4)
    assert calls == [(4, 9), (8, 9), (9, 9)]
    assert exp.rows(0) == [(1, exp.variants[0][0], "template"),
                           (2, exp.variants[0][1], "template")]
    none = expand_prompts(REAL, "template", 0)
    assert none.variants == [[], [], []] and none.num_fallback == 0


def test_plain_callable_expander_and_output_checks():
    def shout(prompts, num_variants, seed):
        return [[f"{p}!" * (i + 1) for i in range(num_variants)] for p in prompts]

    exp = expand_prompts(["a cat"], shout, 2)
    assert exp.variants == [["a cat!", "a cat!a cat!"]] and exp.provenance == [["shout"] * 2]
    with pytest.raises(ExpansionError, match=r"returned 0 variant lists for 1 prompts"):
        expand_prompts(["a cat"], lambda p, n, s: [], 2)
    with pytest.raises(ExpansionError, match=r"for prompt 0 \('a cat'\); expected a list of 2"):
        expand_prompts(["a cat"], lambda p, n, s: [["x", ""]], 2)


def test_registry_and_argument_errors():
    with pytest.raises(ExpansionError, match=r"'gpt' is unknown; known expanders: \['llm_http', "
                                             r"'llm_local', 'template'\]"):
        make_expander("gpt")
    with pytest.raises(ExpansionError, match=r"'llm_local': missing a required argument: "
                                             r"'model_path'"):
        expand_prompts(["a cat"], "llm_local", 2)
    with pytest.raises(ExpansionError, match=r"num_variants=-1 must be an integer >= 0"):
        expand_prompts(["a cat"], "template", -1)
    with pytest.raises(ExpansionError, match=r"prompts\[1\] = '  ' is empty"):
        expand_prompts(["a cat", "  "], "template", 2)
    register_expander("echo_test", lambda: (lambda p, n, s: [[x] * n for x in p]))
    assert expand_prompts(["a"], "echo_test", 2).variants == [["a", "a"]]


# --------------------------------------------------------------------------------------------
# Parsing LLM answers and filling with templates.

PARSE_CASES = [
    ("Here are rewrites:\n1. a big red fox\n2) a red fox at dawn\n3: the fox\n", 5,
     ["a big red fox", "a red fox at dawn", "the fox"]),
    ("- one\n* two\n\u2022 three\nnot a list item", 5, ["one", "two", "three"]),
    ('1. "quoted rewrite"\n2. **bold rewrite**\n3. 12345\n4. a fox\n', 5,
     ["quoted rewrite", "bold rewrite"]),  # "a fox" is the original; digits are not a rewrite
    ("1. same\n2. SAME\n3. other\n4. more\n", 2, ["same", "other"]),
    ("no numbered lines at all", 3, []),
]


@pytest.mark.parametrize("text,limit,expected", PARSE_CASES)
def test_parse_variant_lines(text, limit, expected):
    assert parse_variant_lines(text, original="a fox", limit=limit) == expected


def test_fill_with_templates_marks_fallback():
    rows = fill_with_templates(TOY[0], ["a rewrite"], 3, seed=0, source="llm_x")
    assert rows[0] == ("a rewrite", "llm_x")
    assert [p for _, p in rows[1:]] == [FALLBACK, FALLBACK]
    assert all(parse_caption(v) for v, _ in rows[1:])


# --------------------------------------------------------------------------------------------
# llm_local with a tiny random causal LM saved to a folder (no hub).

# No digits, bullets or newlines: the random model cannot write a list item, so every variant
# must come from the fallback, whatever it samples.
WORDS = ("a an the red blue green large small sharp circle square cat fox on of in "
         "background photo painting light rewrite prompt with center").split()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny-lm")
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="<eos>").save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=512,
                        bos_token_id=2, eos_token_id=2, pad_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_llm_local_loads_offline_and_falls_back(tiny_lm):
    import torch

    expander = make_expander("llm_local", model_path=str(tiny_lm), max_new_tokens=4,
                             batch_size=2)
    assert isinstance(expander, LocalLLMExpander)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    exp = expand_prompts(TOY[:3], expander, num_variants=3, seed=0)
    assert torch.equal(torch.rand(1), before)  # sampling ran under a forked RNG
    assert exp.expander == "llm_local"
    assert [len(v) for v in exp.variants] == [3, 3, 3]
    assert all(p in ("llm_local", FALLBACK) for row in exp.provenance for p in row)
    # random weights and a vocabulary without newlines cannot write numbered lines
    assert exp.num_fallback == 9
    for row in exp.variants:
        assert all(parse_caption(v) for v in row)
    again = expander.generate_answers(TOY[:3], 3, seed=0)
    assert again == expander.generate_answers(TOY[:3], 3, seed=0)  # seeded sampler


def test_llm_local_keeps_usable_lines(tiny_lm, monkeypatch):
    expander = LocalLLMExpander(tiny_lm, max_new_tokens=2)
    answers = {"a cat": "1. a fluffy cat in soft light\n2. a cat, close-up\n3. a cat napping",
               "a dog": "Sure!\n1. a dog running on a beach"}
    monkeypatch.setattr(expander, "generate_answers", lambda ps, n, s: [answers[p] for p in ps])
    exp = expand_prompts(["a cat", "a dog"], expander, 3, seed=0)
    assert exp.variants[0] == ["a fluffy cat in soft light", "a cat, close-up", "a cat napping"]
    assert exp.provenance == [["llm_local"] * 3, ["llm_local", FALLBACK, FALLBACK]]
    assert exp.variants[1][0] == "a dog running on a beach"
    assert all(v.startswith("a dog, ") for v in exp.variants[1][1:])
    assert exp.num_fallback == 2


def test_llm_local_uses_chat_template(tiny_lm):
    expander = LocalLLMExpander(tiny_lm, max_new_tokens=2)
    assert "Prompt: a red circle" in expander.instruction("a red circle", 2)
    expander.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}")
    text = expander.instruction("a red circle", 2)
    assert text.startswith("<system> You rewrite prompts") and text.endswith("<assistant> ")
    assert len(expander(["a red circle"], 2, seed=0)[0]) == 2


def test_llm_local_missing_model_teaches(tmp_path):
    with pytest.raises(ExpansionError, match=r"expander_model='.*nowhere'.*does not exist.*"
                                             r"--local-dir.*expander 'template'"):
        make_expander("llm_local", model_path=str(tmp_path / "nowhere"))
    with pytest.raises(ExpansionError, match=r"has no config\.json"):
        make_expander("llm_local", model_path=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ExpansionError, match=r"could not load a causal LM"):
        make_expander("llm_local", model_path=str(tmp_path))


def test_expander_from_config(tiny_lm):
    from craft.run.config import PromptsConfig

    assert isinstance(expander_from_config(PromptsConfig()), TemplateExpander)
    local = expander_from_config(PromptsConfig(expander="llm_local", expander_model=str(tiny_lm),
                                               expander_max_new_tokens=5))
    assert isinstance(local, LocalLLMExpander) and local.max_new_tokens == 5
    http = expander_from_config(PromptsConfig(expander="llm_http",
                                              expander_url="http://127.0.0.1:9/v1",
                                              expander_api_model="qwen"))
    assert isinstance(http, HTTPExpander) and http.model == "qwen"
    assert http.url == "http://127.0.0.1:9/v1/chat/completions"


# --------------------------------------------------------------------------------------------
# llm_http against a local server.


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append((self.path, dict(self.headers), body))
        status = server.statuses.pop(0) if server.statuses else 200
        if status != 200:
            payload = b'{"error": "busy"}'
        elif server.raw is not None:
            payload = server.raw
        else:
            prompt = body["messages"][-1]["content"].removeprefix("Prompt: ")
            lines = [f"{i}. {prompt}, variant {i}" for i in range(1, server.lines + 1)]
            payload = json.dumps({"choices": [{"message": {
                "role": "assistant", "content": "Rewrites:\n" + "\n".join(lines)}}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.statuses, srv.lines, srv.raw = [], [], 3, None
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_llm_http_request_and_parsing(server, monkeypatch):
    monkeypatch.setenv("CRAFT_LLM_API_KEY", "sk-test")
    expander = make_expander("llm_http", url=_url(server), model="qwen-plus", backoff=0.01)
    exp = expand_prompts(["a cat", "a dog"], expander, 3, seed=7)
    assert exp.variants[0] == ["a cat, variant 1", "a cat, variant 2", "a cat, variant 3"]
    assert exp.provenance == [["llm_http"] * 3] * 2
    assert len(server.requests) == 2  # one request per prompt (sent concurrently)
    path, headers, body = min(server.requests, key=lambda r: r[2]["messages"][-1]["content"])
    assert path == "/v1/chat/completions"
    assert body["model"] == "qwen-plus" and body["messages"][0]["role"] == "system"
    assert body["messages"][-1] == {"role": "user", "content": "Prompt: a cat"}
    assert "3 richer" in body["messages"][0]["content"] and isinstance(body["seed"], int)
    assert headers["Authorization"] == "Bearer sk-test"


def test_llm_http_short_answer_falls_back(server, monkeypatch):
    monkeypatch.delenv("CRAFT_LLM_API_KEY", raising=False)
    server.lines = 1
    exp = expand_prompts([TOY[0]], HTTPExpander(_url(server), max_workers=1), 3, seed=0)
    assert exp.provenance == [["llm_http", FALLBACK, FALLBACK]]
    assert all(parse_caption(v) for v in exp.variants[0][1:])
    _, headers, body = server.requests[0]
    assert "Authorization" not in headers and "model" not in body  # server default model


def test_llm_http_retries_server_errors(server):
    server.statuses = [500, 503]
    expander = HTTPExpander(_url(server), max_retries=2, backoff=0.01)
    assert expander(["a cat"], 2, seed=0) == [["a cat, variant 1", "a cat, variant 2"]]
    assert len(server.requests) == 3
    server.statuses = [500, 500, 500]
    with pytest.raises(ExpansionError, match=r"failed after 3 attempts \(last: HTTP 500"):
        expander(["a cat"], 2, seed=0)


def test_llm_http_client_error_fails_at_once(server):
    server.statuses = [401]
    with pytest.raises(ExpansionError, match=r"answered HTTP 401.*CRAFT_LLM_API_KEY"):
        HTTPExpander(_url(server), backoff=0.01)(["a cat"], 2, seed=0)
    assert len(server.requests) == 1


def test_llm_http_unreachable_fails_clearly_and_quickly():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    expander = HTTPExpander(f"http://127.0.0.1:{port}", max_retries=2, backoff=0.05, timeout=2)
    start = time.monotonic()
    with pytest.raises(ExpansionError, match=rf"POST http://127.0.0.1:{port}/v1/chat/completions "
                                             r"failed after 3 attempts.*server is running"):
        expander(["a cat"], 2, seed=0)
    assert time.monotonic() - start < 5


def test_llm_http_bad_url_and_bad_answer(server):
    with pytest.raises(ExpansionError, match=r"expander_url='localhost:8000' is not an http"):
        HTTPExpander("localhost:8000")
    server.raw = b'{"data": [{"id": "qwen"}]}'  # e.g. a /models answer: not chat completions
    with pytest.raises(ExpansionError, match=r"did not answer in the chat-completions format"):
        HTTPExpander(_url(server))(["a cat"], 1, seed=0)
    assert len(server.requests) == 1  # a wrong answer is not retried


@pytest.mark.parametrize("url,expected", [
    ("http://h:8000", "http://h:8000/v1/chat/completions"),
    ("http://h:8000/v1/", "http://h:8000/v1/chat/completions"),
    ("https://api.x.com/mode/v1", "https://api.x.com/mode/v1/chat/completions"),
    ("http://h/v1/chat/completions", "http://h/v1/chat/completions"),
])
def test_chat_completions_url(url, expected):
    assert chat_completions_url(url) == expected
