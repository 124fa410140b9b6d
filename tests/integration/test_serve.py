"""Serving engine: KV-cache decode equals recomputation, sharded logits equal one device, batching."""

import collections
import dataclasses
import functools
import json
import logging
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fax import models
from fax.config import ConfigError
from fax.data import ByteTokenizer
from fax.serving.batching import Batcher, Busy, Scheduler, complete, generate, stream
from fax.serving import engine as engine_module
from fax.serving.engine import Engine, serving_mesh
from fax.serving.sampling import MAX_LOGPROBS, SamplingParams
from fax.serving.text import TextStream

PROMPTS = [[5, 17, 99, 3, 42], [7] * 11 + [300], [1, 2, 3]]


def model(name):
    """Random weights, scaled up so that greedy continuations are varied (not one repeated token)."""
    cfg = dataclasses.replace(models.preset(name), init_std=0.3)
    graphdef, state = nnx.split(models.build(cfg, seed=1))
    return cfg, graphdef, nnx.to_pure_dict(state)


@functools.lru_cache
def full_forward(graphdef):
    return jax.jit(functools.partial(models.apply, graphdef))


def greedy_by_recomputing(graphdef, params, prompt, new_tokens, window=32, sampling=SamplingParams()):
    """The whole forward pass again for every token, over one right-padded window (causal attention
    keeps the padding out of earlier positions), so it compiles once; the logits adjusted by
    ``sampling``'s penalties and logit biases as OpenAI defines them, in float64."""
    tokens, counts = list(prompt), collections.Counter()
    for _ in range(new_tokens):
        padded = np.zeros((1, window), np.int32)
        padded[0, :len(tokens)] = tokens
        logits = np.asarray(full_forward(graphdef)(params, padded)[0, len(tokens) - 1], np.float64)
        for token, count in counts.items():
            logits[token] -= sampling.frequency_penalty * count + sampling.presence_penalty
        for token, bias in sampling.logit_bias:
            logits[token] += bias
        tokens.append(int(np.argmax(logits)))
        counts[tokens[-1]] += 1
    return tokens[len(prompt):]


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("n_devices", [1, 8])
def test_kv_cache_greedy_equals_recomputing(name, n_devices):
    cfg, graphdef, params = model(name)
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()[:n_devices]))
    assert engine.mesh.shape["tensor"] == n_devices
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    got = generate(engine, PROMPTS, [greedy] * len(PROMPTS))
    for prompt, tokens in zip(PROMPTS, got):
        expected = greedy_by_recomputing(graphdef, params, prompt, 12)
        assert tokens == expected
    assert len(set(got[0])) > 2  # a real continuation, not one token repeated


