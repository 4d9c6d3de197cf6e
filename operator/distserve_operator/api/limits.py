"""Engine limits: the batch and memory bounds the planner simulates and the workers run.

One model for both sides, so that a plan and the runtime cannot disagree on them: the planner
writes the limits it simulated into `PlanStatus.limits`, the operator copies them into the runtime
contract (`plan.json`), and every worker runs exactly those.
"""

from __future__ import annotations

from pydantic import Field

from .base import ApiModel

# A prefill batch stops growing at this many (padded) prompt tokens: beyond it a GPU is
# compute-bound and a bigger batch only delays the requests at its head.
DEFAULT_PREFILL_TOKEN_BUDGET = 2048
# Sequences per decode step. The worker's default, and the CPU default: on a few cores a decode
# step is compute-bound, so its time grows with every row and a bigger batch buys no throughput.
DEFAULT_DECODE_MAX_BATCH = 32
# On a GPU a decode step is memory-bound (it reads every weight once, whatever the batch), so
# rows are nearly free until hundreds; 256 is also vLLM's default `max_num_seqs`.
GPU_DECODE_MAX_BATCH = 256
# KV-cache capacity a worker assumes without a plan (the planner writes the memory fit's figure).
DEFAULT_DECODE_KV_TOKENS = 65536
MIN_DECODE_KV_TOKENS = 16


class EngineLimits(ApiModel):
    """The engine limits the planner simulated; the workers run exactly these."""

    prefill_token_budget: int = Field(
        DEFAULT_PREFILL_TOKEN_BUDGET,
        ge=1,
        description="Padded prompt tokens per prefill forward (a longer prompt still runs, alone).",
    )
    decode_max_batch: int = Field(
        DEFAULT_DECODE_MAX_BATCH, ge=1, le=65536, description="Sequences per decode step."
    )
    decode_kv_tokens: int = Field(
        DEFAULT_DECODE_KV_TOKENS,
        ge=MIN_DECODE_KV_TOKENS,
        description="KV-cache capacity of one decode instance in tokens (prompt + max_tokens reserved per request).",
    )
