"""Discrete-event simulation of prefill, decode and colocated instances. Times are milliseconds.

Lifecycle of a request: arrives -> waits FCFS for a prefill batch (up to a token budget) -> first
token at the end of its batch (TTFT) -> waits in the prefill instance's memory until a decode
instance has KV room for prompt+output -> KV is pulled (transfer time from the link) -> one token
per decode step of a continuously batched decode instance -> done. TPOT = (last token - first
token) / (output tokens - 1).

Events are arrivals, batch ends and completions. Decode steps between two events are advanced
in closed form: with a constant batch B the context grows by B each step, so k steps take
`k*alpha + beta*(k*ctx + B*k*(k-1)/2)`. A padded batch (`padded`) costs B x the longest
length instead of the sum; that also grows by B per step, so the same closed form holds. A padded
prefill batch likewise costs B x its longest prompt. That keeps a probe at O(requests log requests) instead of
O(steps * batch), which is what makes a whole search take about a second.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .latency import InstanceTiming

INF = math.inf


@dataclass(frozen=True)
class DecodeResult:
    last_token: list[float]
    memory_bound: bool  # a ready request ever waited for KV room
    admitted: list[float]  # when each request got its KV room (it leaves the prefill's memory)


class _Longest:
    """The longest running request's context length at a step, for padded decode batches:
    length = step + (input + 1 - admission step), so the max of the bracket is kept in a heap
    (entries of finished requests are dropped lazily)."""

    def __init__(self) -> None:
        self.heap: list[tuple[int, int]] = []
        self.finished: set[int] = set()

    def add(self, r: int, tokens: int, step: int) -> None:
        heapq.heappush(self.heap, (-(tokens - step), r))

    def remove(self, r: int) -> None:
        self.finished.add(r)

    def at(self, step: int) -> int:
        while self.heap and self.heap[0][1] in self.finished:
            self.finished.discard(heapq.heappop(self.heap)[1])
        return step - self.heap[0][0] if self.heap else 0


def _step_context(timing: InstanceTiming, ctx: int, batch: int, longest: _Longest, step: int) -> float:
    """The context a decode step pays for: the batch's total, or batch x the longest if padded."""
    return batch * longest.at(step) if timing.padded else ctx


def _within_budget(
    timing: InstanceTiming, rows: int, tokens: int, longest: int, nxt: int, budget: int
) -> bool:
    """Whether one more prompt of `nxt` tokens may join a prefill batch: a padded engine's budget
    bounds rows x longest (what its forward computes), a packed one's the real tokens."""
    if timing.padded:
        return (rows + 1) * max(longest, nxt) <= budget
    return tokens + nxt <= budget


def _prefill_paid(
    timing: InstanceTiming, rows: int, longest: int, tokens: int, sum_sq: int
) -> tuple[int, int]:
    """(tokens, sum of squared lengths) a prefill batch pays for: its own, or padded to its longest."""
    if timing.padded:
        return rows * longest, rows * longest * longest
    return tokens, sum_sq


def _steps_until(dt: float, alpha: float, beta: float, ctx: float, batch: int) -> int:
    """Fewest decode steps (>= 1) whose total time reaches `dt`."""
    q = beta * batch / 2
    p = alpha + beta * ctx - q
    if q <= 0:
        return max(1, math.ceil(dt / p)) if p > 0 else 1
    return max(1, math.ceil((-p + math.sqrt(p * p + 4 * q * dt)) / (2 * q)))


def _advance(k: int, alpha: float, beta: float, ctx: float, batch: int) -> float:
    return k * alpha + beta * (k * ctx + batch * k * (k - 1) / 2)


def simulate_prefill(
    timing: InstanceTiming, arrivals: Sequence[float], inputs: Sequence[int], token_budget: int
) -> list[float]:
    """First-token time of each request on one FCFS prefill instance (arrivals sorted)."""
    n = len(arrivals)
    done = [0.0] * n
    free, i = 0.0, 0
    while i < n:
        start = max(free, arrivals[i])
        j, tokens, sq, longest = i, 0, 0, 0
        # Batch everything already waiting, in order, while the batch stays within the budget.
        while (
            j < n
            and arrivals[j] <= start
            and (j == i or _within_budget(timing, j - i, tokens, longest, inputs[j], token_budget))
        ):
            tokens += inputs[j]
            sq += inputs[j] * inputs[j]
            longest = max(longest, inputs[j])
            j += 1
        latency, busy = timing.prefill(*_prefill_paid(timing, j - i, longest, tokens, sq))
        for k in range(i, j):
            done[k] = start + latency
        free, i = start + busy, j
    return done


