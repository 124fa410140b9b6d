"""Hugging Face interop: imported GPT-2 / Llama checkpoints give transformers' logits; exports load back."""

import json
from pathlib import Path

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
    # Llama 3.1's RoPE scaling, with a pretraining context (16) that puts head frequencies in all three bands
    "llama3": lambda: transformers.LlamaConfig(
        vocab_size=320, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16, "rope_theta": 500.0}),
    # Mistral's sliding window, shorter than the sequences (24 tokens; 40 in the greedy decode)
    "mistral": lambda: transformers.MistralConfig(vocab_size=320, max_position_embeddings=64, hidden_size=32,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  intermediate_size=64, sliding_window=8, rope_theta=500.0),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=320, max_position_embeddings=64, hidden_size=32,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              intermediate_size=64, tie_word_embeddings=True, rope_theta=500.0),
    "qwen3": lambda: transformers.Qwen3Config(vocab_size=320, max_position_embeddings=64, hidden_size=32,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=16, intermediate_size=64, tie_word_embeddings=False,
                                              rope_theta=500.0),
    "gemma": lambda: transformers.GemmaConfig(vocab_size=320, max_position_embeddings=64, hidden_size=32,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=16, intermediate_size=64, rope_theta=500.0),
    # Gemma 2: norms after each sublayer, soft-capped scores and logits (low caps, so that they bite),
    # queries scaled by 1/sqrt(24) (not head_dim's 16), its first layer local (a window of 8), its second global
    "gemma2": lambda: transformers.Gemma2Config(vocab_size=320, max_position_embeddings=64, hidden_size=32,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=16, intermediate_size=64, rope_theta=500.0,
                                                final_logit_softcapping=3.0, attn_logit_softcapping=2.0,
                                                query_pre_attn_scalar=24, sliding_window=8),
    # Mixtures of experts: top-2 of 4 (Mixtral); Qwen2-MoE's weights not renormalised, its gated shared
    # expert and q/k/v biases, dense layers 0, 1 and 3 (a dense first layer, then every other layer a
    # mixture); Qwen3-MoE's renormalised top-2 of 8 narrow experts and q/k norms
    "mixtral": lambda: transformers.MixtralConfig(vocab_size=320, max_position_embeddings=64, hidden_size=32,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                                  rope_theta=500.0),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=320, max_position_embeddings=64, hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, norm_topk_prob=False, rope_theta=500.0, mlp_only_layers=[0, 1, 3]),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=320, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, rope_theta=500.0),
}
MESHES = {"1 device": (ParallelConfig(fsdp=1), 1), "2x2x2": (ParallelConfig(data=2, fsdp=2, tensor=2), 8)}
EXPERT_MESH = (ParallelConfig(expert=2, fsdp=2, tensor=2), 8)  # a mixture of experts' instead of data=2


