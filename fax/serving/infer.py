"""``fax infer``: generate a completion for every prompt (or a reply to every conversation) of a
file, with Ray Data over a pool of serving engines (one per worker process), resumable.

Prompts are cut into chunks; each chunk's results land in its own part file (written atomically),
so a re-run computes only the chunks without one. Every row's sampling seed is ``seed + row``, so a
result does not depend on which worker ran it, or when. The output (JSONL or Parquet, one row per
input row, in input order) is assembled from the parts at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fax.interop.sources import absolute_source, source_config
from fax.data import read_records, write_atomic
from fax.data.chat import TemplateError, layout, message_problems
from fax.serving.batching import generate
from fax.serving.engine import Engine
from fax.serving.sampling import SamplingParams, request_problems
from fax.serving.text import TextStream, generation_ends, run_tokenizer

CHUNK_ROWS = 64


@dataclass(frozen=True)
class InferSettings:
    field: str = "prompt"  # the prompt's field (JSONL) or column (Parquet)
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    max_batch: int = 16  # prompts decoded together by one engine
    messages_field: str = ""  # instead of a prompt, a conversation (``fax.data.chat``) to reply to
    frequency_penalty: float = 0.0  # as SamplingParams
    presence_penalty: float = 0.0

    def sampling(self, row: int, stop: tuple[str, ...]) -> SamplingParams:
        """Row ``row``'s SamplingParams (its own seed)."""
        return SamplingParams(self.max_tokens, self.temperature, self.top_k, self.top_p, self.seed + row, stop,
                              self.frequency_penalty, self.presence_penalty)


