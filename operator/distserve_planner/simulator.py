"""Discrete-event simulation of prefill, decode and colocated instances. Times are milliseconds.

Lifecycle of a request: arrives -> waits FCFS for a prefill batch (up to a token budget) -> first
token at the end of its batch (TTFT) -> waits in the prefill instance's memory until a decode
instance has KV room for prompt+output -> KV is pulled (transfer time from the link) -> one token
per decode step of a continuously batched decode instance -> done. TPOT = (last token - first
token) / (output tokens - 1). A colocated instance runs both phases on one device, in the order
its engine gives them (`ColocatedScheduling`): ours alternates them on one forward thread.

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
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

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


def _finish(
    step: int,
    t: float,
    running: list[tuple[int, int]],
    longest: _Longest,
    last: list[float],
    inputs: Sequence[int],
    outputs: Sequence[int],
) -> int:
    """The requests whose last token is step `step`'s (at `t`) leave the batch: the KV tokens they free."""
    freed = 0
    while running and running[0][0] == step:
        _, r = heapq.heappop(running)
        longest.remove(r)
        last[r] = t
        freed += inputs[r] + outputs[r]
    return freed


def _prefill_batch(
    timing: InstanceTiming, arrivals: Sequence[float], inputs: Sequence[int], i: int, by: float, budget: int
) -> tuple[int, int, int, int]:
    """The prompts from `i` on that arrived by `by`, in order, while the batch stays within the
    token budget (at least one): (end index, tokens, sum of squared lengths, longest)."""
    n = len(arrivals)
    j, tokens, sq, longest = i, 0, 0, 0
    while (
        j < n
        and arrivals[j] <= by
        and (j == i or _within_budget(timing, j - i, tokens, longest, inputs[j], budget))
    ):
        tokens += inputs[j]
        sq += inputs[j] * inputs[j]
        longest = max(longest, inputs[j])
        j += 1
    return j, tokens, sq, longest


def simulate_prefill(
    timing: InstanceTiming, arrivals: Sequence[float], inputs: Sequence[int], token_budget: int
) -> list[float]:
    """First-token time of each request on one FCFS prefill instance (arrivals sorted)."""
    n = len(arrivals)
    done = [0.0] * n
    free, i = 0.0, 0
    while i < n:
        start = max(free, arrivals[i])
        j, tokens, sq, longest = _prefill_batch(timing, arrivals, inputs, i, start, token_budget)
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
        freed = _finish(step, t, running, longest, last, inputs, outputs)
        used, ctx = used - freed, ctx - freed
    return DecodeResult(last, memory_bound, admitted)


class ColocatedScheduling(Enum):
    """How one colocated instance orders its prefill and decode forwards."""

    # `distserve worker colocated` (worker/distserve_worker/colocated.py), what the operator
    # deploys: the prefill half and the decode engine share ONE forward thread, FIFO, each with at
    # most one forward submitted at a time, so under load they alternate. A prefill batch is taken
    # when it is submitted (the batch loop takes the queued prompts when the first one arrives, or
    # when the previous prefill ended), so a prompt arriving while it waits for the running decode
    # step is not in it; it goes into the next one. The prefill half knows nothing of decode
    # slots: a prompt is prefilled (first token out) even when the decode batch is full, and its
    # wait for a slot falls into TPOT. A decode step's rows are fixed when it is submitted (at the
    # end of the previous step): a sequence ready by then joins it, one admitted then (a slot just
    # freed) is fetched during it and joins the next.
    WORKER = "worker"
    # vLLM's scheduler (the paper's colocated baseline, scored with vLLM's own profile): a waiting
    # request that has a batch slot and KV room is prefilled before the next decode step.
    PREFILL_FIRST = "prefill-first"


def simulate_colocated(
    timing: InstanceTiming,
    arrivals: Sequence[float],
    inputs: Sequence[int],
    outputs: Sequence[int],
    kv_capacity: int,
    token_budget: int,
    max_batch: int = 1 << 30,
    scheduling: ColocatedScheduling = ColocatedScheduling.WORKER,
) -> tuple[list[float], list[float]]:
    """(first token, last token) of each request on one instance doing both phases (arrivals
    sorted). The default models the colocated worker we deploy (what the planner assumes, the
    runtime obeys); PREFILL_FIRST stays for a baseline scored as another engine runs it."""
    if scheduling is ColocatedScheduling.PREFILL_FIRST:
        return _prefill_first(timing, arrivals, inputs, outputs, kv_capacity, token_budget, max_batch)
    return _one_forward_thread(timing, arrivals, inputs, outputs, kv_capacity, token_budget, max_batch)


