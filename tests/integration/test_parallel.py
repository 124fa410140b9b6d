"""Shardings follow the logical rules; every mesh computes the same step as one device."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fax.train import step as step_lib
from fax.checkpoint import abstract_like
from fax.config import load_config
from fax.data import Batch
from fax.parallel import make_mesh

MESHES = {"2x2x2": (2, 2, 2), "8x1x1": (8, 1, 1), "1x8x1": (1, 8, 1), "1x1x8": (1, 1, 8)}


def config(model: str, mesh: tuple[int, int, int], *extra: str):
    data, fsdp, tensor = mesh
    return load_config(overrides=[f"model={model}", f"parallel.data={data}", f"parallel.fsdp={fsdp}",
                                  f"parallel.tensor={tensor}", "train.batch_size=16", "train.seq_len=32", *extra])


def build(cfg, n_devices: int):
    return step_lib.build(cfg, make_mesh(cfg.parallel, jax.devices()[:n_devices]))


def batch(cfg, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    return Batch.of(rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.seq_len + 1)))


def one_step(cfg, n_devices: int, tokens: Batch):
    training = build(cfg, n_devices)
    state, metrics = training.step(training.init(), jax.device_put(tokens, training.batch_sharding))
    return training, state, {k: float(v) for k, v in metrics.items()}


# What the default rules must give each kind of weight, by mesh (data, fsdp, tensor).
EXPECTED = {
    # path in params                      2x2x2                                  8x1x1                1x8x1                           1x1x8
    ("embed",): {"2x2x2": P("tensor", "fsdp"), "8x1x1": P(None, None), "1x8x1": P(None, "fsdp"), "1x1x8": P("tensor", None)},
    ("blocks", "attn", "wq"): {"2x2x2": P(None, "fsdp", "tensor", None), "8x1x1": P(None, None, None, None),
                               "1x8x1": P(None, "fsdp", None, None), "1x1x8": P(None, None, "tensor", None)},
    ("blocks", "attn", "wo"): {"2x2x2": P(None, "tensor", None, "fsdp"), "8x1x1": P(None, None, None, None),
                               "1x8x1": P(None, None, None, "fsdp"), "1x1x8": P(None, "tensor", None, None)},
    ("blocks", "mlp", "wi"): {"2x2x2": P(None, "fsdp", "tensor"), "8x1x1": P(None, None, None),
                              "1x8x1": P(None, "fsdp", None), "1x1x8": P(None, None, "tensor")},
    ("blocks", "mlp_norm", "scale"): {m: P(None, None) for m in MESHES},
}


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_param_and_optimizer_shardings_follow_rules(mesh_name):
    cfg = config("gpt-tiny", MESHES[mesh_name])
    training = build(cfg, 8)
    state = training.init()
    for path, by_mesh in EXPECTED.items():
        assert _get(state["params"], path).sharding.spec == by_mesh[mesh_name], path
    # Adam's moments are sharded exactly like the params they mirror, on the arrays themselves.
    adam = state["opt_state"][1][0]
    for moments in (adam.mu, adam.nu):
        got = jax.tree.map(lambda x: x.sharding, moments)
        want = jax.tree.map(lambda x: x.sharding, state["params"])
        assert got == want
    # The batch is split over data and fsdp together.
    batch_rows = {"2x2x2": ("data", "fsdp"), "8x1x1": "data", "1x8x1": "fsdp", "1x1x8": None}[mesh_name]
    assert training.batch_sharding.spec == P(batch_rows, None)
    # A step keeps every array where it was (donation does not move anything).
    new_state, _ = training.step(state, jax.device_put(batch(cfg), training.batch_sharding))
    assert jax.tree.map(lambda x: x.sharding, new_state) == training.state_shardings


@pytest.mark.parametrize("model", ["gpt-tiny", "llama-tiny"])
def test_every_mesh_matches_one_device(model):
    tokens = batch(config(model, (1, 1, 1)))
    _, _, reference = one_step(config(model, (1, 1, 1)), 1, tokens)
    for name, mesh in MESHES.items():
        _, _, metrics = one_step(config(model, mesh), 8, tokens)
        np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=1e-5, err_msg=f"{model} {name}")
        np.testing.assert_allclose(metrics["grad_norm"], reference["grad_norm"], rtol=1e-5, err_msg=f"{model} {name}")


@pytest.mark.parametrize("model", ["gpt-tiny", "llama-tiny"])
def test_gradient_accumulation_equals_full_batch(model):
    tokens = batch(config(model, (2, 2, 2)))
    _, full_state, full = one_step(config(model, (2, 2, 2)), 8, tokens)
    _, acc_state, acc = one_step(config(model, (2, 2, 2), "train.microbatches=4"), 8, tokens)
    np.testing.assert_allclose(acc["loss"], full["loss"], rtol=1e-5)
    np.testing.assert_allclose(acc["grad_norm"], full["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 acc_state["params"], full_state["params"])


def looped_all_reduces(hlo: str, sizes: dict[str, int]) -> list[str]:
    """The mesh axes of each all-reduce inside a loop of a compiled program (``compiled.as_text()``)."""
    from fax.parallel.hlo import axes_of, computation_name, group_size

    lines: dict[str, list[str]] = {}
    comp = ""
    for line in hlo.splitlines():
        comp = computation_name(line) or comp
        lines.setdefault(comp, []).append(line)
    looped, todo = set(), re.findall(r"body=%?([\w.\-]+)", hlo)
    while todo:  # the loops' bodies and what they call
        if (name := todo.pop()) not in looped:
            looped.add(name)
            todo.extend(re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", "\n".join(lines.get(name, ()))))
    return [axes_of(group_size(line) or 0, sizes) for name in looped for line in lines.get(name, ())
            if re.search(r"\sall-reduce(-start)?\(", line)]


def test_data_replicas_sum_their_microbatches_gradients_apart_and_reduce_them_once():
    """Gradient accumulation over data (and tensor): the step is one device's whole batch, and no
    all-reduce over data is left inside a loop (XLA would reduce each microbatch's gradients there)."""
    tokens = batch(config("llama-tiny", (1, 1, 1)))
    _, one_state, one = one_step(config("llama-tiny", (1, 1, 1)), 1, tokens)
    cfg = config("llama-tiny", (4, 1, 2), "train.microbatches=4")
    training, state, acc = one_step(cfg, 8, tokens)
    np.testing.assert_allclose(acc["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(acc["grad_norm"], one["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state["params"]), jax.device_get(one_state["params"]))
    sizes = dict(training.mesh.shape)
    hlo = step_lib.compile_step(training, abstract_like(jax.eval_shape(training.init), training.state_shardings),
                                (16, 33)).as_text()
    assert "tensor" in looped_all_reduces(hlo, sizes)  # the loops are seen: tensor's activations in them
    assert "data" not in looped_all_reduces(hlo, sizes)
    # A mixture of experts' microbatches need their rows together: each one's gradients are reduced
    mixture = config("llama-tiny", (4, 1, 2), "train.microbatches=4", "model.moe_experts=4")
    training = build(mixture, 8)
    hlo = step_lib.compile_step(training, abstract_like(jax.eval_shape(training.init), training.state_shardings),
                                (16, 33)).as_text()
    assert "data" in looped_all_reduces(hlo, dict(training.mesh.shape))


def test_loss_in_chunks_equals_the_whole_loss_and_holds_fewer_logits():
    large_vocab = ("model.vocab_size=8192", "train.z_loss=1e-3")  # logits: most of the step's memory
    tokens = batch(config("llama-tiny", (1, 1, 1), *large_vocab))
    whole_training, whole_state, whole = one_step(config("llama-tiny", (1, 1, 1), *large_vocab), 1, tokens)
    # Pieces over a mesh that also splits the sequence: each piece keeps the sequence's sharding.
    cfg = config("llama-tiny", (2, 1, 2), *large_vocab, "parallel.sequence=2", "train.loss_chunks=4")
    _, state, metrics = one_step(cfg, 8, tokens)
    np.testing.assert_allclose(metrics["loss"], whole["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], whole["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state["params"]), jax.device_get(whole_state["params"]))

    def temp_bytes(training) -> int:
        state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             jax.eval_shape(training.init), training.state_shardings)
        return step_lib.compile_step(training, state, tokens.shape).memory_analysis().temp_size_in_bytes
    pieces = build(config("llama-tiny", (1, 1, 1), *large_vocab, "train.loss_chunks=8"), 1)
    logits = tokens.tokens[:, 1:].size * 8192 * 4
    assert temp_bytes(whole_training) - temp_bytes(pieces) > logits  # the whole logits and more (their gradient)


