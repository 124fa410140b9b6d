"""Hugging Face interop: imported GPT-2 / Llama checkpoints give transformers' logits; exports load back."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the hf extra: pip install -e '.[hf]' (CPU torch, transformers)")
transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")

from fax import models  # noqa: E402
from fax.interop import hf  # noqa: E402
from fax.cli import main  # noqa: E402
from fax.config import ConfigError, load_config  # noqa: E402
from fax.data import Sampler, TokenDataset  # noqa: E402
from fax.config import Config  # noqa: E402
from fax.params import param_layout  # noqa: E402
from fax.train.loop import Trainer  # noqa: E402
from fax.parallel import ParallelConfig, make_mesh  # noqa: E402

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "llama": lambda: transformers.LlamaConfig(vocab_size=320, max_position_embeddings=64, hidden_size=32,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              intermediate_size=64, tie_word_embeddings=False, rope_theta=500.0),
}
MESHES = {"1 device": (ParallelConfig(fsdp=1), 1), "2x2x2": (ParallelConfig(data=2, fsdp=2, tensor=2), 8)}


def hf_model(kind: str, path):
    """A transformers model with every weight random (biases and norms too), saved as safetensors."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def fax_logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
    graphdef, _ = models.abstract(cfg)
    return np.asarray(models.apply(graphdef, params, jnp.asarray(tokens)))


TOKENS = np.random.default_rng(0).integers(0, 320, (2, 24))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_import_matches_transformers_and_export_loads_back(kind, tmp_path):
    model = hf_model(kind, tmp_path / "hf")
    want = hf_logits(model, TOKENS)
    cfg = hf.model_config(hf.read_config(tmp_path / "hf"))
    for name, (parallel, n) in MESHES.items():
        mesh = make_mesh(parallel, jax.devices()[:n])
        *_, shardings = param_layout(Config(model=cfg), mesh)
        params = hf.import_params(tmp_path / "hf", cfg, shardings)
        # Straight into the target sharding: each device holds only its slice.
        assert params["blocks"]["attn"]["wq"].sharding == shardings["blocks"]["attn"]["wq"]
        np.testing.assert_allclose(fax_logits(cfg, params, TOKENS), want, rtol=1e-4, atol=1e-4, err_msg=name)
    hf.export_params(params, cfg, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_logits(back, TOKENS), want, rtol=1e-4, atol=1e-4)


def test_bfloat16_checkpoints_import(tmp_path):
    """Published checkpoints are mostly bfloat16, which numpy cannot hold."""
    model = hf_model("llama", tmp_path / "fp32").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    upcast = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    want = hf_logits(upcast, TOKENS)
    cfg = hf.model_config(hf.read_config(tmp_path / "bf16"))
    *_, shardings = param_layout(Config(model=cfg), make_mesh(ParallelConfig(fsdp=1), jax.devices()[:1]))
    params = hf.import_params(tmp_path / "bf16", cfg, shardings)
    np.testing.assert_allclose(fax_logits(cfg, params, TOKENS), want, rtol=1e-4, atol=1e-4)


def test_fine_tune_from_hf_then_export_the_run(tmp_path, small_corpus):
    model = hf_model("gpt2", tmp_path / "hf")
    run_dir = tmp_path / "run"
    config = load_config(overrides=["model=gpt-tiny", "train.steps=3", "train.log_every=1", "train.batch_size=8",
                                    "train.seq_len=32", "train.sample_tokens=0", f"data.path={small_corpus}",
                                    f"run_dir={run_dir}", f"init_from=hf:{tmp_path / 'hf'}"])
    trainer = Trainer(config, echo=lambda _: None)
    assert trainer.config.model.d_model == 32 and trainer.config.model.vocab_size == 320  # the checkpoint's shape
    history = trainer.fit()
    trainer.close()
    # The first step's loss is the imported model's loss on the first batch.
    batch = Sampler(TokenDataset.open(small_corpus), 8, 32, config.seed).batch(0).tokens
    logits = torch.tensor(hf_logits(model, batch[:, :-1]))
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 320), torch.tensor(batch[:, 1:]).long().reshape(-1))
    assert history[0]["loss"] == pytest.approx(float(want), rel=1e-4)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert not np.allclose(hf_logits(exported, TOKENS), hf_logits(model, TOKENS), atol=1e-3)  # it trained
    from fax.config import run_config
    from fax.params import run_params

    params, step = run_params(run_dir, run_config(run_dir), make_mesh(ParallelConfig(fsdp=1), jax.devices()[:1]))
    assert step == 3
    np.testing.assert_allclose(hf_logits(exported, TOKENS), fax_logits(trainer.config.model, params, TOKENS),
                               rtol=1e-4, atol=1e-4)


def test_what_cannot_be_imported_or_exported_is_named(tmp_path):
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        hf.model_config({"model_type": "bert"})
    gpt2 = CONFIGS["gpt2"]().to_dict()
    with pytest.raises(ValueError, match="activation_function='gelu'"):
        hf.model_config({**gpt2, "activation_function": "gelu"})
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        hf.import_params(tmp_path, hf.model_config(gpt2), {})
    with pytest.raises(ValueError, match="no Hugging Face architecture matches"):
        hf.family(models.preset("gpt-tiny").replace(norm="rmsnorm"))
    with pytest.raises(ConfigError, match="init_from="):
        Trainer(load_config(overrides=[f"init_from=hf:{tmp_path / 'missing'}"]))
