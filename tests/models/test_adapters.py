"""Adapters (LoRA, VLA-GSE): the mechanism on every layer kind, spectral init, routing, merge, errors.

References are independent: numpy float64 reimplementations of the formulas (softmax / top-k / renorm,
the Switch aux loss, the GSE mixture), each layer kind's weight read as a matrix by hand (checked
against the layer's own einsum), and the model without adapters. Backbone parameters come from
`eval_shape` plus random values (compiling the initialisers costs more than these tests).
"""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2vla_jax.core import freezing
from m2vla_jax.core import tree_util
from m2vla_jax.models import adapters
from m2vla_jax.models import gemma
from m2vla_jax.models import vlm

GSE = dict(kind="gse", rank=8, num_generalized=1, num_specialized=3, top_k=2)   # 4 experts of rank 2


def _vlm_inputs(cfg, b=2, t=5, seed=0):
  rng = np.random.default_rng(seed)
  if cfg.img is None:
    images = image_mask = None
  else:
    images = rng.integers(0, 256, (b, 1, *vlm.image_hw(cfg.img), 3)).astype(np.uint8)
    image_mask = np.ones((b, 1), bool)
  return images, image_mask, rng.integers(0, 128, (b, t)).astype(np.int32), np.ones((b, t), bool)


def _fill(shapes, seed, config=None, std=0.2):
  """Random values for a shape tree; adapter leaves as `adapters.init` makes them (B = 0, scales)."""
  rng = np.random.default_rng(seed)
  flat = tree_util.flatten(shapes)
  out = {}
  for path, s in flat.items():
    if path.endswith(("_lora_b", "_gse_b")):
      out[path] = np.zeros(s.shape, np.float32)
    elif path.endswith("_gse_scale"):
      d_in = flat[path[:-len("_scale")] + "_a"].shape[-2]
      out[path] = np.full(s.shape, config.expert_scale(d_in), np.float32)
    else:
      out[path] = (std * rng.standard_normal(s.shape)).astype(np.float32)
  return tree_util.unflatten(out)


@functools.lru_cache(maxsize=None)
def _vlm(name, **adapter_fields):
  """(VLM config, model, AdapterConfig, inputs, random variables with fresh adapters)."""
  cfg = vlm.get_config(name, remat_policy="none")
  model = vlm.VLM(cfg)
  config = adapters.AdapterConfig(**adapter_fields)
  inputs = _vlm_inputs(cfg)
  shapes = jax.eval_shape(lambda r: adapters.init(config, model, r, *inputs), jax.random.PRNGKey(0))
  return cfg, model, config, inputs, _fill(shapes, 0, config)


def _drop_adapters(tree):
  pattern = re.compile(f"{adapters.ADAPTER_PARAM_REGEX}|{adapters.ADAPTER_CONSTANT_REGEX}")
  return tree_util.unflatten({p: v for p, v in tree_util.flatten(tree).items() if not pattern.fullmatch(p)})


# Each layer kind's weight as [d_in, d_out] matrices (one per fused slice), written out by hand.
def _matrices(kind, w):
  if kind == "q_einsum/w":                                    # [N, D, H]
    return [w.transpose(1, 0, 2).reshape(w.shape[1], -1)]
  if kind == "kv_einsum/w":                                   # [2, K, D, H]
    return [w[c].transpose(1, 0, 2).reshape(w.shape[2], -1) for c in range(w.shape[0])]
  if kind == "attn_vec_einsum/w":                             # [N, H, D]
    return [w.reshape(-1, w.shape[-1])]
  if kind == "gating_einsum":                                 # [2, D, F]
    return [w[0], w[1]]
  return [w]                                                  # linear [F, D]


