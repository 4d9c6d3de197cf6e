"""Start the ranks of an instance: one process (tp=1) or rank 0 plus its followers."""

from __future__ import annotations

import asyncio
from typing import Any

from distserve_worker.model_source import load_model
from distserve_worker.pp.partial import load_stage
from distserve_worker.settings import DecodeSettings, PrefillSettings
from distserve_worker.tp.group import RankGroup
from distserve_worker.tp.ranks import kv_heads_of, load_shard


async def start_ranks(
    role: str, settings: PrefillSettings | DecodeSettings, loaded: Any = None
) -> tuple[RankGroup | None, Any, Any, int]:
    """(group or None, rank 0's model (shard), tokenizer, the model's key/value heads).

    `loaded` (model, tokenizer) skips loading (tests, the colocated baseline); tp must then be 1."""
    if settings.tp == 1:
        if loaded is not None:
            model, tokenizer = loaded
        elif settings.pp > 1 and settings.layers is not None:
            model, tokenizer = await asyncio.to_thread(load_stage, settings.model, settings.layers)
        else:
            model, tokenizer = await asyncio.to_thread(load_model, settings.model)
        return None, model, tokenizer, kv_heads_of(model)
    if loaded is not None:
        raise ValueError(
            "a preloaded model cannot be sharded: start tensor-parallel instances from the model source"
        )
    group = RankGroup(role, settings)
    place = group.spawn()
    try:
        await asyncio.to_thread(group.join, place)
        layers = settings.layers if settings.pp > 1 else None
        model, tokenizer = await asyncio.to_thread(load_shard, settings.model, place, layers)
    except BaseException:
        await group.close()
        raise
    return group, model, tokenizer, kv_heads_of(model)
