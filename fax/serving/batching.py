"""Continuous batching over an engine's cache rows: the ``Batcher``, generation to completion
(``stream``, ``generate``), and the ``Scheduler`` that runs a batcher on a thread of its own."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from fax.serving.engine import bucket
from fax.data import Tokenizer
from fax.serving.sampling import GREEDY_PAD, SamplingParams, request_problems
from fax.serving.text import TextStream

Event = tuple[Any, int | None, bool]  # (request key, its new token or None at end-of-text, finished)


@dataclass
class _Row:
    """A request occupying one cache row."""

    key: Any
    sampling: SamplingParams
    position: int  # where the next token fed to the model goes
    token: int = 0  # the last sampled token: fed at the next decode
    emitted: int = 0


class Batcher:
    """Continuous batching over an engine's cache rows: requests join free rows between decode
    steps and leave as soon as they finish, so a long generation never holds back a short one.
    Decode runs over the smallest batch bucket that covers the occupied rows. One batcher drives
    an engine at a time; the engine may be a proxy for the processes of a multi-host engine."""

    def __init__(self, engine: Any, rows: int | None = None):
        self.engine = engine
        self.rows: list[_Row | None] = [None] * (rows or engine.max_batch)
        engine.reset()

    def clear(self) -> None:
        """Drop every request and start from an empty cache."""
        self.rows = [None] * len(self.rows)
        self.engine.reset()

    @property
    def free(self) -> int:
        return self.rows.count(None)

    @property
    def active(self) -> int:
        return len(self.rows) - self.free

    def admit(self, requests: Sequence[tuple[Any, tuple[Sequence[int], SamplingParams]]]) -> list[Event]:
        """Prefill requests (key, (prompt, sampling)) into free rows (at most ``free`` of them)."""
        if not requests:
            return []
        if len(requests) > self.free:
            raise ValueError(f"{len(requests)} requests but only {self.free} free cache rows")
        rows = [i for i, r in enumerate(self.rows) if r is None][:len(requests)]
        for i, (key, (prompt, sampling)) in zip(rows, requests):
            self.rows[i] = _Row(key, sampling, len(prompt))
        first = self.engine.prefill(rows, [p for _, (p, _) in requests], [s for _, (_, s) in requests])
        return [self._emit(i, int(t)) for i, t in zip(rows, first)]

    def step(self) -> list[Event]:
        """One decode call (several tokens) for every occupied row."""
        occupied = [i for i, r in enumerate(self.rows) if r is not None]
        if not occupied:
            return []
        rows = self.rows[:bucket(self.engine.batch_buckets, occupied[-1] + 1)]
        tokens, positions, emitted = (np.array([getattr(r, name) if r else 0 for r in rows])
                                      for name in ("token", "position", "emitted"))
        tokens = self.engine.decode(tokens, positions, emitted, [r.sampling if r else GREEDY_PAD for r in rows])
        events = []
        for i in occupied:
            for token in tokens[i]:  # the tokens after its end (length or end-of-text) are dropped
                self.rows[i].position += 1
                events.append(self._emit(i, int(token)))
                if self.rows[i] is None:
                    break
        return events

    def cancel(self, key: Any) -> None:
        """Free the row of a request nobody waits for any more."""
        self.rows = [None if r is not None and r.key == key else r for r in self.rows]

    def _emit(self, i: int, token: int) -> Event:
        row = self.rows[i]
        eos = token in self.engine.end_ids
        if not eos:
            row.token, row.emitted = token, row.emitted + 1
        finished = eos or row.emitted >= row.sampling.max_new_tokens
        if finished:
            self.rows[i] = None
        return row.key, None if eos else token, finished


def stream(engine: Any, prompts: Sequence[Sequence[int]],
           sampling: Sequence[SamplingParams]) -> Iterator[list[int | None]]:
    """Yield, step by step, each prompt's next token (None once it is done: it reached its
    max_new_tokens or produced the end-of-text token). Prompts may have different lengths;
    ``engine`` is an ``Engine`` or a multi-host one."""
    problems = [f"request {i}: {p}" for i, (ids, s) in enumerate(zip(prompts, sampling))
                for p in request_problems(engine.cfg, ids, s)]
    if problems:
        raise ValueError("; ".join(problems))
    if len(prompts) > engine.max_batch:
        raise ValueError(f"{len(prompts)} prompts exceed the engine's max_batch={engine.max_batch}")
    batcher = Batcher(engine, bucket(engine.batch_buckets, len(prompts)))
    events = batcher.admit(list(enumerate(zip(prompts, sampling))))
    while events:
        per_row: list[list[int | None]] = [[] for _ in prompts]
        for row, token, _ in events:  # a decode call gives each row several tokens
            per_row[row].append(token)
        for i in range(max(map(len, per_row))):
            yield [tokens[i] if i < len(tokens) else None for tokens in per_row]
        events = batcher.step()


def generate(engine: Any, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams]) -> list[list[int]]:
    """Each prompt's continuation (see ``stream``)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream(engine, prompts, sampling):
        for row, token in zip(out, step):
            if token is not None:
                row.append(token)
    return out


