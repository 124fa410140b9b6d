"""The Trainer end to end: falling loss, metrics files, hooks, the CLI, no Ray in local mode."""

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from fax import models
from fax import ConfigError, Trainer, load_config
from fax.cli import main, parse
from fax.train import step as step_lib
from fax.data import Batch, Sampler, TokenDataset, prepare
from fax.metrics import read_metrics
from fax.train.evaluate import evaluate_checkpoint


def tiny(run_dir, *extra):
    return ["model=gpt-tiny", f"run_dir={run_dir}", "train.batch_size=16", "train.seq_len=64",
            "train.sample_tokens=0", *extra]


def test_loss_and_validation_loss_fall_on_the_default_corpus(tmp_path, small_corpus, capsys):
    trainer = Trainer(overrides=tiny(tmp_path, "train.steps=60", "train.log_every=10", "optim.lr=3e-3",
                                     "train.sample_tokens=20", "train.eval_every=30", "train.eval_batches=2"),
                      echo=lambda _: None)
    history = trainer.fit()
    losses = [r["loss"] for r in history]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0], losses
    assert np.isfinite([r["grad_norm"] for r in history]).all()
    # The end-of-run sample of `fax train`: the serving engine on the checkpoint the run ended with.
    from fax.cli.train import sample

    text = sample(trainer, "import ", 20)
    assert text.startswith("import ") and len(text) > len("import ")
    # The validation split's loss at steps 30 and 60 (logged with them), falling, and exactly the
    # cross-entropy of the final params on the same held-out batches computed here.
    val = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r}
    assert sorted(val) == [30, 60] and val[60] < val[30]
    params = jax.device_get(trainer.state["params"])
    held_out = Sampler(TokenDataset.open(trainer.data_path, "val"), 16, 64, seed=0)
    ce = []
    for tokens in (held_out.batch(i).tokens for i in range(2)):
        logits = np.asarray(models.apply(trainer.training.graphdef, params, tokens[:, :-1]), np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ce.append(-np.take_along_axis(log_p, tokens[:, 1:, None], -1).mean())
    assert val[60] == pytest.approx(np.mean(ce), rel=1e-5)

    # `fax eval` of the checkpoint: the logged val_loss, on the run's mesh and on one device.
    assert evaluate_checkpoint(tmp_path) == (60, val[60])
    assert main(["eval", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"step 60: val loss {val[60]:.4f}, perplexity {np.exp(val[60]):,.2f}"
    assert evaluate_checkpoint(tmp_path, devices=jax.devices()[:1])[1] == pytest.approx(val[60], rel=1e-5)
    assert evaluate_checkpoint(tmp_path, ["train.eval_batches=1"], split="train")[1] != pytest.approx(val[60])
    with pytest.raises(ConfigError, match=r"the val split of data.path=.* holds 0 tokens, fewer than one sequence "
                                          r"\(65\); pick another data.path or split"):
        evaluate_checkpoint(tmp_path, [f"data.path={small_corpus}"])


def masked_cross_entropy(graphdef, params, batch):
    """float64 reference: the mean next-token cross-entropy over the targets in the loss mask."""
    logits = np.asarray(models.apply(graphdef, params, batch.tokens[:, :-1]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_p, batch.tokens[:, 1:, None], -1)[..., 0]
    return ce[batch.loss_mask[:, 1:]].mean()


def test_prompt_tokens_are_read_but_not_trained_on(tmp_path):
    cfg = load_config(overrides=["model=gpt-tiny"])
    graphdef, state = nnx.split(models.build(cfg.model, seed=0))
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.model.vocab_size, (8, 33)).astype(np.int32)
    prompt = rng.random(ids.shape) < np.linspace(0.1, 0.9, 8)[:, None]  # rows from few to many prompt tokens
    tokens = Batch.of(ids, loss_mask=~prompt)
    expected = masked_cross_entropy(graphdef, params, tokens)
    objective = step_lib.Objective()
    assert float(step_lib.batch_objective(graphdef, params, tokens, objective)[1]["loss"]) == pytest.approx(expected, rel=1e-5)
    # Microbatches hold different numbers of targets: the loss and gradients are still the batch's.
    whole = jax.jit(step_lib.accumulated_grads, static_argnums=(0, 3, 4))(graphdef, params, tokens, 1, objective)
    parts = jax.jit(step_lib.accumulated_grads, static_argnums=(0, 3, 4))(graphdef, params, tokens, 4, objective)
    assert float(parts[0]["loss"]) == pytest.approx(float(whole[0]["loss"]), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), parts[1], whole[1])
    evaluate = functools.partial(step_lib.eval_loss, graphdef=graphdef, schedule=step_lib.Schedule(1, 4),
                                 objective=objective, lora=cfg.lora)
    assert float(evaluate(params, tokens)) == pytest.approx(expected, rel=1e-5)

    # End to end: `fax prepare --prompt-field` records train, and the logged val_loss is the masked one.
    records = [{"prompt": f"Q{i}: what is {i} + {i}? ", "answer": f"{2 * i}."} for i in range(400)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare([tmp_path / "sft.jsonl"], tmp_path / "sft", text_field="answer", prompt_field="prompt", val_fraction=0.2)
    trainer = Trainer(overrides=tiny(tmp_path / "run", f"data.path={tmp_path / 'sft'}", "train.steps=20",
                                     "train.eval_every=20", "train.eval_batches=2", "train.log_every=20"),
                      echo=lambda _: None)
    history = trainer.fit()
    held_out = Sampler(TokenDataset.open(tmp_path / "sft", "val"), 16, 64, seed=0)
    reference = np.mean([masked_cross_entropy(trainer.training.graphdef, jax.device_get(trainer.state["params"]),
                                              held_out.batch(i)) for i in range(2)])
    assert history[-1]["val_loss"] == pytest.approx(reference, rel=1e-5)


def test_settings_may_follow_options_on_the_command_line():
    assert parse(["eval", "RUN", "--step", "3", "train.eval_batches=2", "--split", "train", "a.b=1"]).overrides == [
        "train.eval_batches=2", "a.b=1"]
    assert parse(["train", "x=1", "--emulate-hosts", "2", "y=2"]).overrides == ["x=1", "y=2"]
    for argv in (["train", "--bogus"], ["presets", "x=1"], ["eval", "RUN", "--step", "3", "notasetting"]):
        with pytest.raises(SystemExit):
            parse(argv)


def test_evaluation_needs_a_validation_split(tmp_path, small_corpus):
    with pytest.raises(ConfigError, match=r"train.eval_every=10 needs a validation split .* has 0; prepare it "
                                          r"with `fax prepare --val-fraction"):
        Trainer(overrides=tiny(tmp_path, "train.eval_every=10", f"data.path={small_corpus}"))


def test_run_dir_holds_config_and_metrics(tmp_path, small_corpus):
    overrides = tiny(tmp_path, "train.steps=6", "train.log_every=2", f"data.path={small_corpus}")
    Trainer(overrides=overrides, echo=lambda _: None).fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    assert load_config(tmp_path / "config.yaml") == load_config(overrides=overrides)


def test_hooks_are_called_every_n_steps(tmp_path, small_corpus):
    trainer = Trainer(overrides=tiny(tmp_path, "train.steps=6", "train.log_every=5", f"data.path={small_corpus}"),
                      echo=lambda _: None)
    calls = []
    trainer.add_hook(3, lambda step, metrics: calls.append((step, round(metrics["loss"], 6))))
    history = trainer.fit()
    assert [c[0] for c in calls] == [3, 6]
    assert calls[-1][1] == round(history[-1]["loss"], 6)  # step 6 is both logged and hooked


def test_profile_traces_exactly_the_chosen_steps(tmp_path, small_corpus, traced_steps):
    said = []
    Trainer(overrides=tiny(tmp_path, "train.steps=5", "train.log_every=5", "train.profile_from=2",
                           "train.profile_steps=2", f"data.path={small_corpus}"), echo=said.append).fit()
    folder = tmp_path / "profile" / "host0"
    assert any(line.startswith(f"fax: profiled steps 2-3 -> {folder};") for line in said), said
    # Step 1 finished before the trace began, step 3 before it ended; each step is marked with its number.
    assert traced_steps(folder) == (2, [2, 3])
    assert len(list(folder.rglob("*.xplane.pb"))) == 1 and len(list(folder.rglob("perfetto_trace.json.gz"))) == 1
    # Resumed past the traced steps: said, and no second trace.
    said.clear()
    Trainer(overrides=tiny(tmp_path, "train.steps=6", "train.log_every=5", "train.profile_from=2",
                           "train.profile_steps=2", f"data.path={small_corpus}"), echo=said.append).fit()
    assert ("fax: no profile this time: steps 2-3 (train.profile_from, profile_steps) come before step 6, where "
            "this run resumes") in said
    assert len(list(folder.rglob("*.xplane.pb"))) == 1
    with pytest.raises(ConfigError, match=r"train.profile_from=4 and train.profile_steps=3 trace steps 4..6, "
                                          r"not all within 1..5 \(train.steps\)"):
        Trainer(overrides=tiny(tmp_path / "late", "train.steps=5", "train.profile_from=4", "train.profile_steps=3"))


def run_cli(args, cwd):
    # Local mode must run where Ray is not installed: make `import ray` fail in the child.
    code = "import sys; sys.modules['ray'] = None; from fax.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_cli_trains_without_ray_and_reports_bad_settings(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    ok = run_cli(["train", *tiny(run_dir, "train.steps=4", "train.log_every=2", "train.sample_tokens=8",
                                 f"data.path={small_corpus}")], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "step      4  loss" in ok.stdout and "fax: sample ->" in ok.stdout
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 4
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2

    bad = run_cli(["train", "model=gpt-tiny", "parallel.data=3"], tmp_path)
    assert bad.returncode == 2
    assert "parallel.data=3" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_prepare_then_train_on_it(tmp_path):
    src = tmp_path / "text"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20)
    done = run_cli(["prepare", str(src), "--out", str(tmp_path / "ds"), "--engine", "local"], tmp_path)
    assert done.returncode == 0, done.stderr
    index = json.loads(Path(tmp_path / "ds" / "index.json").read_text())
    assert index["num_documents"] == 3
    trained = run_cli(["train", *tiny(tmp_path / "run", "train.steps=2", f"data.path={tmp_path / 'ds'}",
                                      "data.document_mask=true")], tmp_path)
    assert trained.returncode == 0, trained.stderr


