"""`fax serve`: an OpenAI-style completions and chat API on Ray Serve over a continuously batched engine.

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
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from fax.chat import Layout, TemplateError, message_problems
from fax.chat import layout as chat_layout  # "layout" names the argument of parse_chat
from fax.config import ClusterConfig, ConfigError, ServeConfig, run_config
from fax.serve import (MAX_LOGPROBS, Busy, SamplingParams, Scheduler, TextStream, generation_ends, request_problems,
                       run_tokenizer)

MAX_STOP_SEQUENCES = 4
# OpenAI settings this server does not implement, taken only at a value that changes nothing (never
# silently ignored): each with the values it accepts.
NO_OP_SETTINGS: dict[str, tuple[Any, ...]] = {"best_of": (1,), "suffix": ("",)}
NO_OP_CHAT_SETTINGS: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "response_format": ({"type": "text"},)}


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a message the client can act on."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param}},
                            status_code=self.status)


@dataclass(frozen=True)
class Completion:
    """A validated request."""

    prompt: list[int]
    sampling: SamplingParams
    stream: bool
    logprobs: int | None = None  # the most likely tokens to list at each position, if any
    echo: bool = False  # the prompt's text (and its tokens' logprobs) before the completion's
    generate: bool = True  # False: max_tokens=0 with echo, the prompt scored alone
    usage_chunk: bool = False  # streamed: a last chunk with the usage (stream_options.include_usage)


def _typed(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(f"{name} must be {what}, got {json.dumps(value)[:40]}", name)
    return value


def _refuse_unsupported(body: dict[str, Any], settings: dict[str, tuple[Any, ...]], endpoint: str) -> None:
    for name, no_ops in settings.items():
        if body.get(name) not in (None, *no_ops):
            raise RequestError(f"{name} is not supported on {endpoint} (only {json.dumps(no_ops[0])})", name)


def _logprobs_count(body: dict[str, Any], name: str) -> int | None:
    """How many of the most likely tokens to list at each position (None: no logprobs)."""
    count = _typed(body, name, (int,), None, "an integer")
    if count is not None and not 0 <= count <= MAX_LOGPROBS:
        raise RequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {count}", name)
    return count


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """``logit_bias``: an object of token ids (JSON keys: strings) and the biases added to their logits."""
    bias = _typed(body, "logit_bias", (dict,), {}, "an object of token ids and biases")
    if not all(key.isascii() and key.isdigit() and isinstance(value, (int, float)) and not isinstance(value, bool)
               for key, value in bias.items()):
        raise RequestError("logit_bias must map token ids (as strings, e.g. \"50256\") to numbers", "logit_bias")
    return tuple((int(key), float(value)) for key, value in bias.items())


def _prompt_ids(prompt: Any, encode: Callable[[str], list[int]], vocab_size: int) -> list[int]:
    """A string or token ids, alone or as a batch of one (what OpenAI clients and evaluation
    harnesses send)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
        return prompt
    raise RequestError("prompt must be a string or a list of token ids", "prompt")