def hf_model(kind, path):
    """A transformers model (``kind``: a CONFIGS name, or a config) with every weight random (biases and
    norms too), saved as safetensors."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]() if isinstance(kind, str) else kind).eval()
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
        parallel, n = EXPERT_MESH if cfg.moe_experts and n > 1 else (parallel, n)
        mesh = make_mesh(parallel, jax.devices()[:n])
        *_, shardings = param_layout(Config(model=cfg), mesh)
        params = hf.import_params(tmp_path / "hf", cfg, shardings)
        # Straight into the target sharding: each device holds only its slice.
        assert jax.tree.all(jax.tree.map(lambda p, s: p.sharding == s, params, shardings))
        np.testing.assert_allclose(fax_logits(cfg, params, TOKENS), want, rtol=1e-4, atol=1e-4, err_msg=name)
    hf.export_params(params, cfg, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_logits(back, TOKENS), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", [k for k in CONFIGS if k not in ("gpt2", "qwen3_moe")])  # Qwen3-MoE: Qwen3's + Mixtral's
def test_kv_cache_greedy_generation_equals_transformers(kind, tmp_path):
    """32 tokens through the serving engine's KV cache, greedy, from an imported checkpoint: the
    tokens transformers' greedy ``generate`` gives (Llama 3.1 scaling past its 16-token pretraining
    context, Gemma 2's soft caps and scaled queries in the cache's attention)."""
    from fax.serving.batching import generate
    from fax.serving.engine import Engine, serving_mesh
    from fax.serving.sampling import SamplingParams

    model = hf_model(kind, tmp_path / "hf")
    cfg = hf.model_config(hf.read_config(tmp_path / "hf"))
    mesh = serving_mesh(cfg, jax.devices()[:1])
    *_, shardings = param_layout(Config(model=cfg), mesh)
    engine = Engine(cfg, hf.import_params(tmp_path / "hf", cfg, shardings), mesh, max_batch=1, end_ids=())
    prompt = TOKENS[0, :8].tolist()
    ours = generate(engine, [prompt], [SamplingParams(max_new_tokens=32, temperature=0.0)])[0]
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
    assert ours == theirs


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


@pytest.mark.parametrize("kind", ["gpt2", "gemma2"])  # Gemma 2: the loss of soft-capped logits
def test_fine_tune_from_hf_then_export_the_run(kind, tmp_path, small_corpus):
    model = hf_model(kind, tmp_path / "hf")
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


def test_older_rope_scaling_forms_load_exactly_or_are_refused_by_name(tmp_path):
    """``"rope_scaling": {"type": "linear", "factor": 4}`` (the form before ``rope_type``) loaded as plain
    RoPE, its logits off by up to 9.3; ``dynamic`` and ``yarn`` were accepted the same way."""
    config = CONFIGS["llama"]()
    config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}
    model = hf_model(config, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    legacy = {k: v for k, v in saved.items() if k not in ("rope_parameters", "rope_scaling")}
    legacy |= {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 500.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(legacy))
    cfg = hf.model_config(hf.read_config(tmp_path / "hf"))
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_theta) == ("linear", 4.0, 500.0)
    *_, shardings = param_layout(Config(model=cfg), make_mesh(ParallelConfig(fsdp=1), jax.devices()[:1]))
    params = hf.import_params(tmp_path / "hf", cfg, shardings)
    np.testing.assert_allclose(fax_logits(cfg, params, TOKENS), hf_logits(model, TOKENS), rtol=1e-4, atol=1e-4)
    for rope in ({"type": "dynamic", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0}):
        with pytest.raises(ValueError, match=f"rope scaling '{rope.get('type', rope.get('rope_type'))}' \\(fax "
                                             "implements default, linear and llama3 RoPE\\)"):
            hf.model_config({**legacy, "rope_scaling": rope})


def test_sliding_windows_are_the_models_or_cut_its_context_where_some_layers_have_one():
    """Mistral's window (every layer's) is the model's attention window, the context whole (it loaded as a
    64-token model without one, its logits off by 11.3 past the window); Gemma 2's every other layer's
    too, the others global; a window other layers have (Qwen's from max_window_layers on) cuts the
    context to it, within which windowed attention is causal attention; a window Qwen does not use
    changes nothing."""
    mistral = hf.model_config(CONFIGS["mistral"]().to_dict())
    assert (mistral.attention_window, mistral.global_every, mistral.max_seq_len) == (8, 0, 64)
    assert hf.hf_config(mistral)["model_type"] == "mistral" and hf.hf_config(mistral)["sliding_window"] == 8
    gemma2 = hf.model_config(CONFIGS["gemma2"]().to_dict())
    assert (gemma2.attention_window, gemma2.global_every, gemma2.max_seq_len) == (8, 2, 64)
    assert hf.hf_config(gemma2)["layer_types"] == ["sliding_attention", "full_attention"]
    qwen = CONFIGS["qwen2"]().to_dict()
    assert hf.model_config({**qwen, "use_sliding_window": False, "sliding_window": 16}).max_seq_len == 64
    partly = {**qwen, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1,
              "layer_types": ["full_attention", "sliding_attention"]}
    assert (hf.model_config(partly).max_seq_len, hf.model_config(partly).attention_window) == (16, 0)
    every = {**partly, "max_window_layers": 0, "layer_types": ["sliding_attention"] * 2}
    assert hf.model_config(every).attention_window == 16
    with pytest.raises(ValueError, match="Gemma has no attention window"):
        hf.model_type(hf.model_config(CONFIGS["gemma"]().to_dict()).replace(attention_window=16))
    with pytest.raises(ValueError, match="Mistral's and Mixtral's window is every layer's"):
        hf.model_type(mistral.replace(global_every=2))


def test_tensors_and_config_keys_the_model_would_not_use_are_refused_by_name(tmp_path):
    """A Qwen2 checkpoint relabelled llama loaded with its q/k/v biases dropped (logits off by 5.9)."""
    hf_model("qwen2", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    cfg = hf.model_config(hf.read_config(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"cannot import it as a llama model: tensors the model has no place for: "
                                         r"model.layers.0.self_attn.k_proj.bias, model.layers.0.self_attn.q_proj.bias"):
        hf.import_params(tmp_path / "hf", cfg, {})
    with pytest.raises(ValueError, match=r"tensors missing: model.layers.0.self_attn.q_norm.weight"):
        hf.import_params(tmp_path / "hf", cfg.replace(qk_norm=True), {})
    with pytest.raises(ValueError, match=r"k_proj.weight is \[16, 32\], the model needs \[32, 32\].*4 more tensors"):
        hf.import_params(tmp_path / "hf", cfg.replace(qkv_bias=True, n_kv_heads=4), {})
    with pytest.raises(ValueError, match="config keys fax does not know: logit_softcapping"):
        hf.model_config({**config, "logit_softcapping": 30.0})
    with pytest.raises(ValueError, match=r"attention_bias=True \(biases on all four attention projections"):
        hf.model_config({**CONFIGS["llama"]().to_dict(), "attention_bias": True})


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Llama checkpoint as people bring one: config.json, model.safetensors and its tokenizer.json;
    and a dataset prepared with that tokenizer."""
    from fax.data import prepare, stdlib_dir
    from fax.data.tokenizers import train_bpe

    root = tmp_path_factory.mktemp("brought")
    texts = [(stdlib_dir() / name).read_text() for name in ("textwrap.py", "string.py")]
    config = CONFIGS["llama3"]()
    config.bos_token_id, config.eos_token_id = None, 0  # the BPE tokenizer's <|endoftext|>
    model = hf_model(config, root / "llama")
    train_bpe(texts, 300, root / "llama" / "tokenizer.json")
    prepare([stdlib_dir() / "textwrap.py", stdlib_dir() / "string.py"], root / "data",
            str(root / "llama" / "tokenizer.json"))
    return root / "llama", root / "data", model


def test_generate_infer_eval_and_plan_take_a_hugging_face_folder_directly(hf_dir, capsys, tmp_path):
    """`fax generate hf:DIR` said "not a fax run directory", `fax plan --model hf:DIR` "unknown model
    preset": a checkpoint could not be used without training it first."""
    from fax.config import apply_overrides
    from fax.data import HFTokenizer, open_split
    from fax.interop.sources import source_config
    from fax.train.evaluate import evaluate_checkpoint

    folder, data, model = hf_dir
    tokenizer = HFTokenizer(folder / "tokenizer.json")
    prompt = "def wrap(text"
    ids = torch.tensor([tokenizer.encode(prompt).tolist()])
    greedy = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=0, pad_token_id=0)[0, ids.shape[1]:]
    assert main(["generate", f"hf:{folder}", "--prompt", prompt, "--max-tokens", "10", "--temperature", "0"]) == 0
    completion = tokenizer.decode([t for t in greedy.tolist() if t != 0])
    assert capsys.readouterr().out == prompt + completion + "\n"
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    assert main(["infer", f"hf:{folder}", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                 "--max-tokens", "10", "--engine", "local"]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["completion"] == completion
    # eval: the checkpoint's loss on batches of a dataset prepared with its tokenizer, as transformers computes it
    overrides = [f"data.path={data}", "train.batch_size=8", "train.seq_len=16", "train.eval_batches=1"]
    step, loss = evaluate_checkpoint(f"hf:{folder}", overrides, split="train")
    config = apply_overrides(source_config(f"hf:{folder}"), overrides)
    path, split, _ = open_split(str(data), "train", 16, 320)
    tokens = split.sampler(path, config).batch(0).tokens
    logits = torch.tensor(hf_logits(model, tokens[:, :-1]))
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 320), torch.tensor(tokens[:, 1:]).long().reshape(-1))
    assert step == 0 and loss == pytest.approx(float(want), rel=1e-4)
    assert not Path(f"hf:{folder}").exists()  # it made a folder of that name (relative) for checkpoints
    # A dataset of another tokenizer is refused before anything compiles (it trained on byte ids silently).
    with pytest.raises(ConfigError, match="was prepared with fax's byte tokenizer, not the tokenizer of .* Prepare "
                                          "the data with the checkpoint's tokenizer"):
        evaluate_checkpoint(f"hf:{folder}", ["train.batch_size=8", "train.seq_len=16"])
    with pytest.raises(ConfigError, match="was prepared with fax's byte tokenizer"):
        Trainer(load_config(overrides=[f"init_from=hf:{folder}", "train.steps=1"]), echo=lambda _: None)
    assert main(["plan", "--model", f"hf:{folder}", "--cluster", "h100-8"]) == 0
    assert f"hf:{folder} on h100-8" in capsys.readouterr().out


