"""The router process: OpenAI-compatible HTTP in front of prefill and decode instances.

Lifecycle of a request:
0. With `--api-key-file`, every path but /healthz, /readyz and /metrics needs
   `Authorization: Bearer <key>` (401 otherwise; auth.py).
1. Parse and validate the JSON (400 with the reason otherwise), tokenize (chat template for chat),
   check prompt and max_tokens against the model's context (reported by the instances).
   Past the overload bound (`--max-queue`, see `Router.refusal`): 503 with Retry-After, at once.
2. Prefill on the least-loaded prefill instance. If that instance is unreachable before it answers,
   the request is retried once on another one (safe: nothing was produced yet).
3. Decode on a decode instance with room, passing the first token and where the KV cache is held.
   Before 2 and 3: when every instance of the role is saturated or none is ready, the request
   waits its turn in that role's line (admission.py, picker.py), at most `--queue-timeout-seconds`
   (then 503 with Retry-After); a client that goes away leaves the line.
   Unreachable before its first event: retried once elsewhere (the cache is still held). After
   tokens have been sent, a failure ends the request with an error (SSE error event, or 503).
   A call refused by a draining instance (drain.py), prefill or decode, is retried on another
   instance whatever the count (it did nothing), and that instance leaves the rotation at once.
4. Stream tokens (SSE) or collect them; record TTFT, TPOT, token counts and SLO attainment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
from distserve_worker.drain import refused_draining
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.router.admission import Admission, QueueTimeout
from distserve_worker.router.auth import ApiKeys, auth_middleware
from distserve_worker.router.discovery import DnsDiscovery, StaticDiscovery
from distserve_worker.router.openai import (
    BadRequest,
    GenerationRequest,
    chunk_body,
    error_body,
    finish_reason,
    full_body,
    parse_request,
    usage,
)
from distserve_worker.router.picker import Instance, decode_room, pick_decode, pick_prefill
from distserve_worker.router.topology import apply_status, instances_document
from distserve_worker.settings import RouterSettings

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
# A prefill that failed before answering changed nothing a client sees (its KV cache is never
# pulled), so these go to another instance too. CANCELLED reaches the router only from the
# instance's side (a call the router cancels raises CancelledError here): a server stopping with
# the call in flight, e.g. right after a drain that ended before the router saw it draining.
RETRYABLE_PREFILL = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
# json.loads (or a check of what it gave) past Python's recursion limit: the client's doing, a 400.
TOO_DEEP = (
    "the request body nests too deeply (arrays or objects within each other, about 1000 levels or more)"
)


class WorkerError(RuntimeError):
    """A worker failed the request (or could not be reached); the client gets a 503 with this text."""


class Unavailable(WorkerError):
    """No instance can take the request now (overload, none ready); a 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int, code: str) -> None:
        super().__init__(message)
        self.retry_after, self.code = retry_after, code


@dataclass
class Timing:
    arrived: float
    first: float | None = None
    last: float | None = None
    kv_seconds: float = 0.0
    # From the prefill instance's answer: time queued there, and from its batch's forward start
    # to the answer; `prefilled` is when the router had it (the rest of TTFT is the hand-off to
    # decode and the way back to the client).
    prefill_queue: float = 0.0
    prefill: float = 0.0
    prefilled: float | None = None

    def ttft(self) -> float:
        return (self.first or time.perf_counter()) - self.arrived

    def tpot(self, tokens: int) -> float | None:
        if tokens < 2 or self.first is None or self.last is None:
            return None
        return (self.last - self.first) / (tokens - 1)


