"""What every rank of a tensor-parallel instance does at start, rank 0 and followers alike.

Join the instance's process group (NCCL on CUDA, gloo on the CPU; a TCP store on loopback that rank
0 hosts), load the model on the CPU, keep this rank's shard and move it to this rank's device. The
ranks then run the same start-up forward (the KV layout probe), so their collectives line up from
the first one.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from distserve_worker.model_source import ModelSpec, load_model
from distserve_worker.tp.shard import shard_model

# A collective that waits longer than this fails: a rank that died mid-step is usually seen at once
# (its sockets close); this bounds the case of a rank that hangs.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)
# Joining waits for every rank to start its interpreter and import torch.
JOIN_TIMEOUT = datetime.timedelta(seconds=300)


@dataclass(frozen=True)
class RankPlace:
    rank: int
    world: int
    store_port: int

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.rank % torch.cuda.device_count())
        return torch.device("cpu")

    @property
    def backend(self) -> str:
        # NCCL needs a device per rank; ranks sharing a GPU (a check on a one-GPU machine) use gloo,
        # which is correct but slow: a test path, not a serving one.
        if self.device.type == "cuda" and torch.cuda.device_count() >= self.world:
            return "nccl"
        return "gloo"


def host_store(world: int) -> dist.TCPStore:
    """Rank 0's store on a free loopback port (`store.port`): ranks are processes of one pod."""
    return dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=JOIN_TIMEOUT, wait_for_workers=False)


def join(place: RankPlace, store: dist.TCPStore | None = None) -> dist.TCPStore:
    """Join the instance's process group; returns the store (followers publish their address in it)."""
    if store is None:
        store = dist.TCPStore(
            "127.0.0.1", place.store_port, place.world, is_master=False, timeout=JOIN_TIMEOUT
        )
    if place.device.type == "cuda":
        torch.cuda.set_device(place.device)
    dist.init_process_group(
        place.backend, store=store, rank=place.rank, world_size=place.world, timeout=COLLECTIVE_TIMEOUT
    )
    return store


def load_shard(spec: ModelSpec, place: RankPlace, layers: tuple[int, int] | None = None) -> tuple[Any, Any]:
    """(model shard on this rank's device, tokenizer): this rank's heads of this pipeline stage's
    `layers` (all of them by default)."""
    from distserve_worker.pp.partial import keep_stage

    started = time.perf_counter()
    model, tokenizer = load_model(spec, device="cpu")
    if layers is not None:
        model = keep_stage(model, *layers)  # before sharding: only this stage's layers get sharded
    model = shard_model(model, place.world, place.rank).to(place.device).eval()
    print(
        f"[distserve] rank {place.rank}/{place.world}: shard on {place.device} in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return model, tokenizer


def kv_heads_of(model: Any) -> int:
    """The model's key/value heads (all ranks together)."""
    from distserve_worker.contract import model_shape

    return model_shape(model.config)[2]


def broadcast_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """Rank 0 of a pipeline stage after the first: its input hidden states to the stage's other
    ranks (NCCL on GPUs: device to device; gloo on the CPU). Call inside the forward, in order."""
    hidden = hidden.contiguous()
    dist.broadcast(hidden, src=0)
    return hidden


def receive_hidden(shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A follower's side of `broadcast_hidden`."""
    hidden = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(hidden, src=0)
    return hidden