def parse_completion(body: Any, encode: Callable[[str], list[int]], settings: ServeConfig,
                     model: Any, model_name: str, prompt_name: str = "prompt") -> Completion:
    """A /v1/completions body checked against the settings and the model, every problem named
    (the prompt as ``prompt_name``: what the client sent it as)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if "prompt" not in body:
        raise RequestError("prompt is required", "prompt")
    if body.get("model") not in (None, model_name):
        raise RequestError(f"model {body['model']!r} is not served here; this server serves {model_name!r}",
                           "model", 404, "model_not_found")
    if _typed(body, "n", (int,), 1, "an integer") != 1:
        raise RequestError("n must be 1 (one completion per request)", "n")
    _refuse_unsupported(body, NO_OP_SETTINGS, "/v1/completions")
    prompt = _prompt_ids(body["prompt"], encode, model.vocab_size)
    context = model.max_seq_len
    stream = _typed(body, "stream", (bool,), False, "true or false")
    echo = _typed(body, "echo", (bool,), False, "true or false")
    options = _typed(body, "stream_options", (dict,), {}, "an object")
    if options and not stream:
        raise RequestError("stream_options needs stream=true", "stream_options")
    usage_chunk = _typed(options, "include_usage", (bool,), False, "true or false")
    logprobs = _logprobs_count(body, "logprobs")
    if stream and (echo or logprobs is not None):
        raise RequestError("logprobs and echo are not supported with stream=true; ask without stream", "stream")
    max_tokens = _typed(body, "max_tokens", (int,), settings.default_max_tokens, "an integer")
    generate = not (echo and max_tokens == 0)  # echo with nothing to generate: the prompt scored
    max_prompt = settings.max_prompt_tokens or context - generate  # scored alone, it may fill the context
    if len(prompt) > max_prompt:
        raise RequestError(f"{prompt_name}: {len(prompt)} tokens, more than the {max_prompt} this server accepts "
                           "(serve.max_prompt_tokens)", prompt_name)
    limit = settings.max_tokens or context
    if max_tokens > limit:
        raise RequestError(f"max_tokens={max_tokens} is above this server's limit of {limit} (serve.max_tokens)",
                           "max_tokens")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_SEQUENCES:
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} strings", "stop")
    seed = _typed(body, "seed", (int,), None, "an integer")
    if seed is not None and not 0 <= seed < 2 ** 32:
        raise RequestError("seed must be in [0, 2**32)", "seed")
    sampling = SamplingParams(
        max_new_tokens=max_tokens if generate else 1,
        temperature=float(_typed(body, "temperature", (int, float), 1.0, "a number")),
        top_k=_typed(body, "top_k", (int,), 0, "an integer"),
        top_p=float(_typed(body, "top_p", (int, float), 1.0, "a number")),
        seed=secrets.randbelow(2 ** 32) if seed is None else seed, stop=tuple(stop),
        frequency_penalty=float(_typed(body, "frequency_penalty", (int, float), 0.0, "a number")),
        presence_penalty=float(_typed(body, "presence_penalty", (int, float), 0.0, "a number")),
        logit_bias=_logit_bias(body))
    problems = request_problems(model, prompt, sampling, scored_only=not generate, prompt_name=prompt_name)
    if problems:
        raise RequestError("; ".join(problems), problems[0].split()[0])  # each begins with its setting's name
    return Completion(prompt, sampling, stream, logprobs, echo, generate, usage_chunk)


def parse_chat(body: Any, encode: Callable[[str], list[int]], settings: ServeConfig, model: Any,
               model_name: str, layout: Layout) -> Completion:
    """A /v1/chat/completions body: the conversation in the tokenizer's ``layout``, as in training
    (``fax.chat``), the reply generated after it and ended by the end-of-turn marker; ``logprobs``
    (true or false) with ``top_logprobs`` (a count); the rest as for a completion."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    problems = message_problems(body.get("messages"))
    if problems:
        raise RequestError("; ".join(problems), "messages")
    if body.get("echo") not in (None, False):
        raise RequestError("echo is not supported on /v1/chat/completions; ask /v1/completions", "echo")
    _refuse_unsupported(body, NO_OP_SETTINGS | NO_OP_CHAT_SETTINGS, "/v1/chat/completions")
    logprobs = _typed(body, "logprobs", (bool,), False, "true or false")
    top = _logprobs_count(body, "top_logprobs")
    if top is not None and not logprobs:
        raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
    try:
        prompt = layout.prompt_ids(encode, body["messages"])
    except TemplateError as e:  # the chat template's own demands (alternating roles...)
        raise RequestError(str(e), "messages") from None
    reply = {**body, "prompt": prompt, "logprobs": (top or 0) if logprobs else None,
             "max_tokens": body.get("max_completion_tokens", body.get("max_tokens"))}
    completion = parse_completion(reply, encode, settings, model, model_name, prompt_name="messages")
    sampling = dataclasses.replace(completion.sampling, stop=layout.reply_stops(completion.sampling.stop))
    return dataclasses.replace(completion, sampling=sampling)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def serving_hosts(cluster: ClusterConfig) -> int:
    return cluster.hosts or cluster.emulate_hosts or 1


def _engine(run_dir: str, settings: ServeConfig, cluster: ClusterConfig, end_ids: Sequence[int]) -> Any:
    """The engine in this process (ending generations at ``end_ids``), or spread over host workers
    when it needs more than one host (each reads the run's tokenizer itself); warmed up if asked."""
    if serving_hosts(cluster) > 1:
        from fax.cluster import ClusterEngine, RayRuntime

        config = dataclasses.replace(run_config(run_dir), run_dir=run_dir, cluster=cluster)
        engine = ClusterEngine(RayRuntime(config), run_dir, None, settings.max_batch)
    else:
        from fax.serve import Engine

        engine = Engine.from_run_dir(run_dir, max_batch=settings.max_batch, end_ids=end_ids)
    if settings.warm_up:
        engine.warm_up()
    return engine


api = FastAPI(title="fax")


@serve.deployment
@serve.ingress(api)
class CompletionServer:
    """The HTTP ingress: parses requests, queues them on the scheduler, streams the text back."""

    def __init__(self, run_dir: str, settings: ServeConfig, cluster: ClusterConfig, cpu_devices: int):
        import jax

        jax.config.update("jax_num_cpu_devices", cpu_devices)  # before the CPU backend starts
        self.settings = settings
        self.model_name = settings.model_name or Path(run_dir).resolve().name
        config = run_config(run_dir)
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

    async def _answer(self, request: Request, parse: Callable[[Any], Completion], chat: bool) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            return RequestError(f"the request body is not valid JSON: {e}").response()
        except RecursionError:
            return RequestError("the request body nests JSON too deeply").response()
        try:
            completion = parse(body)
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
            return StreamingResponse(self._events(rid, pieces, chat, len(completion.prompt) if completion.usage_chunk
                                                  else None), media_type="text/event-stream")
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
    import ray

    from fax.cluster import actor_options, connect, host_layout

    problems = settings.problems()
    if problems:
        raise ConfigError("invalid serve settings:\n  - " + "\n  - ".join(problems))
    run_dir = str(Path(run_dir).absolute())
    config = run_config(run_dir)  # a clear error for a directory that is not a run, before Ray starts
    check_listenable(settings.host, settings.port)
    connect(dataclasses.replace(config, run_dir=run_dir, cluster=cluster), echo)
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
    import ray

    serve.shutdown()
    if shutdown_ray:
        ray.shutdown()