class Pool:
    """The instances of one role, re-discovered and polled (Status RPC) every refresh period."""

    def __init__(self, role: str, discovery: StaticDiscovery | DnsDiscovery) -> None:
        self.role = role
        self.discovery = discovery
        self.instances: dict[str, Instance] = {}
        self.channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self.channels:
            self.channels[address] = grpc.aio.insecure_channel(address)
        return self.channels[address]

    async def refresh(self) -> None:
        addresses = await self.discovery.resolve()
        for gone in set(self.instances) - set(addresses):
            if self.instances[gone].inflight:
                # Out of DNS once not ready (draining): closing its channel would cut this router's
                # streams on it short. Out of rotation, not polled; it leaves with the last of them.
                self.instances[gone].ready = False
                continue
            del self.instances[gone]
            channel = self.channels.pop(gone, None)
            if channel is not None:
                await channel.close()
        for address in addresses:
            self.instances.setdefault(address, Instance(address))
        await asyncio.gather(*(self._poll(self.instances[a]) for a in addresses))

    async def _poll(self, inst: Instance) -> None:
        stub: Any = (gen_grpc.PrefillServiceStub if self.role == "prefill" else gen_grpc.DecodeServiceStub)(
            self.channel(inst.address)
        )
        # The answer counts this router's requests then; the most it had on the instance while
        # asking (picker.Instance.others: the rest are other routers').
        before = inst.inflight
        try:
            status = await stub.Status(gen.StatusRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            inst.healthy, inst.error = False, f"{exc.code().name}: {exc.details()}"
            # A fresh channel at the next poll connects at once, instead of after gRPC's growing
            # reconnect backoff, so a restarted instance is back in rotation within one period.
            # Only when the connection itself failed: a slow answer must not cancel streams in flight.
            channel = (
                self.channels.pop(inst.address, None) if exc.code() == grpc.StatusCode.UNAVAILABLE else None
            )
            if channel is not None:
                await channel.close()
            return
        apply_status(inst, status)
        inst.polled_inflight = max(before, inst.inflight)

    def routable(self) -> list[Instance]:
        """Instances that answered the last poll and report themselves ready."""
        return [i for i in self.instances.values() if i.routable]

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


class Router:
    def __init__(self, settings: RouterSettings, tokenizer: Any, metrics: RuntimeMetrics) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.prefill = Pool(
            "prefill", _discovery(settings.prefill, settings.prefill_dns, settings.prefill_port)
        )
        self.decode = Pool("decode", _discovery(settings.decode, settings.decode_dns, settings.decode_port))
        self.inflight = 0
        # Requests waiting for an instance of a role, in arrival order (admission.py).
        self.lines: dict[str, Admission[Instance]] = {
            role: Admission(
                role,
                settings.max_queue,
                settings.queue_timeout_seconds,
                functools.partial(metrics.set_router_queue, role),
            )
            for role in ("prefill", "decode")
        }
        for role in self.lines:
            metrics.set_router_queue(role, 0)
        # A client told to come back sooner than the next poll would find the router knowing no more.
        self.retry_after = max(1, math.ceil(settings.refresh_seconds))

    @property
    def slo(self) -> tuple[float, float] | None:
        s = self.settings
        if s.slo_ttft_seconds is None or s.slo_tpot_seconds is None:
            return None
        return (s.slo_ttft_seconds, s.slo_tpot_seconds)

    def ready(self) -> bool:
        return bool(self.prefill.routable() and self.decode.routable())

    async def refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # one bad round must not stop discovery for good
                await asyncio.gather(self.prefill.refresh(), self.decode.refresh())
            for line in self.lines.values():  # instances may have come back, or freed room
                line.notify()
            await asyncio.sleep(self.settings.refresh_seconds)

    def topology(self) -> dict[str, Any]:
        """`GET /v1/distserve/instances`: every instance as its last Status poll described it."""
        return instances_document(
            self.settings.model.name,
            [(pool.role, pool.instances.values()) for pool in (self.prefill, self.decode)],
        )

    def max_context(self) -> int:
        # As each instance last reported it, ready now or not: one whose poll timed out under load
        # still serves this model, and the request waits for it in the queue.
        known = [*self.prefill.instances.values(), *self.decode.instances.values()]
        contexts = [i.max_context for i in known if i.max_context]
        if not contexts:
            raise Unavailable("no prefill/decode instance has answered yet", self.retry_after, "no_instance")
        return min(contexts)

    # --- overload ------------------------------------------------------------------------------------

    def refusal(self) -> Unavailable | None:
        """Why a request arriving now is refused (503), or None. Each role's line admits it while
        fewer than `max_queue` requests would wait ahead of it (Admission.admits): for prefill, its
        line; for decode, its line plus every request not on a decode instance yet (waiting for or
        in prefill: with prefill running ahead, they reach the decode line first), less the room
        the decode instances have now."""
        decode = list(self.decode.instances.values())
        on_decode = sum(i.inflight for i in decode)
        ahead = max(0, self.inflight - on_decode - self.lines["decode"].depth)
        checks = (("prefill", 0, 0), ("decode", ahead, decode_room(decode)))
        for role, before, room in checks:
            line = self.lines[role]
            if not line.admits(before, room):
                return Unavailable(
                    f"no {role} instance has room (each saturated or not ready) and "
                    f"{line.depth + before - room} requests already wait for one (the router queues at most "
                    f"{line.bound}); retry after {self.retry_after} s",
                    self.retry_after,
                    "queue_full",
                )
        return None

    async def _instance(
        self, role: str, grant: Callable[[list[Instance]], Instance | None], tried: set[str]
    ) -> Instance:
        """An open instance of the role from `grant` (a picker), at once or after waiting in the
        role's line. A retry goes to an instance not `tried` yet; with none left, to a tried one
        once it is back in rotation (a restarted pod), within the same queue timeout."""
        pool = self.prefill if role == "prefill" else self.decode

        def candidates() -> list[Instance]:
            fresh = [i for i in pool.instances.values() if i.address not in tried and i.routable]
            return fresh or list(pool.instances.values())

        started = time.perf_counter()
        try:
            return await self.lines[role].take(lambda: grant(candidates()))
        except QueueTimeout as exc:
            raise Unavailable(str(exc), self.retry_after, "queue_timeout") from exc
        finally:
            self.metrics.router_waited(role, time.perf_counter() - started)

    # --- tokenizing and checks --------------------------------------------------------------------

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise BadRequest("this model has no chat template; use /v1/completions", "messages")
            encoded = self.tokenizer.apply_chat_template(
                req.messages, add_generation_prompt=True, tokenize=True
            )
            ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
            return [int(t) for t in ids]
        if isinstance(req.prompt, list):
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in req.prompt):
                raise BadRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
            return req.prompt
        return [int(t) for t in self.tokenizer(req.prompt)["input_ids"]]

    def check_lengths(self, req: GenerationRequest, prompt: list[int]) -> int:
        context = self.max_context()
        if len(prompt) >= context:
            raise BadRequest(
                f"the prompt has {len(prompt)} tokens; this model's context is {context} tokens",
                "messages" if req.chat else "prompt",
                "context_length_exceeded",
            )
        room = context - len(prompt)
        if req.max_tokens is None:
            return min(self.settings.max_tokens_default, room)
        if req.max_tokens > room:
            raise BadRequest(
                f"max_tokens is {req.max_tokens}, but the prompt ({len(prompt)} tokens) leaves room for {room} "
                f"in this model's context of {context}",
                "max_tokens",
                "context_length_exceeded",
            )
        return req.max_tokens

    # --- dispatch -----------------------------------------------------------------------------------

    async def generate(
        self, req: GenerationRequest, prompt: list[int], max_tokens: int, timing: Timing | None = None
    ) -> AsyncGenerator[gen.TokenEvent, None]:
        sampling = gen.SamplingParams(temperature=req.temperature, top_p=req.top_p)
        if req.seed is not None:
            sampling.seed = req.seed
        first = await self._prefill(req.id, prompt, sampling)
        if timing is not None:
            timing.prefilled = time.perf_counter()
            timing.prefill_queue, timing.prefill = first.queue_seconds, first.prefill_seconds
        decode_request = gen.DecodeRequest(
            request_id=req.id,
            kv_address=first.kv_address,
            prompt_tokens=first.prompt_tokens,
            first_token_id=first.first_token_id,
            sampling=sampling,
            max_tokens=max_tokens,
            stop=req.stop,
            ignore_eos=req.ignore_eos,
            # Under tensor parallelism: each prefill rank's KV server, so decode ranks pull their heads.
            kv_rank_addresses=list(first.kv_rank_addresses),
            # Under pipeline parallelism: each prefill stage's layers and ranks (decode stages pull theirs).
            kv_stages=list(first.kv_stages),
        )
        need = len(prompt) + max_tokens  # KV tokens the decode instance reserves for it
        tried: set[str] = set()
        while True:
            inst = await self._instance(
                "decode", lambda pool: pick_decode(pool, near=first.kv_address, need=need), tried
            )
            tried.add(inst.address)
            inst.inflight += 1
            inst.inflight_tokens += need
            call = gen_grpc.DecodeServiceStub(self.decode.channel(inst.address)).Decode(
                decode_request, timeout=self.settings.request_timeout_seconds
            )
            received = 0
            try:
                async for event in call:
                    received += 1
                    yield event
                return
            except grpc.aio.AioRpcError as exc:
                if received == 0 and refused_draining(exc):  # it did nothing: any other will do
                    inst.ready = False  # out of rotation now, not at its next poll
                    continue
                if received == 0 and exc.code() in RETRYABLE and len(tried) < 2:
                    inst.healthy = False
                    continue
                raise WorkerError(
                    f"decode instance {inst.address} failed: {exc.code().name}: {exc.details()}"
                ) from exc
            finally:
                inst.inflight -= 1
                inst.inflight_tokens -= need
                self.lines["decode"].notify()
                call.cancel()  # no-op when finished; frees the decode slot when the client went away

    async def _prefill(
        self, rid: str, prompt: list[int], sampling: gen.SamplingParams
    ) -> gen.PrefillResponse:
        tried: set[str] = set()
        while True:
            inst = await self._instance("prefill", lambda pool: pick_prefill(pool, need=len(prompt)), tried)
            tried.add(inst.address)
            inst.inflight += 1
            inst.inflight_tokens += len(prompt)
            try:
                return await gen_grpc.PrefillServiceStub(self.prefill.channel(inst.address)).Prefill(
                    gen.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling),
                    timeout=self.settings.request_timeout_seconds,
                )
            except grpc.aio.AioRpcError as exc:
                if refused_draining(exc):  # it did nothing: any other will do
                    inst.ready = False  # out of rotation now, not at its next poll
                    continue
                if exc.code() in RETRYABLE_PREFILL and len(tried) < 2:
                    inst.healthy = False
                    continue
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise BadRequest(str(exc.details()), "prompt") from exc
                raise WorkerError(
                    f"prefill instance {inst.address} failed: {exc.code().name}: {exc.details()}"
                ) from exc
            finally:
                inst.inflight -= 1
                inst.inflight_tokens -= len(prompt)
                self.lines["prefill"].notify()

    def record(self, prompt: int, output: int, timing: Timing) -> dict[str, Any]:
        tpot = timing.tpot(output)
        met = self.metrics.finished(prompt, output, timing.ttft(), tpot, self.slo)
        return {
            "ttft_ms": round(timing.ttft() * 1000, 2),
            "tpot_ms": None if tpot is None else round(tpot * 1000, 2),
            "kv_transfer_ms": round(timing.kv_seconds * 1000, 2),
            "prefill_queue_ms": round(timing.prefill_queue * 1000, 2),
            "prefill_ms": round(timing.prefill * 1000, 2),
            # Router to first token out: decode instance's accept of the request and the way back.
            "handoff_ms": None
            if timing.first is None or timing.prefilled is None
            else round((timing.first - timing.prefilled) * 1000, 2),
            "slo_attained": met,
        }