def test_remat_policies_do_not_change_the_step():
    tokens = batch(config("llama-tiny", (2, 2, 2)))
    _, _, none = one_step(config("llama-tiny", (2, 2, 2)), 8, tokens)
    for policy in ("full", "dots_saveable", "save_dot_except_mlpwi", "offload_qkv_proj"):
        _, _, metrics = one_step(config("llama-tiny", (2, 2, 2), f"model.remat={policy}"), 8, tokens)
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(metrics[key], none[key], rtol=1e-5, err_msg=policy)


def test_named_remat_policies_keep_what_they_name():
    """Compiled scratch memory falls as a policy keeps less: nothing recomputed, every matmul output
    kept, the matmuls but the MLP's input projections, q/k/v alone, only each layer's input."""
    def scratch(policy: str) -> int:
        cfg = config("llama-tiny", (1, 1, 1), "model.n_layers=4", "model.d_model=256", "model.n_heads=8",
                     "model.n_kv_heads=4", "model.d_ff=1024", "model.max_seq_len=128", "train.seq_len=128",
                     f"model.remat={policy}")
        training = build(cfg, 1)
        state = abstract_like(jax.eval_shape(training.init), training.state_shardings)
        return step_lib.compile_step(training, state, (16, 129)).memory_analysis().temp_size_in_bytes

    order = ["none", "dots_saveable", "save_dot_except_mlpwi", "save_qkv_proj", "full"]
    used = {policy: scratch(policy) for policy in order}
    assert [used[p] for p in order] == sorted(used.values(), reverse=True), used
    assert used["save_qkv_proj"] > 1.05 * used["full"] and used["none"] > 2 * used["save_dot_except_mlpwi"], used