def read_column(path: str | Path, field: str, option: str = "--field") -> list[Any]:
    """The values of ``field`` of every JSONL record / Parquet row, in order."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: expected a .jsonl or .parquet file of prompts")
    return [row[field] for _, row in read_records(path, {field: option})]


def read_prompts(path: str | Path, settings: InferSettings) -> list[Any]:
    """Each row's prompt (text; a row that holds something else is refused in its place), or its
    conversation with ``messages_field``."""
    if settings.messages_field:
        return read_column(path, settings.messages_field, "--messages-field")
    return read_column(path, settings.field)


def _text_problems(prompt: Any, field: str) -> list[str]:
    return [] if isinstance(prompt, str) else [f"{field} must be text, got {json.dumps(prompt)[:40]}"]


class ChunkWorker:
    """One serving engine; completes chunks of prompts and writes each chunk's part file."""

    def __init__(self, run_dir: str, parts: str, settings: dict[str, Any]):
        self.settings = InferSettings(**{**settings, "stop": tuple(settings["stop"])})
        self.tokenizer = run_tokenizer(source_config(run_dir))
        self.layout = layout(self.tokenizer)  # of conversations (--messages-field)
        self.engine = Engine.from_run_dir(run_dir, max_batch=self.settings.max_batch,
                                          end_ids=generation_ends(self.tokenizer, self.layout))
        self.parts = Path(parts)

    def complete(self, start: int, prompts: list[Any]) -> list[dict[str, Any]]:
        """Rows of ``row``, the prompt as ``prompt`` (a conversation as ``messages``; None where it is
        not text, or not a conversation), ``completion``, ``tokens`` and ``error``."""
        s = self.settings
        chat = bool(s.messages_field)
        name = "messages" if chat else "prompt"
        stop = self.layout.reply_stops(s.stop) if chat else s.stop
        rows = [{"row": start + i, name: p} for i, p in enumerate(prompts)]
        todo = []
        for row in rows:
            problems = message_problems(row[name]) if chat else _text_problems(row[name], s.field)
            ids: list[int] = []
            if problems:
                row[name] = None  # a column of text, or of conversations, only
            elif chat:
                try:
                    ids = self.layout.prompt_ids(self.tokenizer.encode, row[name])
                except TemplateError as e:  # the chat template's own demands (alternating roles...)
                    problems = [str(e)]
            else:
                ids = [int(t) for t in self.tokenizer.encode(row[name])]
            sampling = s.sampling(row["row"], stop)
            problems = problems or request_problems(self.engine.cfg, ids, sampling, prompt_name=name)
            if problems:  # one bad row is reported in its place; the job goes on
                row.update(completion=None, error="; ".join(problems))
            else:
                todo.append((row, ids, sampling))
        for k in range(0, len(todo), self.engine.max_batch):
            group = todo[k:k + self.engine.max_batch]
            for (row, _, sampling), tokens in zip(group, generate(self.engine, [g[1] for g in group],
                                                                  [g[2] for g in group])):
                text = TextStream(self.tokenizer, sampling.stop)
                row.update(completion="".join(text.push(t) for t in tokens) + text.flush(), tokens=len(tokens),
                           error=None)
        return rows

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        for start, prompts in zip(batch["start"], batch["prompts"]):
            rows = self.complete(int(start), json.loads(prompts))
            write_atomic(self.parts / f"{int(start):010d}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        return {"start": list(batch["start"])}


def infer(run_dir: str | Path, input_path: str | Path, output: str | Path, settings: InferSettings = InferSettings(),
          workers: int = 1, engine: str = "ray", chunk_rows: int = CHUNK_ROWS, progress: bool = False) -> dict:
    """Complete every prompt of ``input_path`` into ``output``; returns counts. Parts live beside the
    output (``OUTPUT.parts/``) and make a re-run resume; parts of a different job are refused."""
    problems = settings.sampling(0, settings.stop).problems()  # the whole job's: before any engine starts
    if problems:
        raise ValueError("; ".join(problems))
    prompts = read_prompts(input_path, settings)
    output = Path(output)
    if output.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"output {output}: use a .jsonl or .parquet file name")
    parts = output.with_name(output.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    job = {"run_dir": absolute_source(run_dir), "input": str(Path(input_path).absolute()),
           "rows": len(prompts), "chunk_rows": chunk_rows, "settings": asdict(settings)}
    job_file = parts / "job.json"
    if job_file.exists() and json.loads(job_file.read_text()) != json.loads(json.dumps(job)):
        raise ValueError(f"{parts} holds parts of a different job (other run, input or settings); "
                         "delete it or choose another output")
    write_atomic(job_file, json.dumps(job, indent=2).encode())
    starts = range(0, len(prompts), chunk_rows)
    todo = [s for s in starts if not (parts / f"{s:010d}.jsonl").exists()]
    args = (absolute_source(run_dir), str(parts), asdict(replace(settings, stop=list(settings.stop))))
    bar = tqdm(total=len(starts), initial=len(starts) - len(todo), desc="infer", unit="chunk", disable=not progress)
    items = [{"start": s, "prompts": json.dumps(prompts[s:s + chunk_rows])} for s in todo]
    if engine == "local" and items:
        worker = ChunkWorker(*args)
        for item in items:
            worker({k: [v] for k, v in item.items()})
            bar.update(1)
    elif engine == "ray" and items:
        _run_on_ray(items, args, workers, bar)
    elif engine not in ("local", "ray"):
        raise ValueError(f"engine {engine!r}: use ray or local")
    bar.close()
    rows = [json.loads(line) for s in starts for line in (parts / f"{s:010d}.jsonl").read_text().splitlines()]
    _write_output(rows, output)
    return {"rows": len(rows), "errors": sum(r["error"] is not None for r in rows), "chunks_run": len(todo)}


def _run_on_ray(items: list[dict], args: tuple, workers: int, bar: Any) -> None:
    from fax.cluster.data import map_on_actors  # Ray, imported only where it is used

    map_on_actors(items, ChunkWorker, args, lambda _: bar.update(1), actors=workers, batch_size=1, num_cpus=1)


def _write_output(rows: list[dict], output: Path) -> None:
    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    if output.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, output)
