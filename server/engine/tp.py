"""Tensor parallelism: which part of the model this worker process (one rank) holds, and how a row's steering
tables are cut to it.

Under `tensor_parallel_size = N` vLLM runs one worker per rank, each with its own model runner, persistent batch
and steering processor (server/engine/processor.py), so every hook runs on every rank, sees the same rows in the
same order (each rank replays the same scheduler output) and must act on that rank's tensors:

- attention (server/engine/attention_backend.py): rank r holds query heads [r * H/N, (r + 1) * H/N) of every
  layer (vLLM's `QKVParallelLinear` cuts the heads contiguously), so a row's per-layer `[heads, keys]` bias table
  is cut to those rows (`local_heads`). KV heads need no table: with K >= N KV heads a rank holds K/N of them,
  with K < N every KV head is replicated on N/K ranks, and in both cases the rank's query heads read exactly the
  KV heads the rank holds (`kv_heads` says which), so per-head score biases stay per query head;
- the MoE router (server/engine/router_hook.py): the gate is replicated and every rank routes every token over all
  experts (vLLM-CPU's tensor parallel MoE shards each expert's intermediate size, not the experts), so expert masks
  apply unchanged; the routed-expert counts are the same on every rank and are written by rank 0 only
  (`Rank.leads`), so the server sums each row once;
- control vectors and IAPT (server/engine/vectors_hook.py, server/engine/iapt_hook.py): they act on the residual
  stream, which every rank holds whole (attention and MLP outputs are all-reduced inside the layer), so every rank
  applies the same full-width tables: nothing is cut;
- LoRA (server/engine/lora_ops_patch.py): vLLM hands the torch ops each rank's shard of the adapter weights;
  the grouped ops act on whatever shapes they get.

A hook that fails on one rank switches its method off there and reports it in the directory shared with the
server (server/engine/faults.py), which then refuses the method, as at N = 1; rows still in flight that the
method steers are reported as faulted (`MethodRows.switch_off`), because the other ranks keep steering them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import vllm_compat


@dataclass(frozen=True)
class Rank:
    """This process's place in the tensor-parallel group: `rank` of `size` (0 of 1 without TP)."""

    rank: int = 0
    size: int = 1

    @property
    def leads(self) -> bool:
        """Whether this rank publishes what every rank computes alike (the routed-expert counts)."""
        return self.rank == 0


def current() -> Rank:
    """The tensor-parallel rank of this worker process (Rank(0, 1) outside a distributed engine)."""
    return Rank(*vllm_compat.tensor_parallel_rank())


def query_heads(num_heads: int, rank: Rank) -> range:
    """The global query heads `rank` holds, contiguous, as vLLM's `QKVParallelLinear` assigns them."""
    if num_heads % rank.size:
        raise ValueError(f"{num_heads} query heads do not divide over {rank.size} tensor-parallel ranks")
    per = num_heads // rank.size
    return range(rank.rank * per, (rank.rank + 1) * per)


def kv_heads(num_kv_heads: int, rank: Rank) -> range:
    """The global KV heads `rank` holds: K/N of them, or with K < N one head replicated on N/K ranks."""
    if num_kv_heads >= rank.size:
        if num_kv_heads % rank.size:
            raise ValueError(f"{num_kv_heads} KV heads do not divide over {rank.size} tensor-parallel ranks")
        per = num_kv_heads // rank.size
        return range(rank.rank * per, (rank.rank + 1) * per)
    if rank.size % num_kv_heads:
        raise ValueError(f"{rank.size} tensor-parallel ranks do not divide over {num_kv_heads} KV heads")
    head = rank.rank // (rank.size // num_kv_heads)
    return range(head, head + 1)


def local_heads(tables: list[torch.Tensor | None], heads: range) -> list[torch.Tensor | None]:
    """Per-layer `[global heads, ...]` tables cut to `heads` (this rank's query heads); a layer whose cut is all
    zero becomes None (not steered on this rank). Unchanged when `heads` covers every head."""
    out: list[torch.Tensor | None] = []
    for t in tables:
        if t is not None and (heads.start, heads.stop) != (0, t.shape[0]):
            t = t[heads.start: heads.stop]
            t = t if t.any() else None
        out.append(t)
    return out


BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM-CPU: the cores of each rank's OpenMP threads, ranks split by "|"


def cpu_binding(size: int, cpus: list[int]) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `size` ranks over `cpus`: contiguous, equal groups (the remainder unused),
    e.g. "0|1" or "0-3|4-7". Raises ValueError with fewer CPUs than ranks."""
    cpus = sorted(cpus)
    if len(cpus) < size:
        raise ValueError(f"tensor_parallel_size {size} needs at least {size} CPU cores; this process may use "
                         f"{len(cpus)}")
    per = len(cpus) // size
    groups = [cpus[i * per: (i + 1) * per] for i in range(size)]
    return "|".join(",".join(map(str, g)) if g != list(range(g[0], g[-1] + 1)) else
                    (f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0])) for g in groups)


def bind_cpus(size: int) -> None:
    """Give each of `size` CPU ranks its own cores, unless the operator set `VLLM_CPU_OMP_THREADS_BIND` (vLLM-CPU's
    default binds ranks to NUMA nodes and refuses to start with fewer nodes than ranks: "Not enough allowed NUMA
    nodes to bind threads of N local CPUWorkers"). Inherited by the engine's processes."""
    import os

    if os.environ.get(BIND_ENV, "auto") == "auto":
        os.environ[BIND_ENV] = cpu_binding(size, list(os.sched_getaffinity(0)))
