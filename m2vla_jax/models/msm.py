"""Meta Skill Module (M²-VLA eqs. 10-13): a FIFO key-value memory of skills and its read-out attention.

The memory is STATE, not parameters: a dict of arrays carried beside the params (`state['msm']`), saved
with the checkpoint and frozen at inference.

  keys   float32 [M, Dk]     pooled visual features of a shallow, a middle and a deep VLM layer (10)
  values float32 [M, H, A]   ground-truth action chunks
  ids    int32   [M]         frame_id of the sample that wrote the entry (self-exclusion)
  valid  bool    [M]         False until the slot is first written
  ptr    int32   []          next slot to write (FIFO with wrap-around)

`retrieve` returns the top-K entries by L1 distance (11), skipping never-written slots and any entry
whose id equals the query's id (a sample must not retrieve its own label). Early in training fewer than
K entries may be valid: the missing ones come back with `mask=False`, zero values and `inf` distance,
and `MemoryAttention` ignores them (a row with no valid entry contributes zero).

Sharding: the entry axis M may be sharded over a mesh axis. `retrieve(..., mesh=, axis_name=)` runs a
per-shard top-K under `jax.shard_map` and merges the shard candidates globally; ties are broken by the
global entry index in both paths, so the sharded result equals the unsharded one exactly.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m2vla_jax.models import mol

Memory = dict[str, jax.Array]


def init_memory(size: int, key_dim: int, horizon: int, action_dim: int) -> Memory:
  """An empty memory with `size` slots."""
  if size <= 0:
    raise ValueError(f"msm.size must be positive, got {size}")
  return {
      "keys": jnp.zeros((size, key_dim), jnp.float32),
      "values": jnp.zeros((size, horizon, action_dim), jnp.float32),
      "ids": jnp.full((size,), -1, jnp.int32),
      "valid": jnp.zeros((size,), bool),
      "ptr": jnp.zeros((), jnp.int32),
  }


def memory_sharding(mesh: Mesh, axis_name: str) -> dict[str, NamedSharding]:
  """Shardings that split the entry axis over `axis_name` (ptr replicated)."""
  return {
      "keys": NamedSharding(mesh, P(axis_name, None)),
      "values": NamedSharding(mesh, P(axis_name, None, None)),
      "ids": NamedSharding(mesh, P(axis_name)),
      "valid": NamedSharding(mesh, P(axis_name)),
      "ptr": NamedSharding(mesh, P()),
  }


def num_valid(memory: Memory) -> jax.Array:
  return memory["valid"].sum()


def insert(memory: Memory, keys: jax.Array, values: jax.Array, ids: jax.Array) -> Memory:
  """Writes a batch in FIFO order: row i goes to slot (ptr + i) mod M; the oldest entries are replaced.

  A batch larger than the memory keeps only its last M rows (what sequential writes would leave).

  Args:
    keys: [B, Dk]; values: [B, H, A]; ids: [B] int.
  """
  size = memory["keys"].shape[0]
  if keys.shape[1:] != memory["keys"].shape[1:] or values.shape[1:] != memory["values"].shape[1:]:
    raise ValueError(f"msm.insert: keys {keys.shape} / values {values.shape} do not match the memory's "
                     f"keys {memory['keys'].shape} / values {memory['values'].shape}")
  batch = keys.shape[0]
  ptr = memory["ptr"]
  if batch > size:
    skip = batch - size
    keys, values, ids = keys[skip:], values[skip:], ids[skip:]
    ptr = (ptr + skip) % size
    batch = size
  slots = (ptr + jnp.arange(batch, dtype=jnp.int32)) % size
  return {
      "keys": memory["keys"].at[slots].set(keys.astype(jnp.float32)),
      "values": memory["values"].at[slots].set(values.astype(jnp.float32)),
      "ids": memory["ids"].at[slots].set(ids.astype(jnp.int32)),
      "valid": memory["valid"].at[slots].set(True),
      "ptr": ((ptr + batch) % size).astype(jnp.int32),
  }


def _local_topk(keys, values, ids, valid, query_keys, query_ids, k: int, offset):
  """Top-k smallest L1 distances over one block of entries; indices are global (offset + local)."""
  dist = jnp.abs(query_keys[:, None, :] - keys[None, :, :]).sum(-1)             # [B, m]
  usable = valid[None, :] & (ids[None, :] != query_ids[:, None])
  dist = jnp.where(usable, dist, jnp.inf)
  kk = min(k, keys.shape[0])
  # lax.top_k puts the lower index first among equal values: deterministic ties.
  neg, idx = jax.lax.top_k(-dist, kk)
  return -neg, idx + offset, values[idx]                                        # [B,kk], [B,kk], [B,kk,H,A]


def _finish(dist, idx, vals, k: int):
  """Pads to k candidates when the memory has fewer entries; masks unusable ones."""
  if dist.shape[1] < k:
    pad = k - dist.shape[1]
    dist = jnp.pad(dist, ((0, 0), (0, pad)), constant_values=jnp.inf)
    idx = jnp.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
    vals = jnp.pad(vals, ((0, 0), (0, pad)) + ((0, 0),) * (vals.ndim - 2))
  mask = jnp.isfinite(dist)
  vals = jnp.where(mask[:, :, None, None], vals, 0.0)
  idx = jnp.where(mask, idx, -1)
  return {"values": vals, "distances": dist, "mask": mask, "indices": idx}


def retrieve(memory: Memory, query_keys: jax.Array, query_ids: jax.Array, k: int, *,
             mesh: Mesh | None = None, axis_name: str | None = None) -> dict[str, jax.Array]:
  """Top-k entries by L1 distance, excluding invalid slots and entries with the query's own id.

  Args:
    memory: see module docstring.
    query_keys: [B, Dk]; query_ids: [B] int.
    k: number of entries per query.
    mesh, axis_name: when given, the entry axis is treated as sharded over `axis_name` of `mesh` and
      the search is a per-shard top-k followed by a global merge (same result as unsharded).
  Returns:
    {'values': [B, k, H, A] (zeros where masked), 'distances': [B, k] (inf where masked),
     'mask': [B, k] bool, 'indices': [B, k] int32 global slot (-1 where masked)}, sorted by distance
    then by slot index.
  """
  if query_keys.shape[-1] != memory["keys"].shape[-1]:
    raise ValueError(f"msm.retrieve: query_keys have dim {query_keys.shape[-1]}, memory keys "
                     f"{memory['keys'].shape[-1]}")
  query_keys = query_keys.astype(jnp.float32)
  query_ids = query_ids.astype(jnp.int32)
  args = (memory["keys"], memory["values"], memory["ids"], memory["valid"])
  if mesh is None or axis_name is None:
    return _finish(*_local_topk(*args, query_keys, query_ids, k, 0), k)

  n_shards = mesh.shape[axis_name]
  size = memory["keys"].shape[0]
  if size % n_shards:
    raise ValueError(f"msm.size={size} must be divisible by the {n_shards} devices of mesh axis "
                     f"{axis_name!r} to shard the memory")
  per_shard = size // n_shards

  def shard_fn(keys, values, ids, valid, qk, qi):
    offset = jax.lax.axis_index(axis_name) * per_shard
    dist, idx, vals = _local_topk(keys, values, ids, valid, qk, qi, k, offset)
    # Candidates in shard order: within equal distance, earlier position == lower global index.
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, axis=1, tiled=True)
    dist, idx, vals = gather(dist), gather(idx), gather(vals)                  # [B, n*kk, ...]
    kk = min(k, dist.shape[1])
    neg, pos = jax.lax.top_k(-dist, kk)
    take = lambda a: jnp.take_along_axis(a, pos.reshape(pos.shape + (1,) * (a.ndim - 2)), axis=1)
    return -neg, take(idx), take(vals)

  spec_m = P(axis_name)
  fn = jax.shard_map(shard_fn, mesh=mesh,
                     in_specs=(P(axis_name, None), P(axis_name, None, None), spec_m, spec_m, P(), P()),
                     out_specs=(P(), P(), P()), check_vma=False)
  return _finish(*fn(*args, query_keys, query_ids), k)


def pool_keys(visual: jax.Array, visual_mask: jax.Array, layers: Sequence[int],
              normalize: bool = True) -> jax.Array:
  """Memory keys (eq. 10): masked-mean visual features of `layers`, concatenated.

  Args:
    visual: [L, B, Nv, D] per-layer visual hidden states.
    visual_mask: [B, Nv].
    layers: VLM layer indices (shallow, middle, deep).
    normalize: (ours) parameter-free layer norm of each pooled vector so that every layer weighs the
      same in the L1 distance (deep Gemma states have much larger norms than shallow ones).
  Returns:
    [B, len(layers) * D] float32, gradient-free.
  """
  parts = []
  for layer in layers:
    pooled = mol.masked_mean(visual[layer].astype(jnp.float32), visual_mask)
    if normalize:
      pooled = (pooled - pooled.mean(-1, keepdims=True)) / (pooled.std(-1, keepdims=True) + 1e-6)
    parts.append(pooled)
  return jax.lax.stop_gradient(jnp.concatenate(parts, axis=-1))


class MemoryAttention(nn.Module):
  """Eq. 12: A_ref = softmax(Q_A K^M^T / sqrt(d)) V^M over the retrieved (embedded) chunks.

  Attributes:
    num_heads, head_dim: must match `q`.
  """
  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, memory_tokens: jax.Array, memory_mask: jax.Array) -> jax.Array:
    """q [B, N, h, d]; memory_tokens [B, K, D] (embedded chunks); memory_mask [B, K] -> [B, N, h, d]."""
    proj = lambda name: nn.DenseGeneral((self.num_heads, self.head_dim), dtype=self.dtype, name=name)
    return mol.attend(q, proj("key_m")(memory_tokens), proj("value_m")(memory_tokens), memory_mask)
