"""Every bad setting is refused before compiling, with a message naming the setting."""

import pytest
import yaml

from fax import Config, ConfigError, Trainer, load_config
from fax.config import validate


def invalid(overrides, n_devices=8):
    with pytest.raises(ConfigError) as info:
        validate(load_config(overrides=overrides), n_devices)
    return str(info.value)


def test_mesh_product_must_equal_device_count():
    msg = invalid(["parallel.data=2", "parallel.fsdp=2", "parallel.tensor=1"])
    assert "parallel.data=2" in msg and "4 devices but 8 are available" in msg


def test_mesh_fill_must_divide_devices():
    assert "does not divide the 8 devices" in invalid(["parallel.data=3"])


def test_only_one_axis_may_fill():
    assert "only one mesh axis may be -1" in invalid(["parallel.data=-1"])


def test_batch_must_divide_over_data_shards_and_microbatches():
    msg = invalid(["train.batch_size=12", "train.microbatches=2"])
    assert "train.batch_size=12" in msg and "train.microbatches=2" in msg and "= 16" in msg


@pytest.mark.parametrize("setting,value", [("n_heads", 12), ("d_ff", 100), ("vocab_size", 500)])
def test_model_dims_must_divide_over_tensor(setting, value):
    overrides = ["model=gpt-tiny", "parallel.fsdp=1", "parallel.tensor=8", f"model.{setting}={value}"]
    if setting == "n_heads":
        overrides.append(f"model.n_kv_heads={value}")
    msg = invalid(overrides)
    assert f"model.{setting}={value} is not divisible by parallel.tensor=8" in msg


def test_kv_heads_must_divide_over_tensor():
    msg = invalid(["model=llama-tiny", "parallel.fsdp=1", "parallel.tensor=8", "model.n_kv_heads=4"])
    assert "model.n_kv_heads=4 is not divisible by parallel.tensor=8" in msg


def test_sequence_longer_than_context():
    msg = invalid(["model=gpt-tiny", "train.seq_len=4096"])
    assert "train.seq_len=4096 is longer than the model's context model.max_seq_len=128" in msg


def test_loss_chunks_must_split_the_sequence_and_its_shards():
    assert "train.loss_chunks must be positive, got 0" in invalid(["train.loss_chunks=0"])
    assert "train.loss_chunks=3 does not divide train.seq_len=128" in invalid(["train.loss_chunks=3"])
    msg = invalid(["parallel.fsdp=1", "parallel.sequence=8", "train.loss_chunks=32"])
    assert "pieces of 4 positions, which do not split over parallel.sequence=8" in msg
    validate(load_config(overrides=["parallel.fsdp=1", "parallel.sequence=8", "train.loss_chunks=16"]), 8)


def test_unknown_preset_and_unknown_key():
    with pytest.raises(ConfigError, match="unknown model preset 'gpt-huge'.*gpt-tiny"):
        load_config(overrides=["model=gpt-huge"])
    with pytest.raises(ConfigError, match="unknown setting 'train.stepz'.*steps"):
        load_config(overrides=["train.stepz=3"])
    with pytest.raises(ConfigError, match="train.steps='many': expected int"):
        load_config(overrides=["train.steps=many"])
    with pytest.raises(ConfigError, match=r"override 'train.steps=\[' is not valid YAML \(line 1, column 2\): expected"):
        load_config(overrides=["train.steps=["])


def test_a_config_file_that_is_not_yaml_is_named(tmp_path):
    (tmp_path / "job.yaml").write_text("model: gpt-tiny\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"job.yaml is not valid YAML \(line 3, column 1\): expected ',' or ']'"):
        load_config(tmp_path / "job.yaml")


def refused_dataset(path, tmp_path):
    """The Trainer's error for ``data.path=path``: checked where the dataset is opened, before any compile."""
    with pytest.raises(ConfigError) as info:
        Trainer(overrides=[f"data.path={path}", f"run_dir={tmp_path / 'run'}"])
    return str(info.value)


def test_missing_and_empty_data_path(tmp_path):
    validate(load_config(overrides=[f"data.path={tmp_path / 'nowhere'}"]), 8)  # settings alone read no disk
    assert "does not exist" in refused_dataset(tmp_path / "nowhere", tmp_path)
    assert "index.json missing" in refused_dataset(tmp_path, tmp_path)


def test_too_few_tokens_for_one_sequence(tmp_path):
    from fax.data import prepare

    (tmp_path / "a.txt").write_text("tiny")
    prepare([tmp_path / "a.txt"], tmp_path / "ds")
    assert "holds 5 tokens, fewer than one sequence" in refused_dataset(tmp_path / "ds", tmp_path)


def test_trainer_refuses_before_compiling():
    with pytest.raises(ConfigError, match="parallel.tensor"):
        Trainer(overrides=["model=gpt-tiny", "parallel.fsdp=1", "parallel.tensor=8", "model.n_heads=6",
                           "model.n_kv_heads=6"])


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "llama-tiny", "n_layers": 3}, "train": {"steps": 7}}))
    cfg = load_config(path, ["train.steps=9", "optim.lr=0.01"])
    assert cfg.model.n_layers == 3 and cfg.model.n_kv_heads == 8 and cfg.model.norm == "rmsnorm"
    assert cfg.train.steps == 9 and cfg.optim.lr == 0.01


def test_preset_applies_before_field_overrides():
    cfg = load_config(overrides=["model.n_layers=5", "model=llama-tiny"])
    assert cfg.model.n_layers == 5 and cfg.model.position == "rope"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(overrides=["model=llama-tiny", "train.steps=11"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert Config() == load_config()


def test_sequence_parallelism_needs_a_sequence_the_tensor_group_divides():
    msg = invalid(["model=llama-tiny", "parallel.fsdp=4", "parallel.tensor=2", "parallel.tensor_sequence=true",
                   "train.seq_len=33", "model.max_seq_len=64"])
    assert "parallel.tensor_sequence splits train.seq_len=33 over parallel.sequence x parallel.tensor = 2" in msg