def _one_forward_thread(
    timing: InstanceTiming,
    arrivals: Sequence[float],
    inputs: Sequence[int],
    outputs: Sequence[int],
    kv_capacity: int,
    token_budget: int,
    max_batch: int,
) -> tuple[list[float], list[float]]:
    """ColocatedScheduling.WORKER. The thread runs what was submitted in submission order; the
    next prefill batch is formed at `formed` (its first prompt's arrival, or the end of the last
    prefill if prompts were already queued then), the next decode step at `step_submitted`. Runs
    of decode steps with nothing submitted between them advance in closed form, as in
    `simulate_decode`."""
    n = len(arrivals)
    first, last = [INF] * n, [INF] * n
    running: list[tuple[int, int]] = []  # (step at which it finishes, request): the decode batch
    longest = _Longest()
    waiting: deque[int] = deque()  # prefilled, waiting for a slot and KV room (cache held by prefill)
    joining: list[int] = []  # admitted: rows of the next decode step submitted
    t, step, ctx, used, q = 0.0, 0, 0, 0, 0  # arrivals[q:] are in no prefill batch yet
    prefilled = -INF  # when the last prefill forward ended
    step_submitted: float | None = None  # a decode step waits for the thread (submitted then)

    def admit() -> None:  # the decode scheduler's FIFO admission: a slot and KV room
        nonlocal used
        while waiting and len(running) + len(joining) < max_batch:
            need = inputs[waiting[0]] + outputs[waiting[0]]
            if used + need > kv_capacity:
                break
            used += need
            joining.append(waiting.popleft())

    def submit() -> bool:
        """The decode lane submits its next step: the sequences ready join it; those admitted now
        are fetched during it and join the next one. False: nothing to run (the lane sleeps)."""
        nonlocal ctx
        while True:
            for r in joining:
                heapq.heappush(running, (step + outputs[r] - 1, r))
                longest.add(r, inputs[r] + 1, step)
                ctx += inputs[r] + 1
            joining.clear()
            admit()
            if running or not joining:
                return bool(running)
            # Nothing running yet: the lane sleeps until these fetches wake it, at once.

    while q < n or step_submitted is not None:
        formed = max(arrivals[q], prefilled) if q < n else INF
        if step_submitted is None or formed <= step_submitted:  # a prefill forward
            t = max(t, formed)
            j, tokens, sq, widest = _prefill_batch(timing, arrivals, inputs, q, formed, token_budget)
            t += timing.prefill(*_prefill_paid(timing, j - q, widest, tokens, sq))[0]
            prefilled = t
            for r in range(q, j):
                first[r] = t
                if outputs[r] <= 1:
                    last[r] = t
                elif inputs[r] + outputs[r] <= kv_capacity:  # else decode refuses it: a miss
                    waiting.append(r)
            q = j
            admit()
            if step_submitted is None and submit():
                step_submitted = t  # after the next prefill batch, if prompts are queued already
            continue
        # Decode steps: k of them, until a finish, a sequence joining, or a prefill submitted.
        t = max(t, step_submitted)
        batch = len(running)
        a, b, c = timing.decode_abc(batch)
        alpha = a + c * batch
        paid = _step_context(timing, ctx, batch, longest, step)
        k = 1 if joining or formed <= t else running[0][0] - step
        if k > 1 and formed < INF:  # the step during which the next prefill is submitted is the last
            k = min(k, _steps_until(formed - t, alpha, b, paid, batch))
        t += _advance(k, alpha, b, paid, batch)
        step += k
        ctx += k * batch
        freed = _finish(step, t, running, longest, last, inputs, outputs)
        used, ctx = used - freed, ctx - freed
        step_submitted = t if submit() else None
    return first, last


def _prefill_first(
    timing: InstanceTiming,
    arrivals: Sequence[float],
    inputs: Sequence[int],
    outputs: Sequence[int],
    kv_capacity: int,
    token_budget: int,
    max_batch: int,
) -> tuple[list[float], list[float]]:
    """ColocatedScheduling.PREFILL_FIRST: whenever a request is waiting and fits (a batch slot and
    KV room for prompt+output), the next iteration is a prefill and decoding stalls; a request that
    does not fit is not prefilled (its TTFT waits for the slot). It joins the very next step."""
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
        freed = _finish(step, t, running, longest, last, inputs, outputs)
        used, ctx = used - freed, ctx - freed
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
