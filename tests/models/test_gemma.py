"""Gemma decoder: masks vs brute force, published sizes vs transformers, padding/remat/dtype behaviour.

Numerical parity with transformers lives in tests/models/test_hf_parity.py; here we pin what parity cannot see.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from m2vla_jax.core import tree_util  # noqa: E402
from m2vla_jax.models import gemma  # noqa: E402


def _init(cfg, b=2, t=9, seed=0):
  model = gemma.Gemma(cfg)
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (b, t, cfg.width))
  positions = jnp.tile(jnp.arange(t, dtype=jnp.int32)[None], (b, 1))
  mask = gemma.causal_mask(jnp.ones((b, t), bool))
  # Random values for every leaf (norm scales init to zero; all parameters should matter). Shapes come
  # from eval_shape: compiling the initializers costs more than the tests on a loaded 2-core machine.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), x, positions, mask)
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  return model, params, x, positions, mask


def test_masks_match_brute_force():
  rng = np.random.default_rng(0)
  b, t = 3, 7
  input_mask = rng.random((b, t)) > 0.3
  prefix = np.zeros((b, t), bool)
  prefix[:, :3] = True
  causal = np.asarray(gemma.causal_mask(input_mask))
  plm = np.asarray(gemma.prefix_lm_mask(input_mask, prefix))
  for s in range(b):
    for i in range(t):
      for j in range(t):
        valid = input_mask[s, i] and input_mask[s, j]
        assert causal[s, i, j] == (valid and j <= i)
        assert plm[s, i, j] == (valid and (j <= i or (prefix[s, i] and prefix[s, j])))


_HF_SIZES = {
    "gemma_2b": lambda: tf.GemmaConfig(vocab_size=257_152, hidden_size=2048, intermediate_size=16_384,
                                       num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                                       head_dim=256),
    "gemma2_2b": lambda: tf.Gemma2Config(vocab_size=257_152),  # defaults are Gemma 2 2B
    "gemma3_270m": lambda: tf.Gemma3TextConfig(
        vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512),
    "gemma3_4b": lambda: tf.Gemma3TextConfig(
        vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024),
}


@pytest.mark.parametrize("variant", sorted(_HF_SIZES))
def test_published_sizes_match_transformers(variant):
  """Parameter count and per-layer pattern of full-size variants vs transformers (built on 'meta')."""
  cfg = gemma.get_config(variant)
  hf_cfg = _HF_SIZES[variant]()
  with torch.device("meta"):
    ref = {1: tf.GemmaModel, 2: tf.Gemma2Model, 3: tf.Gemma3TextModel}[cfg.version](hf_cfg)
  hf_count = sum(p.numel() for p in ref.parameters())
  b, t = 1, 4
  shapes = jax.eval_shape(gemma.Gemma(cfg).init, jax.random.PRNGKey(0), jnp.zeros((b, t, cfg.width)),
                          jnp.zeros((b, t), jnp.int32), jnp.ones((b, t, t), bool))
  ours = sum(int(np.prod(s.shape)) for s in tree_util.flatten(shapes).values())
  assert ours == hf_count
  if cfg.version > 1:
    hf_local = [lt == "sliding_attention" for lt in hf_cfg.layer_types]
    assert cfg.layer_is_local().tolist() == hf_local
    assert cfg.sliding_window == hf_cfg.sliding_window
    assert cfg.query_pre_attn_scalar == hf_cfg.query_pre_attn_scalar
    assert cfg.attn_logit_softcap == hf_cfg.attn_logit_softcapping
    assert cfg.final_logit_softcap == hf_cfg.final_logit_softcapping
  if cfg.version == 3:
    assert cfg.rope_base_local == hf_cfg.rope_parameters["sliding_attention"]["rope_theta"]
    assert cfg.rope_base_global == hf_cfg.rope_parameters["full_attention"]["rope_theta"]


def test_hidden_per_layer_and_final_norm():
  cfg = gemma.get_config("gemma3_tiny", remat_policy="none")
  model, params, x, positions, mask = _init(cfg)
  out = jax.jit(model.apply)(params, x, positions, mask)
  assert out["hidden"].shape == (cfg.depth, 2, 9, cfg.width)
  last = np.asarray(out["hidden"][-1], np.float64)
  scale = np.asarray(params["params"]["final_norm"]["scale"], np.float64)
  ref = last / np.sqrt(np.mean(last ** 2, -1, keepdims=True) + cfg.norm_eps) * (1 + scale)
  np.testing.assert_allclose(out["final"], ref, rtol=1e-5, atol=1e-5)
  # Layers differ from each other (the scan did not return one layer L times).
  assert not np.allclose(out["hidden"][0], out["hidden"][1])


@pytest.mark.parametrize("variant", ["gemma2_tiny", "gemma3_tiny"])
def test_padding_inside_sequence_changes_nothing(variant):
  """Pad tokens in the middle, with gap-free positions, leave the valid tokens' outputs unchanged.

  Also pins that sliding windows count positions, not array indices.
  """
  cfg = gemma.get_config(variant, remat_policy="none")
  model, params, x, positions, mask = _init(cfg, b=1, t=9)
  ref = jax.jit(model.apply)(params, x, positions, mask)
  pad_at = 4
  x_pad = jnp.concatenate([x[:, :pad_at], 7.0 * jnp.ones((1, 3, cfg.width)), x[:, pad_at:]], axis=1)
  valid = np.ones((1, 12), bool)
  valid[0, pad_at:pad_at + 3] = False
  pos_pad = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  out = jax.jit(model.apply)(params, x_pad, pos_pad, gemma.causal_mask(valid))
  np.testing.assert_allclose(out["hidden"][:, :, valid[0]], ref["hidden"], rtol=2e-5, atol=2e-5)


@pytest.mark.slow  # two XLA grad compilations: ~25 s on a loaded 2-core machine
def test_remat_and_unroll_do_not_change_values_or_grads():
  cfg = gemma.get_config("gemma2_tiny", remat_policy="none")
  model, params, x, positions, mask = _init(cfg)

  def loss(p, m):
    return jnp.sum(m.apply(p, x, positions, mask)["final"] ** 2)

  ref_loss, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(p, model)))(params)
  for overrides in (dict(remat_policy="nothing_saveable", scan_unroll=2),):
    other = gemma.Gemma(gemma.get_config("gemma2_tiny", **overrides))
    val, grad = jax.jit(jax.value_and_grad(lambda p: loss(p, other)))(params)
    np.testing.assert_allclose(val, ref_loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad, ref_grad)


def test_bfloat16_compute_tracks_float32():
  cfg = gemma.get_config("gemma3_tiny", remat_policy="none")
  model, params, x, positions, mask = _init(cfg)
  ref = jax.jit(model.apply)(params, x, positions, mask)["final"]
  bf = gemma.Gemma(gemma.get_config("gemma3_tiny", remat_policy="none", dtype="bfloat16"))
  out = jax.jit(bf.apply)(params, x, positions, mask)
  assert out["final"].dtype == jnp.bfloat16 and out["hidden"].dtype == jnp.bfloat16
  err = np.linalg.norm(np.asarray(out["final"], np.float32) - ref) / np.linalg.norm(ref)
  assert err < 3e-2
  # Parameters stay float32 whatever the compute dtype.
  p = jax.eval_shape(bf.init, jax.random.PRNGKey(0), x, positions, mask)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(p))


def test_embed_scaling_and_softcapped_logits():
  cfg = gemma.get_config("gemma2_tiny", remat_policy="none")
  model, params, x, positions, mask = _init(cfg)
  tokens = jnp.array([[1, 5, 9]], jnp.int32)
  emb = model.apply(params, tokens, method=model.embed)
  table = np.asarray(params["params"]["embedder"]["input_embedding"])
  np.testing.assert_allclose(emb[0], table[[1, 5, 9]] * np.sqrt(cfg.width), rtol=1e-6)
  logits = model.apply(params, 50.0 * x, method=model.logits)
  assert logits.shape == (2, 9, cfg.vocab_size)
  assert float(jnp.max(jnp.abs(logits))) <= cfg.final_logit_softcap
  raw = np.asarray(50.0 * x) @ table.T
  np.testing.assert_allclose(logits, np.tanh(raw / 30.0) * 30.0, rtol=1e-4, atol=1e-4)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="unknown Gemma variant 'gemma_9z'"):
    gemma.get_config("gemma_9z")
  with pytest.raises(ValueError, match="widht"):
    gemma.get_config("gemma_tiny", widht=3)
  with pytest.raises(ValueError, match="remat_policy"):
    gemma.get_config("gemma_tiny", remat_policy="everything")
  with pytest.raises(ValueError, match="num_kv_heads"):
    gemma.get_config("gemma_tiny", num_kv_heads=3)
  model, params, x, positions, mask = _init(gemma.get_config("gemma_tiny"))
  with pytest.raises(ValueError, match="attn_mask"):
    model.apply(params, x, positions, mask[:, :, :-1])


def test_dot_product_attention_impl_matches_einsum():
  cfg = gemma.get_config("gemma3_tiny", remat_policy="none")
  model, params, x, positions, mask = _init(cfg)
  ref = jax.jit(model.apply)(params, x, positions, mask)
  other = gemma.Gemma(gemma.get_config("gemma3_tiny", remat_policy="none", attn_impl="dot_product_attention"))
  out = jax.jit(other.apply)(params, x, positions, mask)
  np.testing.assert_allclose(out["hidden"], ref["hidden"], rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="attn_logit_softcap"):
    gemma.get_config("gemma2_tiny", attn_impl="dot_product_attention")
