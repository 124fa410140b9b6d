"""`fax serve`: an OpenAI-compatible completions and chat API on Ray Serve over a continuously batched engine.

The ingress replica holds a ``Scheduler``: requests from the HTTP event loop are queued, join the
running batch as rows free up, and get their tokens back through the loop as they are produced
(plain JSON or server-sent events). The engine is in the replica (one host) or on the host workers
of a Ray cluster (``hosts > 1``: one global mesh, the same actors as training).
"""

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
import ray
from ray import serve

from fax.cluster.hosts import HostGroup, actor_options, connect, host_layout
from fax.config import ClusterConfig, ConfigError, ServeConfig
from fax.interop.sources import absolute_source, source_config
from fax.data.chat import layout as chat_layout
from fax.serving.batching import Busy, Scheduler
from fax.serving.cluster_engine import ClusterEngine
from fax.serving.engine import Engine
from fax.serving.requests import Completion, RequestError, lone_surrogate, parse_chat, parse_completion, usage
from fax.serving.text import TextStream, generation_ends, run_tokenizer


def serving_hosts(cluster: ClusterConfig) -> int:
    return cluster.hosts or cluster.emulate_hosts or 1


def _engine(run_dir: str, settings: ServeConfig, cluster: ClusterConfig, end_ids: Sequence[int]) -> Any:
    """The engine in this process (ending generations at ``end_ids``), or spread over host workers
    when it needs more than one host (each reads the run's tokenizer itself); warmed up if asked."""
    if serving_hosts(cluster) > 1:
        config = dataclasses.replace(source_config(run_dir), cluster=cluster)
        engine = ClusterEngine(HostGroup(config), run_dir, None, settings.max_batch)
    else:
        engine = Engine.from_run_dir(run_dir, max_batch=settings.max_batch, end_ids=end_ids)
    if settings.warm_up:
        engine.warm_up()
    return engine


class EventStream(StreamingResponse):
    """Server-sent events whose client may hang up mid-stream: a normal end of the request. (Ray
    Serve's replica raises TaskCancelledError from ``receive`` where an ASGI server would send
    ``http.disconnect``; Starlette would log it as a failure with a traceback.)"""

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream")

    async def listen_for_disconnect(self, receive: Any) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except ray.exceptions.TaskCancelledError:
            pass


api = FastAPI(title="fax", docs_url=None, redoc_url=None, openapi_url=None)  # no pages beyond the API's


@api.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """An unknown path or method, in the API's one error shape."""
    return RequestError(str(error.detail), status=error.status_code).response()


@api.exception_handler(Exception)
async def _server_error(request: Request, error: Exception) -> JSONResponse:
    return RequestError(f"internal error ({type(error).__name__})", status=500, kind="server_error").response()


