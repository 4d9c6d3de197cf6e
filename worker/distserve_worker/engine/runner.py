"""Runs the model: a batched prefill over whole prompts and a batched single-token decode step.

Everything here is synchronous torch code; the workers call it from one executor thread so the
event loop keeps serving gRPC while a forward runs.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from distserve_worker.contract import text_config
from distserve_worker.engine.kvcache import BatchedKV, SequenceKV, build_batch, cache_to_layers


@dataclass
class PrefillOutput:
    # [vocab], logits after the prompt's last token; None on a pipeline stage before the last
    last_logits: torch.Tensor | None
    kv: SequenceKV


class ModelRunner:
    """Runs the whole model, or one pipeline stage of it (`pp/partial.py`): a stage after the first
    takes hidden states instead of token ids; a stage before the last returns hidden states (the
    next stage's input) instead of logits."""

    def __init__(self, model: torch.nn.Module, threads: int | None = None) -> None:
        from distserve_worker.pp.partial import stage_span

        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.span = stage_span(model)
        self.first, self.last = self.span.first, self.span.last
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

    @property
    def hidden_size(self) -> int:
        return int(text_config(self.model.config).hidden_size)

    def _inputs(self, ids: torch.Tensor, hidden: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Token ids on the first stage, the previous stage's hidden states on any other."""
        if self.first:
            return {"input_ids": ids.to(self.device)}
        if hidden is None:
            raise ValueError("a pipeline stage after the first needs the previous stage's hidden states")
        return {"inputs_embeds": hidden.to(self.device, self.dtype)}

    def prefill(self, prompts: list[list[int]], hidden: torch.Tensor | None = None) -> list[PrefillOutput]:
        return self.prefill_stage(prompts, hidden)[0]

    @torch.inference_mode()
    def prefill_stage(
        self, prompts: list[list[int]], hidden: torch.Tensor | None = None
    ) -> tuple[list[PrefillOutput], torch.Tensor | None]:
        """One forward over the prompts, right-padded to the longest (causal attention never looks at
        the padding after a prompt, so each prompt's keys/values are those of the prompt alone).
        Also returns, before the last stage, the padded output hidden states [prompts, longest, hidden]
        (`hidden` is the same from the previous stage)."""
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
        if self.keeps_logits and self.last:
            lasts = sorted(column)
            extra["logits_to_keep"] = torch.tensor(lasts, device=self.device)
            column = {pos: i for i, pos in enumerate(lasts)}
        # Before the last stage, the base model (layers only: no norm, no head, see pp/partial.py).
        forward = self.model if self.last else self.model.model
        out = forward(
            **self._inputs(input_ids, hidden),
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
            logits = out.logits[row, column[n - 1]].float().clone() if self.last else None
            results.append(PrefillOutput(logits, kv))
        return results, (None if self.last else out.last_hidden_state)

    @torch.inference_mode()
    def decode_step(
        self, batch: BatchedKV, last_tokens: list[int], hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One forward of one new token for every row of `batch` (row i's new token is
        `last_tokens[i]`, at position `batch.lengths[i]`); appends to `batch` in place.
        Returns [rows, vocab] logits, or before the last pipeline stage the hidden states
        [rows, 1, hidden] (`hidden` is the same from the previous stage; `last_tokens` unused then)."""
        input_ids = torch.tensor(last_tokens, dtype=torch.long).unsqueeze(1)
        positions = torch.tensor(batch.lengths, dtype=torch.long).unsqueeze(1)
        mask = batch.attention_mask(new_tokens=1)
        batch.reserve(1)
        forward = self.model if self.last else self.model.model
        out = forward(
            **self._inputs(input_ids, hidden),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.commit(1)
        if not self.last:
            return out.last_hidden_state
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
    """One token through the model (or its stage: zeros stand in for the previous stage's output;
    every rank of a stage runs the same probe, so their collectives line up)."""
    hidden = None if runner.first else torch.zeros(1, 1, runner.hidden_size, dtype=runner.dtype)
    kv = runner.prefill([[0]], hidden)[0].kv
    keys = kv.layers[0][0]
    return KVLayout(len(kv.layers), int(keys.shape[0]), int(keys.shape[2]), keys.dtype)