def complete(engine: Any, tokenizer: Tokenizer, prompt: str, max_tokens: int, temperature: float = 0.8,
             seed: int = 0) -> str:
    """``prompt`` continued by at most ``max_tokens`` tokens of ``engine`` (an ``Engine`` or a
    multi-host one), as text. The model reads the prompt's tail that leaves room for them, at least
    half its context, and generates what the context then holds (``fax train``'s default sample asks
    for more tokens than a small model's context)."""
    context = engine.cfg.max_seq_len
    ids = [int(t) for t in tokenizer.encode(prompt)][-max(context - max_tokens, context // 2):]
    new = min(max_tokens, context - len(ids))
    tokens = generate(engine, [ids], [SamplingParams(max_new_tokens=new, temperature=temperature, seed=seed)])
    stream = TextStream(tokenizer)
    return prompt + "".join(stream.push(t) for t in tokens[0]) + stream.flush()


class Busy(RuntimeError):
    """More requests than ``max_pending`` are running or waiting."""


Sink = Callable[[tuple[int | None, bool] | BaseException], None]  # receives (token, finished) or the failure


class Scheduler:
    """A ``Batcher`` on a thread of its own. Callers on any thread submit requests and receive
    each token through a callback as it is produced; queued requests join the running batch as
    soon as rows free up. An engine failure fails the requests it touched, not the scheduler."""

    def __init__(self, engine: Any, max_pending: int):
        self.engine, self.max_pending = engine, max_pending
        self.batcher = Batcher(engine)
        self._queue: deque[tuple[object, tuple[list[int], SamplingParams]]] = deque()
        self._sinks: dict[object, Sink] = {}
        self._cancelled: set[object] = set()
        self._scores: deque[tuple[list[int], Future]] = deque()
        self._scoring = 0  # scores asked for and not yet done
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fax-scheduler", daemon=True)
        self._thread.start()

    def _check_room(self) -> None:
        """Busy once max_pending requests are running, queued or being scored (under the lock)."""
        pending = len(self._sinks) + self._scoring
        if pending >= self.max_pending:
            raise Busy(f"{pending} requests are running, queued or being scored (the limit, max_concurrent="
                       f"{self.max_pending}); retry later")

    def submit(self, prompt: list[int], sampling: SamplingParams, sink: Sink) -> object:
        with self._wake:
            self._check_room()
            key = object()
            self._sinks[key] = sink
            self._queue.append((key, (prompt, sampling)))
            self._wake.notify()
        return key

    def score(self, tokens: list[int], request: bool = False) -> Future:
        """The engine's ``score`` of ``tokens``, run between decode calls (every engine call is made
        from this thread: a multi-host engine's processes must all make the same calls in order).
        A ``request`` of its own is refused (Busy) like a generation when the scheduler is full; the
        scoring of a finished generation is not (that request had its place)."""
        future: Future = Future()
        with self._wake:
            if request:
                self._check_room()
            self._scoring += 1
            self._scores.append((tokens, future))
            self._wake.notify()
        return future

    def cancel(self, key: object) -> None:
        """Stop a request nobody waits for any more (a no-op once it has finished)."""
        with self._wake:
            if self._sinks.pop(key, None) is not None:
                self._cancelled.add(key)
                self._wake.notify()

    def load(self) -> dict[str, int]:
        with self._wake:
            return {"running": len(self._sinks) - len(self._queue), "queued": len(self._queue),
                    "scoring": self._scoring}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closed or self._queue or self._cancelled or self._scores
                                    or self.batcher.active)
                if self._closed:
                    for _, future in self._scores:
                        future.cancel()
                    return
                scores, self._scores = self._scores, deque()
                for key in self._cancelled:
                    self.batcher.cancel(key)
                self._queue = deque(item for item in self._queue if item[0] not in self._cancelled)
                self._cancelled.clear()
                joining = [self._queue.popleft() for _ in range(min(len(self._queue), self.batcher.free))]
            for tokens, future in scores:
                try:
                    future.set_result(self.engine.score(tokens))
                except Exception as error:  # noqa: BLE001 - this request's failure, not the server's
                    future.set_exception(error)
            with self._wake:
                self._scoring -= len(scores)
            try:
                events = self.batcher.admit(joining)
            except Exception as error:  # noqa: BLE001 - the joining requests' failure: the running ones go on
                for key, _ in joining:
                    self.batcher.cancel(key)
                self._fail([key for key, _ in joining], error, clear=False)
                events = []
            try:
                events += self.batcher.step()
            except Exception as error:  # noqa: BLE001 - the engine's state is in doubt: every request fails
                self._fail([r.key for r in self.batcher.rows if r], error)
                continue
            with self._wake:
                for key, token, finished in events:
                    sink = self._sinks.pop(key, None) if finished else self._sinks.get(key)
                    if sink is not None:
                        sink((token, finished))

    def _fail(self, keys: list[object], error: Exception, clear: bool = True) -> None:
        """Fail the requests ``keys``; ``clear``: and start again from an empty cache."""
        with self._wake:
            for key in keys:
                sink = self._sinks.pop(key, None)
                if sink is not None:
                    sink(error)
        if not clear:
            return
        try:
            self.batcher.clear()
        except Exception:  # noqa: BLE001 - the engine is unusable: the next requests fail with its error
            pass


