"""Sampling maths, request checks and text streaming, without an engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fax.data import ByteTokenizer
from fax import models
from fax.serving.sampling import SamplingParams, argmax, filter_logits, request_problems, sample
from fax.serving.text import TextStream


def test_argmax_and_sampling_pick_what_jax_would():
    """The two-reduction argmax: jnp.argmax's index on ties, NaNs and all -inf rows; sampling with it
    draws jax.random.categorical's tokens for the same keys."""
    logits = jax.random.normal(jax.random.key(0), (16, 1000))
    logits = logits.at[1, 7].set(jnp.nan).at[1, 9].set(jnp.nan).at[2].set(-jnp.inf).at[3, 4:9].set(50.0)
    np.testing.assert_array_equal(argmax(logits), jnp.argmax(logits, axis=-1))
    seeds, steps = jnp.arange(16, dtype=jnp.uint32), jnp.arange(16) * 3
    hot = jnp.full((16,), 0.8)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
    finite = logits.at[1].set(0.0)  # a NaN row samples the NaN; not a question of which one
    np.testing.assert_array_equal(sample(finite, seeds, steps, hot, jnp.zeros(16, jnp.int32), jnp.ones(16)),
                                  jax.vmap(jax.random.categorical)(keys, finite / 0.8))


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.array([2, 0, 0]), jnp.array([1.0, 0.7, 1.0]))))
    assert kept.tolist() == [[True, True, False, False],  # top_k=2
                             [True, True, False, False],  # top_p=0.7: 0.5 + 0.3 reach it
                             [True, True, True, True]]  # no filter


@pytest.mark.parametrize(("argv", "devices"), [(["generate", "run", "--prompt", "x"], 1), (["serve", "run"], 1),
                                               (["train"], 8), (["eval", "run"], 8),
                                               (["--cpu-devices", "4", "serve", "run"], 4)])
def test_commands_that_decode_emulate_one_cpu_device_unless_told(argv, devices):
    """An engine split over emulated devices runs slower than on one (they share the cores)."""
    from fax.cli import cpu_devices, parse

    args = parse(argv)
    assert cpu_devices(args.command, args.cpu_devices) == devices


def test_text_stream_ends_at_a_stop_sequence_and_completes_characters():
    tok = ByteTokenizer()
    stream = TextStream(tok, stop=["\n\n"])
    out = "".join(stream.push(int(t)) for t in tok.encode("é ok\nmore\n\nnever"))
    assert out == "é ok\nmore" and stream.stopped
    partial = TextStream(tok)
    first, second = (partial.push(int(t)) for t in "é".encode())
    assert (first, second) == ("", "é")  # half a character is held back


def first_stop(text, stops):
    """The text before the stop sequence that completes first (the longest of those ending there)."""
    for end in range(1, len(text) + 1):
        ended = [s for s in stops if s and text[:end].endswith(s)]
        if ended:
            return text[:end - max(map(len, ended))], True
    return text, False


@pytest.mark.parametrize("seed", range(40))
def test_text_stream_stops_where_a_search_of_the_whole_text_would(seed):
    """Overlapping stop sequences (shared prefixes, one inside another) over a small alphabet, so
    that partial matches are everywhere; the streamed deltas and the flush add up to the text before
    the first completed stop."""
    rng = np.random.default_rng(seed)
    tok = ByteTokenizer()
    text = "".join(rng.choice(list("aab\né"), size=60))
    stops = ["".join(rng.choice(list("ab\n"), size=rng.integers(1, 5))) for _ in range(rng.integers(1, 4))]
    stream = TextStream(tok, stops)
    out = "".join(stream.push(int(t)) for t in tok.encode(text)) + stream.flush()
    assert (out, stream.stopped) == first_stop(text, stops)


def test_text_stream_work_does_not_grow_with_the_stop_sequences_length():
    """A 400,000-character stop sequence made a server stall for 14 s: each token searched every
    prefix of it. Now each character costs constant work: 2,000 tokens in well under a second."""
    import time

    tok = ByteTokenizer()
    stream = TextStream(tok, ["a" * 400_000 + "b"])
    start = time.perf_counter()
    out = "".join(stream.push(int(t)) for t in tok.encode("a" * 2000)) + stream.flush()
    assert out == "a" * 2000 and time.perf_counter() - start < 1.0


def test_text_stream_of_a_bpe_tokenizer_adds_up_to_its_decoded_text(tmp_path):
    """Windowed decoding (a few recent tokens at a time) gives the same text as decoding them all,
    for a BPE tokenizer on random ids too (pieces of characters, merged spaces)."""
    from fax.data.tokenizers import train_bpe

    tok = train_bpe(["héllo wörld, the quick brown fox", "jumps over the lazy dög 123"] * 20, 300,
                    tmp_path / "tokenizer.json")
    ids = np.random.default_rng(0).integers(0, 300, size=200).tolist()
    stream = TextStream(tok)
    assert "".join(stream.push(t) for t in ids) + stream.flush() == tok.decode(ids)


def test_requests_a_model_cannot_serve_are_refused_with_reasons():
    cfg = models.preset("gpt-tiny")
    assert request_problems(cfg, [1] * 100, SamplingParams(max_new_tokens=64)) == [
        "prompt (100 tokens) + max_tokens (64) exceeds the model's context of 128 tokens; "
        "shorten the prompt or lower max_tokens"]
    assert request_problems(cfg, [], SamplingParams(max_new_tokens=0, temperature=-1, top_p=0)) == [
        "max_tokens must be positive, got 0", "temperature must be >= 0, got -1",
        "top_p must be in (0, 1], got 0", "prompt is empty"]
    assert request_problems(cfg, [1] * 128, SamplingParams(max_new_tokens=1), scored_only=True) == []
    assert request_problems(cfg, [1], SamplingParams(logit_bias=((cfg.vocab_size, 1.0),))) == [
        f"logit_bias token ids must be in [0, {cfg.vocab_size})"]
