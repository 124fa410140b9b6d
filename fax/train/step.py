"""Loss, optimizer and the train step: pure functions, then jitted with explicit shardings."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fax import models
from fax.config import Config, LoraConfig, OptimConfig
from fax.data import Batch
from fax.models import lora as lora_lib
from fax.models.sharding import axis_aliases, constrain
from fax.params import init_params, model_params, param_layout, trainable, with_trainable
from fax.parallel import (BATCH_AXES, logical_sharding, optimizer_shardings, replicated, rules_for,
                          with_activation_sharding)
from fax.parallel.config import Schedule
from fax.models.attention import softcap
from fax.models.config import moe_layer_count
from fax.parallel.pipeline import head_layout, pipeline, split_microbatches

State = dict[str, Any]  # {"step": int32 scalar, "params": ..., "opt_state": ...}


def loss_sums(hidden: jax.Array, head: jax.Array, targets: jax.Array, counted: jax.Array, cap: float = 0.0) -> jax.Array:
    """[sum of next-token cross-entropies, sum of logsumexp^2] over the positions whose target
    counts (``counted``: a prompt's tokens do not), of final hidden states through the LM ``head``
    (the logits soft-capped at ``cap`` if given)."""
    log_z = jax.nn.logsumexp(models.head_logits(hidden, head, cap), axis=-1)
    # The targets' logits from their own columns of the head: the backward then scatters into the
    # head's gradient, not into a [length, vocab] buffer per row (which XLA may build for every piece
    # of the loss at once, outside the loop over them).
    columns = models.lookup(head.astype(hidden.dtype).T, targets)
    target_logits = softcap(jnp.einsum("bld,bld->bl", hidden, columns).astype(jnp.float32), cap)
    return jnp.stack([jnp.sum(jnp.where(counted, log_z - target_logits, 0.0)),
                      jnp.sum(jnp.where(counted, log_z**2, 0.0))])


def router_terms(stats: models.RouterStats, layers: int) -> dict[str, jax.Array]:
    """A mixture of experts' router statistics as metrics, each a mean over the rows and ``layers``:
    the balance and z losses, each expert's share of the assignments, the share dropped."""
    return {"moe_balance": jnp.mean(stats.balance) / layers, "moe_z_loss": jnp.mean(stats.z) / layers,
            "expert_load": jnp.mean(stats.load, axis=0) / layers, "moe_dropped": jnp.mean(stats.dropped) / layers}


def target_count(batch: Batch, microbatches: int = 1) -> jax.Array:
    """The next-token targets of a batch that count, as a share of one of ``microbatches``: each
    microbatch divides its loss sums by it, so that the microbatches' mean is the whole batch's
    mean however the prompts fall among them."""
    return jnp.maximum(jnp.sum(batch.loss_mask[:, 1:]), 1).astype(jnp.float32) / microbatches


def microbatches_of(batch: Batch, microbatches: int) -> Batch:
    """Every field of ``batch`` split into ``microbatches`` (``split_microbatches``)."""
    return jax.tree.map(lambda x: split_microbatches(x, microbatches), batch)


def constrain_rows(batch: Batch) -> Batch:
    return jax.tree.map(lambda x: constrain(x, BATCH_AXES), batch)


@dataclass(frozen=True)
class Objective:
    """Mean next-token cross-entropy plus ``z_loss * mean(logsumexp^2)``, the LM head and loss taken
    ``chunks`` pieces of the sequence at a time: one piece's logits exist at once, forward and
    backward (the backward recomputes them), where whole they are a step's largest tensor (a 128k
    vocabulary: 1 GiB of float32 per 2k tokens)."""

    z_loss: float = 0.0
    chunks: int = 1
    documents: bool = False  # each document of a row read alone: attention stops at the flagged ends
    rows: str = "batch"  # the logical axis the head's rows are laid out by (a pipeline's: over its stages too)
    row_pieces: int = 1  # the rows taken this many pieces at a time (a pipeline's: one microbatch's worth each)
    logit_softcap: float = 0.0  # model.logit_softcap
    moe_aux_loss: float = 0.0  # model.moe_aux_loss: weight of the load-balancing loss, per layer
    moe_z_loss: float = 0.0  # model.moe_z_loss
    layers: int = 1  # the mixtures of experts among the blocks: the router statistics are summed over them

    def __call__(self, hidden: jax.Array, head: jax.Array, targets: jax.Array, counted: jax.Array,
                 count: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the objective, the cross-entropy) of final hidden states [batch, length, embed], the
        sums over the targets that count (``counted``) divided by ``count``."""
        with axis_aliases({"batch": self.rows}):
            sums = self._sums(hidden, head, targets, counted)
        ce, z = sums[0] / count, sums[1] / count
        return ce + self.z_loss * z, ce

    def _sums(self, hidden: jax.Array, head: jax.Array, targets: jax.Array, counted: jax.Array) -> jax.Array:
        if self.row_pieces == 1:
            return self._piece_sums(hidden, head, targets, counted)
        pieces = [split_microbatches(a, self.row_pieces) for a in (hidden, targets, counted)]
        return summed_pieces(self._piece_sums, head, *pieces)

    def _piece_sums(self, hidden: jax.Array, head: jax.Array, targets: jax.Array, counted: jax.Array) -> jax.Array:
        sums = functools.partial(loss_sums, cap=self.logit_softcap)
        if self.chunks == 1:
            return sums(hidden, head, targets, counted)
        batch, length, embed = hidden.shape

        def pieces(x: jax.Array) -> jax.Array:  # piece c holds positions c, c + chunks, ...: each keeps
            x = x.reshape(batch, length // self.chunks, self.chunks, *x.shape[2:])  # the sequence's sharding
            return jnp.moveaxis(x, 2, 0)

        return summed_pieces(sums, head, pieces(hidden), pieces(targets), pieces(counted))


def summed_pieces(sums: Callable[..., jax.Array], head: jax.Array, hidden: jax.Array, targets: jax.Array,
                  counted: jax.Array) -> jax.Array:
    """``sums(hidden, head, targets, counted)`` added up over pieces (the leading axis of the three),
    one piece after another; each piece's logits are recomputed in the backward pass, not kept."""
    piece = jax.checkpoint(lambda x, t, c, w: sums(x, w, t, c))
    return jax.lax.scan(lambda total, xtc: (total + piece(*xtc, head), None), jnp.zeros(2, jnp.float32),
                        (hidden, targets, counted))[0]


def lr_schedule(optim: OptimConfig, steps: int) -> optax.Schedule:
    warmup = min(optim.warmup_steps, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
                                              end_value=optim.lr * optim.min_lr_ratio)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: norm scales and biases are exempt."""
    def decays(path: tuple, _: Any) -> bool:
        name = path[-1].key
        return not (name == "scale" or name.endswith("bias"))
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: OptimConfig, steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(lr_schedule(optim, steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay, mask=decay_mask),
    )


ToModel = Callable[[Any], Any]  # trainable params -> the weights the model reads


def _same(params: Any) -> Any:
    return params


def batch_objective(graphdef: nnx.GraphDef, weights: Any, batch: Batch, objective: Objective,
                    run_layers: models.RunLayers = models.scan_layers,
                    count: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the objective, its parts: the cross-entropy as ``loss`` and a mixture of experts' ``router_terms``)
    of predicting each next token of rows [batch, seq_len + 1] that counts, over ``count`` targets
    (default: these rows' own, ``target_count``)."""
    count = target_count(batch) if count is None else count
    segments = batch.segments[:, :-1] if objective.documents else None
    hidden, head, stats = models.apply_hidden(graphdef, weights, batch.tokens[:, :-1], run_layers, segments)
    total, ce = objective(hidden, head, batch.tokens[:, 1:], batch.loss_mask[:, 1:], count)
    if stats is None:
        return total, {"loss": ce}
    terms = router_terms(stats, objective.layers)
    total = total + objective.moe_aux_loss * terms["moe_balance"] + objective.moe_z_loss * terms["moe_z_loss"]
    return total, {"loss": ce, **terms}


def loss_and_grads(graphdef: nnx.GraphDef, params: Any, batch: Batch, objective: Objective,
                   run_layers: models.RunLayers = models.scan_layers, to_model: ToModel = _same,
                   count: jax.Array | None = None) -> tuple[dict[str, jax.Array], Any]:
    """The objective's parts (``batch_objective``) of one (micro)batch [batch, seq_len + 1] and its
    gradient with respect to ``params`` (``to_model`` turns them into the model's weights)."""
    def of(p: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        return batch_objective(graphdef, to_model(p), batch, objective, run_layers, count)

    (_, parts), grads = jax.value_and_grad(of, has_aux=True)(params)
    return parts, grads


def accumulated_grads(graphdef: nnx.GraphDef, params: Any, batch: Batch, microbatches: int,
                      objective: Objective, to_model: ToModel = _same,
                      replica_sums: Any = None) -> tuple[dict[str, jax.Array], Any]:
    """Mean objective parts and gradient over ``microbatches`` equal slices of the batch, one slice at a time.

    Microbatch m takes rows m, m + M, m + 2M, ...: each device's block of the batch then feeds
    every microbatch, so no microbatch sits on a subset of the devices. Each draws dropout masks
    of its own, the same as in a pipeline.

    With ``replica_sums`` (``replica_sum_shardings``) each data replica sums the gradients of its own
    rows over the microbatches, as one [replicas, ...] array split over data, and they are reduced once,
    after the last: XLA would otherwise all-reduce every microbatch's gradients over data inside the
    backward loop over the layers (where no pass moves a reduction out).
    """
    if microbatches == 1:
        return loss_and_grads(graphdef, params, batch, objective, to_model=to_model)
    micro, count = microbatches_of(batch, microbatches), target_count(batch, microbatches)

    def of(mb: Batch, index: jax.Array) -> tuple[dict[str, jax.Array], Any]:
        return loss_and_grads(graphdef, params, constrain_rows(mb), objective,
                              to_model=lambda p: lora_lib.for_microbatch(to_model(p), index), count=count)

    def of_replicas(mb: Batch, index: jax.Array) -> tuple[dict[str, jax.Array], Any]:
        replicas = jax.tree.leaves(replica_sums)[0].mesh.shape["data"]
        rows = jax.tree.map(lambda x: x.reshape(replicas, x.shape[0] // replicas, *x.shape[1:]), mb)
        with axis_aliases({"batch": "replica_batch"}):  # the data axis is the replicas' own
            parts, grads = jax.vmap(of, in_axes=(0, None), spmd_axis_name="data")(rows, index)
        return parts, jax.lax.with_sharding_constraint(grads, replica_sums)

    run = of if replica_sums is None else of_replicas

    def body(sums: Any, mb_index: tuple[Batch, jax.Array]) -> tuple[Any, None]:
        return jax.tree.map(jnp.add, sums, run(*mb_index)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(run, jax.tree.map(lambda x: x[0], micro), jnp.int32(0)))
    sums, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(microbatches)))
    if replica_sums is not None:
        sums = jax.tree.map(lambda total: total.sum(0), sums)
    return jax.tree.map(lambda total: total / microbatches, sums)


def replica_sum_shardings(cfg: Config, mesh: Mesh, param_shardings: Any) -> Any:
    """The shardings of the data replicas' own gradient sums (``accumulated_grads``): [replicas, ...]
    over data, then as each trainable param. None where there is nothing to sum apart; with fsdp, whose
    reduce-scatter of each microbatch's gradients XLA runs over data and fsdp together, while it would
    reduce the replicas' sums over fsdp whole; and where it would change the step: a mixture's router
    statistics (its balance loss, its capacity) and LoRA's dropout masks depend on which rows are
    computed together."""
    dropout = cfg.lora.rank > 0 and cfg.lora.dropout > 0
    if (mesh.shape["data"] == 1 or cfg.train.microbatches == 1 or mesh.shape["stage"] > 1
            or mesh.shape["fsdp"] * mesh.shape["expert"] > 1 or cfg.model.moe_experts or dropout):
        return None
    return jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec("data", *s.spec)),
                        trainable(param_shardings, cfg.lora))


