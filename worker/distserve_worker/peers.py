"""How a peer of this instance fails: the errors the decode engine handles, apart from the gRPC
clients that raise them (so the engine needs no gRPC: `make lint`'s import contracts)."""

from __future__ import annotations


class KVPullError(RuntimeError):
    """The cache could not be pulled (instance gone, cache expired, corrupt data)."""


class StageChainBroken(RuntimeError):
    """A stage of this instance is gone or failed; the instance cannot serve until it is whole."""


class RankGroupBroken(RuntimeError):
    """A rank of this instance died or failed; the instance cannot serve until it is restarted."""