def test_sharded_engine_logits_equal_one_device_forward():
    cfg, graphdef, params = model("llama-tiny")
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()))
    leaf = jax.tree.leaves(engine.params)[0]
    assert leaf.sharding.mesh.devices.size == 8
    logits = engine.prefill_logits(PROMPTS)
    for prompt, row in zip(PROMPTS, logits):
        reference = models.apply(graphdef, params, jnp.asarray([prompt]))[0, -1]
        # 1e-5 of the logits' scale (these reach ~11): eight devices sum the heads' outputs in another
        # order than one, and float32 rounding alone then differs by up to ~2e-5 on some CPUs.
        np.testing.assert_allclose(row, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("n_devices", [1, 8])
def test_scores_are_the_forward_pass_log_probabilities(name, n_devices):
    """What `logprobs` returns: each token's log-probability given the ones before it, and the most
    likely tokens at each position, as the training forward pass gives them (float64 reference)."""
    cfg, graphdef, params = model(name)
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()[:n_devices]))
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 21)]
    chosen, top_ids, top_logp = engine.score(tokens)
    logits = np.asarray(models.apply(graphdef, params, jnp.asarray([tokens])), np.float64)[0, :-1]
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    assert chosen.shape == (20,) and top_ids.shape == top_logp.shape == (20, MAX_LOGPROBS)
    np.testing.assert_allclose(chosen, log_p[np.arange(20), tokens[1:]], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(top_ids, np.argsort(-log_p, -1)[:, :MAX_LOGPROBS])
    np.testing.assert_allclose(top_logp, np.take_along_axis(log_p, top_ids, -1), rtol=1e-5, atol=1e-5)
    for wrong in ([], [1] * (cfg.max_seq_len + 1)):
        with pytest.raises(ValueError, match=rf"can score 1 to {cfg.max_seq_len} tokens \(the model's context\), "
                                             rf"got {len(wrong)}"):
            engine.score(wrong)


def test_penalties_and_logit_biases_adjust_each_rows_logits_as_openai_defines_them():
    """Greedy rows with and without penalties and biases in one batch, over several decode calls:
    each equals the recomputed reference whose logits are adjusted by hand."""
    cfg, graphdef, params = model("gpt-tiny")
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()[:1]), max_batch=4)
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0)
    banned = greedy_by_recomputing(graphdef, params, PROMPTS[0], 1)[0]  # the first greedy token
    rows = [greedy, dataclasses.replace(greedy, frequency_penalty=1.5),
            dataclasses.replace(greedy, presence_penalty=-0.5, logit_bias=((7, 4.0), (banned, -100.0))),
            dataclasses.replace(greedy, frequency_penalty=0.3)]
    got = generate(engine, [PROMPTS[0]] * len(rows), rows)
    for tokens, sampling in zip(got, rows):
        assert tokens == greedy_by_recomputing(graphdef, params, PROMPTS[0], 20, sampling=sampling), sampling
    assert len({tuple(t) for t in got}) == len(rows)  # each adjustment changed the continuation
    assert banned not in got[2]


def test_after_warm_up_no_request_waits_for_a_prefill_or_decode_compile(caplog):
    """Batches of every size, prompts and generations of many lengths: their prefill and decode
    were all compiled (what is left: resizing the cache between two shapes, ~0.05 s)."""
    cfg, _, params = model("gpt-tiny")
    cfg = dataclasses.replace(cfg, max_seq_len=48)  # fewer shapes: prompt buckets 16, 32, 48; caches to 48 slots
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()[:1]), max_batch=4)
    engine.warm_up()

    def compiled() -> list[str]:
        found = re.findall(r"Finished XLA compilation of jit\((\w+)\)", caplog.text)
        caplog.clear()
        return [name for name in found if name in ("_prefill", "_decode")]

    rng = np.random.default_rng(0)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        for batch in (1, 3, 4, 2):
            prompts = [list(rng.integers(0, cfg.vocab_size, rng.integers(1, 40))) for _ in range(batch)]
            sampling = [SamplingParams(max_new_tokens=int(rng.integers(1, 49 - len(p))), temperature=0.7, seed=i)
                        for i, p in enumerate(prompts)]
            assert [len(t) for t in generate(engine, prompts, sampling)] == [s.max_new_tokens for s in sampling]
        assert compiled() == []
        generate(engine, [[1, 2]], [SamplingParams(max_new_tokens=3, logit_bias=((5, 1.0),))])
        assert compiled() == ["_prefill", "_decode"]  # logit biases: programs of their own, compiled on first use


def test_a_requests_samples_do_not_depend_on_its_batch():
    cfg, _, params = model("gpt-tiny")
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()))
    hot = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    alone = generate(engine, [PROMPTS[0]], [hot])[0]
    batched = generate(engine, PROMPTS, [hot, SamplingParams(max_new_tokens=3, seed=1), hot])[0]
    assert alone == batched and len(alone) == 10
    other_seed = generate(engine, [PROMPTS[0]], [dataclasses.replace(hot, seed=8)])[0]
    assert other_seed != alone


def test_requests_the_engine_cannot_serve_are_refused_with_reasons():
    """``request_problems`` (tests/unit/test_sampling.py) stop a generation before the engine runs."""
    cfg, _, params = model("gpt-tiny")
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()[:1]))
    with pytest.raises(ValueError, match="request 0: prompt is empty"):
        next(stream(engine, [[]], [SamplingParams()]))
    with pytest.raises(ValueError, match=r"request 1: prompt \(100 tokens\) \+ max_tokens \(64\) exceeds"):
        next(stream(engine, [[1], [1] * 100], [SamplingParams(max_new_tokens=64)] * 2))