def test_export_in_bfloat16_shards_with_the_tokenizers_ids(hf_dir, tmp_path):
    """Exports were one float32 file (a bfloat16 input of 1.6 MB came out as 2.4 MB) without bos/eos
    ids or a generation_config.json."""
    folder, data, _ = hf_dir
    run_dir = tmp_path / "run"
    Trainer(load_config(overrides=[f"init_from=hf:{folder}", f"data.path={data}", f"run_dir={run_dir}",
                                   "train.steps=2", "train.batch_size=8", "train.seq_len=16", "train.sample_tokens=0"]),
            echo=lambda _: None).fit()
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--out", str(out), "--dtype", "bfloat16", "--max-shard-gib", "0.00003"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert sum(p.stat().st_size for p in out.glob("model-*.safetensors")) < index["metadata"]["total_size"] * 1.1
    config = json.loads((out / "config.json").read_text())
    assert (config["torch_dtype"], config["eos_token_id"], config["model_type"]) == ("bfloat16", 0, "llama")
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 0}
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    from fax.config import run_config
    from fax.params import run_params

    cfg = run_config(run_dir)
    params, _ = run_params(run_dir, cfg, make_mesh(ParallelConfig(fsdp=1), jax.devices()[:1]))
    np.testing.assert_allclose(hf_logits(exported, TOKENS), fax_logits(cfg.model, params, TOKENS), atol=0.1)