def test_step_compiles_without_involuntary_rematerialisation(capfd):
    cfg = config("llama-tiny", (2, 2, 2))
    training = build(cfg, 8)
    state = training.init()
    training.step.lower(state, step_lib.abstract_batch(training.batch_sharding, (16, 33))).compile()
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def grads_on_mesh(cfg, tokens: np.ndarray):
    """Loss and gradients of the batch (the train step's own grad function) on cfg's mesh of 8 devices."""
    training = build(cfg, 8)
    fn = jax.jit(step_lib.with_activation_sharding(
        lambda params, t: step_lib.batch_grads(training.graphdef, params, t,
                                               step_lib.pipeline_schedule(cfg, training.mesh.shape["stage"]),
                                               step_lib.Objective()), training.mesh))
    parts, grads = fn(training.init()["params"], jax.device_put(tokens, training.batch_sharding))
    return training, float(parts["loss"]), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("model", ["llama-tiny"])  # the schedules are the model's layers whatever they hold
def test_pipeline_stages_match_one_stage(model):
    """GPipe, interleaved (V = 2, with sequence parallelism: the stages' hidden states split over
    tensor too) and stage-rematerialised schedules over S = 2 and 4 stages: the unpipelined step's
    loss and gradients. Every third layer attends to all, the others to a window of 8 (Gemma 2's
    alternation at another period): each row's layer count travels with it through the stages."""
    layers = ("model.n_layers=8", "model.attention_window=8", "model.global_every=3")
    tokens = batch(config(model, (1, 8, 1), *layers))
    _, loss, grads = grads_on_mesh(config(model, (1, 8, 1), *layers), tokens)
    for stages, virtual, remat, (data, fsdp, tensor), micro in ((2, 1, False, (1, 2, 2), 4), (2, 2, True, (1, 2, 2), 4),
                                                                  (4, 1, True, (1, 2, 1), 2), (4, 2, True, (1, 2, 1), 4)):
        cfg = config(model, (data, fsdp, tensor), *layers, f"parallel.stage={stages}", f"train.microbatches={micro}",
                     f"parallel.virtual_stages={virtual}", f"parallel.stage_remat={remat}",
                     f"parallel.tensor_sequence={virtual > 1 and tensor > 1}")
        training, piped_loss, piped = grads_on_mesh(cfg, tokens)
        where = f"{model} S={stages} V={virtual} stage_remat={remat} M={micro}"
        # Each stage holds its own consecutive layers: the stacked layer axis is split over `stage`.
        assert training.state_shardings["params"]["blocks"]["mlp"]["wi"].spec[0] == "stage", where
        np.testing.assert_allclose(piped_loss, loss, rtol=1e-5, err_msg=where)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=where), piped, grads)


