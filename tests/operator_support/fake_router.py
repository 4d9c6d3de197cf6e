"""A real HTTP server playing the router: Prometheus text whose counters grow with wall time at
the rate the test sets (as a router under that traffic would report them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .local_http import LoopbackServer

PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)
OUTPUT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Traffic:
    requests_per_second: float
    prompt_mean: float = 512
    output_mean: float = 128
    attainment_percent: float = 99.0


class FakeRouter(LoopbackServer):
    path = "/metrics"

    def __init__(self, traffic: Traffic, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock`: wall time by default; a replay passes its virtual clock."""
        super().__init__()
        self.traffic = traffic
        self.clock = clock
        self._t = clock()
        self.requests = 0.0
        self.attained = 0.0
        self.prompt_sum = 0.0
        self.output_sum = 0.0
        self.scrapes = 0

    def set(self, traffic: Traffic) -> None:
        self._advance()
        self.traffic = traffic

    def _advance(self) -> None:
        now = self.clock()
        n = self.traffic.requests_per_second * (now - self._t)
        self._t = now
        self.requests += n
        self.attained += n * self.traffic.attainment_percent / 100
        self.prompt_sum += n * self.traffic.prompt_mean
        self.output_sum += n * self.traffic.output_mean

    def _hist(self, name: str, bounds: tuple[int, ...], total_sum: float, mean: float) -> list[str]:
        # Every request of the current traffic lands in the bucket holding its mean length.
        lines = [f"# HELP {name} lengths", f"# TYPE {name} histogram"]
        for le in bounds:
            count = self.requests if le >= mean else 0.0
            lines.append(f'{name}_bucket{{model="m",le="{le}"}} {count}')
        lines += [
            f'{name}_bucket{{model="m",le="+Inf"}} {self.requests}',
            f'{name}_sum{{model="m"}} {total_sum}',
            f'{name}_count{{model="m"}} {self.requests}',
        ]
        return lines

    def render(self) -> str:
        self._advance()
        self.scrapes += 1
        t = self.traffic
        lines = [
            "# HELP distserve_requests_total Requests.",
            "# TYPE distserve_requests_total counter",
            f'distserve_requests_total{{model="m"}} {self.requests}',
            "# HELP distserve_slo_attained_total Met both.",
            "# TYPE distserve_slo_attained_total counter",
            f'distserve_slo_attained_total{{model="m"}} {self.attained}',
            "# HELP distserve_slo_missed_total Missed.",
            "# TYPE distserve_slo_missed_total counter",
            f'distserve_slo_missed_total{{model="m"}} {self.requests - self.attained}',
            "# HELP distserve_queue_requests Queued.",
            "# TYPE distserve_queue_requests gauge",
            'distserve_queue_requests{role="prefill"} 3',
        ]
        lines += self._hist("distserve_request_prompt_tokens", PROMPT_BUCKETS, self.prompt_sum, t.prompt_mean)
        lines += self._hist("distserve_request_output_tokens", OUTPUT_BUCKETS, self.output_sum, t.output_mean)
        return "\n".join(lines) + "\n"

    def app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=self.render(), content_type="text/plain")

        app = web.Application()
        app.router.add_get(self.path, metrics)
        return app
