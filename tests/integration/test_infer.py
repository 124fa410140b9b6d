"""`fax infer`: every prompt completed, in order, on a Ray Data pool of engines; resumable."""

import json

import jax
import pytest

from fax.cli import main
from fax.config import load_config, run_config
from fax.serving.infer import InferSettings, infer
from fax.serving.batching import generate
from fax.serving.engine import Engine
from fax.serving.sampling import SamplingParams
from fax.serving.text import run_tokenizer
from fax.train.loop import Trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_corpus):
    path = tmp_path_factory.mktemp("infer")
    with Trainer(load_config(overrides=["model=gpt-tiny", f"run_dir={path}", f"data.path={small_corpus}",
                                        "train.steps=10", "train.batch_size=8", "train.seq_len=64",
                                        "train.sample_tokens=0"]), echo=lambda _: None) as trainer:
        trainer.fit()
    return path


def test_infer_writes_one_row_per_prompt_in_order_and_resumes(tmp_path, run_dir):
    prompts = [f"def f{i}(x):" if i % 7 else "" for i in range(300)]
    prompts[5] = "x" * 500  # longer than the context: an error in its row, the job goes on
    prompts[8:10] = [None, 42]  # not text: errors in their rows, never completed as "None" or "42"
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    settings = InferSettings(max_tokens=6, max_batch=16)
    done = infer(run_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", settings, workers=2, chunk_rows=64)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert done == {"rows": 300, "errors": 46, "chunks_run": 5}  # 43 empty prompts, the long one, the two not text
    assert [r["row"] for r in rows] == list(range(300))
    assert [r["prompt"] for r in rows] == [p if isinstance(p, str) else None for p in prompts]
    assert "longer than" in rows[5]["error"] or "context" in rows[5]["error"]
    assert rows[8]["error"] == "prompt must be text, got null" and rows[9]["error"] == "prompt must be text, got 42"
    text = [isinstance(p, str) and p and i != 5 for i, p in enumerate(prompts)]
    assert all(r["error"] is None and r["tokens"] >= 1 for r, ok in zip(rows, text) if ok)
    # Greedy rows equal the engine run alone.
    engine = Engine.from_run_dir(run_dir, devices=jax.devices()[:1], max_batch=1)
    tok = run_tokenizer(run_config(run_dir))
    for i in (1, 150, 299):
        ids = generate(engine, [[int(t) for t in tok.encode(prompts[i])]], [SamplingParams(6, 0.0, seed=i)])[0]
        assert rows[i]["tokens"] == len(ids)
        assert rows[i]["completion"] == tok.decode(ids)
    # Resume: two lost parts are the only chunks computed again, and the output is the same.
    parts = tmp_path / "out.jsonl.parts"
    (parts / "0000000064.jsonl").unlink()
    (parts / "0000000256.jsonl").unlink()
    kept = (parts / "0000000128.jsonl").stat().st_mtime_ns
    again = infer(run_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", settings, engine="local", chunk_rows=64)
    assert again["chunks_run"] == 2 and (parts / "0000000128.jsonl").stat().st_mtime_ns == kept
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == rows
    with pytest.raises(ValueError, match="parts of a different job"):
        infer(run_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", InferSettings(max_tokens=7), engine="local")


def test_infer_command_writes_parquet(tmp_path, run_dir, capsys):
    import pyarrow.parquet as pq

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"import os{i}"}) + "\n" for i in range(20)))
    assert main(["infer", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.parquet"),
                 "--field", "text", "--max-tokens", "4", "--engine", "local"]) == 0
    table = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [r["row"] for r in table] == list(range(20)) and all(r["completion"] is not None for r in table)
    assert main(["infer", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.csv"),
                 "--field", "text"]) == 2
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": oops}\n')
    assert main(["infer", str(run_dir), "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "b.jsonl"),
                 "--field", "text"]) == 2
    assert f"{tmp_path / 'bad.jsonl'}:2: not valid JSON (Expecting value, column 10)" in capsys.readouterr().err
    # the repetition penalties: each row as the engine continues it under them; a bad one stops the job at once
    assert main(["infer", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "p.jsonl"),
                 "--field", "text", "--max-tokens", "8", "--frequency-penalty", "1.5", "--engine", "local"]) == 0
    penalized = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    engine = Engine.from_run_dir(run_dir, devices=jax.devices()[:1], max_batch=1)
    tok = run_tokenizer(run_config(run_dir))
    changed = []
    for row in (penalized[0], penalized[13]):
        prompt = [int(t) for t in tok.encode(f"import os{row['row']}")]
        plain, under = (tok.decode(generate(engine, [prompt], [SamplingParams(8, 0.0, frequency_penalty=p)])[0])
                        for p in (0.0, 1.5))
        assert row["completion"] == under
        changed.append(under != plain)
    assert any(changed)
    assert main(["infer", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "q.jsonl"),
                 "--field", "text", "--presence-penalty", "-3"]) == 2
    assert not (tmp_path / "q.jsonl.parts").exists()


def test_infer_replies_to_conversations_laid_out_as_in_chat_tuning(tmp_path, run_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    talks = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"def f{i}"}] for i in range(6)]
    talks[2] = [{"role": "bot", "content": "hi"}]  # not a conversation: an error in its row
    talks[3] = [{"role": "user", "content": "x" * 100}]  # with max_tokens, longer than the context
    pq.write_table(pa.Table.from_pylist([{"talk": t} for t in talks]), tmp_path / "in.parquet")
    out = tmp_path / "out.jsonl"
    assert main(["infer", str(run_dir), "--input", str(tmp_path / "in.parquet"), "--output", str(out),
                 "--messages-field", "talk", "--max-tokens", "8", "--engine", "local"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(6)) and "prompt" not in rows[0]
    assert rows[2]["messages"] is None and "messages[0].role must be one of" in rows[2]["error"]
    assert "messages (131 tokens) + max_tokens (8) exceeds the model's context" in rows[3]["error"]
    # A reply is the greedy continuation of the conversation's text in the chat layout.
    engine = Engine.from_run_dir(run_dir, devices=jax.devices()[:1], max_batch=1)
    tok = run_tokenizer(run_config(run_dir))
    for i in (0, 5):
        layout = f"<|system|>\nBe brief.<|end|>\n<|user|>\ndef f{i}<|end|>\n<|assistant|>\n"
        ids = generate(engine, [[int(t) for t in tok.encode(layout)]], [SamplingParams(8, 0.0, seed=i)])[0]
        assert rows[i]["messages"] == talks[i] and rows[i]["error"] is None
        assert rows[i]["completion"] == tok.decode(ids).split("<|end|>")[0] and rows[i]["tokens"] == len(ids)
    assert main(["infer", str(run_dir), "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "o.jsonl"),
                 "--messages-field", "chat", "--engine", "local"]) == 2  # no such column