def tensorboard_scalars(folder):
    """Every scalar of the TensorBoard event files under ``folder``: {tag: {step: value}} (TFRecord
    framing: length, its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_steps_are_logged_to_tensorboard_and_weights_and_biases(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = Trainer(overrides=tiny(tmp_path, "train.steps=4", "train.log_every=2", f"data.path={small_corpus}",
                                     "logging.tensorboard=true", "logging.wandb_project=fax-test"),
                      echo=lambda _: None)
    history = trainer.fit()
    logged = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert sorted(logged) == [2, 4] and [r["step"] for r in history] == [2, 4]
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    for key in ("loss", "grad_norm", "lr", "tokens_per_s"):
        assert scalars[f"train/{key}"] == pytest.approx({s: r[key] for s, r in logged.items()}, rel=1e-6), key
    # The offline W&B run's history records hold each logged value as JSON text (in its .wandb log,
    # which wandb's service finishes writing a moment after the run has finished).
    wanted = [json.dumps(r[key]).encode() for r in logged.values() for key in ("loss", "grad_norm")]
    run_file = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + 60
    while not all(w in run_file.read_bytes() for w in wanted) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(w in run_file.read_bytes() for w in wanted), wanted


def test_a_loop_hook_of_ones_own_sees_every_step_and_the_records_it_is_due_at(tmp_path, small_corpus):
    from fax.train.hooks import LoopHook

    class Watch(LoopHook):
        def __init__(self):
            self.before_steps, self.records, self.closed = [], [], None

        def before(self, step):
            self.before_steps.append(step)

        def due(self, step, final):
            return step == 3 or final

        def __call__(self, step, record, final):
            self.records.append((step, final, sorted(record)))

        def close(self, lost_hosts):
            self.closed = lost_hosts

    trainer = Trainer(overrides=tiny(tmp_path, "train.steps=5", "train.log_every=10", f"data.path={small_corpus}"),
                      echo=lambda _: None)
    watch = Watch()
    trainer.add_loop_hook(watch)
    trainer.fit()
    assert watch.before_steps == [1, 2, 3, 4, 5] and watch.closed is False
    assert [(step, final) for step, final, _ in watch.records] == [(3, False), (5, True)]
    assert {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(watch.records[0][2])
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5]  # logging is a hook of its own