def simulate_decode(
    timing: InstanceTiming,
    ready: Sequence[float],
    inputs: Sequence[int],
    outputs: Sequence[int],
    kv_capacity: int,
    max_batch: int = 1 << 30,
) -> DecodeResult:
    """Last-token time of each request on one continuously batching decode instance.

    `ready` is when a request's KV can be on this instance (prefill end + transfer). A request is
    admitted FCFS at a step boundary when prompt+output tokens fit the free KV room (reserved up
    front, so nothing is ever preempted) and the batch has fewer than `max_batch` requests (the
    engine's limit); until then it waits in the prefill instance's memory.
    """
    n = len(ready)
    last = [INF] * n
    admitted = [INF] * n
    order = sorted(range(n), key=ready.__getitem__)
    running: list[tuple[int, int]] = []  # (step at which it finishes, request)
    longest = _Longest()
    t, step, ctx, used, q = 0.0, 0, 0, 0, 0
    memory_bound = False
    while q < n or running:
        while q < n and ready[order[q]] <= t and len(running) < max_batch:  # admit what is ready and fits
            r = order[q]
            need = inputs[r] + outputs[r]
            if need > kv_capacity:
                q += 1  # can never fit: reported as a miss
                continue
            if used + need > kv_capacity:
                memory_bound = True
                break
            q += 1
            admitted[r] = max(t, ready[r])
            if outputs[r] <= 1:
                last[r] = ready[r]
                continue
            heapq.heappush(running, (step + outputs[r] - 1, r))
            longest.add(r, inputs[r] + 1, step)
            used += need
            ctx += inputs[r] + 1
        if not running:
            if q < n:
                t = max(t, ready[order[q]])
            continue
        batch = len(running)
        a, b, c = timing.decode_abc(batch)
        alpha = a + c * batch
        paid = _step_context(timing, ctx, batch, longest, step)
        k = running[0][0] - step
        if q < n and ready[order[q]] > t and batch < max_batch:
            head = order[q]
            if used + inputs[head] + outputs[head] <= kv_capacity:
                k = min(k, _steps_until(ready[head] - t, alpha, b, paid, batch))
        t += _advance(k, alpha, b, paid, batch)
        step += k
        ctx += k * batch
        while running and running[0][0] == step:
            _, r = heapq.heappop(running)
            longest.remove(r)
            last[r] = t
            used -= inputs[r] + outputs[r]
            ctx -= inputs[r] + outputs[r]
    return DecodeResult(last, memory_bound, admitted)


def simulate_colocated(
    timing: InstanceTiming,
    arrivals: Sequence[float],
    inputs: Sequence[int],
    outputs: Sequence[int],
    kv_capacity: int,
    token_budget: int,
    max_batch: int = 1 << 30,
) -> tuple[list[float], list[float]]:
    """(first token, last token) on one instance doing both phases, prefill first (vLLM-style):
    whenever a request is waiting and fits, the next iteration is a prefill and decoding stalls."""
    n = len(arrivals)
    first, last = [INF] * n, [INF] * n
    running: list[tuple[int, int]] = []
    longest = _Longest()
    t, step, ctx, used, i = 0.0, 0, 0, 0, 0
    while i < n or running:
        while i < n and inputs[i] + outputs[i] > kv_capacity:
            i += 1  # can never fit
        if (
            i < n
            and arrivals[i] <= t
            and used + inputs[i] + outputs[i] <= kv_capacity
            and len(running) < max_batch
        ):
            j, tokens, sq, widest = i, 0, 0, 0
            while (
                j < n
                and arrivals[j] <= t
                and (j == i or _within_budget(timing, j - i, tokens, widest, inputs[j], token_budget))
                and used + inputs[j] + outputs[j] <= kv_capacity
                and len(running) + (j - i) < max_batch
            ):
                tokens += inputs[j]
                sq += inputs[j] * inputs[j]
                widest = max(widest, inputs[j])
                used += inputs[j] + outputs[j]
                j += 1
            t += timing.prefill(*_prefill_paid(timing, j - i, widest, tokens, sq))[0]
            for r in range(i, j):
                first[r] = t
                if outputs[r] <= 1:
                    last[r] = t
                    used -= inputs[r] + outputs[r]
                else:
                    heapq.heappush(running, (step + outputs[r] - 1, r))
                    longest.add(r, inputs[r] + 1, step)
                    ctx += inputs[r] + 1
            i = j
            continue
        if not running:
            if i < n:
                t = max(t, arrivals[i])
            continue
        batch = len(running)
        a, b, c = timing.decode_abc(batch)
        alpha = a + c * batch
        paid = _step_context(timing, ctx, batch, longest, step)
        k = running[0][0] - step
        if i < n and arrivals[i] > t and used + inputs[i] + outputs[i] <= kv_capacity and batch < max_batch:
            k = min(k, _steps_until(arrivals[i] - t, alpha, b, paid, batch))
        t += _advance(k, alpha, b, paid, batch)
        step += k
        ctx += k * batch
        while running and running[0][0] == step:
            _, r = heapq.heappop(running)
            longest.remove(r)
            last[r] = t
            used -= inputs[r] + outputs[r]
            ctx -= inputs[r] + outputs[r]
    return first, last