def batch_grads(graphdef: nnx.GraphDef, params: Any, batch: Batch, schedule: Schedule, objective: Objective,
                to_model: ToModel = _same, replica_sums: Any = None) -> tuple[dict[str, jax.Array], Any]:
    """The objective's parts and gradient of a batch: with pipeline stages the microbatches flow through the pipeline,
    otherwise they accumulate one after another (the same dropout masks either way)."""
    if schedule.stages > 1:
        run_layers = pipeline(schedule, lora_lib.for_microbatch)
        return loss_and_grads(graphdef, params, batch, objective, run_layers, to_model)
    return accumulated_grads(graphdef, params, batch, schedule.microbatches, objective, to_model, replica_sums)


def eval_loss(params: Any, batch: Batch, *, graphdef: nnx.GraphDef, schedule: Schedule, objective: Objective,
              lora: LoraConfig) -> jax.Array:
    """Mean cross-entropy of a batch under the merged weights (no dropout), split into
    microbatches as the train step is, so that it fits wherever the step does."""
    weights = model_params(params, lora)

    def ce(batch: Batch, run_layers: models.RunLayers = models.scan_layers, count: jax.Array | None = None
           ) -> jax.Array:
        return batch_objective(graphdef, weights, batch, objective, run_layers, count)[1]["loss"]

    if schedule.stages > 1:
        return ce(batch, pipeline(schedule))
    count = target_count(batch, schedule.microbatches)
    return jnp.mean(jax.lax.map(lambda mb: ce(constrain_rows(mb), count=count),
                                microbatches_of(batch, schedule.microbatches)))


