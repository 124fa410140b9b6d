"""`fax serve`: a run directory written by `fax train`, served by Ray Serve, asked by real HTTP clients."""

import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import psutil
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("ray.serve")

import ray  # noqa: E402

from fax import Trainer, load_config  # noqa: E402
from fax.config import ClusterConfig, ServeConfig  # noqa: E402
from fax.serving.batching import generate  # noqa: E402
from fax.serving.engine import Engine  # noqa: E402
from fax.serving.sampling import SamplingParams  # noqa: E402
from fax.serving.text import run_tokenizer  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_corpus):
    path = tmp_path_factory.mktemp("served")
    Trainer(load_config(overrides=["model=gpt-tiny", f"run_dir={path}", f"data.path={small_corpus}",
                                   "train.steps=30", "train.batch_size=8", "train.seq_len=64",
                                   "train.sample_tokens=0", "optim.lr=3e-3"]), echo=lambda _: None).fit()
    return path


@pytest.fixture(scope="module")
def url(run_dir):
    from fax.serving import http as server

    ray.init(_temp_dir=tempfile.mkdtemp(prefix="fax-srv-", dir="/tmp"), include_dashboard=False,
             num_cpus=2, log_to_driver=False)
    try:
        yield server.start(run_dir, ServeConfig(port=free_port(), max_batch=8, max_concurrent=32, max_tokens=64,
                                                       read_timeout_s=3),
                           ClusterConfig(), cpu_devices=8, echo=lambda _: None)
    finally:
        server.stop(shutdown_ray=True)


def complete(url, stream=False, **body):
    return post(f"{url}/v1/completions", {"prompt": "def ", "max_tokens": 12, "temperature": 0, **body}, stream)


