"""LoRA: only the adapters train, the optimizer holds only them, they shard with their weights, and
the merged export is the base plus the adapters."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from fax import models
from fax.interop import hf
from fax import params as params_lib
from fax.data import Batch
from fax.train import step as step_lib
from fax.cli import main
from fax.config import ConfigError, load_config, validate
from fax.data import Sampler, TokenDataset, prepare
from fax.train.loop import Trainer
from fax.parallel import ParallelConfig, make_mesh


def lora_config(run_dir, corpus, *extra):
    return load_config(overrides=["model=gpt-tiny", "train.steps=30", "train.log_every=1", "train.batch_size=8",
                                  "train.seq_len=32", "train.sample_tokens=0", "optim.lr=1e-2", "optim.warmup_steps=2",
                                  "lora.rank=4", "lora.targets=[attn.wq, attn.wv, mlp.wi, attn.wo]",
                                  f"data.path={corpus}", f"run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, small_corpus):
    """A briefly trained GPT exported as a Hugging Face checkpoint: what LoRA users start from."""
    root = tmp_path_factory.mktemp("pretrained")
    cfg = lora_config(root / "run", small_corpus, "lora.rank=0", "train.steps=20", "train.log_every=20")
    with Trainer(cfg, echo=lambda _: None) as trainer:
        trainer.fit()
    return hf.export_run(root / "run", root / "hf")[0]


def test_only_adapters_train_and_the_merged_export_is_base_plus_adapters(tmp_path, pretrained):
    (tmp_path / "text.txt").write_text("Adapters learn this one sentence while the model stays frozen. " * 3)
    prepare([tmp_path / "text.txt"], tmp_path / "data")
    cfg = lora_config(tmp_path / "run", tmp_path / "data", f"init_from=hf:{pretrained}", "train.steps=60",
                      "lora.rank=8", "lora.alpha=16")
    with Trainer(cfg, echo=lambda _: None) as trainer:
        history = trainer.fit()
        state = jax.device_get(trainer.state)
    one_device = make_mesh(ParallelConfig(fsdp=1), jax.devices()[:1])
    graphdef, _, _, shardings = params_lib.param_layout(cfg, one_device)
    initial = jax.device_get(hf.import_params(pretrained, cfg.model, shardings["base"]))
    # The base is bitwise the checkpoint it started from; every adapter moved (B starts at zero).
    jax.tree.map(np.testing.assert_array_equal, state["params"]["base"], initial)
    assert all(np.abs(ab["b"]).max() > 0 for ab in state["params"]["lora"].values())
    # The adapters learned: on the first batch the loss is below the base model's.
    batch = Sampler(TokenDataset.open(tmp_path / "data"), 8, 32, cfg.seed).batch(0)
    merged = params_lib.model_params(state["params"], cfg.lora)
    _, after = step_lib.batch_objective(graphdef, merged, batch, step_lib.Objective())
    assert float(after["loss"]) < history[0]["loss"] - 0.1
    # The optimizer state mirrors the adapters only: no moments for the frozen base.
    adam = state["opt_state"][1][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(state["params"]["lora"])
    assert sum(x.nbytes for x in jax.tree.leaves(adam.mu)) < sum(x.nbytes for x in jax.tree.leaves(initial)) / 10
    # Merged export == base + scale * A @ B on a forward pass.
    tokens = np.random.default_rng(0).integers(0, 257, (2, 24))
    want = models.apply(graphdef, merged, tokens)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    exported = hf.import_params(tmp_path / "merged", cfg.model, shardings["base"])
    np.testing.assert_allclose(models.apply(graphdef, exported, tokens), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(models.apply(graphdef, initial, tokens), want, atol=1e-3)
    # The adapters alone are PEFT's layout, which has no LoRA on part of GPT-2's fused q/k/v tensor.
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "adapters"), "--adapters-only"]) == 2
    assert not (tmp_path / "adapters").exists()


def test_adapters_are_sharded_with_their_weights_and_bad_settings_are_named(tmp_path, small_corpus):
    cfg = lora_config(tmp_path / "run", small_corpus, "parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2")
    training = step_lib.build(cfg, make_mesh(cfg.parallel))
    params = training.state_shardings["params"]
    for target, n_in in (("attn.wq", 2), ("attn.wo", 3), ("mlp.wi", 2)):
        module, name = target.split(".")
        base = tuple(params["base"]["blocks"][module][name].spec)
        assert tuple(params["lora"][target]["a"].spec) == (*base[:n_in], None), target
        assert tuple(params["lora"][target]["b"].spec) == (base[0], None, *base[n_in:]), target
    assert any(axis is not None for axis in params["lora"]["attn.wq"]["b"].spec)  # really sharded
    with pytest.raises(ConfigError, match="lora.targets: unknown attn.qkv"):
        validate(lora_config(tmp_path, small_corpus, "lora.targets=[attn.qkv]"), 8)
    with pytest.raises(ConfigError, match="mlp.wg exists only with model.activation=swiglu"):
        validate(lora_config(tmp_path, small_corpus, "lora.targets=[mlp.wg]"), 8)
    with pytest.raises(ConfigError, match=r"lora.dropout must be in \[0, 1\), got 1.0"):
        validate(lora_config(tmp_path, small_corpus, "lora.dropout=1.0"), 8)


@pytest.mark.parametrize("model", ["gpt-tiny", "llama-tiny"])
def test_training_applies_adapters_to_activations_with_dropout(tmp_path, small_corpus, model):
    targets = "[attn.wq, attn.wk, attn.wv, attn.wo, mlp.wi, mlp.wo" + (", mlp.wg]" if model == "llama-tiny" else "]")
    cfg = lora_config(tmp_path, small_corpus, f"model={model}", f"lora.targets={targets}")
    graphdef = params_lib.param_layout(cfg, make_mesh(ParallelConfig(fsdp=1), jax.devices()[:1]))[0]
    params = params_lib.init_params(cfg)
    rng = np.random.default_rng(0)
    params["lora"] = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32), params["lora"])
    tokens = rng.integers(0, cfg.model.vocab_size, (4, 17))

    @functools.partial(jax.jit, static_argnums=0)
    def loss_and_adapter_grads(lora, key):
        def to_model(adapters):
            return params_lib.model_params({**params, "lora": adapters}, lora, key)
        parts, grads = step_lib.loss_and_grads(graphdef, params["lora"], Batch.of(tokens), step_lib.Objective(),
                                               to_model=to_model)
        return parts["loss"], grads

    key = jax.random.key(3)
    # Without dropout, adapters on the activations are the merged weights: same loss, same gradients.
    merged, attached = loss_and_adapter_grads(cfg.lora, None), loss_and_adapter_grads(cfg.lora, key)
    np.testing.assert_allclose(attached[0], merged[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), attached[1], merged[1])
    # With dropout the adapters see masked inputs: a different loss, the same for the same key.
    dropped = cfg.lora.__class__(**{**cfg.lora.__dict__, "dropout": 0.5})
    first, again = loss_and_adapter_grads(dropped, key), loss_and_adapter_grads(dropped, key)
    other = loss_and_adapter_grads(dropped, jax.random.key(4))
    assert float(first[0]) == float(again[0]) and abs(float(first[0]) - float(merged[0])) > 1e-4
    assert abs(float(other[0]) - float(first[0])) > 1e-4


def test_training_with_dropout_learns(tmp_path, small_corpus):
    with Trainer(lora_config(tmp_path / "run", small_corpus, "lora.dropout=0.1"), echo=lambda _: None) as trainer:
        history = trainer.fit()
    assert history[-1]["loss"] < history[0]["loss"] - 0.15


def test_each_microbatch_draws_dropout_masks_of_its_own(tmp_path, small_corpus):
    cfg = lora_config(tmp_path, small_corpus)
    graphdef = params_lib.param_layout(cfg, make_mesh(ParallelConfig(fsdp=1), jax.devices()[:1]))[0]
    tx = step_lib.make_optimizer(cfg.optim, cfg.train.steps)
    state = step_lib.init_state(cfg, tx)
    rng = np.random.default_rng(0)
    state["params"]["lora"] = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32),
                                           state["params"]["lora"])
    row = rng.integers(0, cfg.model.vocab_size, (1, 17))

    def loss(dropout, tokens, microbatches, stages=1):
        lora = dataclasses.replace(cfg.lora, dropout=dropout)
        step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                                         lr=step_lib.lr_schedule(cfg.optim, cfg.train.steps),
                                         schedule=step_lib.Schedule(stages, microbatches),
                                         objective=step_lib.Objective(), lora=lora, seed=0))
        return float(step(state, Batch.of(tokens))[1]["loss"])

    # A row alone, and twice as two microbatches: the same loss without dropout; with it, the second
    # microbatch's masks differ from the first's, so its loss (and the mean) does too.
    twice = np.concatenate([row, row])
    assert loss(0.0, twice, 2) == pytest.approx(loss(0.0, row, 1), rel=1e-6)
    accumulated = loss(0.5, twice, 2)
    assert abs(accumulated - loss(0.5, row, 1)) > 1e-4
    # Through two pipeline stages each microbatch draws the same masks as when accumulated (the
    # stage running microbatch m at a tick knows m): the same loss.
    assert loss(0.5, twice, 2, stages=2) == pytest.approx(accumulated, rel=1e-6)
