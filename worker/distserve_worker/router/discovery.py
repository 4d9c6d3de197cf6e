"""Finding instances: a fixed list (local mode) or the DNS records of a headless Service (cluster).

A headless Service `<name>-prefill` resolves to one A record per ready pod, so re-resolving every
few seconds follows scale-up, scale-down and restarts without talking to the Kubernetes API.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class StaticDiscovery:
    addresses: tuple[str, ...]

    async def resolve(self) -> list[str]:
        return list(self.addresses)


@dataclass(frozen=True)
class DnsDiscovery:
    host: str
    port: int

    async def resolve(self) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return []  # no ready pods yet (or the Service is gone): nothing to route to
        hosts = sorted({info[4][0] for info in infos})
        return [f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}" for h in hosts]