def train_step(state: State, batch: Batch, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               lr: optax.Schedule, schedule: Schedule, objective: Objective, lora: LoraConfig,
               seed: int, replica_sums: Any = None) -> tuple[State, dict[str, jax.Array]]:
    params = trainable(state["params"], lora)
    step_key = jax.random.fold_in(jax.random.key(seed), state["step"])

    def to_model(p: Any) -> Any:
        return model_params(with_trainable(state["params"], p, lora), lora, step_key)

    parts, grads = batch_grads(graphdef, params, batch, schedule, objective, to_model, replica_sums)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = with_trainable(state["params"], optax.apply_updates(params, updates), lora)
    metrics = {**parts, "grad_norm": optax.tree.norm(grads), "lr": lr(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def init_state(cfg: Config, tx: optax.GradientTransformation) -> State:
    params = init_params(cfg)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(trainable(params, cfg.lora))}


@dataclass
class ShardedTraining:
    """Everything compiled for one config on one mesh."""

    mesh: Mesh
    graphdef: nnx.GraphDef
    param_axes: Any
    state_shardings: State
    batch_sharding: NamedSharding  # of every field of a Batch: rows over the batch axes
    init: Any  # () -> State, created directly in its shardings
    step: Any  # (State, Batch) -> (State, metrics); donates the state
    evaluate: Any  # (params, Batch) -> mean cross-entropy


def batch_shardings(sharding: NamedSharding) -> Batch:
    """``sharding`` for every field of a batch."""
    return Batch(*[sharding] * len(Batch._fields))


def abstract_batch(sharding: NamedSharding, shape: tuple[int, int]) -> Batch:
    """A batch's shapes and dtypes (``Batch``) in ``sharding``, to compile against."""
    return Batch(jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
                 jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=sharding),
                 jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding))