def test_hand_written_matrices_are_the_layers_linear_maps():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 4))
  w = rng.standard_normal((2, 4, 5))                          # q_einsum [N, D, H]
  np.testing.assert_allclose(np.einsum("td,ndh->tnh", x, w).reshape(3, -1),
                             x @ _matrices("q_einsum/w", w)[0], rtol=1e-12)
  w = rng.standard_normal((2, 3, 4, 5))                       # kv_einsum [C, K, D, H]
  y = np.einsum("sd,ckdh->cskh", x, w)
  for c, m in enumerate(_matrices("kv_einsum/w", w)):
    np.testing.assert_allclose(y[c].reshape(3, -1), x @ m, rtol=1e-12)
  w = rng.standard_normal((2, 2, 6))                          # attn_vec [N, H, D]
  np.testing.assert_allclose(np.einsum("tnh,nhd->td", x.reshape(3, 2, 2), w),
                             x @ _matrices("attn_vec_einsum/w", w)[0], rtol=1e-12)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="top_k"):
    adapters.AdapterConfig(kind="gse", rank=8, num_specialized=3, top_k=4)
  with pytest.raises(ValueError, match="rank=10 is not divisible"):
    adapters.AdapterConfig(kind="gse", rank=10, num_generalized=1, num_specialized=3)
  with pytest.raises(ValueError, match="kind"):
    adapters.AdapterConfig(kind="dora")
  with pytest.raises(ValueError, match="svd"):
    adapters.AdapterConfig(kind="gse", svd="lanczos")
  with pytest.raises(ValueError, match="targets"):
    adapters.AdapterConfig(targets="(")
  assert adapters.AdapterConfig(kind="gse").dropout == 0.05
  assert adapters.AdapterConfig(kind="lora").dropout == 0.0


def _trace_init(config, name="tiny_text"):
  """(wrapper, variable shapes) of adapters.init traced on a VLM (no compile)."""
  cfg = vlm.get_config(name, remat_policy="none")
  model, inputs = vlm.VLM(cfg), _vlm_inputs(cfg)
  with adapters.wrap(config) as wrapper:
    jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)
  shapes = jax.eval_shape(lambda r: adapters.init(config, model, r, *inputs), jax.random.PRNGKey(0))
  return wrapper, shapes


def test_layer_selection_errors_and_gse_skip_rule():
  # gemma3_tiny: width 32, 4 query heads of 16, one kv head (k and v slices are 32 -> 16).
  with pytest.raises(ValueError, match="targets='llm/.\\*/nothing' matches no wrappable layer"):
    _trace_init(adapters.AdapterConfig(targets="llm/.*/nothing"))
  with pytest.raises(ValueError, match="rank=17 exceeds min.*kv_einsum"):
    _trace_init(adapters.AdapterConfig(kind="lora", rank=17))
  with pytest.raises(ValueError, match="rank=64 exceeds min.*every layer.*reference"):
    _trace_init(adapters.AdapterConfig(**{**GSE, "rank": 64}))
  # GSE at rank 24: the 16-wide k / v projections are skipped (as the reference skips them), the rest
  # wrapped; skipped layers get no adapter parameters.
  wrapper, shapes = _trace_init(adapters.AdapterConfig(**{**GSE, "rank": 24}))
  assert set(wrapper.skipped) == {"llm/layers/attn/kv_einsum/w"}
  assert set(wrapper.wrapped) == {f"llm/layers/{p}" for p in (
      "attn/q_einsum/w", "attn/attn_vec_einsum/w", "mlp/gating_einsum", "mlp/linear")}
  paths = adapters.adapter_param_paths(shapes)
  assert not [p for p in paths if "kv_einsum" in p]
  assert "params/llm/layers/attn/q_einsum/w_gse_router" in paths
  assert tree_util.flatten(shapes)["params/llm/layers/mlp/gating_einsum_gse_a"].shape == (6, 2, 4, 32, 6)


def test_route_top_k_renormalised_and_aux_loss():
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((2, 9, 5)).astype(np.float32)     # [slices, tokens, experts]
  gates, probs, aux = adapters.route(jnp.asarray(logits), 2)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  idx = np.argsort(-p, axis=-1)[..., :2]
  want = np.zeros_like(p)
  np.put_along_axis(want, idx, np.take_along_axis(p, idx, -1), -1)
  want = want / want.sum(-1, keepdims=True)
  np.testing.assert_allclose(probs, p, rtol=1e-6)
  np.testing.assert_allclose(gates, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gates).sum(-1), 1.0, rtol=1e-6)
  assert ((np.asarray(gates) > 0).sum(-1) == 2).all()
  counts = np.stack([np.bincount(i.reshape(-1), minlength=5) for i in idx])
  np.testing.assert_allclose(aux, 5 * np.sum(counts / 9 * p.mean(1), -1), rtol=1e-6)


