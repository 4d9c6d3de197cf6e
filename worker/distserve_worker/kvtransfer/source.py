"""Where a decode engine gets a request's KV cache from: the `KVSource` interface.

- `PullSource`: the disaggregated case. Pulls this instance's heads over gRPC from the prefill
  rank(s) that hold them (rank 0's own pieces here, each follower rank's by itself, each later
  pipeline stage its own layers, all at once; see `tp/heads.py`, `pp/pieces.py`), then releases
  the cache on every prefill rank.
- `LocalSource`: the cache is already in this process (the colocated baseline, engine tests): it
  is taken from the prefill side's buffer as tensors, with no encoding, no loopback gRPC and no copy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_worker.engine.kvcache import SequenceKV
from distserve_worker.engine.runner import KVLayout
from distserve_worker.engine.sequence import Sequence
from distserve_worker.kvtransfer.buffer import KVBuffer
from distserve_worker.kvtransfer.reshard import pull_kv_pieces
from distserve_worker.kvtransfer.transport import KVPuller
from distserve_worker.peers import KVPullError
from distserve_worker.pp.chain import StageChain
from distserve_worker.pp.partial import StageSpan
from distserve_worker.pp.pieces import SourceStage, pieces_to_pull
from distserve_worker.tp.group import RankGroup


@dataclass
class Fetched:
    kv: SequenceKV  # rank 0's heads (followers keep theirs)
    nbytes: int  # moved for all ranks


class KVSource(Protocol):
    async def fetch(self, seq: Sequence) -> Fetched:
        """The cache of `seq`; KVPullError (or RankGroupBroken) when it cannot be had."""
        ...

    async def release(self, seq: Sequence) -> None:
        """The holder may free it (best effort)."""
        ...


class PullSource:
    """Pulls this instance's part of a request's cache: each of its stages its own layers (stage 0
    here, later stages told to through the chain), each rank its own heads of them."""

    def __init__(
        self,
        puller: KVPuller,
        layout: KVLayout,
        kv_heads: int,
        tp: int,
        group: RankGroup | None,
        max_chunk_bytes: int,
        timeout: float,
        span: StageSpan | None = None,
        chain: StageChain | None = None,
    ) -> None:
        """`span`: this stage's layers of the model (all of them when None)."""
        self.puller = puller
        self.layout = layout
        self.kv_heads = kv_heads
        self.tp = tp
        self.group = group
        self.max_chunk_bytes = max_chunk_bytes
        self.timeout = timeout
        self.total_layers = span.total if span is not None else layout.num_layers
        self.layers = (span.start, span.end) if span is not None else (0, self.total_layers)
        self.chain = chain

    @staticmethod
    def addresses(seq: Sequence) -> list[str]:
        return list(seq.kv_sources) or [seq.kv_address]

    def sources(self, seq: Sequence) -> list[SourceStage]:
        """The prefill stages holding the cache (one, holding every layer, without pipeline stages)."""
        if seq.kv_stages:
            return list(seq.kv_stages)
        return [SourceStage((0, self.total_layers), tuple(self.addresses(seq)))]

    async def fetch(self, seq: Sequence) -> Fetched:
        sources = self.sources(seq)
        try:
            plans = [pieces_to_pull(sources, self.layers, self.kv_heads, self.tp, r) for r in range(self.tp)]
        except ValueError as exc:
            raise KVPullError(f"request {seq.request_id}: {exc}") from exc
        own = pull_kv_pieces(
            self.puller,
            seq.request_id,
            seq.prompt_tokens,
            plans[0],
            self.layout,
            self.max_chunk_bytes,
            self.timeout,
        )
        others = [
            self.group.pull(rank, seq.request_id, seq.prompt_tokens, plans[rank], self.timeout)
            for rank in range(1, self.tp)
            if self.group is not None
        ]
        if self.chain is not None:
            wire = [
                gen.KVStage(layer_start=s.layers[0], layer_end=s.layers[1], ranks=s.ranks) for s in sources
            ]
            others += [
                self.chain.pull(stage, seq.request_id, seq.prompt_tokens, wire, self.timeout)
                for stage in range(1, self.chain.pp)
            ]
        kv, *pulled = await asyncio.gather(own, *others)
        return Fetched(kv, kv.nbytes + sum(p.bytes for p in pulled))

    async def release(self, seq: Sequence) -> None:
        """Every prefill rank of every stage frees its part (every decode rank holds its own now)."""
        addresses = {a for s in self.sources(seq) for a in s.ranks}
        await asyncio.gather(*(self.puller.release(a, seq.request_id) for a in sorted(addresses)))


class LocalSource:
    """The prefill side's buffer in this same process; it must store caches as tensors."""

    def __init__(self, buffer: KVBuffer) -> None:
        self.buffer = buffer

    async def fetch(self, seq: Sequence) -> Fetched:
        held = self.buffer.get(seq.request_id)
        if not isinstance(held, SequenceKV):
            raise KVPullError(f"no KV cache held in this process for request {seq.request_id!r}")
        return Fetched(held, 0)  # nothing moved

    async def release(self, seq: Sequence) -> None:
        await self.buffer.release(seq.request_id)


class LocalFirstSource:
    """The colocated baseline: a cache this process holds is taken in-process; one another
    colocated instance holds (a router may pair any prefill with any decode) is pulled."""

    def __init__(self, local: LocalSource, remote: KVSource, own_address: str) -> None:
        self.local, self.remote, self.own = local, remote, own_address

    def _pick(self, seq: Sequence) -> KVSource:
        return self.local if seq.kv_address == self.own else self.remote

    async def fetch(self, seq: Sequence) -> Fetched:
        return await self._pick(seq).fetch(seq)

    async def release(self, seq: Sequence) -> None:
        await self._pick(seq).release(seq)