def _discovery(static: tuple[str, ...], dns: str, port: int) -> StaticDiscovery | DnsDiscovery:
    return DnsDiscovery(dns, port) if dns and not static else StaticDiscovery(static)


def _json_error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> web.Response:
    return web.json_response(error_body(message, type_, param, code), status=status)


def _unavailable(exc: WorkerError) -> web.Response:
    """503 for a worker error; with Retry-After (and a code saying why) when waiting may help."""
    if not isinstance(exc, Unavailable):
        return _json_error(503, str(exc), "server_error")
    response = _json_error(503, str(exc), "server_error", code=exc.code)
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


def build_app(router: Router) -> web.Application:
    async def completions(request: web.Request, chat: bool) -> web.StreamResponse:
        arrived = time.perf_counter()
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError):
            router.metrics.request("bad_request")
            return _json_error(400, "the request body is not valid JSON")
        except RecursionError:
            router.metrics.request("bad_request")
            return _json_error(400, TOO_DEEP)
        try:
            req = parse_request(body, chat, router.settings.model.name)
            prompt = router.prompt_ids(req)
            max_tokens = router.check_lengths(req, prompt)
        except RecursionError:
            router.metrics.request("bad_request")
            return _json_error(400, TOO_DEEP)
        except BadRequest as exc:
            router.metrics.request("bad_request")
            return _json_error(exc.status, str(exc), param=exc.param, code=exc.code)
        except WorkerError as exc:
            router.metrics.request("unavailable")
            return _unavailable(exc)
        refused = router.refusal()
        if refused is not None:
            router.metrics.request("overloaded")
            return _unavailable(refused)
        router.inflight += 1
        router.metrics.set_queue(router.inflight)
        try:
            if req.stream:
                return await _stream(request, router, req, prompt, max_tokens, arrived)
            return await _collect(router, req, prompt, max_tokens, arrived)
        finally:
            router.inflight -= 1
            router.metrics.set_queue(router.inflight)

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        return await completions(request, chat=True)

    async def completions_handler(request: web.Request) -> web.StreamResponse:
        return await completions(request, chat=False)

    async def models(_: web.Request) -> web.Response:
        name = router.settings.model.name
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": name, "object": "model", "created": 0, "owned_by": "distserve"}],
            }
        )

    def instances() -> dict[str, Any]:
        return {
            pool.role: [
                {"address": i.address, "healthy": i.healthy, "ready": i.routable, "error": i.error}
                for i in pool.instances.values()
            ]
            for pool in (router.prefill, router.decode)
        }

    async def topology(_: web.Request) -> web.Response:
        return web.json_response(router.topology())

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "ready": router.ready(), **instances()})

    async def readyz(_: web.Request) -> web.Response:
        ok = router.ready()
        return web.json_response({"ready": ok, **instances()}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=router.metrics.exposition(), content_type="text/plain", charset="utf-8")

    middlewares = []
    if router.settings.api_key_file:
        keys = ApiKeys(router.settings.api_key_file)
        print(f"[distserve] router: API keys required ({keys.count} allowed, from a file)", flush=True)
        middlewares.append(auth_middleware(keys, lambda: router.metrics.request("unauthorized")))
    app = web.Application(client_max_size=8 * 1024 * 1024, middlewares=middlewares)
    app.add_routes(
        [
            web.post("/v1/completions", completions_handler),
            web.post("/v1/chat/completions", chat_handler),
            web.get("/v1/models", models),
            web.get("/v1/distserve/instances", topology),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
        ]
    )
    return app


