"""One request inside a decode worker: its tokens, limits and where it is in its lifecycle."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # accepted, waiting for a free slot
    PULLING = "pulling"  # slot reserved, KV cache being pulled from the prefill instance
    READY = "ready"  # KV cache here, joins the batch at the next step
    RUNNING = "running"  # in the batch, one token per step
    FINISHED = "finished"


class Finish(enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORTED = "aborted"  # the caller went away
    ERROR = "error"  # the worker failed it (pull failed, forward failed)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_tokens: int
    first_token: int
    max_tokens: int  # output tokens in total, the first (prefill's) one included
    kv_address: str = ""
    # Under tensor parallelism, prefill rank r's KV server is entry r (entry 0 is kv_address).
    kv_sources: tuple[str, ...] = ()
    # Under pipeline parallelism, the prefill instance's stages: (layer range, rank addresses) each
    # (pp/pieces.SourceStage); empty when it runs one stage.
    kv_stages: tuple[Any, ...] = ()
    lane: int = -1  # the micro-batch it runs in (pipeline stages); -1 until it joins one
    output: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish: Finish | None = None
    # Engine-side payloads the scheduler never looks at (the pulled KV cache, the detokenizer).
    kv: Any = None
    detok: Any = None

    def __post_init__(self) -> None:
        if not self.output:
            self.output.append(self.first_token)

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys/values are in the cache: the prompt and every output token but the last."""
        return self.prompt_tokens + len(self.output) - 1

    @property
    def reserved_tokens(self) -> int:
        """The most cache this sequence can ever need; what the scheduler reserves when admitting it."""
        return self.prompt_tokens + self.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
