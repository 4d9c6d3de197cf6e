"""Runs the model: a batched prefill over whole prompts and a batched single-token decode step.

Everything here is synchronous torch code; the workers call it from one executor thread so the
event loop keeps serving gRPC while a forward runs.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from distserve_worker.engine.kvcache import BatchedKV, SequenceKV, build_batch, cache_to_layers


@dataclass
class PrefillOutput:
    last_logits: torch.Tensor  # [vocab], logits after the prompt's last token
    kv: SequenceKV


class ModelRunner:
    def __init__(self, model: torch.nn.Module, threads: int | None = None) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        if threads:
            torch.set_num_threads(threads)
        # Prefill needs logits at each prompt's last position only. Projecting every position onto
        # the vocabulary is a large share of a small model's prefill (SmolLM2-135M: 49,152 x 576,
        # a fifth of its forward on a CPU core), so ask for just those positions where the model
        # takes `logits_to_keep` (transformers' causal LMs do).
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @functools.cached_property
    def parameters(self) -> int:
        """Parameters this process holds (its shard under tensor parallelism; a tied weight once)."""
        return sum(p.numel() for p in self.model.parameters())

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> list[PrefillOutput]:
        """One forward over the prompts, right-padded to the longest (causal attention never looks at
        the padding after a prompt, so each prompt's keys/values are those of the prompt alone)."""
        length = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            mask[row, : len(prompt)] = 1
        positions = torch.arange(length).unsqueeze(0).expand(len(prompts), -1)
        # With `logits_to_keep`, the logits of the prompts' distinct last positions only (every row
        # gets all of them, a handful at most); `column` maps a last position to its logits column.
        extra: dict[str, torch.Tensor] = {}
        column = {len(p) - 1: len(p) - 1 for p in prompts}
        if self.keeps_logits:
            lasts = sorted(column)
            extra["logits_to_keep"] = torch.tensor(lasts, device=self.device)
            column = {pos: i for i, pos in enumerate(lasts)}
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **extra,
        )
        layers = cache_to_layers(out.past_key_values)
        results = []
        for row, prompt in enumerate(prompts):
            n = len(prompt)
            # .clone() so one request's cache does not pin the whole batch's tensors in memory.
            kv = SequenceKV([(k[row, :, :n].clone(), v[row, :, :n].clone()) for k, v in layers])
            results.append(PrefillOutput(out.logits[row, column[n - 1]].float().clone(), kv))
        return results

    @torch.inference_mode()
    def decode_step(self, batch: BatchedKV, last_tokens: list[int]) -> torch.Tensor:
        """One forward of one new token for every row of `batch` (row i's new token is
        `last_tokens[i]`, at position `batch.lengths[i]`); appends to `batch` in place.
        Returns [rows, vocab]."""
        input_ids = torch.tensor(last_tokens, dtype=torch.long).unsqueeze(1)
        positions = torch.tensor(batch.lengths, dtype=torch.long).unsqueeze(1)
        mask = batch.attention_mask(new_tokens=1)
        batch.reserve(1)
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.commit(1)
        return out.logits[:, -1].float()

    def batch(self, sequences: list[SequenceKV]) -> BatchedKV:
        return build_batch(sequences, self.device)  # copying a cache in also moves it to the device

    def empty_batch(self, like: SequenceKV, max_rows: int = 0) -> BatchedKV:
        """A batch for caches shaped like `like`, never holding more than `max_rows` (0: no limit)."""
        return BatchedKV.like(like, self.device, max_rows)


@torch.inference_mode()
def reference_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    """The single-process, single-sequence greedy loop the disaggregated stack must match token for token."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    tokens: list[int] = []
    while True:
        token = int(torch.argmax(out.logits[0, -1]).item())
        tokens.append(token)
        if token in eos or len(tokens) >= max_tokens:
            return tokens
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's cache, read from the model itself (works for any architecture)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return (
            2
            * self.num_layers
            * self.kv_heads
            * self.head_dim
            * torch.empty(0, dtype=self.dtype).element_size()
        )


def probe_kv_layout(runner: ModelRunner) -> KVLayout:
    kv = runner.prefill([[0]])[0].kv
    keys = kv.layers[0][0]
    return KVLayout(len(kv.layers), int(keys.shape[0]), int(keys.shape[2]), keys.dtype)