def test_document_mask_gives_the_same_step_on_every_mesh(model="llama-tiny"):
    """Rows packing several documents (their segments numbered as a Sampler numbers them) under
    data.document_mask: one device, a sharded mesh that splits the sequence, and a pipeline whose
    microbatches carry their rows' documents through the stages all take the same step."""
    masked = ("data.document_mask=true", "model.n_layers=4")
    plain = batch(config(model, (1, 1, 1), *masked))
    ends = (np.random.default_rng(1).random(plain.shape) < 0.1).astype(np.int32)
    tokens = plain._replace(segments=np.cumsum(ends, axis=1) - ends)
    _, _, reference = one_step(config(model, (1, 1, 1), *masked), 1, tokens)
    _, _, unmasked = one_step(config(model, (1, 1, 1), "model.n_layers=4"), 1, tokens)
    assert abs(unmasked["loss"] - reference["loss"]) > 1e-4  # the mask changes what is read
    for mesh, extra in (((2, 1, 2), ["parallel.sequence=2"]),
                        ((1, 2, 2), ["parallel.stage=2", "train.microbatches=4"])):
        _, _, metrics = one_step(config(model, mesh, *masked, *extra), 8, tokens)
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(metrics[key], reference[key], rtol=1e-5, err_msg=f"{model} {mesh} {extra}")


def test_pipeline_schedule_runs_m_plus_s_minus_1_ticks():
    """The stack runs in order on every microbatch, in V M + S - 1 ticks of all stages at once."""
    from fax.models import scan_layers
    from fax.parallel.config import Schedule
    from fax.parallel.pipeline import pipeline

    def layer(h, p):  # not commutative: a wrong layer order or a mixed-up microbatch changes the result
        return h * p["scale"] + p["shift"]

    rng = np.random.default_rng(0)
    params = {"scale": rng.normal(size=(8, 1)).astype(np.float32), "shift": rng.normal(size=(8, 1)).astype(np.float32)}
    x = rng.normal(size=(12, 3)).astype(np.float32)
    want = scan_layers(layer, params, x)
    for stages, micro, virtual in ((2, 3, 1), (4, 6, 1), (8, 1, 1), (4, 12, 1), (2, 4, 2), (2, 6, 4), (4, 4, 2)):
        schedule = Schedule(stages, micro, virtual, stage_remat=virtual > 1)
        run = pipeline(schedule)
        np.testing.assert_allclose(run(layer, params, x), want, rtol=1e-6, err_msg=str(schedule))
        scans = [e for e in jax.make_jaxpr(lambda p, h: run(layer, p, h))(params, x).eqns if e.primitive.name == "scan"]
        assert [e.params["length"] for e in scans] == [virtual * micro + stages - 1]
    assert Schedule(4, 12).bubble == pytest.approx(3 / 15)
    assert Schedule(4, 12, 3).bubble == pytest.approx(3 / 39)


