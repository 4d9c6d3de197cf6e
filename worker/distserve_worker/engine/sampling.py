"""Choosing the next token from logits: greedy, or temperature + top-p with a per-request seed.

The seed is combined with the token's index in the output, so a request's sampled tokens do not
depend on which other requests share its batch or on which instance produced a given token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distserve_protos.generation.v1 import generation_pb2 as gen


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """Pick a token from one row of logits ([vocab]); `index` is the token's position in the output."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if 0.0 < params.top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = cumulative - sorted_probs < params.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, sorted_ids, sorted_probs)
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed((params.seed * 1_000_003 + index) % (2**63))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


def sampling_from_proto(p: gen.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature, top_p=p.top_p or 1.0, seed=p.seed if p.HasField("seed") else None
    )


def sampling_to_proto(s: SamplingParams) -> gen.SamplingParams:
    """What a later pipeline stage gets to sample with (the last stage samples)."""
    out = gen.SamplingParams(temperature=s.temperature, top_p=s.top_p)
    if s.seed is not None:
        out.seed = s.seed
    return out