def compile_step(training: ShardedTraining, state: Any, batch_shape: tuple[int, int]) -> Any:
    """The step compiled ahead of time for ``state`` (arrays, or abstract shapes with shardings)."""
    return training.step.lower(state, abstract_batch(training.batch_sharding, batch_shape)).compile()


def pipeline_schedule(cfg: Config, stages: int) -> Schedule:
    return Schedule(stages, cfg.train.microbatches, cfg.parallel.virtual_stages, cfg.parallel.stage_remat)


def build(cfg: Config, mesh: Mesh) -> ShardedTraining:
    """Shardings from the logical rules, then the jitted init, train step and eval step."""
    graphdef, abstract_params, param_axes, param_shardings = param_layout(cfg, mesh)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state_shardings = {
        "step": replicated(mesh),
        "params": param_shardings,
        "opt_state": optimizer_shardings(tx, trainable(abstract_params, cfg.lora),
                                         trainable(param_shardings, cfg.lora), mesh),
    }
    batch_sharding = logical_sharding(("batch", None), mesh)  # rows of seq_len + 1 tokens: split by the step
    rules = rules_for(cfg.parallel)  # of the activations (the params' are the defaults)
    schedule = pipeline_schedule(cfg, mesh.shape["stage"])
    layout = dict(graphdef=graphdef, schedule=schedule,
                  objective=Objective(cfg.train.z_loss, cfg.train.loss_chunks, cfg.data.document_mask,
                                      *head_layout(schedule), logit_softcap=cfg.model.logit_softcap,
                                      moe_aux_loss=cfg.model.moe_aux_loss, moe_z_loss=cfg.model.moe_z_loss,
                                      layers=max(1, moe_layer_count(cfg.model))),
                  lora=cfg.lora)
    step = functools.partial(train_step, tx=tx, lr=lr_schedule(cfg.optim, cfg.train.steps), seed=cfg.seed,
                             replica_sums=replica_sum_shardings(cfg, mesh, param_shardings), **layout)
    return ShardedTraining(
        mesh=mesh,
        graphdef=graphdef,
        param_axes=param_axes,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        init=jax.jit(functools.partial(init_state, cfg, tx), out_shardings=state_shardings),
        step=jax.jit(with_activation_sharding(step, mesh, rules),
                     in_shardings=(state_shardings, batch_shardings(batch_sharding)),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,)),
        evaluate=jax.jit(with_activation_sharding(functools.partial(eval_loss, **layout), mesh, rules),
                         in_shardings=(param_shardings, batch_shardings(batch_sharding)), out_shardings=replicated(mesh)),
    )
