"""OpenAI-style request bodies (/v1/completions, /v1/chat/completions) checked and turned into
what the engine runs; every problem named, with the setting it is about."""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from fax.config import ServeConfig
from fax.data.chat import Layout, TemplateError, message_problems
from fax.serving.sampling import MAX_LOGPROBS, SamplingParams, request_problems

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1000  # the longest stop sequence a request may give
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


def _finite(value: int | float) -> float | None:
    """``value`` as a float, None when it is not finite (NaN, an infinity, an integer past float's range)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = _typed(body, name, (int, float), default, "a number")
    number = _finite(value)
    if number is None:
        raise RequestError(f"{name} must be a finite number, got {str(value)[:40]}", name)
    return number


def lone_surrogate(body: Any) -> str | None:
    """The top-level field of a parsed JSON body holding a string that is not valid Unicode (a lone
    UTF-16 surrogate such as "\\ud800", which JSON allows), if any: no tokenizer can encode it."""
    todo = list(body.items()) if isinstance(body, dict) else [("body", body)]
    while todo:
        field, value = todo.pop()
        parts = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else \
            [*value.keys(), *value.values()] if isinstance(value, dict) else []
        for part in parts:
            if isinstance(part, str):
                try:
                    part.encode()
                except UnicodeEncodeError:
                    return field
            else:
                todo.append((field, part))
    return None


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
               and _finite(value) is not None for key, value in bias.items()):
        raise RequestError("logit_bias must map token ids (as strings, e.g. \"50256\") to finite numbers",
                           "logit_bias")
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
    if not all(0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise RequestError(f"stop sequences must hold 1 to {MAX_STOP_CHARS} characters", "stop")
    seed = _typed(body, "seed", (int,), None, "an integer")
    if seed is not None and not 0 <= seed < 2 ** 32:
        raise RequestError("seed must be in [0, 2**32)", "seed")
    sampling = SamplingParams(
        max_new_tokens=max_tokens if generate else 1,
        temperature=_number(body, "temperature", 1.0),
        top_k=_typed(body, "top_k", (int,), 0, "an integer"),
        top_p=_number(body, "top_p", 1.0),
        seed=secrets.randbelow(2 ** 32) if seed is None else seed, stop=tuple(stop),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        logit_bias=_logit_bias(body))
    problems = request_problems(model, prompt, sampling, scored_only=not generate, prompt_name=prompt_name)
    if problems:
        raise RequestError("; ".join(problems), problems[0].split()[0])  # each begins with its setting's name
    return Completion(prompt, sampling, stream, logprobs, echo, generate, usage_chunk)


def parse_chat(body: Any, encode: Callable[[str], list[int]], settings: ServeConfig, model: Any,
               model_name: str, layout: Layout) -> Completion:
    """A /v1/chat/completions body: the conversation in the tokenizer's ``layout``, as in training
    (``fax.data.chat``), the reply generated after it and ended by the end-of-turn marker; ``logprobs``
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