async def _collect(
    router: Router, req: GenerationRequest, prompt: list[int], max_tokens: int, arrived: float
) -> web.Response:
    timing = Timing(arrived)
    text, tokens, finish = [], [], "stop"
    try:
        async for event in router.generate(req, prompt, max_tokens, timing):
            now = time.perf_counter()
            timing.first = timing.first or now
            timing.last = now
            text.append(event.text)
            tokens.append(event.token_id)
            if event.finish_reason:
                finish = finish_reason(event.finish_reason)
                timing.kv_seconds = event.kv_transfer_seconds
    except BadRequest as exc:
        router.metrics.request("bad_request")
        return _json_error(exc.status, str(exc), param=exc.param, code=exc.code)
    except WorkerError as exc:
        router.metrics.request("overloaded" if isinstance(exc, Unavailable) else "error")
        return _unavailable(exc)
    router.metrics.request("ok")
    body = full_body(req, "".join(text), finish, tokens, len(prompt))
    body["distserve"] = router.record(len(prompt), len(tokens), timing)
    return web.json_response(body)


async def _stream(
    request: web.Request,
    router: Router,
    req: GenerationRequest,
    prompt: list[int],
    max_tokens: int,
    arrived: float,
) -> web.StreamResponse:
    timing = Timing(arrived)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    tokens = 0

    async def send(payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    events = router.generate(req, prompt, max_tokens, timing)
    try:
        async for event in events:
            if not response.prepared:
                await response.prepare(request)
            now = time.perf_counter()
            timing.first = timing.first or now
            timing.last = now
            tokens += 1
            finish = finish_reason(event.finish_reason) if event.finish_reason else None
            chunk = chunk_body(req, event.text, finish, first=tokens == 1)
            if finish:
                timing.kv_seconds = event.kv_transfer_seconds
                chunk["usage"] = usage(len(prompt), tokens)
                chunk["distserve"] = router.record(len(prompt), tokens, timing)
            await send(chunk)
        await send("[DONE]")
        router.metrics.request("ok")
    except (BadRequest, WorkerError) as exc:
        router.metrics.request("overloaded" if isinstance(exc, Unavailable) else "error")
        if not response.prepared:
            if isinstance(exc, WorkerError):
                return _unavailable(exc)
            status = exc.status
            return _json_error(status, str(exc), "invalid_request_error" if status == 400 else "server_error")
        await send(error_body(str(exc), "server_error"))
    finally:
        await events.aclose()
    await response.write_eof()
    return response


async def serve_router(settings: RouterSettings, tokenizer: Any = None) -> None:
    from distserve_worker.model_source import load_tokenizer

    metrics = RuntimeMetrics("router", settings.model.name)
    if tokenizer is None:
        print(f"[distserve] router loading tokenizer of {settings.model.name} ...", flush=True)
        tokenizer = await asyncio.to_thread(load_tokenizer, settings.model)
    router = Router(settings, tokenizer, metrics)
    # A client that goes away cancels its handler: it leaves the queue, or frees its decode slot.
    runner = web.AppRunner(build_app(router), access_log=None, handler_cancellation=True)
    await runner.setup()
    refresh = asyncio.create_task(router.refresh_loop())
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        print(f"[distserve] router serving http://{settings.host}:{settings.port}", flush=True)
        await asyncio.Event().wait()
    finally:
        refresh.cancel()
        await runner.cleanup()
        await router.prefill.close()
        await router.decode.close()
