"""Typed run configuration: dataclasses, YAML files, ``key.sub=value`` overrides, validation.

Validation runs before anything is compiled and names the setting to change.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fax.models.config import (LORA_TARGETS, ModelConfig, expert_indivisible, mixed_layers, stack_units,
                               tensor_indivisible)
from fax.models.presets import preset
from fax.parallel.config import ParallelConfig
from fax.parallel.layout import Candidate


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and the fix."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the learning rate at the end, as a share of lr
    warmup_steps: int = 20  # linear warmup from 0 to lr
    b1: float = 0.9  # Adam's first-moment decay
    b2: float = 0.95  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not norms or biases)
    clip_norm: float = 1.0  # gradients clipped to this global norm


@dataclass(frozen=True)
class TrainConfig:
    """The loop: steps, batches, the loss, evaluation, logging and profiling."""

    steps: int = 200  # train steps in all
    batch_size: int = 16  # global, in sequences
    seq_len: int = 0  # 0: the model's max_seq_len
    microbatches: int = 1  # gradient accumulation
    z_loss: float = 0.0  # weight of the mean logsumexp^2 added to the loss (PaLM's z-loss)
    # Pieces of the sequence the LM head and loss run in, one after another: the logits' memory
    # divides by it, for one more forward pass of the head. Raise it for large vocabularies.
    loss_chunks: int = 1
    eval_every: int = 0  # steps between losses on the validation split (and at the end); 0: never
    eval_batches: int = 8  # batches of the validation split per evaluation, the same ones each time
    log_every: int = 10  # steps between logged records
    sample_tokens: int = 200  # tokens `fax train` generates from the trained model at the end; 0: none
    sample_prompt: str = "def "  # what that sample continues
    # Steps traced by the JAX profiler into RUN_DIR/profile (TensorBoard's profile plugin, Perfetto);
    # 0: none. The trace starts at step ``profile_from``, past compilation and the first steps' warm-up.
    profile_steps: int = 0
    profile_from: int = 3  # the first traced step
    peak_flops_per_device: float = 0.0  # 0: from the device table (see fax.metrics)


@dataclass(frozen=True)
class DataConfig:
    """What is trained on."""

    path: str = ""  # a folder written by `fax prepare`; empty: the Python standard library corpus
    # Each document a training window packs is read as if it stood alone: its tokens attend only to
    # its own, and its positions count from its first token. Off: windows read straight across ends.
    document_mask: bool = False
    check_tokenizer: bool = True  # refuse a dataset prepared with another tokenizer than an hf: checkpoint's


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the named weights; the base weights stay frozen (and out of the optimizer)."""

    rank: int = 0  # 0: train every weight
    alpha: float = 16.0  # the update is (alpha / rank) * A @ B
    targets: tuple[str, ...] = ("attn.wq", "attn.wv")  # of attn.wq/wk/wv/wo, mlp.wi/wg/wo
    dropout: float = 0.0  # on the adapters' inputs, in training

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def problems(self, model: ModelConfig) -> list[str]:
        if self.rank < 0:
            return [f"lora.rank must be >= 0 (0: no adapters), got {self.rank}"]
        if not self.rank:
            return []
        if not 0.0 <= self.dropout < 1.0:
            return [f"lora.dropout must be in [0, 1), got {self.dropout}"]
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        found = [f"lora.targets: unknown {', '.join(unknown)}; choose from {', '.join(LORA_TARGETS)}"] if unknown else []
        if "mlp.wg" in self.targets and model.activation not in ("swiglu", "geglu"):
            found.append("lora.targets: mlp.wg exists only with model.activation=swiglu or geglu")
        if model.moe_experts and (mixed_layers(model) or any(t.startswith("mlp.") for t in self.targets)):
            found.append("lora.targets: fax's LoRA adapts a mixture of experts' attention (attn.wq, attn.wk, attn.wv, "
                         "attn.wo), not its per-expert MLPs, and nothing of one with dense blocks too "
                         "(model.moe_first_dense, model.moe_every)")
        if not self.targets:
            found.append("lora.targets is empty; name the weights to adapt, e.g. [attn.wq, attn.wv]")
        return found


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the train state: every host writes its shards, asynchronously."""

    every_n_steps: int = 100  # 0: only at the end of training (and on preemption)
    max_to_keep: int = 3  # the most recent checkpoints kept; 0 keeps all
    keep_every_n_steps: int = 0  # steps divisible by this are kept for good (milestones); 0: none
    async_save: bool = True  # write in the background; the loop waits only while arrays leave the devices
    # A checksum of every array in each checkpoint's meta, checked whenever it is read back (one pass over
    # the state on the devices at each save and restore)
    checksums: bool = True
    # A resume whose latest checkpoint is damaged (fails its checksums, files gone) takes the newest intact
    # one, saying so; false: stop with an error naming the damaged step instead
    fallback: bool = True
    # zstd on every array: smaller checkpoints of low-entropy states (fresh Adam moments), at a CPU
    # cost that makes saves several times slower than writing the raw bytes (benchmarks/checkpoint.py)
    compress: bool = False
    dir: str = ""  # empty: RUN_DIR/checkpoints. Multi-host: a path every host sees (e.g. gs://...)


@dataclass(frozen=True)
class LoggingConfig:
    """Where logged steps go besides RUN_DIR/metrics.jsonl (always written)."""

    tensorboard: bool = False  # TensorBoard event files in RUN_DIR/tensorboard (the tensorboardX package)
    wandb_project: str = ""  # a Weights & Biases project to log to (the wandb package; WANDB_MODE=offline works)
    wandb_entity: str = ""  # the W&B team or user; empty: wandb's default
    wandb_name: str = ""  # the W&B run's display name; empty: the run directory's name


@dataclass(frozen=True)
class ClusterConfig:
    """Ray mode: this process is the head and drives one HostWorker actor per host (fax.cluster)."""

    ray: bool = False  # this process is the head of a Ray-mode run
    address: str = ""  # "auto": join the running Ray cluster; "": start a local one
    hosts: int = 0  # 0: every host the cluster has
    emulate_hosts: int = 0  # > 0: a local cluster of this many emulated CPU hosts (laptops, tests)
    devices_per_host: int = 4  # emulated CPU devices on each emulated host
    startup_timeout_s: float = 180.0  # actors placed and jax.distributed joined within this
    step_timeout_s: float = 600.0  # a step (or save) taking longer counts as a hung worker
    heartbeat_timeout_s: int = 30  # jax.distributed: a silent peer is declared dead after this
    max_restarts: int = 3  # fresh actors + restore after a worker failure, at most this often
    ray_temp_dir: str = ""  # a local cluster's files; empty: RUN_DIR/ray (see the README)


@dataclass(frozen=True)
class ServeConfig:
    """`fax serve`: where it listens and what it accepts. Requests beyond a limit get a 4xx that names it."""

    host: str = "127.0.0.1"  # 0.0.0.0 to accept connections from other machines
    port: int = 8000  # the port to listen on
    max_batch: int = 16  # requests decoded together (rows of the KV cache)
    max_concurrent: int = 64  # requests running, queued or being scored; more get 429
    max_prompt_tokens: int = 0  # 0: up to the model's context
    max_tokens: int = 0  # the most tokens one request may ask for; 0: up to the model's context
    default_max_tokens: int = 16  # when a request does not say
    model_name: str = ""  # what /v1/models reports and requests may name; empty: the run directory's name
    warm_up: bool = False  # compile every prefill and decode shape before serving (Engine.warm_up)
    max_request_bytes: int = 8_388_608  # a larger request body gets 413
    read_timeout_s: float = 30.0  # a request body that has not arrived by then gets 408

    def problems(self) -> list[str]:
        found = [] if 0 < self.port < 65536 else [f"serve.port={self.port} must be in 1..65535"]
        for name in ("max_batch", "max_concurrent", "default_max_tokens", "max_request_bytes", "read_timeout_s"):
            if getattr(self, name) <= 0:
                found.append(f"serve.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_tokens"):
            if getattr(self, name) < 0:
                found.append(f"serve.{name} must be >= 0 (0: the model's context), got {getattr(self, name)}")
        return found


@dataclass(frozen=True)
class Config:
    """Everything a run is: the sections below and the top-level settings."""

    model: ModelConfig = field(default_factory=lambda: preset("gpt-mini"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run_dir: str = "runs/default"  # where the run's config, metrics, checkpoints and tokenizer go
    resume: bool = True  # continue from the run directory's latest complete checkpoint, if any
    plan: str = ""  # "auto": the planner picks parallel.*, train.microbatches, model.remat; or a plan JSON file
    init_from: str = ""  # hf:/path/to/dir: start from a Hugging Face GPT-2/Llama checkpoint (its shape wins)
    seed: int = 0  # of the initial params, the batches and dropout

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def with_layout(cfg: Config, layout: Candidate) -> Config:
    """``cfg`` laid out as a plan says: mesh axis sizes, microbatches, remat policy, loss pieces."""
    parallel = dataclasses.replace(cfg.parallel, **layout.axes, virtual_stages=layout.virtual_stages,
                                   stage_remat=layout.stage_remat, tensor_sequence=layout.tensor_sequence)
    return dataclasses.replace(cfg, parallel=parallel, model=cfg.model.replace(remat=layout.remat),
                               train=dataclasses.replace(cfg.train, microbatches=layout.microbatches,
                                                         loss_chunks=layout.loss_chunks))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check a parsed value against a dataclass field type (ints widen to floats)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads '3e-3' (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typing.get_origin(typ) is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if typ in (int, float, str, bool) and (type(value) is not typ):
        raise ConfigError(f"{key}={value!r}: expected {typ.__name__}")
    return value


def _apply(obj: Any, key: str, value: Any, prefix: str = "") -> Any:
    """A copy of dataclass ``obj`` with dotted ``key`` set to ``value``."""
    head, _, rest = key.partition(".")
    full = prefix + head
    hints = typing.get_type_hints(type(obj))
    if head not in hints:
        raise ConfigError(f"unknown setting {full!r}; valid keys here: {', '.join(hints)}")
    current = getattr(obj, head)
    if head == "model" and isinstance(obj, Config) and not rest:
        if isinstance(value, str):
            return dataclasses.replace(obj, model=preset_or_error(value))
        if isinstance(value, dict):
            base = preset_or_error(value.pop("preset")) if "preset" in value else ModelConfig()
            return dataclasses.replace(obj, model=_apply_dict(base, value, "model."))
    if dataclasses.is_dataclass(current):
        if rest:
            return dataclasses.replace(obj, **{head: _apply(current, rest, value, full + ".")})
        if not isinstance(value, dict):
            raise ConfigError(f"{full} is a section; set its keys, e.g. {full}.{next(iter(typing.get_type_hints(type(current))))}=...")
        return dataclasses.replace(obj, **{head: _apply_dict(current, value, full + ".")})
    if rest:
        raise ConfigError(f"{full} is not a section; use {full}=VALUE")
    return dataclasses.replace(obj, **{head: _coerce(value, hints[head], full)})


def _apply_dict(obj: Any, values: dict, prefix: str) -> Any:
    for k, v in values.items():
        obj = _apply(obj, str(k), v, prefix)
    return obj


def preset_or_error(name: str) -> ModelConfig:
    try:
        return preset(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    return key.strip(), _yaml(raw, f"override {text!r}") if raw else ""


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply ``key.sub=value`` overrides; a ``model=PRESET`` applies first, field overrides on top."""
    pairs = sorted((parse_override(o) for o in overrides), key=lambda kv: kv[0] != "model")
    for key, value in pairs:
        cfg = _apply(cfg, key, value)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then a YAML file, then ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        values = _yaml(Path(path).read_text(), str(path)) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        cfg = _apply_dict(cfg, values, "")
    return apply_overrides(cfg, overrides)


