"""Mixture-of-Layers attention: separate softmaxes, gates, key masks, and the mol=False ablation."""
import jax
import jax.numpy as jnp
import numpy as np

import head_reference as ref
from m2vla_jax.models import mol

B, N, D, H, HD, DV = 2, 3, 8, 2, 4, 6


def _setup(seed=0, use_mol=True):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  args = dict(q=f(B, N, H, HD), x=f(B, N, D), ctx_s=f(B, 4, DV), ctx_s_mask=np.ones((B, 4), bool),
              gate_src=f(B, 3, DV), gate_mask=np.array([[True, True, False], [True, True, True]]),
              ctx_v=f(B, 5, DV), ctx_v_mask=np.array([[True] * 3 + [False] * 2, [False] * 5]))
  module = mol.MoLAttention(H, HD, alpha_v_init=0.7, mol=use_mol)
  params = module.init(jax.random.PRNGKey(seed), **args)
  return module, params, args


def test_matches_numpy_reference_with_separate_softmaxes():
  module, params, args = _setup()
  with jax.default_matmul_precision("highest"):
    out, gates = module.apply(params, **args)
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
  a64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in args.items()}
  want, alpha_s = ref.mol(p64, **{k: a64[k] for k in ("q", "ctx_s", "ctx_s_mask", "gate_src", "gate_mask",
                                                      "ctx_v", "ctx_v_mask")}, h=a64["x"])
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gates["alpha_s"]), alpha_s, rtol=1e-5)
  assert gates["alpha_s"].shape == (B, H) and np.all((gates["alpha_s"] > 0) & (gates["alpha_s"] < 1))
  assert float(gates["alpha_v"]) == np.float32(0.7)  # documented init


def test_branches_do_not_share_a_softmax():
  """Adding visual tokens changes only branch V: (out_new - out_old) == (A_V_new - A_V_old) / 3."""
  module, params, args = _setup()
  out1, _ = module.apply(params, **args)
  args2 = dict(args, ctx_v_mask=np.ones((B, 5), bool))
  out2, _ = module.apply(params, **args2)
  p = params["params"]
  q = jnp.asarray(args["q"])
  dense = lambda name, x: jnp.einsum("bnd,dhk->bnhk", x, p[name]["kernel"]) + p[name]["bias"]
  k_v, v_v = dense("key_v", jnp.asarray(args["ctx_v"])), dense("value_v", jnp.asarray(args["ctx_v"]))
  av1 = mol.attend(q, k_v, v_v, jnp.asarray(args["ctx_v_mask"]), p["alpha_v"])
  av2 = mol.attend(q, k_v, v_v, jnp.asarray(args2["ctx_v_mask"]), p["alpha_v"])
  np.testing.assert_allclose(np.asarray(out2 - out1), np.asarray(av2 - av1) / 3, atol=1e-5)


def test_masked_tokens_are_ignored_and_gate_depends_on_queries():
  module, params, args = _setup()
  out, gates = module.apply(params, **args)
  junk = dict(args)
  junk["ctx_v"] = args["ctx_v"].copy()
  junk["ctx_v"][0, 3:] = 1e3          # masked visual tokens of example 0
  junk["ctx_v"][1] = -1e3             # example 1 has no camera at all
  junk["gate_src"] = args["gate_src"].copy()
  junk["gate_src"][0, 2] = 1e3        # masked query token is not pooled
  out2, gates2 = module.apply(params, **junk)
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gates2["alpha_s"]), np.asarray(gates["alpha_s"]), rtol=1e-6)
  moved = dict(args, gate_src=args["gate_src"] + np.random.default_rng(5).normal(size=args["gate_src"].shape))
  _, gates3 = module.apply(params, **moved)
  assert np.abs(np.asarray(gates3["alpha_s"] - gates["alpha_s"])).max() > 1e-3  # input-dependent gate


def test_ablation_is_one_softmax_over_all_tokens():
  module, params, args = _setup(use_mol=False)
  with jax.default_matmul_precision("highest"):
    out, gates = module.apply(params, **args)
  assert gates == {} and "gate_s" not in params["params"] and "alpha_v" not in params["params"]
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
  a64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in args.items()}
  want, _ = ref.mol(p64, a64["q"], a64["x"], a64["ctx_s"], a64["ctx_s_mask"], a64["gate_src"],
                    a64["gate_mask"], a64["ctx_v"], a64["ctx_v_mask"], use_mol=False)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
