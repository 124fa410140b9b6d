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