def test_pipeline_stages_must_divide_the_layers():
    from fax.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"stack.s 2 blocks .* do not split into parallel.stage=4"):
        validate(config("gpt-tiny", (1, 2, 1), "parallel.stage=4"), 8)


def test_sequence_parallelism_in_the_tensor_group_keeps_the_step_and_splits_the_residual_stream():
    """parallel.tensor_sequence: the same loss and gradients, and less compiled scratch memory (the
    residual stream and its norms are divided over the tensor axis between the blocks)."""
    shape = ("model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4", "model.d_ff=1024", "model.n_layers=4",
             "model.max_seq_len=256", "train.batch_size=8", "train.seq_len=256")
    tokens = Batch.of(np.random.default_rng(0).integers(0, 512, (8, 257)))
    figures = {}
    for split in (False, True):
        cfg = config("llama-tiny", (1, 2, 4), *shape, f"parallel.tensor_sequence={split}")
        training, _, metrics = one_step(cfg, 8, tokens)
        state = abstract_like(jax.eval_shape(training.init), training.state_shardings)
        figures[split] = metrics, step_lib.compile_step(training, state, (8, 257)).memory_analysis().temp_size_in_bytes
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(figures[True][0][key], figures[False][0][key], rtol=1e-5)
    assert figures[True][1] < 0.85 * figures[False][1], figures


def test_stage_remat_bounds_pipeline_memory_as_microbatches_grow():
    """Compiled scratch memory of a 4-stage pipeline at M = 16 microbatches against M = 4 of the same
    size: GPipe keeps every tick's layer activations (it grows about with M); stage_remat keeps one
    hidden state per tick (within 1.3x)."""
    shape = ("model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4", "model.d_ff=1024", "model.n_layers=8",
             "model.max_seq_len=256", "train.seq_len=256", "model.vocab_size=8192", "parallel.stage=4")
    temps = {}
    for remat in (False, True):
        for micro in (4, 16):
            cfg = config("llama-tiny", (1, 2, 1), *shape, f"parallel.stage_remat={remat}",
                         f"train.microbatches={micro}", f"train.batch_size={2 * micro}")
            training = build(cfg, 8)
            state = abstract_like(jax.eval_shape(training.init), training.state_shardings)
            compiled = step_lib.compile_step(training, state, (2 * micro, 257))
            temps[remat, micro] = compiled.memory_analysis().temp_size_in_bytes
    print({k: f"{v / 2**20:.1f} MiB" for k, v in temps.items()})
    assert temps[False, 16] > 2 * temps[False, 4]
    assert temps[True, 16] < 1.3 * temps[True, 4]
    assert temps[True, 4] < temps[False, 4]


def test_a_vocabulary_split_over_tensor_is_never_gathered_whole():
    """The embedding lookup and the loss's target logits read each device's rows of the vocabulary
    (the pieces summed over the tensor axis): no device holds a whole [vocab, embed] table or its
    gradient, which XLA, left to itself, builds on every device and all-reduces over all of them."""
    cfg = config("llama-tiny", (1, 2, 4), "parallel.tensor_sequence=true")  # vocabulary 512, embed 128, untied
    training = build(cfg, 8)
    state = abstract_like(jax.eval_shape(training.init), training.state_shardings)
    hlo = step_lib.compile_step(training, state, (16, 33)).as_text()
    whole = re.findall(r"\b(?:bf16|f32)\[(?:512,128|128,512)\]", hlo)
    assert not whole, f"{len(whole)} whole-table arrays"
