"""The real HTTP the test fakes speak: an aiohttp app on a free loopback port, inside `async with`."""

from __future__ import annotations

from typing import Self

from aiohttp import web


class LoopbackServer:
    """Subclasses give their routes (`app`) and the `path` their `url` points at."""

    path = ""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"
