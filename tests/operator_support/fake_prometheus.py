"""A real HTTP server answering Prometheus instant queries (`/api/v1/query`) for the router's
series: each query is answered from the current traffic by the metric it asks about."""

from __future__ import annotations

from aiohttp import web

from .fake_router import Traffic
from .local_http import LoopbackServer


class FakePrometheus(LoopbackServer):
    def __init__(self, traffic: Traffic) -> None:
        super().__init__()
        self.traffic = traffic
        self.queries: list[str] = []

    def answer(self, query: str) -> float | None:
        t = self.traffic
        if query.startswith("100 *"):
            return t.attainment_percent
        if "histogram_quantile" in query:
            return t.prompt_mean * 1.5 if "prompt" in query else t.output_mean * 1.5
        if "_sum" in query:  # mean = rate(sum) / rate(count), answered as one expression
            return t.prompt_mean if "prompt" in query else t.output_mean
        if "distserve_requests_total" in query:
            return t.requests_per_second
        return None

    def app(self) -> web.Application:
        async def query(request: web.Request) -> web.Response:
            q = request.query.get("query", "")
            self.queries.append(q)
            value = self.answer(q)
            result = [] if value is None else [{"metric": {}, "value": [0, str(value)]}]
            return web.json_response(
                {"status": "success", "data": {"resultType": "vector", "result": result}}
            )

        app = web.Application()
        app.router.add_get("/api/v1/query", query)
        return app
