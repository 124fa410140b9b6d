"""`fax serve`: a run directory written by `fax train`, served by Ray Serve, asked by real HTTP clients."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("ray.serve")

import ray  # noqa: E402

from fax import Trainer, load_config  # noqa: E402
from fax.config import ClusterConfig, ServeConfig  # noqa: E402
from fax.serve import Engine, SamplingParams, generate, run_tokenizer  # noqa: E402


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
    from fax import server

    ray.init(_temp_dir=tempfile.mkdtemp(prefix="fax-srv-", dir="/tmp"), include_dashboard=False,
             num_cpus=2, log_to_driver=False)
    try:
        yield server.start(run_dir, ServeConfig(port=free_port(), max_batch=8, max_concurrent=32, max_tokens=64),
                           ClusterConfig(), cpu_devices=8, echo=lambda _: None)
    finally:
        server.stop(shutdown_ray=True)


def complete(url, stream=False, **body):
    body = {"prompt": "def ", "max_tokens": 12, "temperature": 0, **body}
    response = requests.post(f"{url}/v1/completions", json={**body, "stream": stream}, stream=stream, timeout=60)
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


def test_stop_sequence_ends_the_text_before_it(url):
    sampled = {"max_tokens": 40, "temperature": 1.0, "seed": 3}
    full = complete(url, **sampled)["choices"][0]["text"]
    stop = next(full[i:i + 2] for i in range(4, len(full)) if full[i:i + 2].strip())
    got = complete(url, **sampled, stop=["never there", stop])["choices"][0]
    assert (got["text"], got["finish_reason"]) == (full[:full.index(stop)], "stop")


BAD = [
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "must be a JSON object"),
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
    ({"prompt": "x", "n": 2}, 400, "n must be 1"),
    ({"prompt": "x" * 128}, 400, "prompt is 128 tokens; this server accepts at most 127"),
    ({"prompt": "x" * 100, "max_tokens": 64}, 400, "exceeds the model's context of 128 tokens"),
    ({"prompt": "x", "model": "gpt-5"}, 404, "model 'gpt-5' is not served here"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_requests_get_a_4xx_that_says_why_and_the_server_goes_on(url, body, status, message):
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(f"{url}/v1/completions", data=data, timeout=30)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    assert complete(url, max_tokens=2)["choices"][0]["finish_reason"] == "length"


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


def test_a_port_in_use_or_a_foreign_host_is_refused_before_ray_starts(run_dir):
    from fax import server
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
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the shutdown takes seconds
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()
        deadline = time.monotonic() + 30
        while still_running(started) and time.monotonic() < deadline:
            time.sleep(1)
        assert still_running(started) == set()
    finally:
        for pid in still_running(started | {proc.pid}):  # a failed run leaves nothing behind either
            os.kill(pid, signal.SIGKILL)
