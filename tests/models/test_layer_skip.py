"""MoLe-VLA layer skipping: straight-through gates, real skipping vs the masked full-depth forward, the
router, the VLM wiring, and the balance / CogKD losses against numpy float64.

References are independent of the code under test: numpy re-implementations (losses, expand_hidden,
top-k), a Python loop over `gemma.Block` one sample and one kept layer at a time (skipping), the plain
backbone (k = L), and the public code's masked formulation (`run_masked_layers`, itself checked to be
exactly the identity on skipped layers). Gathered and masked forwards are different XLA programs over
the same float32 operations in a different fusion / accumulation order: they agree to ~1e-6 relative
here, and the tolerance is rtol = atol = 1e-5 (hidden states are O(1) after the 0.2-scale weights).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2vla_jax.models import gemma
from m2vla_jax.models import layer_skip as ls
from m2vla_jax.models import vlm

TOL = dict(rtol=1e-5, atol=1e-5)
SMALL_ROUTER = dict(width=16, mlp_dim=8, num_heads=2, ff_dim=32)


def _random_like(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@functools.lru_cache(maxsize=None)
def _gemma():
  """gemma3_tiny (6 layers, local and global, two RoPE bases) with random weights, and a padded batch."""
  cfg = gemma.get_config("gemma3_tiny", remat_policy="none")
  model = gemma.Gemma(cfg)
  b, t = 3, 7
  rng = np.random.default_rng(1)
  x = rng.standard_normal((b, t, cfg.width)).astype(np.float32)
  valid = np.ones((b, t), bool)
  valid[1, 5:] = False
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
  mask = np.asarray(gemma.prefix_lm_mask(valid, valid))
  params = _random_like(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, positions, mask), 0)
  return cfg, model, params, (x, positions, mask)


@functools.lru_cache(maxsize=None)
def _gemma_apply(skip_impl):
  _, model, _, _ = _gemma()
  return jax.jit(lambda p, x, pos, mask, ids, gates: model.apply(
      p, x, pos, mask, route={"ids": ids, "gates": gates}, skip_impl=skip_impl))


def _routes(b, num_layers, k, seed):
  """Distinct per-sample routes as the router would make them: (gates [b, L], ids [b, k])."""
  probs = jax.nn.softmax(jnp.asarray(np.random.default_rng(seed).standard_normal((b, num_layers)) * 3,
                                     jnp.float32))
  gates, ids = ls.straight_through_topk(probs, k)
  assert len({tuple(r) for r in np.asarray(ids)}) == b
  return gates, ids


def test_straight_through_gates_are_exactly_0_1_with_the_softmax_gradient():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((4, 7)) * 2, jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, 7)), jnp.float32)
  probs = jax.nn.softmax(logits)
  for k in (1, 3, 7):
    gates, ids = ls.straight_through_topk(probs, k)
    g = np.asarray(gates)
    assert g.dtype == np.float32 and set(np.unique(g)) <= {0.0, 1.0}
    np.testing.assert_array_equal(g.sum(1), k)
    assert ids.dtype == jnp.int32
    np.testing.assert_array_equal(ids, np.sort(np.argsort(-np.asarray(probs), axis=1)[:, :k], axis=1))
    np.testing.assert_array_equal(np.take_along_axis(g, np.asarray(ids), 1), 1.0)
    ste = jax.grad(lambda l: jnp.sum(ls.straight_through_topk(jax.nn.softmax(l), k)[0] * w))(logits)
    soft = jax.grad(lambda l: jnp.sum(jax.nn.softmax(l) * w))(logits)
    np.testing.assert_allclose(ste, soft, rtol=1e-6, atol=1e-7)


def test_bad_num_skip_k_and_router_inputs_name_the_field():
  probs = jax.nn.softmax(jnp.zeros((2, 6)))
  for k in (0, 7):
    with pytest.raises(ValueError, match="num_skip"):
      ls.straight_through_topk(probs, k)
  with pytest.raises(TypeError, match="num_skip"):
    jax.jit(lambda p, k: ls.straight_through_topk(p, k)[0])(probs, 3)
  with pytest.raises(TypeError, match="num_skip"):
    ls.straight_through_topk(probs, 3.0)
  with pytest.raises(ValueError, match="num_skip"):
    ls.RouterConfig(num_skip=-1)
  with pytest.raises(ValueError, match="num_skip"):
    ls.route_from_logits(jnp.zeros((2, 6)), 6)
  with pytest.raises(ValueError, match="skip_impl"):
    ls.RouterConfig(num_skip=1, skip_impl="scatter")
  with pytest.raises(ValueError, match="router.num_skip=6"):
    vlm.get_config("tiny_gemma3", router=ls.RouterConfig(num_skip=6))   # gemma3_tiny has 6 layers
  router = ls.STARRouter(ls.RouterConfig(num_skip=6, **SMALL_ROUTER), num_layers=6)
  img, txt = jnp.ones((2, 3, 8)), jnp.ones((2, 4, 8))
  with pytest.raises(ValueError, match="num_skip"):
    router.init(jax.random.PRNGKey(0), img, jnp.ones((2, 3), bool), txt, jnp.ones((2, 4), bool))
  router = ls.STARRouter(ls.RouterConfig(num_skip=2, **SMALL_ROUTER), num_layers=6)
  no_text = np.ones((2, 4), bool)
  no_text[1] = False
  with pytest.raises(ValueError, match=r"text_mask has no True entry for sample\(s\) \[1\]"):
    router.init(jax.random.PRNGKey(0), img, jnp.ones((2, 3), bool), txt, no_text)


def test_router_ignores_padding_and_a_sample_without_images_gets_no_spatial_term():
  cfg = ls.RouterConfig(num_skip=2, **SMALL_ROUTER)
  router = ls.STARRouter(cfg, num_layers=6)
  rng = np.random.default_rng(2)
  img = rng.standard_normal((2, 4, 8)).astype(np.float32)
  txt = rng.standard_normal((2, 5, 8)).astype(np.float32)
  img_mask = np.array([[1, 1, 0, 1], [1, 0, 0, 0]], bool)
  txt_mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
  params = _random_like(jax.eval_shape(router.init, jax.random.PRNGKey(0), img, img_mask, txt,
                                       txt_mask), 3)
  params["params"]["temperature_bias"] = np.ones((1,), np.float32)
  apply = jax.jit(router.apply)
  logits = apply(params, img, img_mask, txt, txt_mask)
  assert logits.shape == (2, 6) and logits.dtype == jnp.float32
  img2, txt2 = img.copy(), txt.copy()
  img2[~img_mask] = 7.0
  txt2[~txt_mask] = -3.0
  np.testing.assert_allclose(apply(params, img2, img_mask, txt2, txt_mask), logits, rtol=1e-6, atol=1e-6)
  # No image token: the logits are those of a router whose spatial branch outputs zero.
  none = np.zeros_like(img_mask)
  no_spatial = jax.tree_util.tree_map(np.copy, params)
  no_spatial["params"]["spatial_out"]["kernel"][:] = 0.0
  ref = apply(no_spatial, img, img_mask, txt, txt_mask)
  np.testing.assert_allclose(apply(params, img2, none, txt, txt_mask), ref, rtol=1e-6, atol=1e-6)
  assert not np.allclose(ref, logits)


def test_fixed_temperature_is_the_constant_sigmoid_of_the_bias_init():
  rng = np.random.default_rng(5)
  img = rng.standard_normal((3, 4, 8)).astype(np.float32)
  txt = rng.standard_normal((3, 5, 8)).astype(np.float32)
  img_mask, txt_mask = np.ones((3, 4), bool), np.ones((3, 5), bool)
  learned = ls.STARRouter(ls.RouterConfig(num_skip=2, temperature_bias_init=0.3, **SMALL_ROUTER), 6)
  fixed = ls.STARRouter(ls.RouterConfig(num_skip=2, temperature_bias_init=0.3, temperature="fixed",
                                        **SMALL_ROUTER), 6)
  params = _random_like(jax.eval_shape(learned.init, jax.random.PRNGKey(0), img, img_mask, txt,
                                       txt_mask), 6)
  fixed_params = jax.eval_shape(fixed.init, jax.random.PRNGKey(0), img, img_mask, txt, txt_mask)
  # 'fixed' has no temperature parameters; everything else is the learned router's.
  assert set(params["params"]) - set(fixed_params["params"]) == {"temperature", "temperature_bias"}
  ours = {"params": {k: v for k, v in params["params"].items() if k in fixed_params["params"]}}
  # The learned router with its temperature's input weights at 0 and b = 0.3 has the same tau.
  params["params"]["temperature"]["kernel"][:] = 0.0
  params["params"]["temperature"]["bias"][:] = 0.0
  params["params"]["temperature_bias"] = np.full((1,), 0.3, np.float32)
  want = learned.apply(params, img, img_mask, txt, txt_mask)
  got = fixed.apply(ours, img, img_mask, txt, txt_mask)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # tau scales the logits: a different fixed b gives logits * sigmoid(b') / sigmoid(b).
  other = ls.STARRouter(ls.RouterConfig(num_skip=2, temperature_bias_init=-2.0, temperature="fixed",
                                        **SMALL_ROUTER), 6)
  ratio = (1 / (1 + np.exp(2.0))) / (1 / (1 + np.exp(-0.3)))
  np.testing.assert_allclose(other.apply(ours, img, img_mask, txt, txt_mask), np.asarray(got) * ratio,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="RouterConfig.temperature='frozen'"):
    ls.RouterConfig(num_skip=2, temperature="frozen")


def test_expand_hidden_matches_a_loop():
  rng = np.random.default_rng(4)
  k, b, num_layers = 3, 2, 6
  hidden = rng.standard_normal((k, b, 4, 5)).astype(np.float32)
  x0 = rng.standard_normal((b, 4, 5)).astype(np.float32)
  for ids in (np.array([1, 2, 4]), np.array([[0, 3, 5], [2, 3, 4]])):
    out = np.asarray(ls.expand_hidden(jnp.asarray(hidden), jnp.asarray(x0), jnp.asarray(ids), num_layers))
    assert out.shape == (num_layers, b, 4, 5)
    for s in range(b):
      route = ids if ids.ndim == 1 else ids[s]
      for layer in range(num_layers):
        ran = [j for j, i in enumerate(route) if i <= layer]
        np.testing.assert_array_equal(out[layer, s], hidden[ran[-1], s] if ran else x0[s])


def test_skipped_layers_are_identity_and_kept_layers_run_in_order():
  cfg, _, params, (x, positions, mask) = _gemma()
  gates, ids = _routes(x.shape[0], cfg.depth, 3, seed=5)
  out = _gemma_apply("gather")(params, x, positions, mask, ids, gates)
  assert out["hidden"].shape == (3,) + x.shape
  # Reference: one sample at a time, the kept layers' Blocks in a Python loop.
  block = jax.jit(gemma.Block(cfg).apply)
  is_local = cfg.layer_is_local()
  base, scale = cfg.layer_rope()
  layers = params["params"]["layers"]
  for s in range(x.shape[0]):
    h = x[s:s + 1]
    for j, i in enumerate(np.asarray(ids[s])):
      p = jax.tree_util.tree_map(lambda a: a[i], layers)
      h, _ = block({"params": p}, h, (is_local[i], base[i], scale[i], None), positions[s:s + 1],
                         mask[s:s + 1], None)
      np.testing.assert_allclose(out["hidden"][j, s], h[0], **TOL)
  # The masked full-depth forward passes a skipped layer's input through exactly.
  masked = _gemma_apply("masked")(params, x, positions, mask, ids, gates)
  hid = np.asarray(masked["hidden"])
  for s in range(x.shape[0]):
    for layer in sorted(set(range(cfg.depth)) - set(np.asarray(ids[s]).tolist())):
      np.testing.assert_array_equal(hid[layer, s], hid[layer - 1, s] if layer else x[s])


def _close_to_scale(a, b, rel=1e-5):
  """|a - b| <= rel * max|b|: gradients sum many float32 products, so elements near 0 carry the
  rounding of the leaf's large ones (observed ~2e-6 of the leaf's scale)."""
  a, b = np.asarray(a), np.asarray(b)
  assert np.abs(a - b).max(initial=0) <= rel * np.abs(b).max(initial=0), (np.abs(a - b).max(), np.abs(b).max())


def test_kept_layers_forward_and_gradients_equal_the_masked_full_depth():
  cfg, _, params, (x, positions, mask) = _gemma()
  gates, ids = _routes(x.shape[0], cfg.depth, 3, seed=6)
  w = np.random.default_rng(7).standard_normal(x.shape).astype(np.float32)

  def run(impl, p, g):
    def loss(p, g):
      out = _gemma_apply(impl)(p, x, positions, mask, ids, g)
      return jnp.sum(out["final"] * w), out
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, g)

  # One program for both (compile time is most of this test).
  ((_, kept), (gp_kept, gg_kept)), ((_, full), (gp_full, gg_full)) = jax.jit(
      lambda p, g: (run("gather", p, g), run("masked", p, g)))(params, gates)
  np.testing.assert_allclose(kept["final"], full["final"], **TOL)
  np.testing.assert_allclose(ls.expand_hidden(kept["hidden"], x, ids, cfg.depth), full["hidden"], **TOL)
  b_idx = np.arange(x.shape[0])[None]
  np.testing.assert_allclose(kept["key"], full["key"][np.asarray(ids).T, b_idx], **TOL)
  np.testing.assert_allclose(kept["value"], full["value"][np.asarray(ids).T, b_idx], **TOL)
  for a, b in zip(jax.tree_util.tree_leaves(gp_kept), jax.tree_util.tree_leaves(gp_full)):
    _close_to_scale(a, b)
  on = np.asarray(gates) == 1.0
  _close_to_scale(np.asarray(gg_kept)[on], np.asarray(gg_full)[on])
  # Skipped gates: no gradient when the layer never ran; the public (masked) form gives them one.
  assert np.all(np.asarray(gg_kept)[~on] == 0) and np.any(np.asarray(gg_full)[~on] != 0)


def test_per_sample_strategies_and_a_shared_route_agree():
  cfg, _, params, (x, positions, mask) = _gemma()
  gates, ids = _routes(x.shape[0], cfg.depth, 3, seed=5)      # the routes of the identity test
  gather = _gemma_apply("gather")(params, x, positions, mask, ids, gates)
  loop = _gemma_apply("loop")(params, x, positions, mask, ids, gates)
  for key in ("hidden", "final", "key", "value"):
    np.testing.assert_allclose(loop[key], gather[key], **TOL)
  # One route [k] for the whole batch = that route given to every sample.
  same = jnp.tile(gates[:1], (x.shape[0], 1))
  shared = _gemma_apply("gather")(params, x, positions, mask, ids[0], same)
  per_sample = _gemma_apply("gather")(params, x, positions, mask, jnp.tile(ids[:1], (x.shape[0], 1)), same)
  np.testing.assert_allclose(shared["hidden"], per_sample["hidden"], **TOL)


def test_auto_runs_the_kept_layers_at_batch_1_and_the_union_above_or_the_gather_on_gpu():
  assert [ls.resolve_impl("auto", b) for b in (1, 2, 8)] == ["gather", "union", "union"]  # cpu here
  assert [ls.resolve_impl("auto", b, "gpu") for b in (1, 8, ls.GPU_GATHER_MAX_BATCH + 1)] == [
      "gather", "gather", "union"]
  assert ls.resolve_impl("auto", 8, "tpu") == "union"
  assert ls.resolve_impl("masked", 8, "gpu") == "masked"
  assert ls.resolve_impl("loop", 8) == "loop" and ls.RouterConfig(num_skip=1).skip_impl == "auto"
  with pytest.raises(ValueError, match="skip_impl='scatter'"):
    ls.resolve_impl("scatter", 1)
  cfg, _, params, (x, positions, mask) = _gemma()
  gates, ids = _routes(x.shape[0], cfg.depth, 3, seed=5)
  batched = _gemma_apply("auto")(params, x, positions, mask, ids, gates)
  masked = _gemma_apply("masked")(params, x, positions, mask, ids, gates)
  assert batched["key"].shape[0] == cfg.depth            # all L slots (union of the routes)
  np.testing.assert_allclose(batched["final"], masked["final"], **TOL)
  np.testing.assert_allclose(batched["hidden"], masked["hidden"], **TOL)
  one = _gemma_apply("auto")(params, x[:1], positions[:1], mask[:1], ids[:1], gates[:1])
  assert one["key"].shape[0] == 3                         # only the 3 kept layers ran
  np.testing.assert_allclose(one["final"], masked["final"][:1], **TOL)


def test_union_computes_only_the_layers_some_sample_keeps():
  # A toy stack that reports which layers it computed (a host callback fires only in the branch
  # lax.cond takes): routes of 3 samples over 6 layers whose union leaves layers 1 and 4 out.
  num_layers, d = 6, 5
  rng = np.random.default_rng(11)
  layers = {"w": jnp.asarray(rng.standard_normal((num_layers, d, d)) * 0.5, jnp.float32),
            "i": jnp.arange(num_layers)}
  x = jnp.asarray(rng.standard_normal((3, 2, d)), jnp.float32)
  gates = jnp.asarray([[1, 0, 1, 0, 0, 1], [1, 0, 0, 1, 0, 1], [0, 0, 1, 1, 0, 1]], jnp.float32)
  ran = []

  def layer_fn(layer, step, h, batch):
    jax.debug.callback(lambda i: ran.append(int(i)), layer["i"])
    y = jnp.tanh(h @ layer["w"])
    return y, y[:, 0] * 2.0                                  # aux [b, d], like a layer's key

  union = jax.jit(lambda g: ls.run_union_layers(layer_fn, layers, x, g, None))(gates)
  jax.effects_barrier()
  assert sorted(ran) == [0, 2, 3, 5]
  masked = jax.jit(lambda g: ls.run_masked_layers(layer_fn, layers, x, g, None))(gates)
  np.testing.assert_allclose(union[0], masked[0], **TOL)     # x out
  np.testing.assert_allclose(union[1], masked[1], **TOL)     # every slot's state, skipped = input
  kept = np.array([0, 2, 3, 5])
  np.testing.assert_allclose(np.asarray(union[2])[kept], np.asarray(masked[2])[kept], **TOL)
  assert not np.any(np.asarray(union[2])[np.array([1, 4])])           # aux of a layer nobody kept: zeros
  # Gemma: routes the batch shares run k of L layers' keys; the forward equals the masked one.
  cfg, _, params, (xg, positions, mask) = _gemma()
  g1, i1 = _routes(1, cfg.depth, 3, seed=5)
  shared_gates, shared_ids = jnp.tile(g1, (3, 1)), jnp.tile(i1, (3, 1))
  out = _gemma_apply("union")(params, xg, positions, mask, shared_ids, shared_gates)
  ref = _gemma_apply("masked")(params, xg, positions, mask, shared_ids, shared_gates)
  np.testing.assert_allclose(out["final"], ref["final"], **TOL)
  key = np.asarray(out["key"])
  skipped = np.array(sorted(set(range(cfg.depth)) - set(np.asarray(i1[0]).tolist())))
  assert not np.any(key[skipped]) and np.all(np.any(key[np.asarray(i1[0])] != 0, axis=(1, 2, 3, 4)))


def test_keeping_every_layer_equals_the_plain_backbone():
  cfg, model, params, (x, positions, mask) = _gemma()
  route = ls.route_from_logits(jnp.asarray(np.random.default_rng(8).standard_normal((3, cfg.depth)),
                                           jnp.float32), num_skip=0)
  np.testing.assert_array_equal(route["ids"], np.tile(np.arange(cfg.depth), (3, 1)))
  routed, plain = jax.jit(lambda p: (_gemma_apply("gather")(p, x, positions, mask, route["ids"],
                                                           route["gates"]),
                                      model.apply(p, x, positions, mask)))(params)
  for key in ("hidden", "final", "key", "value"):
    np.testing.assert_allclose(routed[key], plain[key], **TOL)


@functools.lru_cache(maxsize=None)
def _vlm(num_skip):
  cfg = vlm.get_config("tiny_gemma3", remat_policy="none",
                       router=ls.RouterConfig(num_skip=num_skip, **SMALL_ROUTER))
  model = vlm.VLM(cfg)
  rng = np.random.default_rng(9)
  images = rng.integers(0, 256, (2, 2, 32, 32, 3)).astype(np.uint8)
  image_mask = np.array([[1, 1], [1, 0]], bool)
  tokens = rng.integers(0, 128, (2, 5)).astype(np.int32)
  token_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  inputs = (images, image_mask, tokens, token_mask)
  params = _random_like(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs), 10)
  return cfg, model, params, inputs


def test_vlm_routes_prefix_and_queries_through_the_same_kept_layers():
  cfg, model, params, inputs = _vlm(2)
  assert "router" in params["params"]

  def query_of_router(router_params):   # forward mode: cheaper to compile than a VLM gradient
    out = model.apply({"params": {**params["params"], "router": router_params}}, *inputs,
                      skip_impl="gather")     # the kept layers alone ('auto' masks at batch 2)
    return out["query"], out

  def everything(params, router, tangent):   # one program: compile time is most of this test
    _, d_query, out = jax.jvp(query_of_router, (router,), (tangent,), has_aux=True)
    # The masked form runs from cached image features: that stage must still work with a router.
    feats = model.apply(params, inputs[0], method=model.image_features)
    masked = model.apply(params, None, *inputs[1:], cached={"image_features": feats},
                         skip_impl="masked")
    return d_query, out, masked

  router = params["params"]["router"]
  d_query, out, masked = jax.jit(everything)(params, router, _random_like(router, 12))
  l, d = cfg.llm.depth, cfg.llm.width
  assert out["visual"].shape == (l, 2, 8, d) and out["query"].shape == (l, 2, cfg.num_queries, d)
  assert set(out["route"]) == {"logits", "probs", "gates", "ids"} and out["route"]["ids"].shape == (2, 4)
  # The router reaches the queries through the gates (straight-through: forward 1, softmax's tangent).
  assert np.any(np.asarray(d_query) != 0)
  # Masked full depth (the public formulation): equal only if the queries' pass reads the kept layers
  # of the prefix with the same route (and if cached image features give the same prefix).
  for key in ("visual", "text", "query", "final"):
    np.testing.assert_allclose(out[key], masked[key], **TOL)
  # Every stage after the image features is refused.
  with pytest.raises(ValueError, match="router"):
    model.apply(params, *inputs, method=model.prefix)
  with pytest.raises(ValueError, match="router"):
    model.apply(params, *inputs, method=model.outputs)
  with pytest.raises(ValueError, match="router"):
    model.apply(params, None, *inputs[1:], cached={"visual": out["visual"], "query": out["query"]})
  with pytest.raises(ValueError, match="skip_impl"):
    model.apply(params, *inputs, skip_impl="scatter")


def test_skipped_layers_keep_their_module_paths_for_interceptors():
  # models/adapters.py wraps layers through a method interceptor keyed on module paths: a kept layer
  # must look like the scanned layer of the full model, and what a layer sows cannot be dropped silently.
  _, model, params, inputs = _vlm(2)
  seen = {}

  def record(key):
    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, gemma.Einsum) and context.method_name == "__call__":
        seen.setdefault(key, set()).add("/".join(context.module.path))
      return next_fun(*args, **kwargs)
    return interceptor

  for key, full_depth in (("full", True), ("routed", False)):
    with nn.intercept_methods(record(key)):
      jax.eval_shape(functools.partial(model.apply, full_depth=full_depth), params, *inputs)
  assert seen["routed"] == seen["full"] and "llm/layers/attn/attn_vec_einsum" in seen["full"]

  def sow(next_fun, args, kwargs, context):
    if isinstance(context.module, gemma.FeedForward):
      context.module.sow("intermediates", "aux", jnp.float32(1.0))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(sow), pytest.raises(ValueError, match="sow"):
    jax.eval_shape(model.apply, params, *inputs)


def test_vlm_full_depth_equals_the_backbone_without_router():
  _, model, params, inputs = _vlm(2)
  plain_model = vlm.VLM(vlm.get_config("tiny_gemma3", remat_policy="none"))
  plain_params = {"params": {k: v for k, v in params["params"].items() if k != "router"}}
  plain, full = jax.jit(lambda p, q: (plain_model.apply(q, *inputs), model.apply(p, *inputs, full_depth=True)))(
      params, plain_params)
  assert "route" not in full
  for key in ("visual", "text", "query", "final"):
    np.testing.assert_allclose(full[key], plain[key], **TOL)


def _np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _np_cogkd(h_t, h_s, mask, mix):
  """float64, one sample at a time, from the public code's formulas (masked token softmax)."""
  b, s, d = h_s.shape
  total = 0.0
  for i in range(b):
    valid = np.flatnonzero(mask[i])
    c = valid[-1]
    weights = np.ones(s)
    for h in (h_t[i], h_s[i]):
      scores = h[c] @ h_s[i].T / np.sqrt(d)
      wt = np.zeros(s)
      wt[valid] = _np_softmax(scores[valid])
      weights = weights * wt
    p, q = _np_softmax(h_t[i]), _np_softmax(h_s[i])
    kd = (1 - mix) * q * (np.log(q + 1e-8) - np.log(p + 1e-8)) + mix * (h_t[i] - h_s[i]) ** 2
    total += np.sum(weights[:, None] * kd)
  return total / (b * s * d)