def post(endpoint, body, stream):
    """The answer, or the list of its server-sent events (after checking they end with [DONE])."""
    response = requests.post(endpoint, json={**body, "stream": stream}, stream=stream, timeout=60)
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()
    events = [line[len("data: "):] for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_health_and_models(url, run_dir):
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["checkpoint_step"] == 30 and health["model"] == run_dir.name
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [run_dir.name] and models["data"][0]["max_model_len"] == 128


def test_completion_is_the_engines_continuation(url, run_dir):
    engine = Engine.from_run_dir(run_dir)
    tokenizer = run_tokenizer(load_config(run_dir / "config.yaml"))
    prompt = [int(t) for t in tokenizer.encode("def ")]
    expected = generate(engine, [prompt], [SamplingParams(max_new_tokens=12, temperature=0.0)])[0]
    got = complete(url)
    assert got["choices"][0]["text"] == tokenizer.decode(expected)
    assert got["choices"][0]["finish_reason"] == "length"
    assert got["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}


def test_streamed_completion_arrives_in_chunks_that_add_up(url):
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "max_tokens": 24}
    chunks = complete(url, stream=True, **sampled)
    assert len(chunks) >= 5
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == complete(url, **sampled)["choices"][0]["text"]
    counted = complete(url, stream=True, stream_options={"include_usage": True}, **sampled)
    assert counted[-1]["choices"] == [] and counted[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 24,
                                                                     "total_tokens": 28}


def test_stop_sequence_ends_the_text_before_it(url):
    sampled = {"max_tokens": 40, "temperature": 1.0, "seed": 3}
    full = complete(url, **sampled)["choices"][0]["text"]
    stop = next(full[i:i + 2] for i in range(4, len(full)) if full[i:i + 2].strip())
    got = complete(url, **sampled, stop=["never there", stop])["choices"][0]
    assert (got["text"], got["finish_reason"]) == (full[:full.index(stop)], "stop")


def test_echo_with_logprobs_scores_the_prompt(url, run_dir):
    """How evaluation harnesses score text: max_tokens=0, echo, logprobs. Every prompt token after
    the first gets the engine's log-probability, with the 2 most likely tokens and itself."""
    prompt = "def main():\n    return 0\n"
    got = complete(url, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice, usage = got["choices"][0], got["usage"]
    assert (choice["text"], choice["finish_reason"], usage["completion_tokens"]) == (prompt, "length", 0)
    logprobs = choice["logprobs"]
    tokenizer = run_tokenizer(load_config(run_dir / "config.yaml"))
    ids = [int(t) for t in tokenizer.encode(prompt)]
    # The same prompt as token ids in a batch of one, as lm-evaluation-harness sends it.
    assert complete(url, prompt=[ids], max_tokens=0, echo=True, logprobs=2)["choices"][0]["logprobs"] == logprobs
    # Scored alone, a prompt may fill the whole context (one that generates must leave room).
    window = complete(url, prompt=[1] * 128, max_tokens=0, echo=True, logprobs=0)["choices"][0]["logprobs"]
    assert len(window["token_logprobs"]) == 128 and all(t == {"\x01": lp} for t, lp in
                                                        zip(window["top_logprobs"][1:], window["token_logprobs"][1:]))
    assert "".join(logprobs["tokens"]) == prompt and len(logprobs["tokens"]) == len(ids)
    assert all(prompt[at:at + len(t)] == t for at, t in zip(logprobs["text_offset"], logprobs["tokens"]))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    chosen, _, most_likely = Engine.from_run_dir(run_dir, devices=jax.devices()[:1]).score(ids)
    np.testing.assert_allclose(logprobs["token_logprobs"][1:], chosen, rtol=1e-5, atol=1e-5)
    for i, (token, logp, top) in enumerate(zip(*(logprobs[k][1:] for k in ("tokens", "token_logprobs",
                                                                            "top_logprobs")))):
        assert top[token] == logp and 2 <= len(top) <= 3  # the two most likely, and the prompt's own
        np.testing.assert_allclose(sorted(top.values(), reverse=True)[:2], most_likely[i, :2], rtol=1e-5, atol=1e-5)


def test_greedy_tokens_are_the_most_likely_ones(url):
    """logprobs of a greedy completion: each generated token is the top one of its position, and
    the tokens listed are the text returned."""
    response = complete(url, prompt="import ", max_tokens=10, logprobs=1)
    got, got_usage = response["choices"][0], response["usage"]["completion_tokens"]
    logprobs = got["logprobs"]
    assert "".join(logprobs["tokens"]) == got["text"] and len(logprobs["tokens"]) == got_usage == 10
    assert logprobs["text_offset"] == list(itertools.accumulate((len(t) for t in logprobs["tokens"][:-1]),
                                                                initial=0))
    for token, logp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert top == {token: logp} and logp < 0
    # What lm-evaluation-harness asks to score a continuation: echo, one token generated.
    scored = complete(url, prompt="import ", max_tokens=1, logprobs=1, echo=True)["choices"][0]
    assert scored["text"] == "import " + logprobs["tokens"][0]
    assert scored["logprobs"]["tokens"] == [*"import ", logprobs["tokens"][0]]
    assert scored["logprobs"]["token_logprobs"][-1] == pytest.approx(logprobs["token_logprobs"][0], abs=1e-5)
    assert scored["logprobs"]["text_offset"] == list(range(8))


def test_logit_bias_and_penalties_change_the_completion(url):
    """They reach the engine (whose arithmetic test_serve checks against a reference)."""
    assert complete(url, max_tokens=6, logit_bias={str(ord("z")): 100})["choices"][0]["text"] == "zzzzzz"
    plain = complete(url, max_tokens=30)["choices"][0]["text"]
    assert complete(url, max_tokens=30, frequency_penalty=2)["choices"][0]["text"] != plain


TALK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def "}]


def ask_chat(url, stream=False, **body):
    return post(f"{url}/v1/chat/completions", {"messages": TALK, "max_tokens": 12, "temperature": 0, **body}, stream)


def test_chat_reply_continues_the_conversation_laid_out_as_in_training(url):
    """The conversation becomes the text `fax prepare --messages-field` trains on, ending with the
    assistant's header; the reply is its greedy continuation, streamed or whole."""
    reply = ask_chat(url)
    laid_out = "<|system|>\nBe brief.<|end|>\n<|user|>\ndef <|end|>\n<|assistant|>\n"
    alone = complete(url, prompt=laid_out, stop="<|end|>")
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": alone["choices"][0]["text"]}
    assert reply["choices"][0]["finish_reason"] == alone["choices"][0]["finish_reason"]
    assert reply["usage"] == alone["usage"] and reply["usage"]["prompt_tokens"] == len(laid_out)
    chunks = ask_chat(url, stream=True)
    assert len(chunks) > 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == reply["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]
    counted = ask_chat(url, stream=True, stream_options={"include_usage": True})  # a last chunk of the usage
    assert counted[-1]["choices"] == [] and counted[-1]["usage"] == reply["usage"]
    assert [c["choices"] for c in counted[:-1]] == [c["choices"] for c in chunks]
    assert all(c["usage"] is None for c in counted[:-1])
    assert ask_chat(url, max_completion_tokens=3)["usage"]["completion_tokens"] == 3
    # What OpenAI clients send by default changes nothing.
    defaults = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "tools": [], "tool_choice": "none",
                "response_format": {"type": "text"}, "user": "someone"}
    assert ask_chat(url, **defaults)["choices"] == reply["choices"]


def test_chat_logprobs_list_the_reply_tokens_with_the_most_likely_in_order(url):
    """logprobs=true, top_logprobs=2 on a chat: the tokens a completion of the laid-out conversation
    lists, with the same log-probabilities, in the chat form (a list per token, most likely first)."""
    laid_out = "<|system|>\nBe brief.<|end|>\n<|user|>\ndef <|end|>\n<|assistant|>\n"
    reply = ask_chat(url, logprobs=True, top_logprobs=2)
    alone = complete(url, prompt=laid_out, stop="<|end|>", logprobs=2)["choices"][0]["logprobs"]
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"] and [c["token"] for c in content] == alone["tokens"]
    np.testing.assert_allclose([c["logprob"] for c in content], alone["token_logprobs"], rtol=1e-6)
    for c, top in zip(content, alone["top_logprobs"]):
        likely = c["top_logprobs"]
        assert len(likely) == 2 and likely[0]["logprob"] >= likely[1]["logprob"]
        assert c["logprob"] == pytest.approx(likely[0]["logprob"])  # greedy: the reply's token is the most likely
        assert all(top[e["token"]] == pytest.approx(e["logprob"]) for e in likely if e["bytes"] is not None)
        assert c["bytes"] is None or bytes(c["bytes"]).decode() == c["token"]
    assert ask_chat(url)["choices"][0]["logprobs"] is None


BAD_CHATS = [
    ({"prompt": "x"}, "messages must be a non-empty list"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role must be one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be text"),
    ({"messages": TALK, "echo": True}, "echo is not supported on /v1/chat/completions"),
    ({"messages": TALK, "logprobs": 1}, "logprobs must be true or false, got 1"),
    ({"messages": TALK, "top_logprobs": 2}, "top_logprobs needs logprobs=true"),
    ({"messages": TALK, "logprobs": True, "top_logprobs": 9}, "top_logprobs must be in [0, 5], got 9"),
    ({"messages": TALK, "logprobs": True, "stream": True}, "not supported with stream=true"),
    ({"messages": TALK, "max_tokens": 65}, "above this server's limit of 64"),
    ({"messages": TALK, "presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
    ({"messages": TALK, "response_format": {"type": "json_object"}},
     "response_format is not supported on /v1/chat/completions (only {\"type\": \"text\"})"),
    ({"messages": TALK, "tools": [{"type": "function"}]}, "tools is not supported on /v1/chat/completions (only [])"),
    ({"messages": TALK, "temperature": -1}, "temperature must be >= 0"),
    ({"messages": [{"role": "user", "content": "x" * 120}]}, "messages: 151 tokens, more than the 127 this server"),
    ({"messages": [{"role": "user", "content": "x" * 80}], "max_tokens": 20},
     "messages (111 tokens) + max_tokens (20) exceeds the model's context of 128 tokens; shorten the messages"),
]


@pytest.mark.parametrize("body,message", BAD_CHATS, ids=[m for _, m in BAD_CHATS])
def test_bad_chats_get_a_400_that_says_why_and_the_server_goes_on(url, body, message):
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert ask_chat(url, max_tokens=2)["choices"][0]["finish_reason"] == "length"


BAD = [
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "must be a JSON object"),
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "nests JSON too deeply"),
    ({}, 400, "prompt is required"),
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": 7}, 400, "prompt must be a string or a list of token ids"),
    ({"prompt": [1, 99999]}, 400, "prompt token ids must be in [0, 512)"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens must be positive, got -1"),
    ({"prompt": "x", "max_tokens": 65}, 400, "above this server's limit of 64 (serve.max_tokens)"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature must be >= 0"),
    ({"prompt": "x", "temperature": True}, 400, "temperature must be a number"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream must be true or false"),
    ({"prompt": "x", "stop": [1]}, 400, "stop must be a string or a list of at most 4 strings"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options needs stream=true"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, 400, "include_usage must be true or false"),
    ({"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty must be in [-2, 2], got -3.0"),
    ({"prompt": "x", "frequency_penalty": "high"}, 400, "frequency_penalty must be a number"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias values must be in [-100, 100]"),
    ({"prompt": "x", "logit_bias": {"5": True}}, 400, "logit_bias must map token ids"),
    ({"prompt": "x", "logit_bias": {"fox": 1}}, 400, "logit_bias must map token ids"),
    ({"prompt": "x", "logit_bias": [5]}, 400, "logit_bias must be an object"),
    ({"prompt": "x", "logit_bias": {"512": 1}}, 400, "logit_bias token ids must be in [0, 512)"),
    ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias may hold at most 300 tokens"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of is not supported on /v1/completions (only 1)"),
    ({"prompt": "x", "n": 2}, 400, "n must be 1"),
    ({"prompt": "x" * 128}, 400, "prompt: 128 tokens, more than the 127 this server accepts"),
    ({"prompt": [1] * 129, "echo": True, "max_tokens": 0}, 400, "prompt: 129 tokens, more than the 128 this server accepts"),
    ({"prompt": "x" * 100, "max_tokens": 64}, 400, "exceeds the model's context of 128 tokens"),
    ({"prompt": "x", "model": "gpt-5"}, 404, "model 'gpt-5' is not served here"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be positive, got 0"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs must be in [0, 5], got 6"),
    ({"prompt": "x", "logprobs": "2"}, 400, "logprobs must be an integer"),
    ({"prompt": "x", "echo": 1}, 400, "echo must be true or false"),
    ({"prompt": "x", "logprobs": 1, "stream": True}, 400, "logprobs and echo are not supported with stream=true"),
    # Found by hand (500s, or accepted though invalid): each a 400 naming the field now.
    ({"prompt": "x", "top_k": 2 ** 40}, 400, "top_k must be in [0, 2**31)"),
    ('{"prompt": "x", "temperature": ' + "9" * 400 + "}", 400, "temperature must be a finite number"),
    ('{"prompt": "x", "temperature": NaN}', 400, "temperature must be a finite number, got nan"),
    ('{"prompt": "x", "top_p": Infinity}', 400, "top_p must be a finite number, got inf"),
    ('{"prompt": "x", "logit_bias": {"5": ' + "9" * 400 + "}}", 400, "logit_bias must map token ids"),
    ('{"prompt": "ab\\ud800c"}', 400, "prompt holds a lone UTF-16 surrogate"),
    ({"prompt": "x", "stop": ""}, 400, "stop sequences must hold 1 to 1000 characters"),
    ({"prompt": "x", "stop": ["ok", "x" * 400_000]}, 400, "stop sequences must hold 1 to 1000 characters"),
    ({"prompt": "x" * 9_000_000}, 413, "larger than this server's limit of 8388608 bytes (serve.max_request_bytes)"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_requests_get_a_4xx_that_says_why_and_the_server_goes_on(url, body, status, message):
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(f"{url}/v1/completions", data=data, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"]
    if isinstance(body, dict) and status != 413:  # the setting at fault, as OpenAI's clients show it
        assert error["param"] == "prompt" or error["param"] in body or error["param"] in body.get("stream_options", {})
    assert complete(url, max_tokens=2)["choices"][0]["finish_reason"] == "length"


def test_a_streamed_request_completes_while_bad_ones_beside_it_are_refused(url):
    """A bad request shared the batch of a valid stream and ended it with its own 500; now every bad
    one is refused before it joins, and the stream beside them gets what it gets alone."""
    body = {"max_tokens": 48, "temperature": 0.7, "seed": 5}
    alone = complete(url, **body)["choices"][0]["text"]
    with ThreadPoolExecutor(8) as pool:
        streamed = pool.submit(complete, url, True, **body)
        time.sleep(0.2)
        refused = list(pool.map(lambda bad: requests.post(f"{url}/v1/completions", data=bad if isinstance(bad, str)
                                                          else json.dumps(bad), timeout=30).status_code,
                                [b for b, status, _ in BAD if status != 413] * 2))
        chunks = streamed.result(timeout=120)
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone
    assert all(400 <= status < 500 for status in refused)


def test_every_error_is_the_apis_json_and_no_pages_beyond_it(url):
    """Unknown paths and methods, FastAPI's generated docs: a JSON error, never plain text or a page."""
    for method, path, status in (("get", "/nowhere", 404), ("get", "/docs", 404), ("get", "/openapi.json", 404),
                                 ("get", "/v1/completions", 405)):
        response = getattr(requests, method)(f"{url}{path}", timeout=10)
        assert response.status_code == status and response.json()["error"]["message"], (path, response.text)


def test_a_body_that_never_arrives_gets_408(url):
    """A Content-Length larger than the body sent held the connection with no read timeout; now the
    server answers 408 once serve.read_timeout_s (3 s here) has passed."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        start = time.monotonic()
        answer = b""
        while b"serve.read_timeout_s" not in answer:  # the headers and the body may come in separate reads
            piece = client.recv(4096)
            if not piece:
                break
            answer += piece
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "serve.read_timeout_s" in answer, answer
    assert time.monotonic() - start < 20


def test_sixteen_concurrent_clients_get_complete_answers(url):
    """Each client sends requests for a few seconds; every answer is what that request gets alone."""
    def ask(i):
        body = {"max_tokens": 8 + i % 5, "temperature": 0.8, "seed": i % 4, "stream": i % 2 == 1}
        return [(i, complete(url, **body)) for _ in range(3)]

    with ThreadPoolExecutor(16) as pool:
        answers = [a for batch in pool.map(ask, range(16)) for a in batch]
    assert len(answers) == 48
    for i, got in answers:
        text = "".join(c["choices"][0]["text"] for c in got) if i % 2 else got["choices"][0]["text"]
        alone = complete(url, max_tokens=8 + i % 5, temperature=0.8, seed=i % 4)
        assert text == alone["choices"][0]["text"]
        assert alone["usage"]["completion_tokens"] == 8 + i % 5
    assert requests.get(f"{url}/health", timeout=10).json()["running"] == 0


def test_a_warmed_up_server_engine_compiles_nothing_for_its_requests(run_dir, caplog):
    """`fax serve --warm-up`: the engine the ingress builds has every prefill and decode compiled."""
    from fax.serving.http import _engine

    engine = _engine(str(run_dir), ServeConfig(max_batch=1, warm_up=True), ClusterConfig(), end_ids=())
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        for prompt, new in (([5, 6], 3), (list(range(40)), 70), (list(range(100)), 20)):
            assert len(generate(engine, [prompt], [SamplingParams(max_new_tokens=new, temperature=0.0)])[0]) == new
    assert not re.findall(r"compilation of jit\((_prefill|_decode)\)", caplog.text)


def test_a_port_in_use_or_a_foreign_host_is_refused_before_ray_starts(run_dir):
    from fax.serving import http as server
    from fax.config import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use.*--port"):
            server.start(run_dir, ServeConfig(port=port), ClusterConfig(), cpu_devices=1, echo=lambda _: None)
    with pytest.raises(ConfigError, match="--host must be an address of this machine"):
        server.start(run_dir, ServeConfig(host="203.0.113.7", port=free_port()), ClusterConfig(), cpu_devices=1)


def process_states() -> dict[int, tuple[int, str]]:
    """Every process's (parent pid, state letter), read from /proc."""
    states = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        states[int(stat.parent.name)] = int(fields[1]), fields[0]
    return states


def live_descendants(pid: int) -> set[int]:
    """The processes ``pid`` started, and theirs, that are still running (zombies count as ended)."""
    states, found, todo = process_states(), set(), [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, (ppid, _) in states.items() if ppid == parent]
        found.update(children)
        todo.extend(children)
    return {p for p in found if states[p][1] != "Z"}


def still_running(pids: set[int]) -> set[int]:
    states = process_states()
    return {p for p in pids if p in states and states[p][1] != "Z"}


def test_sigterm_stops_fax_serve_and_every_ray_process_it_started(run_dir, tmp_path):
    """How a service manager stops a server: the command exits 0 and none of the processes it
    started outlive it (with Python's default SIGTERM, Ray's agents were left running). A second
    SIGTERM during the shutdown (``timeout`` and a signal to the process group each send one) does
    not cut it short (it did: exit 130)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "serve.log"
    with log.open("w") as out:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen([sys.executable, "-m", "fax.cli", "--cpu-devices", "1", "serve", str(run_dir),
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    started: set[int] = set()
    try:
        deadline, up = time.monotonic() + 180, False
        while not up and time.monotonic() < deadline and proc.poll() is None:
            try:
                up = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok
            except requests.RequestException:  # not listening yet, or the replica is still starting
                time.sleep(1)
        assert up, f"fax serve did not come up (exit code {proc.poll()})"
        started = live_descendants(proc.pid)  # Ray's GCS, raylet, agents, the Serve actors
        assert len(started) >= 3, started
        # Ray's services listened on every interface. Left: Ray Serve's replica binds its gRPC port for
        # calls between deployments to [::] in its own code (ray/serve/_private/replica.py).
        listening = {(p.name(), c.laddr.ip) for p in map(psutil.Process, started) for c in p.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        exposed = {(name, ip) for name, ip in listening if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")}
        # The replica's process title names the method it runs at that moment (``...CompletionServer.check_health``).
        replica = "ray::ServeReplica:fax:CompletionServer"
        assert len(listening) > 5, listening
        assert all(name.split(".")[0] == replica and ip == "::" for name, ip in exposed), exposed
        for _ in range(3):  # clients that hang up mid-stream: each logged a TaskCancelledError traceback
            with requests.post(f"http://127.0.0.1:{port}/v1/completions", stream=True, timeout=60,
                               json={"prompt": "def ", "max_tokens": 100, "stream": True}) as hung_up:
                next(hung_up.iter_lines())
        time.sleep(2)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["running"] == 0
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the shutdown takes seconds
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()
        deadline = time.monotonic() + 30
        while still_running(started) and time.monotonic() < deadline:
            time.sleep(1)
        assert still_running(started) == set()
    finally:
        for pid in still_running(started | {proc.pid}):  # a failed run leaves nothing behind either
            os.kill(pid, signal.SIGKILL)