def test_generate_command_continues_a_trained_run(tmp_path, small_corpus, capsys):
    from fax import Trainer, load_config
    from fax.cli import main
    from fax.config import run_config
    from fax.serving.text import run_tokenizer

    Trainer(load_config(overrides=["model=gpt-tiny", f"run_dir={tmp_path}", f"data.path={small_corpus}",
                                   "train.steps=2", "train.batch_size=8", "train.seq_len=32",
                                   "train.sample_tokens=0"]), echo=lambda _: None).fit()
    engine = Engine.from_run_dir(tmp_path)
    assert engine.step == 2 and engine.mesh.shape["tensor"] == 8  # tensor-parallel over every device
    capsys.readouterr()
    assert main(["generate", str(tmp_path), "--prompt", "def ", "--max-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ") and len(out) > len("def \n")
    assert main(["generate", str(tmp_path), "--prompt", "x" * 120, "--max-tokens", "20"]) == 2
    assert "exceeds the model's context of 128 tokens" in capsys.readouterr().err
    # the repetition penalties of the HTTP API: the engine's own continuation under them, which differs
    tok = run_tokenizer(run_config(tmp_path))
    prompt = [int(t) for t in tok.encode("def ")]
    plain, penalized = (generate(engine, [prompt], [SamplingParams(12, 0.0, presence_penalty=p, frequency_penalty=p)])[0]
                        for p in (0.0, 2.0))
    assert plain != penalized
    assert main(["generate", str(tmp_path), "--prompt", "def ", "--max-tokens", "12", "--temperature", "0",
                 "--presence-penalty", "2", "--frequency-penalty", "2"]) == 0
    assert capsys.readouterr().out == "def " + tok.decode(penalized) + "\n"
    assert main(["generate", str(tmp_path), "--prompt", "def ", "--presence-penalty", "3"]) == 2
    assert "presence_penalty must be in [-2, 2], got 3.0" in capsys.readouterr().err


def test_a_chat_tuned_run_replies_as_taught_and_ends_its_turn(tmp_path, capsys):
    """Conversations prepared with --messages-field train a model which, asked in the same layout
    (what /v1/chat/completions sends), gives the reply it was taught and ends its turn there."""
    from fax import Trainer, load_config
    from fax.data.chat import END_OF_TURN, FAX_LAYOUT
    from fax.cli import main
    from fax.data import prepare

    taught = {"hello": "hi there", "bye": "see you"}
    rng = np.random.default_rng(0)
    talks = [[{"role": "user", "content": asked}, {"role": "assistant", "content": taught[asked]}]
             for asked in rng.choice(list(taught), 300)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": t}) + "\n" for t in talks))
    prepare([tmp_path / "chat.jsonl"], tmp_path / "data", messages_field="messages")
    Trainer(load_config(overrides=["model=gpt-tiny", f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'data'}",
                                   "train.steps=200", "train.batch_size=16", "train.seq_len=64", "optim.lr=3e-3",
                                   "train.sample_tokens=0"]), echo=lambda _: None).fit()
    engine = Engine.from_run_dir(tmp_path / "run")
    for asked, reply in taught.items():
        tokens = generate(engine, [FAX_LAYOUT.prompt_ids(ByteTokenizer().encode, [{"role": "user", "content": asked}])],
                          [SamplingParams(max_new_tokens=20, temperature=0.0)])[0]
        text = TextStream(ByteTokenizer(), [END_OF_TURN])
        assert "".join(text.push(t) for t in tokens) == reply and text.stopped
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "bye", "--chat", "--max-tokens", "20",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "see you\n"


def test_requests_joining_a_running_batch_get_what_they_would_alone():
    cfg, _, params = model("gpt-tiny")
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()[:2]), max_batch=4)
    # Penalties and biases on some: a row's counts of generated tokens restart with each request it takes.
    requests = [(PROMPTS[i % 3], SamplingParams(max_new_tokens=4 + 3 * i, temperature=0.8, top_k=20, seed=i,
                                                frequency_penalty=float(i % 3), logit_bias=((i, 2.0),) * (i % 2)))
                for i in range(6)]
    alone = [generate(engine, [p], [s])[0] for p, s in requests]
    got: dict[int, list] = {i: [] for i in range(len(requests))}

    def sink(i):
        return lambda item: got[i].append(item[0])

    scheduler = Scheduler(engine, max_pending=len(requests))
    try:
        for i, (prompt, sampling) in enumerate(requests):  # 6 requests, 4 rows: two wait for a free row
            scheduler.submit(prompt, sampling, sink(i))
            time.sleep(0.05 * i)  # the later ones arrive while the batch runs
        deadline = time.monotonic() + 60
        while scheduler.load() != {"running": 0, "queued": 0, "scoring": 0} and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.close()
    assert [[t for t in got[i] if t is not None] for i in range(len(requests))] == alone
    assert [len(a) for a in alone] == [4 + 3 * i for i in range(6)]
    # A scheduler with max_pending requests running or queued refuses more until one finishes.
    scheduler = Scheduler(engine, max_pending=2)
    try:
        for _ in range(2):  # 100 tokens each: they outlast the next submit by far
            scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=100), lambda item: None)
        with pytest.raises(Busy, match="max_concurrent=2"):
            scheduler.submit(PROMPTS[0], SamplingParams(), sink(0))
        with pytest.raises(Busy, match="max_concurrent=2"):  # a prompt to score is a request too
            scheduler.score(PROMPTS[0], request=True)
        # A finished generation's scoring is not refused: that request had its place.
        np.testing.assert_array_equal(scheduler.score(PROMPTS[0]).result(timeout=60)[0], engine.score(PROMPTS[0])[0])
    finally:
        scheduler.close()
    # Prompts being scored count against the limit (a scoring flood would otherwise starve generation).
    gate = threading.Event()
    score = engine.score
    engine.score = lambda tokens: gate.wait(60) and score(tokens)
    scheduler = Scheduler(engine, max_pending=1)
    try:
        scored = scheduler.score(PROMPTS[1], request=True)
        assert scheduler.load() == {"running": 0, "queued": 0, "scoring": 1}
        with pytest.raises(Busy, match="1 requests are running, queued or being scored"):
            scheduler.submit(PROMPTS[0], SamplingParams(), sink(0))
        gate.set()
        np.testing.assert_array_equal(scored.result(timeout=60)[0], score(PROMPTS[1])[0])
        deadline = time.monotonic() + 10
        while scheduler.load()["scoring"] and time.monotonic() < deadline:
            time.sleep(0.01)
        scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=1), sink(0))  # room again
    finally:
        scheduler.close()