@serve.deployment
@serve.ingress(api)
class CompletionServer:
    """The HTTP ingress: parses requests, queues them on the scheduler, streams the text back."""

    def __init__(self, run_dir: str, settings: ServeConfig, cluster: ClusterConfig, cpu_devices: int):
        jax.config.update("jax_num_cpu_devices", cpu_devices)  # before the CPU backend starts
        self.settings = settings
        self.model_name = settings.model_name or Path(run_dir).name
        config = source_config(run_dir)
        self.model = config.model
        self.tokenizer = run_tokenizer(config)
        self.chat_layout = chat_layout(self.tokenizer)
        self.engine = _engine(run_dir, settings, cluster, generation_ends(self.tokenizer, self.chat_layout))
        self.scheduler = Scheduler(self.engine, settings.max_concurrent)
        self.created = int(time.time())

    def __del__(self) -> None:
        if hasattr(self, "scheduler"):  # not when __init__ failed
            self.scheduler.close()

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "checkpoint_step": self.engine.step,
                **self.scheduler.load()}

    @api.get("/v1/models")
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                             "owned_by": "fax", "max_model_len": self.model.max_seq_len}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._answer(request, lambda body: parse_completion(
            body, self._encode, self.settings, self.model, self.model_name), chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._answer(request, lambda body: parse_chat(
            body, self._encode, self.settings, self.model, self.model_name, self.chat_layout), chat=True)

    async def _body_of(self, request: Request) -> Any:
        """The request's JSON, read within serve.read_timeout_s and up to serve.max_request_bytes."""
        limit, timeout = self.settings.max_request_bytes, self.settings.read_timeout_s
        too_large = RequestError(f"the request body is larger than this server's limit of {limit} bytes "
                                 "(serve.max_request_bytes)", status=413)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise too_large

        try:
            await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            raise RequestError(f"the request body did not arrive within {timeout:g} s (serve.read_timeout_s)",
                               status=408) from None
        try:
            parsed = json.loads(body)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise RequestError(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise RequestError("the request body nests JSON too deeply") from None
        field = lone_surrogate(parsed)
        if field is not None:
            raise RequestError(f"{field} holds a lone UTF-16 surrogate (e.g. \"\\ud800\"), which is not text; "
                               "send valid Unicode", field)
        return parsed

    async def _answer(self, request: Request, parse: Callable[[Any], Completion], chat: bool) -> Any:
        try:
            body = await self._body_of(request)
            completion = await asyncio.to_thread(parse, body)  # tokenizing a long prompt: off the event loop
            decoded = TextStream(self.tokenizer, completion.sampling.stop)
            pieces = self._pieces(completion, decoded) if completion.generate else None
            scoring = None
            if pieces is not None:
                await anext(pieces)  # queued, or refused before any response is sent
            elif completion.logprobs is not None:  # the prompt scored alone: a request of its own
                scoring = self.scheduler.score(completion.prompt, request=True)
        except RequestError as e:
            return e.response()
        except Busy as e:
            return RequestError(str(e), status=429, kind="server_busy").response()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if completion.stream:
            return EventStream(self._events(rid, pieces, chat, len(completion.prompt) if completion.usage_chunk
                                            else None))
        text, reason, used = "", "length", 0
        try:
            if pieces is not None:
                async with contextlib.aclosing(pieces):
                    async for delta, reason, used in pieces:
                        text += delta
            logprobs = None
            if completion.logprobs is not None:
                scoring = scoring or self.scheduler.score(completion.prompt + decoded.ids)
                scores = await asyncio.wrap_future(scoring)
                logprobs = (self._chat_logprobs if chat else self._logprobs)(completion, decoded.ids, *scores)
        except Exception as e:  # noqa: BLE001 - the engine failed this request; the server goes on
            return RequestError(f"generation failed: {e}", status=500, kind="server_error").response()
        if completion.echo:
            text = self.tokenizer.decode(completion.prompt) + text
        return self._body(rid, text, reason, chat, logprobs=logprobs) | {"usage": usage(len(completion.prompt), used)}

    def _logprobs(self, completion: Completion, generated: list[int], chosen: np.ndarray, top_ids: np.ndarray,
                  top_logp: np.ndarray) -> dict[str, Any]:
        """OpenAI's logprobs object: for the echoed prompt's tokens (the first has none) and every
        generated token (up to the one that completed a stop sequence), the model's own
        log-probability (before temperature and filters) and the ``completion.logprobs`` most
        likely tokens with it (``Engine.score`` of prompt + generated gives them). A token's offset
        counts the decoded text of the tokens before it."""
        prompt, n = completion.prompt, completion.logprobs
        sequence = prompt + generated
        decode = lambda token: self.tokenizer.decode([int(token)])  # noqa: E731

        def offsets(texts: list[str], start: int) -> list[int]:
            return list(itertools.accumulate((len(t) for t in texts[:-1]), initial=start))[:len(texts)]

        shown = [decode(t) for t in prompt] if completion.echo else []
        made = [decode(t) for t in generated]
        start = len(self.tokenizer.decode(prompt)) if completion.echo else 0  # where the completion's text starts
        first = len(prompt) - len(shown)

        def top(i: int) -> dict[str, float] | None:
            if i == 0:
                return None
            likely = {decode(t): float(lp) for t, lp in zip(top_ids[i - 1][:n], top_logp[i - 1][:n])}
            return likely | {texts[i - first]: float(chosen[i - 1])}

        positions, texts = range(first, len(sequence)), shown + made
        return {"tokens": texts,
                "token_logprobs": [None if i == 0 else float(chosen[i - 1]) for i in positions],
                "top_logprobs": [top(i) for i in positions], "text_offset": offsets(shown, 0) + offsets(made, start)}

    def _chat_logprobs(self, completion: Completion, generated: list[int], chosen: np.ndarray, top_ids: np.ndarray,
                       top_logp: np.ndarray) -> dict[str, Any]:
        """The chat form of logprobs: for every generated token (as for a completion), its text,
        its UTF-8 bytes (None where the token holds part of a character) and log-probability, and
        the ``completion.logprobs`` most likely tokens in order."""
        def entry(token: int, logp: float) -> dict[str, Any]:
            text = self.tokenizer.decode([int(token)])
            return {"token": text, "logprob": float(logp), "bytes": None if "\ufffd" in text else list(text.encode())}

        at = len(completion.prompt) - 1  # scores[i] are for token i + 1 of prompt + generated
        return {"content": [entry(token, chosen[at + k]) | {"top_logprobs": [
            entry(t, lp) for t, lp in zip(top_ids[at + k][:completion.logprobs], top_logp[at + k][:completion.logprobs])]}
            for k, token in enumerate(generated)]}

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def _body(self, rid: str, text: str, reason: str | None, chat: bool, streamed: bool = False,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """A completion (``text_completion``) or a chat reply (``chat.completion``; a streamed piece of
        one is a ``chat.completion.chunk`` with the text in its ``delta``)."""
        if chat:
            kind, choice = ("chat.completion.chunk", {"delta": {"content": text}}) if streamed else (
                "chat.completion", {"message": {"role": "assistant", "content": text}, "logprobs": logprobs})
        else:
            kind, choice = "text_completion", {"text": text, "logprobs": logprobs}
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.model_name,
                "choices": [{"index": 0, **choice, "finish_reason": reason}]}

    async def _events(self, rid: str, pieces: AsyncIterator[tuple[str, str | None, int]], chat: bool,
                      prompt_tokens: int | None) -> AsyncIterator[str]:
        """Server-sent events: one per text delta (a chat's first also names the assistant's role),
        with ``prompt_tokens`` a last one of the usage (no choices; the others' usage null), then
        ``[DONE]``; a failure mid-way is an error event."""
        async with contextlib.aclosing(pieces):
            try:
                first, used = chat, 0
                async for delta, reason, used in pieces:
                    body = self._body(rid, delta, reason, chat, streamed=True)
                    if first:
                        body["choices"][0]["delta"]["role"], first = "assistant", False
                    if prompt_tokens is not None:
                        body["usage"] = None
                    yield f"data: {json.dumps(body)}\n\n"
                if prompt_tokens is not None:
                    body = self._body(rid, "", None, chat, streamed=True) | {"choices": [],
                                                                            "usage": usage(prompt_tokens, used)}
                    yield f"data: {json.dumps(body)}\n\n"
            except Exception as e:  # noqa: BLE001 - the status line has gone out: say it in the stream
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"

    async def _pieces(self, completion: Completion, text: TextStream) -> AsyncIterator[tuple[str, str | None, int]]:
        """(text delta, finish reason once finished, tokens so far) as ``text`` turns the tokens
        into text, after a first empty piece that says the request is queued: a refusal surfaces
        before any response has started."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        key = self.scheduler.submit(completion.prompt, completion.sampling,
                                    lambda item: loop.call_soon_threadsafe(tokens.put_nowait, item))
        used = 0
        try:
            yield "", None, 0
            while True:
                item = await tokens.get()
                if isinstance(item, BaseException):
                    raise item
                token, finished = item
                used += token is not None
                delta = text.push(token) if token is not None else ""
                if text.stopped:
                    yield delta, "stop", used
                    return
                if finished:  # out of tokens (a token came) or end-of-text (none came)
                    yield delta + text.flush(), "length" if token is not None else "stop", used
                    return
                if delta:
                    yield delta, None, used
        finally:
            self.scheduler.cancel(key)


def check_listenable(host: str, port: int) -> None:
    """A port in use or an address not of this machine, said before Ray starts (Ray Serve's proxy
    would fail with a traceback after it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use (another server?); pick a free one with "
                                  f"--port") from None
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); --host must be an address of "
                              f"this machine (0.0.0.0 for all of them)") from None


