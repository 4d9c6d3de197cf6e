"""API keys on the router's `/v1/*` endpoints (`--api-key-file`).

The file holds the allowed keys, one a line (blank lines ignored), so a rotation can overlap: add
the new key, move clients, drop the old one. In a cluster it is a Secret mounted as a file, which
the kubelet updates in place; the router re-reads it when its mtime changes, checking at most once
a second, so a rotated Secret takes effect without a restart. A file that cannot be read then keeps
the keys read last. Keys are never logged, and are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from distserve_worker.router.openai import error_body

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: no key
CHECK_EVERY_SECONDS = 1.0


def _signature(path: Path) -> tuple[int, int, int]:
    """What changes when the file does: the kubelet writes a new file and swaps a symlink to it."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def read_keys(path: Path) -> tuple[bytes, ...]:
    """The keys in the file: one a line, surrounding whitespace and blank lines dropped."""
    lines = path.read_bytes().decode("utf-8").splitlines()
    return tuple(key.encode() for key in (line.strip() for line in lines) if key)


class ApiKeys:
    """The allowed keys, from a file re-read when it changes."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.clock = clock
        self._seen = _signature(self.path)  # OSError at start-up: the router does not start
        self._keys = read_keys(self.path)
        self._checked = clock()

    @property
    def count(self) -> int:
        return len(self._keys)

    def keys(self) -> tuple[bytes, ...]:
        """The current keys, re-read if the file changed (its mtime, inode or size; looked at once a
        second at most)."""
        now = self.clock()
        if now - self._checked >= CHECK_EVERY_SECONDS:
            self._checked = now
            try:
                seen = _signature(self.path)
                if seen != self._seen:
                    self._keys, self._seen = read_keys(self.path), seen
            except (OSError, UnicodeDecodeError) as exc:  # mid-update: keep the last keys, retry next time
                print(
                    f"[distserve] router: cannot read the API key file {self.path}: {exc.__class__.__name__}"
                )
        return self._keys

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header carries one of the keys (`Bearer <key>`)."""
        if not authorization:
            return False
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        candidate = presented.strip().encode()
        if not candidate:
            return False
        # Every key is compared, each in constant time: neither which key nor how much of it matched
        # shows in the timing.
        matched = False
        for key in self.keys():
            matched |= hmac.compare_digest(candidate, key)
        return matched


def unauthorized(missing: bool) -> web.Response:
    """401 in OpenAI's shape."""
    message = (
        "You didn't provide an API key: send it as 'Authorization: Bearer <key>'"
        if missing
        else "Incorrect API key provided"
    )
    response = web.json_response(
        error_body(message, "invalid_request_error", None, "invalid_api_key"), status=401
    )
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def auth_middleware(keys: ApiKeys, refused: Callable[[], None] = lambda: None) -> Callable[..., object]:
    """Every request but `/healthz`, `/readyz` and `/metrics` needs a key (the `/v1/*` API, and
    any other path, so a path spelled another way is refused too, not let through)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            header = request.headers.get("Authorization")
            if not keys.allows(header):
                refused()
                return unauthorized(missing=not header)
        return await handler(request)

    return middleware