class _Layers(nn.Module):
  """One layer of each kind outside the Gemma stack: a fused einsum, an einsum with a two-axis
  input, a Dense and a DenseGeneral contracting two axes (SigLIP / DINOv2 attention's `out`)."""

  @nn.compact
  def __call__(self, x):                                      # x [B, T, 12]
    init = nn.initializers.normal(0.3)
    b, t, _ = x.shape
    kv = gemma.Einsum((2, 2, 12, 6), init, name="kv_einsum")("BSD,CKDH->CBSKH", x)
    vec = gemma.Einsum((3, 4, 10), init, name="attn_vec_einsum")("BTNH,NHD->BTD", x.reshape(b, t, 3, 4))
    dense = nn.Dense(10, name="proj")(x)
    general = nn.DenseGeneral(10, axis=(-2, -1), name="out")(x.reshape(b, t, 3, 4))
    return {"kv": kv, "vec": vec, "dense": dense, "general": general}


def _np_gse(x, w, a, b, s, router, n_gen, top_k):
  """float64 reference of one GSE-wrapped linear: (y [N, d_out], aux)."""
  logits = x @ router
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  idx = np.argsort(-p, axis=-1)[:, :top_k]
  top = np.take_along_axis(p, idx, -1)
  top = top / top.sum(-1, keepdims=True)
  y = x @ w
  for e in range(n_gen):
    y = y + s[e] * (x @ a[e] @ b[e]) / n_gen
  for n in range(x.shape[0]):
    for j, wj in zip(idx[n], top[n]):
      y[n] += wj * s[n_gen + j] * (x[n] @ a[n_gen + j] @ b[n_gen + j])
  n_spec = router.shape[1]
  counts = np.bincount(idx.reshape(-1), minlength=n_spec)
  return y, n_spec * np.sum(counts / x.shape[0] * p.mean(0))


def test_init_values():
  # LoRA: A uniform +-1/sqrt(d_in) (PEFT's kaiming_uniform(a=sqrt 5)), B = 0. GSE: the same for A and
  # the router (torch's default Linear init, which the reference leaves in place), B = 0,
  # s = sqrt(3 eta d_in / r_e).
  module = nn.Dense(10, name="proj")
  x = np.ones((3, 12), np.float32)
  for fields in (dict(kind="lora", rank=4), GSE):
    config = adapters.AdapterConfig(**fields)
    flat = tree_util.flatten(jax.jit(lambda r: adapters.init(config, module, r, x))(jax.random.PRNGKey(0)))
    leaves = ("lora_a", "lora_b") if config.kind == "lora" else ("gse_a", "gse_b", "gse_router", "gse_scale")
    assert {p for p in flat if "_" in p} == {f"params/kernel_{leaf}" for leaf in leaves}
    for leaf in leaves:
      value = np.asarray(flat[f"params/kernel_{leaf}"])
      if leaf.endswith("_b"):
        assert not np.any(value)
      elif leaf == "gse_scale":
        np.testing.assert_allclose(value, np.sqrt(3 * 12 / 2), rtol=1e-6)
      else:
        assert 0.5 / np.sqrt(12) < np.abs(value).max() <= 1 / np.sqrt(12)