def test_a_cancelled_request_frees_its_row_at_once():
    """What a client that hangs up mid-stream causes: its row stops decoding after the call under
    way, and the next request is served as if it had been alone."""
    cfg, _, params = model("gpt-tiny")
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()[:1]), max_batch=1)
    decode_calls = []
    decode = engine.decode
    engine.decode = lambda *args: decode_calls.append(1) or decode(*args)
    scheduler = Scheduler(engine, max_pending=2)
    got, keys = [], []

    def hang_up(item):
        got.append(item)
        scheduler.cancel(keys[0])

    try:
        keys.append(scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=100), hang_up))
        after = []
        scheduler.submit(PROMPTS[1], SamplingParams(max_new_tokens=5, temperature=0.0), after.append)
        deadline = time.monotonic() + 60
        while not (after and after[-1][1]) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.close()
    assert len(got) == 1 and not got[0][1]  # the first token, then nothing: its sink is gone
    assert len(decode_calls) <= 2  # one call for the first request (100 tokens would take 13), one for the second
    alone = generate(engine, [PROMPTS[1]], [SamplingParams(max_new_tokens=5, temperature=0.0)])[0]
    assert [t for t, _ in after] == alone and after[-1][1]


def test_a_request_that_fails_to_join_fails_alone_and_the_running_ones_go_on():
    """One bad request (its prefill raises: a value the engine could not take) ended a concurrent
    stream with its error. Now it fails alone: the running request's tokens are those it gets alone."""
    cfg, _, params = model("gpt-tiny")
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()[:1]), max_batch=2)
    prefill = engine.prefill

    def failing_prefill(rows, prompts, sampling):
        if PROMPTS[2] in prompts:
            raise OverflowError("Python integer 1099511627776 out of bounds for int32")
        return prefill(rows, prompts, sampling)

    engine.prefill = failing_prefill
    scheduler = Scheduler(engine, max_pending=2)
    running, bad = [], []
    try:
        scheduler.submit(PROMPTS[1], SamplingParams(max_new_tokens=40, temperature=0.0), running.append)
        while not running:
            time.sleep(0.01)
        scheduler.submit(PROMPTS[2], SamplingParams(max_new_tokens=5), bad.append)  # joins the running batch
        deadline = time.monotonic() + 60
        while not (running[-1] is not None and running[-1][1]) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.close()
    assert len(bad) == 1 and isinstance(bad[0], OverflowError)
    engine.prefill = prefill
    alone = generate(engine, [PROMPTS[1]], [SamplingParams(max_new_tokens=40, temperature=0.0)])[0]
    assert [t for t, _ in running] == alone


