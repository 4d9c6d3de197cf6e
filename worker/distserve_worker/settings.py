"""One typed settings object per process role, filled from flags (and env, see cli_worker)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from distserve_worker.model_source import ModelSpec

MiB = 1024 * 1024


@dataclass(frozen=True)
class WorkerSettings:
    """Common to prefill and decode instances."""

    model: ModelSpec = field(default_factory=ModelSpec)
    host: str = "127.0.0.1"
    port: int = 50051  # gRPC
    http_port: int = 8081  # /healthz, /readyz, /metrics
    # The address other instances use to reach this one (in a pod: its DNS name or IP).
    advertise: str = ""
    instance: str = ""
    threads: int = 0  # torch threads; 0 = torch's default
    max_chunk_bytes: int = 2 * MiB  # KV transfer chunk size (and the gRPC message limit)
    # What the runtime contract says this process runs (see distserve_operator.api.runtime).
    tp: int = 1  # tensor-parallel ranks of this instance, one device each
    pp: int = 1
    stage: int = 0
    layers: tuple[int, int] | None = None  # [start, end) of this stage; None: the whole model
    # gRPC addresses of every pipeline stage of this instance, stage 0 first (pp > 1; from the
    # contract's address templates or --stage-addresses).
    stage_addresses: tuple[str, ...] = ()
    rank_port_base: int = 0  # follower rank r serves gRPC on this + r; 0: free ports (local mode)
    # After SIGTERM: at most this long to finish what the instance holds before giving it up and
    # exiting (drain.py); 0: SIGTERM stops at once. Below the pod's terminationGracePeriodSeconds.
    drain_seconds: float = 30.0

    @property
    def address(self) -> str:
        """Where decode instances pull KV caches from. Listening on all interfaces says nothing about
        how others reach us, so then this host's own address is used (a pod's IP in Kubernetes)."""
        if self.advertise:
            return self.advertise
        if self.host in ("0.0.0.0", "::", ""):
            return f"{socket.gethostbyname(socket.gethostname())}:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class PrefillSettings(WorkerSettings):
    token_budget: int = 2048  # prompt tokens per prefill forward
    kv_buffer_bytes: int = 512 * MiB  # KV caches held while waiting to be pulled
    kv_ttl_seconds: float = 60.0  # a cache nobody pulled within this is freed
    decode_tp: int = 1  # decode instances' tp: each rank prepares its KV for their head ranges
    # Decode instances' stage layer ranges: each rank prepares its KV for their layer ranges too;
    # empty: decode holds every layer in one stage.
    decode_layers: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class DecodeSettings(WorkerSettings):
    port: int = 50052
    http_port: int = 8082
    max_batch: int = 32  # sequences per decode step
    max_kv_tokens: int = 65536  # cached tokens across the batch (prompt + max_tokens reserved per sequence)
    pull_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class RouterSettings:
    model: ModelSpec = field(default_factory=ModelSpec)
    host: str = "127.0.0.1"
    port: int = 8000
    prefill: tuple[str, ...] = ()  # static host:port addresses (local mode)
    decode: tuple[str, ...] = ()
    # Cluster mode: resolve these DNS names (headless Services) to find every instance.
    prefill_dns: str = ""
    decode_dns: str = ""
    prefill_port: int = 50051
    decode_port: int = 50052
    refresh_seconds: float = 2.0  # how often instances are re-resolved and polled
    request_timeout_seconds: float = 300.0
    # Overload (router/admission.py): requests waiting for an instance beyond the free capacity
    # of the decode instances, per role line; one more gets 503 with Retry-After at once.
    max_queue: int = 128
    # Longest a request waits for an instance of one role (every one saturated, or none ready)
    # before a 503 with Retry-After. Keep it under the prefill KV TTL: a request waiting for decode
    # holds its cache there.
    queue_timeout_seconds: float = 30.0
    max_tokens_default: int = 256
    slo_ttft_seconds: float | None = None
    slo_tpot_seconds: float | None = None
    # The API keys clients must send (router/auth.py): a file, one key a line; "" = no keys needed.
    api_key_file: str = ""
