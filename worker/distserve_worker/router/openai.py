"""OpenAI request validation and response shapes for /v1/completions and /v1/chat/completions.

Only what this server does is accepted; anything else is a 400 with the reason, in OpenAI's error
shape. Two extensions from vLLM's API: `ignore_eos` and `return_token_ids` (the output's token ids).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# Roles a chat message may have: what the models' chat templates render. Tool calls are not served,
# so neither are `tool` messages.
CHAT_ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class GenerationRequest:
    chat: bool
    model: str
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    ignore_eos: bool = False
    return_token_ids: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number", name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low} and {high}, got {value}", name)
    return float(value)


def parse_request(body: Any, chat: bool, served_model: str) -> GenerationRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required", "model")
    if model != served_model:
        raise BadRequest(
            f"The model '{model}' does not exist; this server serves '{served_model}'",
            "model",
            "model_not_found",
        )
    req = GenerationRequest(chat=chat, model=model)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list", "messages")
        for m in messages:
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise BadRequest("each message needs a string 'role' and a string 'content'", "messages")
            if m["role"] not in CHAT_ROLES:
                raise BadRequest(
                    f"message role {m['role'][:40]!r} is not supported: use one of {', '.join(CHAT_ROLES)}",
                    "messages",
                )
        req.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            req.prompt = prompt
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            req.prompt = [int(t) for t in prompt]
        else:
            raise BadRequest(
                "'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
                "prompt",
            )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise BadRequest("'max_tokens' must be an integer", "max_tokens")
        if max_tokens < 1:
            raise BadRequest(f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
        req.max_tokens = max_tokens
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if req.top_p == 0.0:
        raise BadRequest("'top_p' must be greater than 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise BadRequest("'seed' must be a non-negative integer", "seed")
    req.seed = seed
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("only n=1 is supported", "n")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)
    ):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    req.stop = stop or []
    for flag in ("stream", "ignore_eos", "return_token_ids"):
        value = body.get(flag, False)
        if not isinstance(value, bool):
            raise BadRequest(f"'{flag}' must be a boolean", flag)
        setattr(req, flag, value)
    return req


def finish_reason(proto_value: int) -> str:
    return {1: "stop", 2: "length"}.get(proto_value, "stop")


def chunk_body(req: GenerationRequest, text: str, finish: str | None, first: bool) -> dict[str, Any]:
    if req.chat:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": _id(req), "object": obj, "created": req.created, "model": req.model, "choices": [choice]}


def full_body(
    req: GenerationRequest, text: str, finish: str, token_ids: list[int], prompt_tokens: int
) -> dict[str, Any]:
    if req.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    if req.return_token_ids:
        choice["token_ids"] = token_ids
    return {
        "id": _id(req),
        "object": obj,
        "created": req.created,
        "model": req.model,
        "choices": [choice],
        "usage": usage(prompt_tokens, len(token_ids)),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _id(req: GenerationRequest) -> str:
    return f"{'chatcmpl' if req.chat else 'cmpl'}-{req.id}"
