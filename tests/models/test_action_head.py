"""Action head: one block against a numpy float64 reference; objectives; block-to-layer mapping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import head_reference as ref
from m2vla_jax.models import action_head as ah

B, N, D, H, HD, DV, NV, NQ, K = 2, 4, 16, 2, 8, 12, 5, 3, 3


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  visual_mask = np.ones((B, NV), bool)
  visual_mask[0, 2:] = False   # a missing camera's tokens
  visual_mask[1, :] = False    # every camera missing: branch V contributes zero
  query_mask = np.ones((B, NQ), bool)
  mem_mask = np.array([[True, True, False], [False, False, False]])  # partial and empty memory
  return dict(x=f(B, N, D), visual=f(B, NV, DV), query=f(B, NQ, DV), visual_mask=visual_mask,
              query_mask=query_mask, proprio=f(B, 1, DV), memory_tokens=f(B, K, D),
              memory_mask=mem_mask)


def _perturbed_params(module, inputs, seed=1):
  params = module.init(jax.random.PRNGKey(0), **inputs)["params"]
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  # Move every parameter off its init (LN scales, gate biases, alpha_v) so each term is exercised.
  leaves = [np.asarray(l) + 0.3 * rng.normal(size=np.shape(l)).astype(np.float32) for l in leaves]
  return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize("use_mol,use_msm", [(True, True), (False, True), (True, False), (False, False)])
def test_block_matches_numpy_float64(use_mol, use_msm):
  config = ah.HeadConfig(width=D, num_heads=H, head_dim=HD, mlp_dim=32, mol=use_mol, msm=use_msm)
  block = ah.HeadBlock(config)
  inputs = _inputs()
  params = _perturbed_params(block, inputs)
  with jax.default_matmul_precision("highest"):
    out, gates = block.apply({"params": params}, **inputs)
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  i64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in inputs.items()}
  want, alpha_s = ref.head_block(p64, i64["x"], i64["visual"], i64["query"], i64["visual_mask"],
                                 i64["query_mask"], i64["proprio"], i64["memory_tokens"],
                                 i64["memory_mask"], use_mol, use_msm)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-5, atol=1e-5)
  if use_mol:
    np.testing.assert_allclose(np.asarray(gates["alpha_s"]), alpha_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gates["alpha_v"]), float(params["MoL"]["alpha_v"]))
  else:
    assert gates == {}


def test_even_layer_mapping():
  assert ah.even_layer_mapping(4, 4) == (0, 1, 2, 3)
  assert ah.even_layer_mapping(6, 18) == (2, 5, 8, 11, 14, 17)
  assert ah.even_layer_mapping(1, 18) == (17,)
  with pytest.raises(ValueError, match="num_blocks"):
    ah.even_layer_mapping(5, 4)
  config = ah.HeadConfig(layer_for_block=(0, 9))
  with pytest.raises(ValueError, match="layer_for_block"):
    ah.layers_for_blocks(config, 4)


def test_head_reads_the_mapped_layers():
  """Changing a VLM layer that no block reads leaves the output unchanged; a read layer changes it."""
  config = ah.HeadConfig(horizon=3, action_dim=2, width=D, num_heads=H, head_dim=HD, mlp_dim=32,
                         num_blocks=2, msm=False)
  assert ah.layers_for_blocks(config, 4) == (1, 3)
  rng = np.random.default_rng(0)
  visual = rng.normal(size=(4, B, NV, DV)).astype(np.float32)
  query = rng.normal(size=(4, B, NQ, DV)).astype(np.float32)
  args = dict(noisy=rng.normal(size=(B, 3, 2)).astype(np.float32), visual_mask=np.ones((B, NV), bool),
              query_mask=np.ones((B, NQ), bool), state=rng.normal(size=(B, 5)).astype(np.float32))
  head = ah.ActionHead(config)
  params = _perturbed_params(head, dict(args, visual=visual, query=query))
  apply = jax.jit(lambda v, q: head.apply({"params": params}, visual=v, query=q, **args)[0])
  run = lambda v, q: np.asarray(apply(v, q))
  base = run(visual, query)
  v2, q2 = visual.copy(), query.copy()
  v2[0] += rng.normal(size=v2[0].shape).astype(np.float32)
  q2[2] += rng.normal(size=q2[2].shape).astype(np.float32)
  np.testing.assert_array_equal(run(v2, q2), base)
  v3 = visual.copy()
  v3[3] += rng.normal(size=v3[3].shape).astype(np.float32)  # random: a constant shift is normed away
  assert np.abs(run(v3, query) - base).max() > 1e-4


def test_objectives_against_numpy():
  actions = np.random.default_rng(0).normal(size=(B, 3, 2)).astype(np.float32)
  mask = np.array([[True, True, False], [True, False, False]])
  rng = jax.random.PRNGKey(3)
  config = ah.HeadConfig(horizon=3, action_dim=2)
  const = np.full((B, 3, 2), 0.25, np.float32)
  loss, aux = ah.objective_loss(lambda noisy, t: (jnp.asarray(const), {}), config, actions, mask, rng)
  noise = np.asarray(jax.random.normal(jax.random.split(rng)[0], actions.shape))
  want = np.abs(noise - const - actions)[mask].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  # Flow matching with the exact velocity of a straight path from noise to a fixed chunk: Euler is exact.
  target = np.ones((B, 3, 2), np.float32)
  fconfig = ah.HeadConfig(horizon=3, action_dim=2, objective="flow_matching", flow_steps=4)
  calls = []

  def exact_velocity(x, t):
    calls.append(t)
    return (x - target) / t[:, None, None], {}

  out = ah.sample(exact_velocity, fconfig, (B, 3, 2), rng)
  np.testing.assert_allclose(np.asarray(out), target, atol=1e-5)
  with pytest.raises(ValueError, match="objective"):
    ah.HeadConfig(objective="ddpm")