def test_balance_and_cogkd_losses_match_numpy_float64():
  rng = np.random.default_rng(11)
  probs = _np_softmax(rng.standard_normal((5, 8)) * 2)
  gates, _ = ls.straight_through_topk(jnp.asarray(probs, jnp.float32), 3)
  mask = np.asarray(gates) == 1
  ref = np.mean(mask * probs)
  np.testing.assert_allclose(ls.balance_loss(jnp.asarray(probs, jnp.float32), gates), ref, rtol=1e-6)

  b, s, d = 3, 6, 16
  h_t = rng.standard_normal((b, s, d)) * 3     # magnitudes where the 1e-8 in the logs matters somewhat
  h_s = h_t + rng.standard_normal((b, s, d))
  token_mask = np.ones((b, s), bool)
  token_mask[1, 4:] = False
  token_mask[2, :2] = False
  h_t32, h_s32 = jnp.asarray(h_t, jnp.float32), jnp.asarray(h_s, jnp.float32)
  loss = jax.jit(ls.cogkd_loss)
  for mix in (0.5, 0.2):
    np.testing.assert_allclose(loss(h_t32, h_s32, token_mask, mix), _np_cogkd(h_t, h_s, token_mask, mix),
                               rtol=1e-5)
  g_t, g_s = jax.jit(jax.grad(ls.cogkd_loss, argnums=(0, 1)))(h_t32, h_s32, token_mask)
  assert np.all(np.asarray(g_t) == 0) and np.any(np.asarray(g_s) != 0)
  with pytest.raises(ValueError, match="token_mask"):
    ls.cogkd_loss(jnp.asarray(h_t), jnp.asarray(h_s), np.zeros((b, s), bool))
