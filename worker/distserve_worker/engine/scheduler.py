"""Decode-side admission and batching decisions, as a plain data structure (no torch, no I/O).

Admission is by slots (the batch size limit) and by KV tokens (each admitted sequence reserves its
prompt plus max_tokens, so a running sequence can never run out of cache). A waiting sequence is
admitted FIFO when both fit; only then does the worker pull its KV cache, so the prefill instance's
buffer is the queue, as DistServe prescribes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from distserve_worker.engine.sequence import Finish, SeqStatus, Sequence


@dataclass
class DecodeScheduler:
    max_running: int
    max_kv_tokens: int
    waiting: deque[Sequence] = field(default_factory=deque)
    admitted: list[Sequence] = field(default_factory=list)  # PULLING, READY or RUNNING

    @property
    def reserved_tokens(self) -> int:
        return sum(s.reserved_tokens for s in self.admitted)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_running - len(self.admitted))

    def fits_ever(self, seq: Sequence) -> bool:
        return seq.reserved_tokens <= self.max_kv_tokens

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences that fit into PULLING (FIFO: a big one at the head is not overtaken)."""
        started = []
        while self.waiting and len(self.admitted) < self.max_running:
            head = self.waiting[0]
            if self.reserved_tokens + head.reserved_tokens > self.max_kv_tokens:
                break
            self.waiting.popleft()
            head.status = SeqStatus.PULLING
            self.admitted.append(head)
            started.append(head)
        return started

    def mark_ready(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.PULLING:
            seq.status = SeqStatus.READY

    def running(self) -> list[Sequence]:
        """The batch of the next step: every READY sequence joins the RUNNING ones, in admission order."""
        batch = []
        for seq in self.admitted:
            if seq.status is SeqStatus.READY:
                seq.status = SeqStatus.RUNNING
            if seq.status is SeqStatus.RUNNING:
                batch.append(seq)
        return batch

    def finish(self, seq: Sequence, reason: Finish) -> None:
        """Finish a sequence wherever it is; its slot and reservation are freed at once."""
        if seq.finished:
            return
        seq.status = SeqStatus.FINISHED
        seq.finish = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.admitted:
            self.admitted.remove(seq)

    def counts(self) -> tuple[int, int]:
        """(queued, running): waiting or pulling, and in the batch."""
        running = sum(1 for s in self.admitted if s.status in (SeqStatus.RUNNING, SeqStatus.READY))
        return len(self.waiting) + len(self.admitted) - running, running


@dataclass
class PrefillBatcher:
    """FIFO queue of prompts; a batch takes prompts in order while the padded batch (prompts x the
    longest prompt, what a right-padded forward computes) stays within the token budget. Counting
    only real tokens let 30 short prompts join one long one: 1,750 real tokens, 8,100 computed,
    a 31 s forward on SmolLM2 on a CPU core."""

    token_budget: int
    queue: deque[tuple[str, int]] = field(default_factory=deque)  # (request_id, prompt tokens)

    def add(self, request_id: str, tokens: int) -> None:
        self.queue.append((request_id, tokens))

    def remove(self, request_id: str) -> None:
        self.queue = deque(item for item in self.queue if item[0] != request_id)

    def next_batch(self) -> list[str]:
        batch: list[str] = []
        longest = 0
        while self.queue:
            request_id, tokens = self.queue[0]
            # A prompt longer than the budget still runs, alone.
            if batch and (len(batch) + 1) * max(longest, tokens) > self.token_budget:
                break
            self.queue.popleft()
            batch.append(request_id)
            longest = max(longest, tokens)
        return batch