def run_config(run_dir: str | Path) -> Config:
    """The resolved config a run directory was trained with."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{str(run_dir)!r} is not a fax run directory (no config.yaml)")
    return load_config(path)


def config_from_dict(values: dict[str, Any]) -> Config:
    return _apply_dict(Config(), values, "")


def setting_problems(cfg: Config) -> list[str]:
    """What is wrong whatever the mesh: model, adapters, checkpoint and train settings (the dataset is
    checked where it is opened)."""
    m, t = cfg.model, cfg.train
    problems = list(m.problems()) + cfg.lora.problems(m)
    for name in ("every_n_steps", "max_to_keep", "keep_every_n_steps"):
        if getattr(cfg.checkpoint, name) < 0:
            problems.append(f"checkpoint.{name} must be >= 0, got {getattr(cfg.checkpoint, name)}")
    for name in ("steps", "batch_size", "microbatches", "loss_chunks", "eval_batches", "log_every"):
        if getattr(t, name) <= 0:
            problems.append(f"train.{name} must be positive, got {getattr(t, name)}")
    if t.eval_every < 0:
        problems.append(f"train.eval_every must be >= 0 (0: no evaluation), got {t.eval_every}")
    if t.profile_steps < 0:
        problems.append(f"train.profile_steps must be >= 0 (0: no profile), got {t.profile_steps}")
    elif t.profile_steps and not 1 <= t.profile_from <= t.steps - t.profile_steps + 1:
        problems.append(f"train.profile_from={t.profile_from} and train.profile_steps={t.profile_steps} trace steps "
                        f"{t.profile_from}..{t.profile_from + t.profile_steps - 1}, not all within 1..{t.steps} "
                        "(train.steps); move the window or trace fewer steps")
    if t.loss_chunks > 0 and cfg.seq_len % t.loss_chunks:
        problems.append(f"train.loss_chunks={t.loss_chunks} does not divide train.seq_len={cfg.seq_len}; "
                        "choose a divisor of the sequence length")
    if cfg.seq_len > m.max_seq_len:
        problems.append(f"train.seq_len={cfg.seq_len} is longer than the model's context "
                        f"model.max_seq_len={m.max_seq_len}; lower train.seq_len or raise model.max_seq_len")
    return problems


def layout_problems(cfg: Config, sizes: dict[str, int]) -> list[str]:
    """What does not divide over the mesh axis ``sizes``."""
    m, t = cfg.model, cfg.train
    problems = []
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if t.batch_size % (shards * t.microbatches):
        problems.append(f"train.batch_size={t.batch_size} must be divisible by the batch shards "
                        f"(parallel.data x parallel.fsdp x parallel.expert = {shards}) x "
                        f"train.microbatches={t.microbatches} = {shards * t.microbatches}")
    tensor = sizes["tensor"]
    indivisible = tensor_indivisible(m, tensor)
    if indivisible:
        problems.append(f"model.{indivisible}={getattr(m, indivisible)} is not divisible by parallel.tensor={tensor}; "
                        f"choose a tensor size that divides it")
    if m.d_model % (sizes["fsdp"] * sizes["expert"]):
        problems.append(f"model.d_model={m.d_model} is not divisible by parallel.fsdp x parallel.expert = "
                        f"{sizes['fsdp'] * sizes['expert']}")
    if expert_indivisible(m, sizes["expert"]):
        problems.append(f"parallel.expert={sizes['expert']} must divide model.moe_experts={m.moe_experts} "
                        + ("(a dense model: set parallel.expert=1)" if not m.moe_experts else "(each device holds "
                           "an equal share of the experts)"))
    problems.extend(cfg.parallel.problems(sizes, stack_units(m), t.microbatches))
    if cfg.seq_len % sizes["sequence"]:
        problems.append(f"train.seq_len={cfg.seq_len} is not divisible by parallel.sequence={sizes['sequence']}")
    elif cfg.parallel.tensor_sequence and cfg.seq_len % (sizes["sequence"] * tensor):
        problems.append(f"parallel.tensor_sequence splits train.seq_len={cfg.seq_len} over parallel.sequence x "
                        f"parallel.tensor = {sizes['sequence'] * tensor}, which does not divide it; choose a "
                        "sequence length it divides, or parallel.tensor_sequence=false")
    elif t.loss_chunks > 0 and cfg.seq_len % t.loss_chunks == 0 and (cfg.seq_len // t.loss_chunks) % sizes["sequence"]:
        problems.append(f"train.loss_chunks={t.loss_chunks} leaves pieces of {cfg.seq_len // t.loss_chunks} positions, "
                        f"which do not split over parallel.sequence={sizes['sequence']}; lower train.loss_chunks")
    return problems


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def validate(cfg: Config, n_devices: int) -> dict[str, int]:
    """Raise ConfigError listing every problem; return the resolved mesh axis sizes."""
    problems = setting_problems(cfg)
    try:
        sizes = cfg.parallel.axis_sizes(n_devices)
    except ValueError as e:
        problems.append(str(e))
        sizes = None
    if sizes is not None and cfg.train.microbatches > 0:
        problems.extend(layout_problems(cfg, sizes))
    raise_problems(problems)
    return sizes