def test_the_cache_follows_the_rows_and_positions_in_use_and_decode_still_equals_recomputing():
    cfg, graphdef, params = model("gpt-tiny")
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()[:1]), max_batch=2)
    assert engine.span_buckets == (16, 24, 32, 48, 64, 96, 128)
    assert engine.length_buckets == (16, 32, 64, 128)
    greedy = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (30, 3)]
    prompts = [[1, 2] * 7, [3] * 40]
    batcher = Batcher(engine)
    got: dict[int, list] = {0: [], 1: []}
    shapes = []

    def record(events):
        for key, token, _ in events:
            got[key].append(token)
        shapes.append((engine.rows, engine.slots))

    record(batcher.admit([(0, (prompts[0], greedy[0]))]))  # one row, positions 0..13: the smallest cache
    record(batcher.step())  # 8 tokens per call: up to position 21
    record(batcher.step())  # up to 29
    record(batcher.admit([(1, (prompts[1], greedy[1]))]))  # a second row, a 40-token prompt: the 64 bucket
    record(batcher.step())  # up to 47, both rows: fewer slots
    record(batcher.step())  # up to 45, the first row alone: one row
    assert shapes == [(1, 16), (1, 24), (1, 32), (2, 64), (2, 48), (1, 48)]
    assert not batcher.active
    assert [got[0], got[1]] == [greedy_by_recomputing(graphdef, params, p, s.max_new_tokens, window=48)
                                for p, s in zip(prompts, greedy)]


def test_an_engine_whose_largest_cache_would_not_fit_is_refused_at_the_start(monkeypatch):
    # float32 params 0.54 MiB and their serving weights 0.22 MiB; a cache of 8 rows x 128 positions 1 MiB
    cfg, _, params = model("gpt-tiny")
    monkeypatch.setattr(engine_module, "device_memory_bytes", lambda device: 5 * 2 ** 18)  # as a GPU would report
    with pytest.raises(ConfigError, match=r"KV cache of max_batch=8 x 128 positions .* lower max_batch"):
        Engine(cfg, params, serving_mesh(cfg, jax.devices()[:1]), max_batch=8)
    Engine(cfg, params, serving_mesh(cfg, jax.devices()[:1]), max_batch=2)  # 0.25 MiB of cache fits
    # Over 8 devices each holds an eighth of the cache (the heads are split) and of the sharded params.
    Engine(cfg, params, serving_mesh(cfg, jax.devices()), max_batch=8)


def test_a_sample_longer_than_the_context_is_cut_to_what_the_context_holds():
    """`fax train`'s default sample (200 tokens) from the default model (a 128-token context) failed
    with "prompt is empty" after training: the prompt was cut to nothing to make room."""
    cfg, _, params = model("gpt-tiny")
    engine = Engine(cfg, params, serving_mesh(cfg, jax.devices()[:1]), max_batch=1, end_ids=())
    text = complete(engine, ByteTokenizer(), "def ", 200, temperature=0.0)
    assert text.startswith("def ") and len(text.encode()) - len(b"def ") >= cfg.max_seq_len - 4 - 8