# ---------------------------------------------------------------------------- metrics


def tpot(first: Sequence[float], last: Sequence[float], outputs: Sequence[int]) -> list[float]:
    return [(lt - ft) / (o - 1) if o > 1 else 0.0 for ft, lt, o in zip(first, last, outputs, strict=True)]


def attainment(values: Sequence[float], limit: float) -> float:
    return sum(1 for v in values if v <= limit) / len(values) if values else 0.0


def joint_attainment(
    ttft: Sequence[float], tpots: Sequence[float], ttft_slo: float, tpot_slo: float
) -> float:
    good = sum(1 for a, b in zip(ttft, tpots, strict=True) if a <= ttft_slo and b <= tpot_slo)
    return good / len(ttft) if ttft else 0.0


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


@dataclass(frozen=True)
class Outcome:
    """Per-request latencies of one simulated run."""

    ttft: list[float]
    tpot: list[float]
    memory_bound: bool = False
    # Peak KV tokens a prefill instance held for requests waiting for decode room, over its capacity.
    prefill_memory_peak: float = 0.0

    def attainment(self, ttft_slo: float, tpot_slo: float) -> float:
        return joint_attainment(self.ttft, self.tpot, ttft_slo, tpot_slo)


def simulate_disaggregated(
    prefill: Sequence[InstanceTiming],
    decode: Sequence[InstanceTiming],
    decode_kv_capacity: int,
    transfer_ms: Callable[[int], float],
    arrivals: Sequence[float],
    inputs: Sequence[int],
    outputs: Sequence[int],
    token_budget: int,
    prefill_kv_capacity: int | None = None,
    max_batch: int = 1 << 30,
) -> Outcome:
    """The whole plan: requests go round-robin to prefill instances, then in first-token order
    round-robin to decode instances (both routers spread load evenly). The prefill's memory is
    checked afterwards rather than enforced: `prefill_memory_peak` > 1 means backpressure would
    have delayed prefills."""
    n = len(arrivals)
    first = [0.0] * n
    for k, timing in enumerate(prefill):
        idx = list(range(k, n, len(prefill)))
        done = simulate_prefill(timing, [arrivals[r] for r in idx], [inputs[r] for r in idx], token_budget)
        for r, d in zip(idx, done, strict=True):
            first[r] = d
    by_first = sorted(range(n), key=first.__getitem__)
    last = [0.0] * n
    left_prefill = [0.0] * n
    memory_bound = False
    for k, timing in enumerate(decode):
        idx = by_first[k :: len(decode)]
        result = simulate_decode(
            timing,
            [first[r] + transfer_ms(inputs[r]) for r in idx],
            [inputs[r] for r in idx],
            [outputs[r] for r in idx],
            decode_kv_capacity,
            max_batch,
        )
        memory_bound |= result.memory_bound
        for r, lt, adm in zip(idx, result.last_token, result.admitted, strict=True):
            last[r] = lt
            left_prefill[r] = adm
    ttft = [f - a for f, a in zip(first, arrivals, strict=True)]
    peak = 0.0
    if prefill_kv_capacity:
        for k in range(len(prefill)):
            mine = range(k, n, len(prefill))
            peak = max(peak, _peak_held(mine, first, left_prefill, inputs) / prefill_kv_capacity)
    return Outcome(ttft, tpot(first, last, outputs), memory_bound, peak)


def _peak_held(
    idx: Iterable[int], start: Sequence[float], end: Sequence[float], tokens: Sequence[int]
) -> int:
    """Most tokens held at once by requests each held from start[r] to end[r]."""
    events = sorted(
        [(start[r], tokens[r]) for r in idx] + [(end[r], -tokens[r]) for r in idx], key=lambda e: (e[0], e[1])
    )
    held = peak = 0
    for _, delta in events:
        held += delta
        peak = max(peak, held)
    return peak