def start(run_dir: str | Path, settings: ServeConfig, cluster: ClusterConfig, cpu_devices: int,
          echo: Callable[[str], None] = print) -> str:
    """Start Ray (unless running), Ray Serve's HTTP proxy and the ingress; the server's base URL."""
    problems = settings.problems()
    if problems:
        raise ConfigError("invalid serve settings:\n  - " + "\n  - ".join(problems))
    run_dir = absolute_source(run_dir)
    config = source_config(run_dir)  # a clear error for a directory that is not a run, before Ray starts
    check_listenable(settings.host, settings.port)
    connect(dataclasses.replace(config, cluster=cluster), echo)
    if serving_hosts(cluster) > 1:
        options: dict[str, Any] = {"num_cpus": 0}  # the engine is on the host workers
    else:
        layout = host_layout(ray.cluster_resources(), ray.nodes(), 1, cpu_devices)
        options = actor_options(layout, layout.bundle)
    if settings.warm_up:
        echo("fax: compiling every prefill and decode shape before serving (--warm-up)")
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = CompletionServer.options(max_ongoing_requests=settings.max_concurrent + 8, ray_actor_options=options)
    serve.run(app.bind(run_dir, settings, cluster, cpu_devices), name="fax", route_prefix="/")
    url = f"http://{settings.host}:{settings.port}"
    echo(f"fax: serving {run_dir} at {url} (POST /v1/completions, GET /v1/models, GET /health)")
    return url


def stop(shutdown_ray: bool) -> None:
    serve.shutdown()
    if shutdown_ray:
        ray.shutdown()