def test_lora_adapters_export_in_peft_layout_that_peft_loads_onto_the_base(hf_dir, tmp_path):
    """`--adapters-only` wrote fax's own names, which PEFT and serving engines cannot load. Now PEFT
    puts them on the transformers base model and its logits are fax's merged model's."""
    peft = pytest.importorskip("peft")
    from fax.config import run_config
    from fax.params import run_params

    folder, data, _ = hf_dir
    run_dir = tmp_path / "run"
    Trainer(load_config(overrides=[f"init_from=hf:{folder}", f"data.path={data}", f"run_dir={run_dir}",
                                   "train.steps=3", "train.batch_size=8", "train.seq_len=16", "train.sample_tokens=0",
                                   "optim.lr=0.05", "optim.warmup_steps=0", "lora.rank=4", "lora.alpha=8",
                                   "lora.targets=[attn.wq, attn.wk, attn.wv, attn.wo, mlp.wg, mlp.wi, mlp.wo]"]),
            echo=lambda _: None).fit()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapters"), "--adapters-only"]) == 0
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder) and config["r"] == 4
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapters").eval()
    cfg = run_config(run_dir)
    merged, _ = run_params(run_dir, cfg, make_mesh(ParallelConfig(fsdp=1), jax.devices()[:1]))
    want = fax_logits(cfg.model, merged, TOKENS)
    np.testing.assert_allclose(hf_logits(adapted, TOKENS), want, rtol=1e-4, atol=1e-4)
    with adapted.disable_adapter():  # the base alone (PEFT put the adapters into it in place)
        assert not np.allclose(hf_logits(adapted, TOKENS), want, atol=1e-3)  # the adapters changed the model