def test_gse_layers_match_float64_reference():
  config = adapters.AdapterConfig(**GSE)
  module = _Layers()
  x = np.random.default_rng(3).standard_normal((2, 5, 12)).astype(np.float32)
  shapes = jax.eval_shape(lambda r: adapters.init(config, module, r, x), jax.random.PRNGKey(0))
  flat = tree_util.flatten(_fill(shapes, 3, config, std=0.3))
  # Random B and a stronger router, so that experts differ and routing varies per token.
  rng = np.random.default_rng(4)
  for p in flat:
    if p.endswith(("_gse_b", "_gse_router")):
      flat[p] = (rng.standard_normal(flat[p].shape) * (0.3 if p.endswith("_b") else 2.0)).astype(np.float32)
  variables = tree_util.unflatten(flat)
  out, aux = jax.jit(lambda v: adapters.apply(config, module, v, x))(variables)
  f64 = lambda path: np.asarray(flat[f"params/{path}"], np.float64)
  xf = x.reshape(10, 12).astype(np.float64)
  total_aux = 0.0
  cases = {"kv": ("kv_einsum/w", [f64("kv_einsum/w")[c].transpose(1, 0, 2).reshape(12, 12)
                                  for c in range(2)]),
           "vec": ("attn_vec_einsum/w", [f64("attn_vec_einsum/w").reshape(12, 10)]),
           "dense": ("proj/kernel", [f64("proj/kernel")]),
           "general": ("out/kernel", [f64("out/kernel").reshape(12, 10)])}
  for key, (path, mats) in cases.items():
    a, b, s, r = (f64(path + leaf) for leaf in ("_gse_a", "_gse_b", "_gse_scale", "_gse_router"))
    if len(mats) == 1:
      a, b, s, r = a[None], b[None], s[None], r[None]
    got = np.asarray(out[key], np.float64)
    for c, w in enumerate(mats):
      want, aux_c = _np_gse(xf, w, a[c], b[c], s[c], r[c], 1, 2)
      total_aux += aux_c
      if key in ("dense", "general"):
        bias = f64(path.replace("kernel", "bias"))
        want = want + bias
      got_c = got[c].reshape(10, -1) if key == "kv" else got.reshape(10, -1)
      np.testing.assert_allclose(got_c, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(aux, total_aux, rtol=1e-5)


class _DenseBody(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.Dense(12, name="fc")(x), None


class _ScanNoIntermediates(nn.Module):
  """A layer scan that does not scan 'intermediates': values sown inside it are dropped by flax."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_DenseBody, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=nn.broadcast, length=2)
    return scan(name="layers")(x, None)[0]


class _Optional(nn.Module):
  @nn.compact
  def __call__(self, x, second=True):
    x = nn.Dense(12, name="first")(x)
    return nn.Dense(12, name="second")(x) if second else x


def test_unused_adapters_are_an_error():
  config = adapters.AdapterConfig(kind="lora", rank=4)
  x = np.ones((2, 12), np.float32)
  shapes = jax.eval_shape(lambda r: adapters.init(config, _Optional(), r, x), jax.random.PRNGKey(0))
  variables = _fill(shapes, 0, config)
  jax.eval_shape(lambda v: adapters.apply(config, _Optional(), v, x), variables)
  with pytest.raises(ValueError, match="adapters of \\['second/kernel'\\].*not used"):
    jax.eval_shape(lambda v: adapters.apply(config, _Optional(), v, x, second=False), variables)


def test_aux_loss_lost_in_a_scan_is_an_error():
  config = adapters.AdapterConfig(**GSE)
  module = _ScanNoIntermediates()
  x = np.ones((2, 12), np.float32)
  shapes = jax.eval_shape(lambda r: adapters.init(config, module, r, x), jax.random.PRNGKey(0))
  assert tree_util.flatten(shapes)["params/layers/fc/kernel_gse_a"].shape == (2, 4, 12, 2)
  with pytest.raises(ValueError, match="never reached 'intermediates'.*variable_axes"):
    jax.eval_shape(lambda v: adapters.apply(config, module, v, x), _fill(shapes, 0, config))


def _check_spectral(params, config, tol):
  """Per weight, layer and slice (float64): s_e A_e B_e = U_e S_e V_e^T / rho for the e-th pair of
  components of the exact SVD of W, and W' + sum_e s_e A_e B_e = W."""
  orig = tree_util.flatten(params)
  init = tree_util.flatten(adapters.gse_spectral_init(params, config))
  kinds = ("q_einsum/w", "kv_einsum/w", "attn_vec_einsum/w", "gating_einsum", "linear")
  checked = set()
  for path in orig:
    kind = next((k for k in kinds if path.endswith("/" + k) and path + "_gse_a" in orig), None)
    if kind is None:
      continue
    checked.add(kind)
    w0, w1 = (np.asarray(t[path], np.float64) for t in (orig, init))
    a, b, s = (np.asarray(init[path + leaf], np.float64) for leaf in ("_gse_a", "_gse_b", "_gse_scale"))
    for layer in range(w0.shape[0]):
      mats0, mats1 = _matrices(kind, w0[layer]), _matrices(kind, w1[layer])
      al, bl, sl = a[layer], b[layer], s[layer]
      if len(mats0) == 1:
        al, bl, sl = al[None], bl[None], sl[None]
      for c, (m0, m1) in enumerate(zip(mats0, mats1)):
        u, sv, vt = np.linalg.svd(m0, full_matrices=False)
        r = config.rank
        truncation = u[:, :r] * sv[:r] @ vt[:r] / config.rho
        experts = [sl[c][e] * al[c][e] @ bl[c][e] for e in range(config.num_experts)]
        norm = np.linalg.norm(truncation)
        assert np.linalg.norm(sum(experts) - truncation) < tol * norm
        for e, got in enumerate(experts):   # descending: generalized first, then disjoint pairs
          k = slice(e * config.expert_rank, (e + 1) * config.expert_rank)
          want = u[:, k] * sv[k] @ vt[k] / config.rho
          assert np.linalg.norm(got - want) < tol * norm
        np.testing.assert_allclose(m1 + sum(experts), m0, rtol=0, atol=1e-6 * np.abs(m0).max())
        np.testing.assert_allclose(sl[c][:config.num_generalized],
                                   np.sqrt(3 * config.eta * m0.shape[0] / config.expert_rank), rtol=1e-6)
  assert checked == set(kinds)
  return init


def test_spectral_init_is_the_rank_r_truncation_over_rho():
  _, _, config, _, params = _vlm("tiny_text", **GSE, svd="exact")
  # 1e-4 of |W_r|: float32 SVD (LAPACK) against float64, ~1e-6 per component, singular gaps ~0.1.
  init = _check_spectral(params, config, 1e-4)
  with pytest.raises(ValueError, match="non-zero.*once"):
    adapters.gse_spectral_init(tree_util.unflatten(init), config)


def _forced_on_error(params, init, config, path, kind):
  """max over layers / slices of |W'x + sum_e s_e (x A_e) B_e - W x| / |W x| with every expert's gate 1."""
  x = np.random.default_rng(5).standard_normal((7, params[path + "_gse_a"].shape[-2]))
  worst = 0.0
  for layer in range(params[path].shape[0]):
    w0, w1 = _matrices(kind, np.asarray(params[path][layer])), _matrices(kind, np.asarray(init[path][layer]))
    a, b, s = (np.asarray(init[path + leaf][layer]) for leaf in ("_gse_a", "_gse_b", "_gse_scale"))
    if len(w0) == 1:
      a, b, s = a[None], b[None], s[None]
    for c in range(len(w0)):
      y = x.astype(np.float32) @ w1[c] + np.asarray(adapters.expert_sum(
          jnp.asarray(x, jnp.float32), a[c], b[c], s[c], jnp.ones((7, config.num_experts))))
      want = x @ np.asarray(w0[c], np.float64)
      worst = max(worst, np.linalg.norm(y - want) / np.linalg.norm(want))
  return worst


@pytest.mark.parametrize("fields", [
    dict(svd="exact"),
    dict(svd="randomized", targets=".*/mlp/linear"),
    dict(svd="exact", balance_grad_scale=True, targets=".*/mlp/linear")])
def test_every_expert_on_gives_back_w(fields):
  # W' = W - sum_i s_i B_i A_i holds for whatever factors the SVD gives (exact or randomized), so
  # with every expert's gate at 1 the wrapped layer is W x; 1e-5 relative: float32 rounding of W'
  # (one subtraction) and of the two products, a few ulp each over d_in = 32..64 terms.
  _, _, config, _, params = _vlm("tiny_text", **GSE, **fields)
  flat = tree_util.flatten(params)
  init = tree_util.flatten(adapters.gse_spectral_init(params, config))
  unflat = lambda f: {p[len("params/"):]: v for p, v in f.items()}  # noqa: E731
  for path, kind in (("llm/layers/attn/kv_einsum/w", "kv_einsum/w"), ("llm/layers/mlp/linear", "linear")):
    if path + "_gse_a" in unflat(flat):
      assert _forced_on_error(unflat(flat), unflat(init), config, path, kind) < 1e-5
  if config.svd == "randomized":   # seeded: the same tree again, another seed another basis
    again = tree_util.flatten(adapters.gse_spectral_init(params, config))
    np.testing.assert_array_equal(again["params/llm/layers/mlp/linear_gse_a"],
                                  init["params/llm/layers/mlp/linear_gse_a"])
    other = adapters.gse_spectral_init(params, adapters.AdapterConfig(**{**vars(config), "svd_seed": 7}))
    assert not np.allclose(tree_util.flatten(other)["params/llm/layers/mlp/linear_gse_a"],
                           init["params/llm/layers/mlp/linear_gse_a"])
  if config.balance_grad_scale:    # specialized s_j = s_base * mean(tr) / tr_j from W's spectrum
    w = np.asarray(flat["params/llm/layers/mlp/linear"][0], np.float64)
    sv = np.linalg.svd(w, compute_uv=False)[:config.rank].reshape(config.num_experts, -1).sum(-1)[1:]
    np.testing.assert_allclose(init["params/llm/layers/mlp/linear_gse_scale"][0, 1:],
                               config.s_base * sv.mean() / sv, rtol=1e-4)


def test_lora_starts_as_the_base_model_and_merges_exactly():
  cfg, model, config, inputs, params = _vlm("tiny", kind="lora", rank=4, alpha=8.0)
  base = _drop_adapters(params)
  assert adapters.adapter_param_paths(base) == []
  plain = jax.jit(lambda v: model.apply(v, *inputs))
  adapted = jax.jit(lambda v: adapters.apply(config, model, v, *inputs)[0])
  # B = 0: the adapted model computes the base one. Two compiled programs (the adapter adds an exact
  # zero, but XLA may fuse the rest differently), so 1e-6 rather than bitwise.
  want, got = plain(base), adapted(params)
  for key in ("visual", "text", "query", "final"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6)
  # Perturbed B: merged weights (no adapters at run time) compute what the adapters do, up to float32
  # re-association of W x + s B (A x) vs (W + s B A) x.
  rng = np.random.default_rng(6)
  flat = tree_util.flatten(params)
  for p in flat:
    if p.endswith("_lora_b"):
      flat[p] = (0.2 * rng.standard_normal(flat[p].shape)).astype(np.float32)
  perturbed = tree_util.unflatten(flat)
  got = adapted(perturbed)
  merged = adapters.merge_lora(perturbed, config)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
  merged_out = plain(merged)
  for key in ("visual", "text", "query", "final"):
    scale = np.abs(got[key]).max()
    assert np.abs(got[key] - want[key]).max() > 1e-2 * scale   # the adapters do change the model
    np.testing.assert_allclose(merged_out[key], got[key], rtol=1e-4, atol=1e-5 * scale)


_FFN = gemma.GemmaConfig(variant="test", version=1, width=12, depth=1, mlp_dim=16, num_heads=2,
                         num_kv_heads=2, head_dim=6, vocab_size=8, remat_policy="none")


class _Block(nn.Module):
  """A scan body with a fused einsum, the gated MLP and a Dense, scanned as the backbone's layers."""

  @nn.compact
  def __call__(self, x, _):
    b, t, d = x.shape
    kv = gemma.Einsum((2, 2, 12, 6), nn.initializers.normal(0.3), name="kv_einsum")("BSD,CKDH->CBSKH", x)
    y = x + gemma.FeedForward(_FFN, name="mlp")(x) + kv.reshape(2, b, t, d).sum(0)
    return y + jnp.mean(nn.Dense(10, name="proj")(x), axis=-1, keepdims=True), None


class _Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_Block, variable_axes={"params": 0, "intermediates": 0},
                   split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast, length=2)
    return scan(name="blocks")(x, None)[0]


def test_gse_gradients_reach_only_adapters_and_routers():
  config = adapters.AdapterConfig(**GSE, svd="exact")
  module = _Stack()
  x = np.random.default_rng(7).standard_normal((2, 5, 12)).astype(np.float32)
  shapes = jax.eval_shape(lambda r: adapters.init(config, module, r, x), jax.random.PRNGKey(0))
  flat = tree_util.flatten(_fill(shapes, 1, config, std=0.3))
  for p in flat:   # B != 0 (as after the spectral init), so that A and the router get gradients
    if p.endswith("_gse_b"):
      flat[p] = np.full(flat[p].shape, 0.1, np.float32)
  params = tree_util.unflatten(flat)
  mask = freezing.trainable_mask(params, [(adapters.ADAPTER_PARAM_REGEX, True), (".*", False)])

  def loss(p):
    p = jax.tree_util.tree_map(lambda m, v: v if m else jax.lax.stop_gradient(v), mask, p)
    out, aux = adapters.apply(config, module, p, x)
    return jnp.mean(out ** 2) + config.aux_weight * aux, aux

  (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert np.isfinite(value) and aux > 0
  trainable = tree_util.flatten(mask)
  adapted = set()
  for path, g in tree_util.flatten(grads).items():
    if trainable[path]:
      adapted.add(path)
      assert np.abs(g).max() > 0, path
    else:
      assert not np.any(g), path
  weights = ("kv_einsum/w", "proj/kernel", "mlp/gating_einsum", "mlp/linear")
  assert adapted == {f"params/blocks/{w}_{leaf}" for w in weights
                     for leaf in ("gse_a", "gse_b", "gse_router")}


def test_gse_on_the_vlm_with_dropout():
  # A weight in each scan (SigLIP attention output, Gemma's fused qkv) and the SigLIP head (the
  # projector): the backbone's scans must carry the dropout rngs in and the sown aux losses out.
  targets = ".*(MultiHeadDotProductAttention_0/out/kernel|img/head/kernel|qkv_einsum/w)"
  _, model, config, inputs, params = _vlm("tiny", **GSE, svd="exact", dropout=0.3, targets=targets)
  before = tree_util.flatten(params)
  params = adapters.gse_spectral_init(params, config)
  # SigLIP attention's DenseGeneral kernel [L, h, hd, W] read as [L, h*hd, W]: W' + sum_e s_e A_e B_e = W.
  after = tree_util.flatten(params)
  p = "params/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel"
  experts = np.einsum("le,ledr,lero->ldo", after[p + "_gse_scale"], after[p + "_gse_a"], after[p + "_gse_b"])
  np.testing.assert_allclose(np.reshape(after[p], experts.shape) + experts,
                             np.reshape(before[p], experts.shape), atol=1e-6)
  run = jax.jit(lambda p, key: adapters.apply(config, model, p, *inputs, deterministic=False,
                                              rngs={"dropout": key}))
  (out1, aux1), (out2, aux2) = run(params, jax.random.PRNGKey(1)), run(params, jax.random.PRNGKey(2))
  assert not np.allclose(out1["query"], out2["query"])
  # Terms: 2 layers x (SigLIP out + qkv's 3 slices) + the head, each in (0, n_spec * top_k].
  assert 0 < aux1 <= (2 * (1 + 3) + 1) * config.num_specialized * config.top_k
  assert np.isfinite(aux2)
  with pytest.raises(ValueError, match="rngs=\\{'dropout': key\\}"):
    adapters.apply(config, model, params, *inputs, deterministic=False)


@pytest.mark.parametrize("rate", [0.05, 0.3])
def test_dropout_mask_rate_and_independence(rate):
  # Two 16-bit draws per threefry word: the rate is quantised to 1/65536 and the returned keep
  # probability is that exact value; draws sharing a word, and experts' masks, are independent.
  shape = (4, 1000, 257)          # odd last axis: the draws do not line up with words per row
  keep, keep_prob = adapters.dropout_keep_mask(jax.random.PRNGKey(0), rate, shape)
  keep = np.asarray(keep)
  assert keep.shape == shape and keep.dtype == bool
  assert keep_prob == 1 - round(rate * 65536) / 65536 and abs(keep_prob - (1 - rate)) < 1e-5
  n, q = keep.size, 1 - keep_prob
  sigma = lambda p, m: 5 * np.sqrt(p * (1 - p) / m)   # 5 standard deviations of a binomial mean
  assert abs((~keep).mean() - q) < sigma(q, n)
  flat = keep.reshape(-1)[: n // 2 * 2].reshape(-1, 2)     # the two halves of one 32-bit word
  assert abs((~flat[:, 0] & ~flat[:, 1]).mean() - q * q) < sigma(q * q, len(flat))
  both = ~keep[0] & ~keep[1]                                # two experts' masks
  assert abs(both.mean() - q * q) < sigma(q * q, both.size)
  again, _ = adapters.dropout_keep_mask(jax.random.PRNGKey(0), rate, shape)
  other, _ = adapters.dropout_keep_mask(jax.random.PRNGKey(1), rate, shape)
  assert np.array_equal(np.asarray(again), keep) and not np.array_equal(np.asarray(other), keep)
