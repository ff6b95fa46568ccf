"""Tensor parallelism: which KV heads a rank holds (its store shard), its share of the model's shape, and the sum
over vLLM's TP group that makes every rank's token selection the same."""

from __future__ import annotations

from dataclasses import replace

import torch

from kvblend.model.spec import ModelSpec
from kvblend.store.key import tp_shard


def kv_head_range(num_kv_heads: int, world: int, rank: int) -> tuple[int, int]:
    """The KV heads [first, end) rank `rank` of `world` holds, as vLLM's QKVParallelLinear splits them (fewer
    heads than ranks: each head replicated on world / num_kv_heads consecutive ranks)."""
    if num_kv_heads >= world:
        if num_kv_heads % world:
            raise ValueError(f"{num_kv_heads} KV heads do not split over {world} tensor-parallel ranks")
        per = num_kv_heads // world
        return rank * per, (rank + 1) * per
    if world % num_kv_heads:
        raise ValueError(f"{world} tensor-parallel ranks do not replicate {num_kv_heads} KV heads evenly")
    head = rank // (world // num_kv_heads)
    return head, head + 1


def rank_shard(num_kv_heads: int, world: int, rank: int) -> str:
    """The store shard of rank `rank`'s KV (the whole KV without tensor parallelism)."""
    return tp_shard(world, rank, *kv_head_range(num_kv_heads, world, rank))


def all_shards(num_kv_heads: int, world: int) -> tuple[str, ...]:
    """Every rank's shard: a chunk is stored only when all of them are."""
    return tuple(rank_shard(num_kv_heads, world, rank) for rank in range(world))


def rank_spec(spec: ModelSpec, world: int) -> ModelSpec:
    """The model's shape as one rank holds it: its share of the query heads and its KV heads."""
    if world == 1:
        return spec
    if spec.num_heads % world:
        raise ValueError(f"{spec.num_heads} attention heads do not split over {world} tensor-parallel ranks")
    first, end = kv_head_range(spec.num_kv_heads, world, 0)
    return replace(spec, num_heads=spec.num_heads // world, num_kv_heads=end - first)


def tp_world_rank() -> tuple[int, int]:
    """This worker's tensor-parallel world size and rank (vLLM's TP group)."""
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    return group.world_size, group.rank_in_group


def tp_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over vLLM's TP group: a sum over heads that each rank took over its own heads, completed."""
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group().all_reduce(t)
