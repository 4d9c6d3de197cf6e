"""A small OpenAI-API client for tests, benchmarks and the demo (aiohttp; streams SSE)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Result:
    status: int
    body: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    chunks: int = 0  # SSE events received (streaming)
    error: dict[str, Any] | None = None
    ttft: float | None = None  # client-side, seconds
    last: float | None = None  # client-side, seconds from the request to the last streamed event
    elapsed: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)  # the response's (Retry-After on a 503)


async def complete(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout: float = 120.0
) -> Result:
    """POST to url; for `stream: true`, reads the SSE events and joins the text."""
    started = time.perf_counter()
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        if not body.get("stream") or resp.status != 200:
            payload = await resp.json(content_type=None)
            result = Result(resp.status, payload, error=payload.get("error"), headers=dict(resp.headers))
            if resp.status == 200:
                choice = payload["choices"][0]
                result.text = choice.get("text") or choice.get("message", {}).get("content", "")
                result.token_ids = choice.get("token_ids", [])
            result.elapsed = time.perf_counter() - started
            return result
        result = Result(resp.status, headers=dict(resp.headers))
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                result.error = event["error"]
                break
            result.chunks += 1
            result.last = time.perf_counter() - started
            if result.ttft is None:
                result.ttft = result.last
            choice = event["choices"][0]
            result.text += choice.get("text") or choice.get("delta", {}).get("content", "")
            if "distserve" in event:
                result.body = event
        result.elapsed = time.perf_counter() - started
        return result
