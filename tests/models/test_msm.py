"""MSM memory: FIFO insert with wrap-around, top-K L1 retrieval vs brute force, sharded == unsharded."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from m2vla_jax.models import msm

HZ, AD = 2, 3


class NumpyFifo:
  """Independent reference: a Python list of slots filled in order, oldest overwritten."""

  def __init__(self, size, key_dim):
    self.slots = [None] * size
    self.ptr = 0
    self.key_dim = key_dim

  def insert(self, keys, values, ids):
    for k, v, i in zip(keys, values, ids):
      self.slots[self.ptr] = (np.asarray(k, np.float64), np.asarray(v), int(i))
      self.ptr = (self.ptr + 1) % len(self.slots)

  def topk(self, q, qid, k):
    cands = [(np.abs(s[0] - q).sum(), j) for j, s in enumerate(self.slots)
             if s is not None and s[2] != qid]
    cands.sort()  # by distance, then by slot index
    return cands[:k]


def _batches(rng, n_batches, batch, key_dim, integer, id_start=0):
  out = []
  for b in range(n_batches):
    keys = (rng.integers(0, 3, (batch, key_dim)) if integer else rng.normal(size=(batch, key_dim)))
    values = rng.normal(size=(batch, HZ, AD))
    ids = np.arange(id_start + b * batch, id_start + (b + 1) * batch)
    out.append((keys.astype(np.float32), values.astype(np.float32), ids.astype(np.int32)))
  return out


def _check(result, ref, queries, qids, k):
  for b in range(len(queries)):
    want = ref.topk(queries[b].astype(np.float64), qids[b], k)
    n = len(want)
    np.testing.assert_array_equal(np.asarray(result["mask"][b]), np.arange(k) < n)
    np.testing.assert_array_equal(np.asarray(result["indices"][b, :n]), [j for _, j in want])
    np.testing.assert_allclose(np.asarray(result["distances"][b, :n]), [d for d, _ in want], rtol=1e-5)
    for r, (_, j) in enumerate(want):
      np.testing.assert_array_equal(np.asarray(result["values"][b, r]), ref.slots[j][1])
    assert np.all(np.asarray(result["values"][b, n:]) == 0)
    assert np.all(np.isinf(np.asarray(result["distances"][b, n:])))


@pytest.mark.parametrize("integer", [True, False])  # integer keys: many exact ties, broken by slot index
def test_insert_and_retrieve_match_brute_force(integer):
  rng = np.random.default_rng(0)
  size, key_dim, k = 20, 4, 4
  memory = msm.init_memory(size, key_dim, HZ, AD)
  ref = NumpyFifo(size, key_dim)
  insert = jax.jit(msm.insert)
  retrieve = jax.jit(msm.retrieve, static_argnames="k")
  # 7 batches of 6 = 42 writes into 20 slots: wraps around twice, mid-batch.
  for step, (keys, values, ids) in enumerate(_batches(rng, 7, 6, key_dim, integer)):
    memory = insert(memory, keys, values, ids)
    ref.insert(keys, values, ids)
    assert int(memory["ptr"]) == ref.ptr
    # Queries: fresh ones, plus copies of stored entries under their own id (self-exclusion: their
    # zero-distance twin must not come back) and under another id (it must come back first).
    stored = [j for j, s in enumerate(ref.slots) if s is not None]
    j0, j1 = stored[0], stored[-1]
    queries = np.concatenate([_batches(rng, 1, 3, key_dim, integer)[0][0],
                              np.stack([ref.slots[j0][0], ref.slots[j1][0]]).astype(np.float32)])
    qids = np.array([-5, -6, -7, ref.slots[j0][2], 10_000], np.int32)
    result = retrieve(memory, queries, qids, k=k)
    _check(result, ref, queries, qids, k)
    if step == 0:  # 6 entries, one excluded for the self query: still >= k valid
      assert bool(result["mask"].all())
  assert int(result["indices"][4, 0]) == j1 and float(result["distances"][4, 0]) == 0.0


def test_early_memory_masks_missing_entries():
  memory = msm.init_memory(8, 2, HZ, AD)
  memory = msm.insert(memory, np.zeros((2, 2), np.float32), np.ones((2, HZ, AD), np.float32),
                      np.array([3, 4], np.int32))
  result = msm.retrieve(memory, np.zeros((1, 2), np.float32), np.array([3], np.int32), k=4)
  np.testing.assert_array_equal(np.asarray(result["mask"]), [[True, False, False, False]])
  np.testing.assert_array_equal(np.asarray(result["indices"]), [[1, -1, -1, -1]])


def test_batch_larger_than_memory_keeps_the_last_entries():
  memory = msm.init_memory(4, 1, HZ, AD)
  keys = np.arange(6, dtype=np.float32)[:, None]
  memory = msm.insert(memory, keys, np.zeros((6, HZ, AD), np.float32), np.arange(6, dtype=np.int32))
  ref = NumpyFifo(4, 1)
  ref.insert(keys, np.zeros((6, HZ, AD)), range(6))
  np.testing.assert_array_equal(np.asarray(memory["ids"]), [s[2] for s in ref.slots])
  assert int(memory["ptr"]) == ref.ptr


def test_bad_shapes_are_named():
  memory = msm.init_memory(4, 3, HZ, AD)
  with pytest.raises(ValueError, match="query_keys"):
    msm.retrieve(memory, np.zeros((1, 2), np.float32), np.zeros((1,), np.int32), k=2)
  with pytest.raises(ValueError, match="msm.insert"):
    msm.insert(memory, np.zeros((1, 2), np.float32), np.zeros((1, HZ, AD)), np.zeros((1,), np.int32))


@pytest.mark.parametrize("size,k,fill", [(64, 4, 200), (16, 4, 9), (64, 8, 5)])
def test_sharded_retrieval_equals_unsharded(size, k, fill):
  """8 emulated devices: per-shard top-k + global merge gives bit-identical results (ties included).

  (16, 4, 9): k exceeds the 2 entries per shard; (64, 8, 5): fewer valid entries than k."""
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(1)
  key_dim = 5
  memory = msm.init_memory(size, key_dim, HZ, AD)
  ref = NumpyFifo(size, key_dim)
  for keys, values, ids in _batches(rng, 1, fill, key_dim, integer=True):
    memory = msm.insert(memory, keys, values, ids)
    ref.insert(keys, values, ids)
  sharded = jax.device_put(memory, msm.memory_sharding(mesh, "data"))
  assert sharded["keys"].sharding.spec[0] == "data"
  queries = rng.integers(0, 3, (6, key_dim)).astype(np.float32)
  qids = np.array([0, 1, 2, -1, -1, -1], np.int32)
  plain = jax.jit(msm.retrieve, static_argnames="k")(memory, queries, qids, k=k)
  dist = jax.jit(lambda m, q, i: msm.retrieve(m, q, i, k, mesh=mesh, axis_name="data"))(
      sharded, queries, qids)
  for name in plain:
    np.testing.assert_array_equal(np.asarray(dist[name]), np.asarray(plain[name]), err_msg=name)
  _check(dist, ref, queries, qids, k)
  # Inserting into the sharded memory under jit keeps it sharded and equal to the unsharded insert.
  keys, values, ids = _batches(rng, 1, 8, key_dim, integer=True, id_start=1000)[0]
  out_sh = msm.memory_sharding(mesh, "data")
  new_sharded = jax.jit(msm.insert, out_shardings=out_sh)(sharded, keys, values, ids)
  new_plain = msm.insert(memory, keys, values, ids)
  for name in new_plain:
    np.testing.assert_array_equal(np.asarray(new_sharded[name]), np.asarray(new_plain[name]))


def test_sharded_size_must_divide():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  memory = msm.init_memory(12, 2, HZ, AD)
  with pytest.raises(ValueError, match="divisible"):
    msm.retrieve(memory, np.zeros((1, 2), np.float32), np.zeros((1,), np.int32), 2, mesh=mesh,
                 axis_name="data")
